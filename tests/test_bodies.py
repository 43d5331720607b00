"""Masks and bodies: what is spooled is masked, decoded and bounded, through a real Tornado app."""

from __future__ import annotations

import glob
import gzip
import json
import logging
from typing import Any, Callable, Dict, List

import pytest
import requests
import tornado.web
from conftest import serve, wait_until
from test_capture import ROUTES, get, post

from moesiftornado_durable import ConfigError, MoesifMiddleware
from moesiftornado_durable.capture import _CAPTURE_ATTRIBUTE, ResponseBodyCapture
from moesiftornado_durable.config import Config
from moesiftornado_durable.testing import Collector

SECRETS = {"password": "PW-SECRET-1", "nested": {"Password": "PW-SECRET-2", "keep": "VISIBLE-1"},
           "items": [{"password": "PW-SECRET-3", "name": "VISIBLE-2"}], "card": "CARD-SECRET-4"}


class SecretHandler(tornado.web.RequestHandler):
    def post(self) -> None:
        self.set_header("X-Session-Secret", "HDR-SECRET-5")
        self.set_header("X-Visible", "VISIBLE-3")
        self.set_header("Content-Type", "application/json")
        self.write({"card": "CARD-SECRET-6", "deep": [{"cvv": "CVV-SECRET-7", "last4": "VISIBLE-4"}]})


class SelfGzippedHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.set_header("Content-Encoding", "gzip")
        self.write(gzip.compress(json.dumps({"zipped": "by the handler", "n": 7}).encode()))


class HugeGzippedHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Encoding", "gzip")
        self.write(gzip.compress(b"z" * 200_000))  # ~200 bytes on the wire, 200 KB decoded


MASK_ROUTES = ROUTES + [(r"/secret", SecretHandler), (r"/self-gzipped", SelfGzippedHandler),
                        (r"/huge-gzipped", HugeGzippedHandler)]

MASKS: Dict[str, Any] = {
    "REQUEST_HEADER_MASKS": ["x-api-key", "AUTHORIZATION"],
    "RESPONSE_HEADER_MASKS": ["x-session-SECRET"],
    "REQUEST_BODY_MASKS": ["password", "card"],
    "RESPONSE_BODY_MASKS": ["card", "CVV"],
}
REQUEST_HEADERS = {"X-Api-Key": "KEY-SECRET-8", "Authorization": "Bearer TOKEN-SECRET-9", "X-Trace": "VISIBLE-5"}


def events_for(middleware: MoesifMiddleware, collector: Collector, calls: List[Callable[[str], Any]],
               **settings: Any) -> List[Dict[str, Any]]:
    app = middleware.attach(tornado.web.Application(MASK_ROUTES, log_function=middleware.log_event, **settings))
    with serve(app) as url:
        for call in calls:
            call(url)
    assert middleware.flush(10), middleware.stats()
    assert collector.wait_for_events(len(calls), timeout=5)
    return collector.events


def test_header_and_body_masks_remove_names_case_insensitively_at_any_depth(
    make_middleware: Any, collector: Collector
) -> None:
    [event] = events_for(make_middleware(**MASKS), collector,
                         [post("/secret", json=SECRETS, headers=REQUEST_HEADERS)])
    request, response = event["request"], event["response"]
    assert {"X-Api-Key", "Authorization"}.isdisjoint(request["headers"])
    assert request["headers"]["X-Trace"] == "VISIBLE-5"
    assert "X-Session-Secret" not in response["headers"]
    assert response["headers"]["X-Visible"] == "VISIBLE-3"
    assert request["body"] == {"nested": {"keep": "VISIBLE-1"}, "items": [{"name": "VISIBLE-2"}]}
    assert response["body"] == {"deep": [{"last4": "VISIBLE-4"}]}
    assert "SECRET" not in json.dumps(event)


def test_masked_values_never_reach_the_spool_files(make_middleware: Any, collector: Collector,
                                                   spool_dir: str) -> None:
    collector.go_down()  # the events stay on disk, where the raw bytes can be searched
    middleware = make_middleware(**MASKS)
    app = middleware.attach(tornado.web.Application(MASK_ROUTES, log_function=middleware.log_event))
    gzipped = gzip.compress(json.dumps(SECRETS).encode())
    with serve(app) as url:
        requests.post(url + "/secret", json=SECRETS, headers=REQUEST_HEADERS, timeout=5)
        requests.post(url + "/secret", data=gzipped, headers={"Content-Encoding": "gzip"}, timeout=5)
    assert wait_until(lambda: middleware.stats()["spooled"] == 2, timeout=5)  # log_event runs after the answer
    raw = b""
    for path in glob.glob(spool_dir + "/*"):  # every file: journals, spool files, their WAL
        with open(path, "rb") as f:
            raw += f.read()
    for visible in ("VISIBLE-1", "VISIBLE-2", "VISIBLE-3", "VISIBLE-4", "VISIBLE-5"):
        assert visible.encode() in raw  # the search does find what is not masked
    for secret in ("PW-SECRET-1", "PW-SECRET-2", "PW-SECRET-3", "CARD-SECRET-4", "HDR-SECRET-5",
                   "CARD-SECRET-6", "CVV-SECRET-7", "KEY-SECRET-8", "TOKEN-SECRET-9"):
        assert secret.encode() not in raw, secret
    collector.come_up()
    assert middleware.flush(10)


def test_masks_leave_non_json_bodies_alone_and_mask_gzip_json_after_decoding(
    make_middleware: Any, collector: Collector
) -> None:
    middleware = make_middleware(REQUEST_BODY_MASKS=["password"])
    events = events_for(middleware, collector, [
        post("/json", data=gzip.compress(b'{"password": "x", "user": "ada"}'), headers={"Content-Encoding": "gzip"}),
        post("/json", data=b"password=x&user=ada"),
    ])
    bodies = [e["request"]["body"] for e in events]
    assert {"user": "ada"} in bodies
    assert any(isinstance(body, str) for body in bodies)  # form data: base64, unmasked (documented)


@pytest.mark.parametrize("compress_response", [False, True])
def test_a_body_the_handler_gzipped_itself_is_decoded(make_middleware: Any, collector: Collector,
                                                      compress_response: bool) -> None:
    [event] = events_for(make_middleware(), collector, [get("/self-gzipped")], compress_response=compress_response)
    assert event["response"]["body"] == {"zipped": "by the handler", "n": 7}
    assert event["response"]["transfer_encoding"] == "json"
    assert event["response"]["headers"]["Content-Encoding"] == "gzip"


def test_a_gzipped_body_larger_than_the_limit_once_decoded_is_replaced_by_the_marker(
    make_middleware: Any, collector: Collector
) -> None:
    [event] = events_for(make_middleware(MAX_BODY_BYTES=10_000), collector, [get("/huge-gzipped")])
    assert "MAX_BODY_BYTES" in str(event["response"]["body"])
    assert "zzzz" not in json.dumps(event)


def test_text_and_binary_bodies_are_base64(make_middleware: Any, collector: Collector) -> None:
    events = events_for(make_middleware(), collector, [post("/json", data="héllo, plain text".encode()),
                                                       post("/json", data=b"\x89PNG\r\n\x1a\n\x00\xff")])
    assert {e["request"]["transfer_encoding"] for e in events} == {"base64"}


class StreamingHandler(tornado.web.RequestHandler):
    """Server-sent events: far more than MAX_BODY_BYTES, flushed chunk by chunk."""

    buffered: List[int] = []

    async def get(self) -> None:
        self.set_header("Content-Type", "text/event-stream")
        capture: ResponseBodyCapture = getattr(self.request, _CAPTURE_ATTRIBUTE)
        for n in range(400):
            self.write(f"id: {n}\ndata: {'x' * 4000}\n\n")
            await self.flush()
            StreamingHandler.buffered.append(capture.buffered_bytes)


def test_a_streaming_response_never_holds_more_than_the_limit(make_middleware: Any, collector: Collector) -> None:
    limit = 16 * 1024
    middleware = make_middleware(MAX_BODY_BYTES=limit)
    StreamingHandler.buffered = []
    app = middleware.attach(tornado.web.Application([(r"/stream", StreamingHandler)],
                                                    log_function=middleware.log_event))
    with serve(app) as url:
        received = 0
        with requests.get(url + "/stream", stream=True, timeout=10) as response:
            for chunk in response.iter_content(65536):
                received += len(chunk)
    assert received > 90 * limit  # 1.6 MB went through
    assert len(StreamingHandler.buffered) == 400
    assert 0 < max(StreamingHandler.buffered) <= limit  # it did buffer, and never past the limit
    assert StreamingHandler.buffered[-1] == 0  # past the limit it holds nothing at all
    assert middleware.flush(10)
    [event] = collector.events
    assert "MAX_BODY_BYTES" in str(event["response"]["body"])


def test_log_body_false_installs_no_response_capture(make_middleware: Any) -> None:
    middleware = make_middleware(LOG_BODY=False)
    app = middleware.attach(tornado.web.Application(MASK_ROUTES, log_function=middleware.log_event))
    assert not any(isinstance(t, type) and issubclass(t, ResponseBodyCapture) for t in app.transforms)


@pytest.mark.parametrize("key", ["REQUEST_HEADER_MASKS", "RESPONSE_HEADER_MASKS", "REQUEST_BODY_MASKS",
                                 "RESPONSE_BODY_MASKS"])
@pytest.mark.parametrize("value", ["password", [""], [1], {"password": True}, 42])
def test_a_bad_mask_list_fails_naming_the_key(tmp_path: Any, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_dict({"APPLICATION_ID": "a", "SPOOL_DIR": str(tmp_path), key: value})
    assert raised.value.key == key


def test_options_of_the_other_middlewares_are_accepted_with_a_reason(tmp_path: Any, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="moesiftornado_durable"):
        config = Config.from_dict({"APPLICATION_ID": "a", "SPOOL_DIR": str(tmp_path), "EVENT_QUEUE_SIZE": 10,
                                   "EVENT_WORKER_COUNT": 4, "EVENT_BATCH_TIMEOUT": 3})
    messages = " ".join(record.getMessage() for record in caplog.records)
    for key in ("EVENT_QUEUE_SIZE", "EVENT_WORKER_COUNT"):
        assert key in messages
    assert "typo" not in messages and "EVENT_BATCH_TIMEOUT" not in messages
    assert config.flush_interval == 3.0  # moesifwsgi's name for FLUSH_INTERVAL


def test_flush_interval_wins_over_event_batch_timeout(tmp_path: Any) -> None:
    config = Config.from_dict({"APPLICATION_ID": "a", "SPOOL_DIR": str(tmp_path), "FLUSH_INTERVAL": 0.5,
                               "EVENT_BATCH_TIMEOUT": 3})
    assert config.flush_interval == 0.5
    with pytest.raises(ConfigError, match="EVENT_BATCH_TIMEOUT"):
        Config.from_dict({"APPLICATION_ID": "a", "SPOOL_DIR": str(tmp_path), "EVENT_BATCH_TIMEOUT": 0})

