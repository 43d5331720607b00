"""Each capture point the original gets wrong, pinned end to end: real Tornado app → spool → collector."""

from __future__ import annotations

import base64
import datetime
import gzip
import json
import logging
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

import pytest
import requests
import tornado.gen
import tornado.web
from conftest import serve
from moesifapi.models import EventModel

from moesiftornado_durable import MoesifMiddleware
from moesiftornado_durable.capture import parse_ip
from moesiftornado_durable.testing import Collector


class JsonHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.add_header("Set-Cookie", "a=1")
        self.add_header("Set-Cookie", "b=2")
        self.write({"ok": True, "n": self.get_argument("n", "")})

    def post(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(self.request.body)


class SlowHandler(tornado.web.RequestHandler):
    async def get(self) -> None:
        await tornado.gen.sleep(0.3)
        self.write("slow")


class FlushingHandler(tornado.web.RequestHandler):
    async def get(self) -> None:
        self.write("part1-")
        await self.flush()
        self.write("part2")
        await self.flush()


class BinaryHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/octet-stream")
        self.write(bytes(range(256)))


class BigHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("x" * 5000)


ROUTES = [(r"/json", JsonHandler), (r"/slow", SlowHandler), (r"/flushing", FlushingHandler),
          (r"/binary", BinaryHandler), (r"/big", BigHandler)]


def run_requests(
    middleware: MoesifMiddleware,
    collector: Collector,
    calls: List[Callable[[str], Any]],
    expect: Optional[int] = None,
    **app_settings: Any,
) -> List[Dict[str, Any]]:
    """Serve ROUTES with the middleware, make the calls, flush, and return the events the collector got."""
    app = middleware.attach(tornado.web.Application(ROUTES, log_function=middleware.log_event, **app_settings))
    with serve(app) as url:
        for call in calls:
            call(url)
    assert middleware.flush(10), middleware.stats()
    expected = len(calls) if expect is None else expect
    assert collector.wait_for_events(expected, timeout=5)
    return collector.events


def get(path: str, **kwargs: Any) -> Callable[[str], Any]:
    return lambda url: requests.get(url + path, timeout=5, **kwargs)


def post(path: str, **kwargs: Any) -> Callable[[str], Any]:
    return lambda url: requests.post(url + path, timeout=5, **kwargs)


def parse_time(text: str) -> float:
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%f")
    return moment.replace(tzinfo=datetime.timezone.utc).timestamp()


def test_request_and_response_times_are_start_and_finish(make_middleware: Any, collector: Collector) -> None:
    before = time.time()
    [event] = run_requests(make_middleware(), collector, [get("/slow")])
    after = time.time()
    started, finished = parse_time(event["request"]["time"]), parse_time(event["response"]["time"])
    assert before - 0.01 <= started <= finished <= after + 0.01
    assert 0.28 <= finished - started < 2.0  # the handler slept 0.3 s
    assert started < before + 0.25  # not shifted late by the request's duration


def test_verb_uri_status_direction_and_transaction_id(make_middleware: Any, collector: Collector) -> None:
    [event] = run_requests(make_middleware(), collector, [get("/json?n=7&x=a%20b")])
    assert event["request"]["verb"] == "GET"
    assert event["request"]["uri"].endswith("/json?n=7&x=a%20b")
    assert event["request"]["uri"].startswith("http://127.0.0.1:")
    assert event["response"]["status"] == 200
    assert event["direction"] == "Incoming"
    assert uuid.UUID(event["transaction_id"]).version == 4


def test_repeated_response_headers_are_joined_not_collapsed(make_middleware: Any, collector: Collector) -> None:
    [event] = run_requests(make_middleware(), collector, [get("/json")])
    assert event["response"]["headers"]["Set-Cookie"] == "a=1, b=2"


def test_repeated_request_headers_are_joined(make_middleware: Any, collector: Collector) -> None:
    import http.client

    def call(url: str) -> None:
        host, port = url.rsplit("/", 1)[-1].split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=5)
        connection.putrequest("GET", "/json")
        connection.putheader("X-Multi", "first")
        connection.putheader("X-Multi", "second")
        connection.endheaders()
        connection.getresponse().read()
        connection.close()

    [event] = run_requests(make_middleware(), collector, [call])
    assert event["request"]["headers"]["X-Multi"] == "first, second"


@pytest.mark.parametrize(
    "headers, expected",
    [
        ({"X-Forwarded-For": "203.0.113.7, 10.0.0.1"}, "203.0.113.7"),
        ({"X-Forwarded-For": "unknown, 198.51.100.4"}, "198.51.100.4"),
        ({"X-Forwarded-For": "2001:db8::1, 10.0.0.1"}, "2001:db8::1"),
        ({"X-Forwarded-For": "[2001:db8::2]:4711"}, "2001:db8::2"),
        ({"X-Forwarded-For": "203.0.113.9:8080"}, "203.0.113.9"),
        ({"Forwarded": 'for="[2001:db8::3]:4711";proto=https, for=10.0.0.1'}, "2001:db8::3"),
        ({"X-Real-Ip": "198.51.100.77"}, "198.51.100.77"),
        ({"Cf-Connecting-Ip": "2001:db8::cf"}, "2001:db8::cf"),
        ({"X-Forwarded-For": "unknown"}, "127.0.0.1"),
        ({"X-Forwarded-For": "garbage ,,, ::::, [, ]:80, [::1"}, "127.0.0.1"),
        ({"X-Client-Ip": "not-an-ip", "X-Real-Ip": "%%%"}, "127.0.0.1"),
        ({}, "127.0.0.1"),
    ],
)
def test_client_ip(make_middleware: Any, collector: Collector, headers: Dict[str, str], expected: str) -> None:
    [event] = run_requests(make_middleware(), collector, [get("/json", headers=headers)])
    assert event["request"]["ip_address"] == expected


def test_parse_ip_never_raises_on_junk() -> None:
    for junk in ["", " ", "[", "]", "[::1", "a:b:c", "999.1.1.1", "\x00", '""', "for=", "1.2.3.4:x:y"]:
        assert parse_ip(junk) is None or isinstance(parse_ip(junk), str)


def test_json_request_and_response_bodies_are_json(make_middleware: Any, collector: Collector) -> None:
    payload = {"name": "Ada", "items": [1, 2, {"deep": True}]}
    [event] = run_requests(make_middleware(), collector, [post("/json", json=payload)])
    assert event["request"]["body"] == payload
    assert event["request"]["transfer_encoding"] == "json"
    assert event["response"]["body"] == payload
    assert event["response"]["transfer_encoding"] == "json"


def test_non_json_bodies_are_base64(make_middleware: Any, collector: Collector) -> None:
    raw = b"\xff\xfe not utf-8 \x00"
    events = run_requests(make_middleware(), collector, [post("/json", data=raw), get("/binary")])
    by_path = {e["request"]["uri"].rsplit("/", 1)[-1]: e for e in events}
    assert by_path["json"]["request"]["transfer_encoding"] == "base64"
    assert base64.b64decode(by_path["json"]["request"]["body"]) == raw
    assert by_path["binary"]["response"]["transfer_encoding"] == "base64"
    assert base64.b64decode(by_path["binary"]["response"]["body"]) == bytes(range(256))


def test_response_body_written_in_several_flushes_is_captured_whole_and_uncompressed(
    make_middleware: Any, collector: Collector
) -> None:
    [event] = run_requests(make_middleware(), collector, [get("/flushing")], compress_response=True)
    assert base64.b64decode(event["response"]["body"]) == b"part1-part2"


def test_gzip_compressed_response_body_is_captured_before_compression(
    make_middleware: Any, collector: Collector
) -> None:
    [event] = run_requests(make_middleware(), collector, [get("/big")], compress_response=True)
    assert base64.b64decode(event["response"]["body"]) == b"x" * 5000
    assert event["response"]["headers"].get("Content-Encoding") == "gzip"  # what the client really got


def test_gzip_encoded_request_body_is_decoded(make_middleware: Any, collector: Collector) -> None:
    body = gzip.compress(b'{"zipped": true}')
    [event] = run_requests(
        make_middleware(), collector, [post("/json", data=body, headers={"Content-Encoding": "gzip"})]
    )
    assert event["request"]["body"] == {"zipped": True}


def test_bodies_over_max_body_bytes_are_replaced_by_a_marker(make_middleware: Any, collector: Collector) -> None:
    [event] = run_requests(make_middleware(MAX_BODY_BYTES=1000), collector, [post("/json", data=b"y" * 3000)])
    for part in ("request", "response"):
        # the shape Moesif's own SDKs (moesif-nodejs, moesif-dotnet, moesif-servlet) send for a body too large
        assert event[part]["body"] == {"msg": f"{part}.body.length exceeded MAX_BODY_BYTES of 1000"}
        assert event[part]["transfer_encoding"] == "json"


def test_log_body_false_leaves_both_bodies_out(make_middleware: Any, collector: Collector) -> None:
    [event] = run_requests(make_middleware(LOG_BODY=False), collector, [post("/json", json={"secret": 1})])
    assert "body" not in event["request"] and "body" not in event["response"]
    assert event["response"]["status"] == 200


def test_callables_receive_the_handler_and_are_called_once_each(make_middleware: Any, collector: Collector) -> None:
    calls: Dict[str, int] = {}

    def counting(name: str, value: Any) -> Callable[[Any], Any]:
        def function(handler: Any) -> Any:
            assert isinstance(handler, tornado.web.RequestHandler)
            calls[name] = calls.get(name, 0) + 1
            return value

        return function

    middleware = make_middleware(
        IDENTIFY_USER=counting("user", "user-1"),
        IDENTIFY_COMPANY=counting("company", "company-1"),
        GET_SESSION_TOKEN=counting("token", "token-1"),
        GET_METADATA=counting("metadata", {"plan": "gold"}),
        SKIP=counting("skip", False),
        API_VERSION=counting("api_version", "v2"),
    )
    [event] = run_requests(middleware, collector, [get("/json")])
    assert calls == {"user": 1, "company": 1, "token": 1, "metadata": 1, "skip": 1, "api_version": 1}
    assert event["user_id"] == "user-1"
    assert event["company_id"] == "company-1"
    assert event["session_token"] == "token-1"
    assert event["metadata"] == {"plan": "gold"}
    assert event["request"]["api_version"] == "v2"


def test_callables_that_raise_leave_the_field_empty_and_the_event_is_logged(
    make_middleware: Any, collector: Collector, caplog: Any
) -> None:
    def boom(handler: Any) -> Any:
        raise RuntimeError("user code failed")

    middleware = make_middleware(
        IDENTIFY_USER=boom, IDENTIFY_COMPANY=boom, GET_SESSION_TOKEN=boom, GET_METADATA=boom, SKIP=boom
    )
    with caplog.at_level(logging.ERROR, logger="moesiftornado_durable"):
        responses: List[int] = []
        [event] = run_requests(middleware, collector, [lambda url: responses.append(
            requests.get(url + "/json", timeout=5).status_code)])
    assert responses == [200]
    assert event["user_id"] is None and event["company_id"] is None
    assert event["session_token"] is None and event["metadata"] is None
    messages = " ".join(record.getMessage() for record in caplog.records)
    for option in ("IDENTIFY_USER", "IDENTIFY_COMPANY", "GET_SESSION_TOKEN", "GET_METADATA", "SKIP"):
        assert option in messages


def test_skip(make_middleware: Any, collector: Collector) -> None:
    middleware = make_middleware(SKIP=lambda handler: "n=skip" in handler.request.uri)
    events = run_requests(middleware, collector, [get("/json?n=skip"), get("/json?n=keep")], expect=1)
    assert [e["request"]["uri"].rsplit("=", 1)[-1] for e in events] == ["keep"]
    assert middleware.stats()["skipped"] == 1


def test_mask_event_model_gets_an_event_model_and_its_result_is_what_is_sent(
    make_middleware: Any, collector: Collector
) -> None:
    seen: List[Any] = []

    def mask(event: EventModel) -> EventModel:
        seen.append(event)
        event.request.headers.pop("User-Agent", None)
        event.request.body = {"masked": True}
        return event

    [event] = run_requests(make_middleware(MASK_EVENT_MODEL=mask), collector,
                           [post("/json", json={"password": "hunter2"})])
    assert isinstance(seen[0], EventModel)
    assert event["request"]["body"] == {"masked": True}
    assert "User-Agent" not in event["request"]["headers"]
    assert event["transaction_id"] == seen[0].transaction_id


def test_masked_values_never_reach_the_spool_file(make_middleware: Any, collector: Collector, spool_dir: str) -> None:
    collector.go_down()  # keep the event on disk so the file can be searched

    def mask(event: EventModel) -> EventModel:
        event.request.body = {"masked": True}
        event.response.body = {"masked": True}  # /json echoes the request body
        return event

    middleware = make_middleware(MASK_EVENT_MODEL=mask)
    app = tornado.web.Application(ROUTES, log_function=middleware.log_event)
    with serve(app) as url:
        requests.post(url + "/json", json={"card": "4111-SECRET-MARKER"}, timeout=5)
    assert middleware.stats()["spooled"] == 1
    middleware.close(timeout=1)
    import glob

    for path in glob.glob(spool_dir + "/*"):
        with open(path, "rb") as f:
            content = f.read()
        assert b"4111-SECRET-MARKER" not in content, path
    collector.come_up()


def test_a_mask_that_raises_keeps_the_event_without_headers_or_bodies(
    make_middleware: Any, collector: Collector
) -> None:
    def mask(event: EventModel) -> EventModel:
        raise ValueError("mask bug")

    [event] = run_requests(make_middleware(MASK_EVENT_MODEL=mask), collector,
                           [post("/json", json={"password": "hunter2"})])
    assert "hunter2" not in str(event)
    assert event["response"]["status"] == 200


@pytest.mark.parametrize("returned", [0, False, "masked", b"bytes", {"a", "set"}, ["a", "list"]])
def test_a_mask_that_returns_the_wrong_type_keeps_the_event_without_headers_or_bodies(
    make_middleware: Any, collector: Collector, returned: Any
) -> None:
    middleware = make_middleware(MASK_EVENT_MODEL=lambda event: returned)
    [event] = run_requests(middleware, collector, [post("/json", json={"password": "hunter2"})])
    assert "hunter2" not in str(event)
    assert event["response"]["status"] == 200
    assert middleware.stats()["spooled"] == 1 and middleware.stats()["skipped"] == 0


@pytest.mark.parametrize("depth, closed", [(5000, False), (5000, True), (990, True), (101, True)])
def test_a_deeply_nested_json_body_is_kept_as_base64(
    make_middleware: Any, collector: Collector, depth: int, closed: bool
) -> None:
    """Any client can send one: the JSON parser's RecursionError must not cost the event (request and response)."""
    body = b"[" * depth + (b"]" * depth if closed else b"")
    middleware = make_middleware()
    [event] = run_requests(middleware, collector, [post("/json", data=body)])
    for part in ("request", "response"):
        assert event[part]["transfer_encoding"] == "base64"
        assert base64.b64decode(event[part]["body"]) == body
    assert not any(key.startswith("dropped_") for key in middleware.stats())


def test_json_nested_up_to_the_limit_is_kept_as_json(make_middleware: Any, collector: Collector) -> None:
    body = "[" * 100 + "]" * 100
    [event] = run_requests(make_middleware(), collector, [post("/json", data=body)])
    assert event["request"]["transfer_encoding"] == "json"
    assert json.dumps(event["request"]["body"], separators=(",", ":")) == body


def test_a_deeply_nested_jwt_payload_gives_no_user_and_keeps_the_event(
    make_middleware: Any, collector: Collector
) -> None:
    payload = base64.urlsafe_b64encode(b"[" * 5000).decode().rstrip("=")
    middleware = make_middleware()
    [event] = run_requests(middleware, collector,
                           [get("/json", headers={"Authorization": f"Bearer e30.{payload}.sig"})])
    assert event.get("user_id") is None
    assert not any(key.startswith("dropped_") for key in middleware.stats())


def test_metadata_json_cannot_hold_is_sent_as_text_and_the_event_kept(
    make_middleware: Any, collector: Collector
) -> None:
    middleware = make_middleware(GET_METADATA=lambda handler: {(1, 2): "pair", "score": float("nan")})
    [event] = run_requests(middleware, collector, [get("/json")])
    assert event["metadata"] == {"(1, 2)": "pair", "score": "nan"}
    assert not any(key.startswith("dropped_") for key in middleware.stats())


class Unprintable:
    """Like a lazy ORM object whose session has closed: str() raises."""

    def __str__(self) -> str:
        raise RuntimeError("detached instance")


@pytest.mark.parametrize("option", ["IDENTIFY_USER", "IDENTIFY_COMPANY", "GET_SESSION_TOKEN", "API_VERSION"])
def test_a_callback_result_whose_str_raises_leaves_the_field_empty_and_keeps_the_event(
    make_middleware: Any, collector: Collector, option: str
) -> None:
    middleware = make_middleware(**{option: lambda handler: Unprintable()})
    [event] = run_requests(middleware, collector, [post("/json", json={"a": 1})])
    assert event["response"]["status"] == 200
    assert not any(key.startswith("dropped_") for key in middleware.stats())


def test_log_event_never_raises_into_tornado(make_middleware: Any, collector: Collector) -> None:
    middleware = make_middleware()

    class Broken:
        application = None

        @property
        def request(self) -> Any:
            raise RuntimeError("a handler Tornado would never pass")

    middleware.log_event(Broken())  # must not raise
    middleware.log_event(None)
    assert middleware.stats()["dropped_capture_error"] == 2


def jwt(payload: Any) -> str:
    import json

    encoded = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    return f"eyJhbGciOiJIUzI1NiJ9.{encoded}.signature-not-checked"


@pytest.mark.parametrize(
    "options, headers, expected",
    [
        ({}, {"Authorization": "Bearer " + jwt({"sub": "jwt-user"})}, "jwt-user"),
        ({}, {"Authorization": "Basic " + base64.b64encode(b"basic-user:pw").decode()}, "basic-user"),
        ({"AUTHORIZATION_USER_ID_FIELD": "uid"}, {"Authorization": "Bearer " + jwt({"UID": 42})}, "42"),
        ({"AUTHORIZATION_HEADER_NAME": "X-Api-Token, X-Other"}, {"X-Other": jwt({"sub": "other"})}, "other"),
        ({}, {"Authorization": "Bearer not.a.jwt"}, None),
        ({}, {"Authorization": "Bearer"}, None),
        ({}, {"Authorization": "Basic %%%"}, None),
        ({}, {"Authorization": "Bearer " + jwt({"no_sub": 1})}, None),
        # as moesifwsgi: a Bearer token needs all three parts; a custom value may be the payload alone
        ({}, {"Authorization": "Bearer " + jwt({"sub": "two-parts"}).rsplit(".", 1)[0]}, None),
        ({}, {"Authorization": base64.b64encode(b'{"sub": "bare-payload"}').decode()}, "bare-payload"),
        ({}, {"Authorization": jwt({"sub": "bare-jwt"})}, "bare-jwt"),
        ({}, {"Authorization": "bearer " + jwt({"sub": "lower-case-scheme"})}, "lower-case-scheme"),
        # fixed: moesifwsgi decodes with the standard alphabet and loses payloads containing '-' or '_'
        ({}, {"Authorization": "Bearer " + jwt({"sub": "user-1", "x": "??>>"})}, "user-1"),
        ({}, {"Authorization": "Bearer " + jwt({"sub": None})}, None),
        ({}, {"Authorization": "Bearer " + jwt(["sub"])}, None),
        ({}, {"Authorization": "Basic"}, None),
        ({}, {"Authorization": "Custom ..."}, None),
        ({"AUTHORIZATION_HEADER_NAME": "x-key,authorization"},
         {"X-Key": "", "Authorization": "Bearer " + jwt({"sub": "second"})}, "second"),
    ],
)
def test_user_id_from_the_authorization_header(
    make_middleware: Any, collector: Collector, options: Dict[str, Any], headers: Dict[str, str],
    expected: Optional[str]
) -> None:
    [event] = run_requests(make_middleware(**options), collector, [get("/json", headers=headers)])
    assert event["user_id"] == expected


def test_identify_user_wins_over_the_authorization_header(make_middleware: Any, collector: Collector) -> None:
    middleware = make_middleware(IDENTIFY_USER=lambda handler: "from-callable")
    [event] = run_requests(middleware, collector, [get("/json", headers={"Authorization": "Bearer " + jwt(
        {"sub": "from-token"})})])
    assert event["user_id"] == "from-callable"


def test_the_urlsafe_case_above_really_has_urlsafe_characters() -> None:
    payload = jwt({"sub": "user-1", "x": "??>>"}).split(".")[1]
    assert "-" in payload or "_" in payload


@pytest.mark.parametrize(
    "api_version, expected",
    [("1.2.3", "1.2.3"), (lambda handler: "v-" + handler.request.method, "v-GET"), (lambda handler: 7, "7"),
     (lambda handler: None, None), (None, None)],
)
def test_api_version_is_a_string_or_a_function_of_the_handler(
    make_middleware: Any, collector: Collector, api_version: Any, expected: Optional[str]
) -> None:
    [event] = run_requests(make_middleware(API_VERSION=api_version), collector, [get("/json")])
    assert event["request"].get("api_version") == expected


def test_an_api_version_function_that_raises_leaves_it_empty(make_middleware: Any, collector: Collector,
                                                             caplog: Any) -> None:
    def broken(handler: Any) -> str:
        raise KeyError("no version")

    with caplog.at_level(logging.ERROR, logger="moesiftornado_durable"):
        [event] = run_requests(make_middleware(API_VERSION=broken), collector, [get("/json")])
    assert event["request"].get("api_version") is None
    assert "API_VERSION" in caplog.text
