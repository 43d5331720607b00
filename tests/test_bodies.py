"""Masks and bodies: what is spooled is masked, decoded and bounded, through a real Tornado app."""

from __future__ import annotations

import base64
import glob
import gzip
import json
import logging
import os
import re
import zlib
from typing import Any, Callable, Dict, List

import pytest
import requests
import tornado.web
from conftest import serve, wait_logged
from test_capture import ROUTES, get, post

from moesiftornado_durable import ConfigError, MoesifMiddleware
from moesiftornado_durable.capture import _CAPTURE_ATTRIBUTE, ResponseBodyCapture
from moesiftornado_durable.config import Config
from moesiftornado_durable.metrics import render_prometheus
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
    wait_logged(middleware, 2)
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


def test_masks_omit_non_json_bodies_and_mask_gzip_json_after_decoding(
    make_middleware: Any, collector: Collector
) -> None:
    middleware = make_middleware(REQUEST_BODY_MASKS=["password"])
    events = events_for(middleware, collector, [
        post("/json", data=gzip.compress(b'{"password": "x", "user": "ada"}'), headers={"Content-Encoding": "gzip"}),
        post("/json", data=b"password=x&user=ada"),
    ])
    bodies = [e["request"]["body"] for e in events]
    assert {"user": "ada"} in bodies
    # form data: masks cannot be applied to it, so it is omitted (it used to be stored as base64, password inside)
    assert {"msg": "request.body omitted: REQUEST_BODY_MASKS is set and the body is not JSON, so the masks "
                   "cannot be applied to it"} in bodies
    assert "cGFzc3dvcmQ9" not in json.dumps(bodies)  # base64 of "password="


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
    assert event["response"]["body"] == {"msg": "response.body.length exceeded MAX_BODY_BYTES of 10000"}
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
    assert event["response"]["body"] == {"msg": f"response.body.length exceeded MAX_BODY_BYTES of {limit}"}


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



# -- Bodies the masks cannot be applied to (issue 13, item 5): fail closed ----------------------------

PW_SECRET = "PW-UNMASKABLE-SECRET"
SECRET_BODY = {"password": PW_SECRET, "user": "ada"}


def _deep_json(levels: int) -> bytes:
    """A JSON object holding the password next to a list nested `levels` deep."""
    return b'{"password": "' + PW_SECRET.encode() + b'", "a": ' + b"[" * levels + b"1" + b"]" * levels + b"}"


def holds_secret(data: bytes, secret: bytes = PW_SECRET.encode()) -> bool:
    """True if `secret` is in `data` as it is, or inside any base64 run of it (how bodies are stored)."""
    if secret in data:
        return True
    for run in re.findall(rb"[A-Za-z0-9+/]{16,}={0,2}", data):
        for start in range(4):  # a run found inside other text may begin mid-quantum
            chunk = run[start:]
            try:
                if secret in base64.b64decode(chunk + b"=" * (-len(chunk) % 4)):
                    return True
            except ValueError:
                continue
    return False


class QuietHandler(tornado.web.RequestHandler):
    """Answers without echoing the request: only the request body can leak."""

    def post(self) -> None:
        self.write({"ok": True})


def spool_bytes(spool_dir: str) -> bytes:
    """Every byte of every file under SPOOL_DIR (journals, spool files, their WAL)."""
    raw = b""
    for path in glob.glob(spool_dir + "/**", recursive=True):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                raw += f.read()
    return raw


@pytest.mark.parametrize("body", [
    pytest.param(b"\xef\xbb\xbf" + json.dumps(SECRET_BODY).encode(), id="utf-8-bom"),
    pytest.param(_deep_json(150), id="nested-150"),
])
def test_a_body_masks_cannot_see_into_never_reaches_disk_or_moesif(make_middleware: Any, collector: Collector,
                                                                   spool_dir: str, body: bytes) -> None:
    """Issue 13 item 5: REQUEST_BODY_MASKS ['password'] and a BOM-prefixed or deeply nested JSON body."""
    collector.go_down()  # the event stays on disk, where every byte can be searched
    middleware = make_middleware(REQUEST_BODY_MASKS=["password"])
    app = middleware.attach(tornado.web.Application([(r"/quiet", QuietHandler)], log_function=middleware.log_event))
    with serve(app) as url:
        assert requests.post(url + "/quiet", data=body, headers={"Content-Type": "application/json"},
                             timeout=5).status_code == 200
    wait_logged(middleware, 1)
    raw = spool_bytes(spool_dir)
    assert b"ada" in raw or b"REQUEST_BODY_MASKS" in raw  # the search does find the event
    assert not holds_secret(raw)
    collector.come_up()
    assert middleware.flush(10)
    [event] = collector.events
    assert not holds_secret(json.dumps(event).encode())
    request = event["request"]
    if body.startswith(b"\xef\xbb\xbf"):  # BOM-prefixed JSON is JSON: parsed and masked
        assert request["body"] == {"user": "ada"} and request["transfer_encoding"] == "json"
    else:  # nested too deep to mask safely: omitted, and the event says why
        assert set(request["body"]) == {"msg"} and "REQUEST_BODY_MASKS" in request["body"]["msg"]
        assert "nested deeper than 100" in request["body"]["msg"]
        assert middleware.stats()["body_omitted_unmaskable"] == 1


class EchoHandler(tornado.web.RequestHandler):
    """Answers with the request body as it came, as JSON: the response body holds what the request did."""

    def post(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(self.request.body)


def _utf16(text: str) -> bytes:
    return text.encode("utf-16")  # with its byte-order mark


UNMASKABLE_BODIES = {
    "invalid-json": (b'{"password": "' + PW_SECRET.encode() + b'", "user": }', None),
    "form": (b"password=" + PW_SECRET.encode() + b"&user=ada", None),
    "text": (b"user=ada; password " + PW_SECRET.encode(), None),
    "nested-2000": (_deep_json(2000), None),  # past orjson's limit too
    "gzip-corrupt": (gzip.compress(json.dumps(SECRET_BODY).encode())[:-12] + b"\x00" * 12, "gzip"),
    "deflate": (zlib.compress(json.dumps(SECRET_BODY).encode()), "deflate"),  # not decoded: still unreadable
    "multipart": (b'--b\r\nContent-Disposition: form-data; name="password"\r\n\r\n' + PW_SECRET.encode()
                  + b"\r\n--b--\r\n", None),
}


@pytest.mark.parametrize("name", sorted(UNMASKABLE_BODIES))
def test_with_body_masks_a_body_that_is_not_json_is_omitted_on_both_sides(
    make_middleware: Any, collector: Collector, name: str
) -> None:
    body, content_encoding = UNMASKABLE_BODIES[name]
    headers = {"Content-Encoding": content_encoding} if content_encoding else {}
    middleware = make_middleware(REQUEST_BODY_MASKS=["password"], RESPONSE_BODY_MASKS=["password"])
    app = middleware.attach(tornado.web.Application([(r"/echo", EchoHandler)], log_function=middleware.log_event))
    with serve(app) as url:
        requests.post(url + "/echo", data=body, headers=headers, timeout=5)
    assert middleware.flush(10)
    [event] = collector.events
    assert not holds_secret(json.dumps(event).encode())
    for side in ("request", "response"):
        marker = event[side]["body"]
        assert set(marker) == {"msg"} and f"{side.upper()}_BODY_MASKS" in marker["msg"], (side, marker)
    assert middleware.stats()["body_omitted_unmaskable"] == 2


@pytest.mark.parametrize("encoded", [
    pytest.param(_utf16(json.dumps(SECRET_BODY)), id="utf-16"),
    pytest.param(json.dumps(SECRET_BODY).encode("utf-32"), id="utf-32"),
    pytest.param(gzip.compress(b"\xef\xbb\xbf" + json.dumps(SECRET_BODY).encode()), id="gzip-bom"),
])
def test_json_in_utf16_utf32_or_behind_a_bom_is_parsed_and_masked(make_middleware: Any, collector: Collector,
                                                                   encoded: bytes) -> None:
    headers = {"Content-Encoding": "gzip"} if encoded[:2] == b"\x1f\x8b" else {}
    middleware = make_middleware(REQUEST_BODY_MASKS=["password"])
    app = middleware.attach(tornado.web.Application([(r"/quiet", QuietHandler)], log_function=middleware.log_event))
    with serve(app) as url:
        requests.post(url + "/quiet", data=encoded, headers=headers, timeout=5)
    assert middleware.flush(10)
    [event] = collector.events
    assert event["request"]["body"] == {"user": "ada"}
    assert event["request"]["transfer_encoding"] == "json"


def test_without_masks_a_body_that_is_not_json_is_still_base64(make_middleware: Any, collector: Collector) -> None:
    middleware = make_middleware()
    app = middleware.attach(tornado.web.Application([(r"/quiet", QuietHandler)], log_function=middleware.log_event))
    bodies = [UNMASKABLE_BODIES[name][0] for name in ("invalid-json", "form", "nested-2000")]
    with serve(app) as url:
        for body in bodies:
            requests.post(url + "/quiet", data=body, timeout=5)
    assert middleware.flush(10)
    assert collector.wait_for_events(3, timeout=5)
    assert [base64.b64decode(event["request"]["body"]) for event in collector.events] == bodies
    assert {event["request"]["transfer_encoding"] for event in collector.events} == {"base64"}


def test_mask_event_model_sees_the_omitted_marker_not_the_unmasked_body(make_middleware: Any,
                                                                         collector: Collector) -> None:
    seen: List[str] = []

    def mask(model: Any) -> Any:
        seen.append(json.dumps(model.to_dictionary(), default=str))
        return model

    middleware = make_middleware(REQUEST_BODY_MASKS=["password"], MASK_EVENT_MODEL=mask)
    app = middleware.attach(tornado.web.Application([(r"/quiet", QuietHandler)], log_function=middleware.log_event))
    with serve(app) as url:
        requests.post(url + "/quiet", data=UNMASKABLE_BODIES["form"][0], timeout=5)
    assert middleware.flush(10)
    assert len(seen) == 1 and not holds_secret(seen[0].encode())
    [event] = collector.events
    assert "REQUEST_BODY_MASKS" in event["request"]["body"]["msg"]


def test_an_unmaskable_body_is_logged_once_at_warning(make_middleware: Any, collector: Collector,
                                                     caplog: Any) -> None:
    middleware = make_middleware(REQUEST_BODY_MASKS=["password"])
    app = middleware.attach(tornado.web.Application([(r"/quiet", QuietHandler)], log_function=middleware.log_event))
    with caplog.at_level(logging.DEBUG, logger="moesiftornado_durable"):
        with serve(app) as url:
            for _ in range(3):
                requests.post(url + "/quiet", data=UNMASKABLE_BODIES["form"][0], timeout=5)
        assert middleware.flush(10)
    about = [r for r in caplog.records if "REQUEST_BODY_MASKS" in r.getMessage()]
    assert [r.levelno for r in about].count(logging.WARNING) <= 1  # once per process (an earlier test may have)
    assert len(about) == 3
    assert not any(holds_secret(r.getMessage().encode()) for r in caplog.records)
    assert middleware.stats()["body_omitted_unmaskable"] == 3
    assert 'moesif_durable_bodies_omitted_total{reason="unmaskable"} 3' in render_prometheus(middleware.stats())


# -- Large bodies (issue 12, item 4): Moesif's limits and its SDKs' marker ---------------------------


def test_the_default_body_limit_is_moesifs_own_body_size(tmp_path: Any, make_middleware: Any,
                                                          collector: Collector) -> None:
    assert Config.from_dict({"APPLICATION_ID": "a", "SPOOL_DIR": str(tmp_path)}).max_body_bytes == 450_000
    body = json.dumps({"rows": ["r" * 100] * 2000}).encode()  # ~206 KB: over the old 100 KiB default
    middleware = make_middleware()
    app = middleware.attach(tornado.web.Application([(r"/quiet", QuietHandler)], log_function=middleware.log_event))
    with serve(app) as url:
        requests.post(url + "/quiet", data=body, timeout=5)
    assert middleware.flush(10)
    [event] = collector.events
    assert event["request"]["body"] == json.loads(body)


@pytest.mark.parametrize("mask_event_model", [False, True], ids=["orjson-path", "json-module-path"])
def test_two_bodies_that_would_take_the_event_over_1_mb_lose_the_larger(
    make_middleware: Any, collector: Collector, mask_event_model: bool
) -> None:
    """Each body is under MAX_BODY_BYTES, but as base64 (4/3 of the bytes) the two are over Moesif's 1 MB."""
    request_body = bytes(range(256)) * 1700  # 435,200 bytes, 580 KB as base64
    response_body = bytes(range(256)) * 1500  # 384,000 bytes, 512 KB as base64
    options: Dict[str, Any] = {"MASK_EVENT_MODEL": (lambda model: model)} if mask_event_model else {}
    middleware = make_middleware(**options)

    class Answer(tornado.web.RequestHandler):
        def post(self) -> None:
            self.set_header("Content-Type", "application/octet-stream")
            self.write(response_body)

    app = middleware.attach(tornado.web.Application([(r"/answer", Answer)], log_function=middleware.log_event))
    with serve(app) as url:
        requests.post(url + "/answer", data=request_body, timeout=10)
    assert middleware.flush(10)
    [event] = collector.events
    assert len(json.dumps(event, separators=(",", ":"))) < 1_000_000
    assert set(event["request"]["body"]) == {"msg"} and "1000000" in event["request"]["body"]["msg"]
    assert base64.b64decode(event["response"]["body"]) == response_body  # the smaller one is kept whole
    assert middleware.stats()["body_omitted_event_too_large"] == 1


def test_max_body_bytes_over_moesifs_event_limit_is_warned_about(tmp_path: Any, caplog: Any) -> None:
    with caplog.at_level(logging.WARNING, logger="moesiftornado_durable"):
        Config.from_dict({"APPLICATION_ID": "a", "SPOOL_DIR": str(tmp_path), "MAX_BODY_BYTES": 5_000_000})
    assert any("MAX_BODY_BYTES" in record.getMessage() for record in caplog.records)
