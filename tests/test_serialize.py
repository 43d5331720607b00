"""Serializing a captured event: the fast paths write the same JSON values as the plain ones they replace."""

from __future__ import annotations

import ast
import datetime
import enum
import json
import math
import os
import time
import uuid
from typing import Any, Dict, List, Optional, Tuple

import pytest
import requests
import tornado.web
from conftest import serve
from hypothesis import given, settings
from hypothesis import strategies as st
from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

from moesiftornado_durable import Config, MoesifMiddleware, capture, codec
from moesiftornado_durable.codec import JSONReady, RawJSON, to_json_bytes
from moesiftornado_durable.testing import Collector


class Echo(tornado.web.RequestHandler):
    def post(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(self.request.body)


def echo_events(middleware: MoesifMiddleware, collector: Collector, bodies: List[bytes]) -> List[Dict[str, Any]]:
    """POST each body to an echo handler with the middleware; the events the collector got, in order."""
    app = middleware.attach(tornado.web.Application([(r"/echo", Echo)], log_function=middleware.log_event))
    with serve(app) as url:
        for body in bodies:
            requests.post(url + "/echo", data=body, timeout=5)
    assert middleware.flush(10), middleware.stats()
    assert collector.wait_for_events(len(bodies), timeout=5)
    return sorted(collector.events, key=lambda event: event["request"]["time"])


def plain_json(value: Any) -> Any:
    """What to_json_bytes wrote for `value` before it had fast paths (json.dumps, else the slow path), read back."""
    options: Dict[str, Any] = dict(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    try:
        text = json.dumps(value, default=str, **options)
    except Exception:
        text = json.dumps(codec._as_json(value), **options)
    return json.loads(text)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(value=json_values)
def test_to_json_bytes_writes_what_json_dumps_writes(value: Any) -> None:
    assert to_json_bytes(value) == json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                                              allow_nan=False).encode("utf-8")


def test_to_json_bytes_slow_path_still_rewrites_what_json_cannot_hold() -> None:
    circular: Dict[str, Any] = {}
    circular["self"] = circular
    record = {"nan": math.nan, "keys": {1: "one"}, "set": {"a"}, "circular": circular}
    assert json.loads(to_json_bytes(record)) == {"nan": "nan", "keys": {"1": "one"}, "set": "{'a'}",
                                                 "circular": {"self": "<circular reference>"}}


def test_a_lone_surrogate_is_written_as_its_escape() -> None:
    data = to_json_bytes({"body": {"a": "\ud800", "b": "x\udc00y", "c": "é"}})
    assert data == b'{"body":{"a":"\\ud800","b":"x\\udc00y","c":"\xc3\xa9"}}'
    assert json.loads(data) == {"body": {"a": "\ud800", "b": "x\udc00y", "c": "é"}}


def test_a_json_body_with_a_lone_surrogate_escape_is_kept(make_middleware: Any, collector: Collector) -> None:
    """It once made the spool write raise UnicodeEncodeError: the event was dropped as a spool error."""
    middleware = make_middleware()
    [event] = echo_events(middleware, collector, [b'{"name": "\\ud83d", "ok": "\\ud83d\\ude00"}'])
    assert event["request"]["body"] == {"name": "\ud83d", "ok": "\U0001f600"}
    assert event["response"]["body"] == event["request"]["body"]
    assert not any(key.startswith("dropped_") for key in middleware.stats())


def test_the_encoder_without_the_c_accelerator_writes_the_same(monkeypatch: Any) -> None:
    import json.encoder

    from moesiftornado_durable import codec

    value = {"a": [1, 2.5, None, True, "é\n\"x\""], "b": {"c": {}}, "d": object}
    monkeypatch.setattr(json.encoder, "c_make_encoder", None)
    assert codec._encoder(str)(value) == codec._encode(value) == json.dumps(
        value, separators=(",", ":"), ensure_ascii=False, default=str)


# -- the parts of an event, each against the plain code it replaced -------------------------------------------


def reference_format_time(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc).replace(tzinfo=None)
    return moment.isoformat(timespec="microseconds")


@settings(max_examples=2000, deadline=None, derandomize=True, database=None)
@given(timestamp=st.floats(min_value=-86400 * 365, max_value=2**33) | st.integers(0, 2**33).flatmap(
    lambda second: st.sampled_from([second + 0.0000005, second + 0.0000015, second + 0.9999995, second + 0.9999994,
                                    second + 0.5000005, second - 0.0000005, second + 0.9999999999])))
def test_format_time_writes_what_datetime_writes(timestamp: float) -> None:
    assert capture.format_time(timestamp) == reference_format_time(timestamp)
    assert capture.format_time(timestamp) == reference_format_time(timestamp)  # from the cached second too


def test_transaction_ids_are_version_4_uuids() -> None:
    ids = [capture.new_transaction_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122


printable = st.characters(min_codepoint=32, max_codepoint=126)
header_values = st.text(printable, max_size=30).map(str.strip) | st.sampled_from([
    "203.0.113.7, 10.0.0.1", "unknown, 198.51.100.4", "[2001:db8::2]:4711", "203.0.113.9:8080", "unknown", "",
    'for="[2001:db8::3]:4711";proto=https, for=10.0.0.1', "for=192.0.2.60;proto=http;by=203.0.113.43", ", ,"])
header_names = st.sampled_from(list(capture._CLIENT_IP_HEADERS) + ["x-real-ip", "Accept", "FORWARDED"])
headers_lists = st.lists(st.tuples(header_names, header_values), max_size=6)


def reference_join(headers: HTTPHeaders) -> Dict[str, str]:
    joined: Dict[str, str] = {}
    for name, value in headers.get_all():
        joined[name] = f"{joined[name]}, {value}" if name in joined else str(value)
    return joined


def reference_client_ip(headers: HTTPHeaders, remote_ip: str) -> Optional[str]:
    for header in capture._CLIENT_IP_HEADERS:
        value = headers.get(header)
        if not value:
            continue
        for candidate in capture._ip_candidates(header, value):
            address = capture.parse_ip(candidate)
            if address is not None:
                return address
    return remote_ip


@settings(max_examples=500, deadline=None, derandomize=True, database=None)
@given(pairs=headers_lists)
def test_joined_headers_and_client_ip_as_before(pairs: List[Tuple[str, str]]) -> None:
    headers = HTTPHeaders()
    for name, value in pairs:
        headers.add(name, value)
    assert capture.join_headers(headers) == reference_join(headers)
    assert capture._client_ip(capture.join_headers(headers), "192.0.2.1") == reference_client_ip(headers, "192.0.2.1")


def test_client_ip_header_names_are_spelled_as_tornado_writes_them() -> None:
    for name in capture._CLIENT_IP_HEADERS:
        assert list(HTTPHeaders({name.lower(): "x"})) == [name]


# -- the whole event: capture_steps + to_json_bytes (the middleware's path) against capture_event + json.dumps --


class FakeHandler:
    """What capture reads of a finished RequestHandler, built without a server."""

    def __init__(self, body: bytes, response: bytes, request_headers: Dict[str, str], status: int = 200) -> None:
        self.request = HTTPServerRequest(start_line=RequestStartLine("POST", "/orders?x=1", "HTTP/1.1"),
                                         headers=HTTPHeaders({"Host": "127.0.0.1:8888", **request_headers}), body=body)
        self.request._start_time = time.time() - 0.002
        self.request._finish_time = time.time()
        capture.body_capture_transform(100_000)(self.request).transform_first_chunk(
            status, HTTPHeaders({"Content-Type": "application/json"}), response, True)
        self._headers = HTTPHeaders({"Content-Type": "application/json", "X-Echo": "one"})
        self._headers.add("X-Echo", "two")
        self._status = status

    def get_status(self) -> int:
        return self._status


def make_config(tmp_path: Any, **options: Any) -> Config:
    return Config.from_dict({"APPLICATION_ID": "app", "SPOOL_DIR": str(tmp_path), **options})


def both_ways(handler: FakeHandler, config: Config, now: float = 1_700_000_000.25) -> Tuple[Any, Any]:
    """(the middleware's event as spooled, capture_event's event as json.dumps writes it), both read back."""
    prepared = capture.run_sync(capture.capture_steps(handler, config, now)).event
    plain = capture.capture_event(handler, config, now)
    assert prepared is not None and plain is not None
    spooled, reference = json.loads(to_json_bytes(prepared)), plain_json(plain)
    assert uuid.UUID(spooled.pop("transaction_id")).version == 4
    reference.pop("transaction_id")
    return spooled, reference


json_bodies = st.one_of(
    json_values.map(lambda value: json.dumps(value).encode()),
    json_values.map(lambda value: json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()),
    json_values.map(lambda value: json.dumps(value, indent=2).encode()),
    st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=5).map(lambda v: json.dumps(v).encode()),
    st.lists(st.floats(allow_nan=False), max_size=5).map(lambda v: json.dumps(v).encode()),  # 1e+16, Infinity
    st.sampled_from([b'{"a": NaN}', b"[-Infinity]", b"[1e400]", b"[1E2, 1e-7, -0, -0.0, 0.1e1]", b'{"a":1,"a":2}',
                     b'["\\ud800"]', b'["\\ud83d\\ude00", "\\u00e9\\/"]', b"\xef\xbb\xbf[1]", b"[1]\x0c", b" [2] ",
                     b'{"k": "a e+ b", "n": 12345678901234567890123}', "[\"é\"]".encode("utf-16"),
                     b"[" * 101 + b"]" * 101, b"[" * 100 + b"]" * 100, b"[" * 1100 + b"]" * 1100, b"[1, 2",
                     b"{'a': 1}", b"[\x00]", b'["a\tb"]', b'["\x7f"]', b"[" + b"1" * 5000 + b"]"]),
)


@settings(max_examples=400, deadline=None, derandomize=True, database=None)
@given(request_body=json_bodies, response_body=json_bodies)
def test_the_spooled_event_holds_what_capture_event_holds(tmp_path_factory: Any, request_body: bytes,
                                                          response_body: bytes) -> None:
    config = make_config(tmp_path_factory.getbasetemp() / "spool")
    spooled, reference = both_ways(FakeHandler(request_body, response_body, {"Content-Type": "text/plain"}), config)
    assert spooled == reference


def test_masks_and_metadata_odd_values_are_spooled_as_before(tmp_path: Any) -> None:
    class Colour(enum.Enum):
        RED = "red"

    metadata = {"when": datetime.datetime(2024, 5, 6, 7, 8, 9), "colour": Colour.RED, "nan": math.nan,
                "big": 2**80, "tuple_key": {(1, 2): "x"}, "set": {3}, "nested": [{"deep": [1.5, None]}]}
    config = make_config(tmp_path, GET_METADATA=lambda handler: metadata, REQUEST_BODY_MASKS=["password"],
                         RESPONSE_BODY_MASKS=["token"], IDENTIFY_USER=lambda handler: "user-\ud800")
    body = json.dumps({"password": "p", "token": "t", "keep": [{"password": 1, "n": 2**64}]}).encode()
    spooled, reference = both_ways(FakeHandler(body, body, {"Authorization": "Basic eDp5"}), config)
    assert spooled == reference
    assert spooled["request"]["body"] == {"token": "t", "keep": [{"n": 2**64}]}
    assert spooled["metadata"]["nan"] == "nan" and spooled["metadata"]["colour"] == "Colour.RED"
    assert spooled["user_id"] == "user-\ud800"


def test_orjson_is_a_dependency_and_the_fast_extra_still_installs() -> None:
    """One serialization path: orjson is installed with the package; `[fast]`, its old extra, still resolves."""
    with open(os.path.join(os.path.dirname(os.path.dirname(__file__)), "setup.py"), encoding="utf-8") as f:
        [call] = [node for node in ast.walk(ast.parse(f.read())) if isinstance(node, ast.Call)
                  and getattr(node.func, "id", None) == "setup"]
    options = {keyword.arg: keyword.value for keyword in call.keywords}
    install_requires = ast.literal_eval(options["install_requires"])
    assert [requirement for requirement in install_requires if requirement.startswith("orjson")] == ["orjson>=3.9"]
    assert ast.literal_eval(options["extras_require"])["fast"] == ["orjson>=3.9"]


def test_bodies_and_metadata_are_written_once(tmp_path: Any) -> None:
    config = make_config(tmp_path, GET_METADATA=lambda handler: {"n": 1})
    body = json.dumps({"n": [1, 2.5, "x"]}).encode()
    event = capture.run_sync(capture.capture_steps(FakeHandler(body, body, {}), config, time.time())).event
    assert type(event) is JSONReady
    assert event["request"]["body"] == RawJSON(b'{"n":[1,2.5,"x"]}') == event["response"]["body"]
    assert event["metadata"] == RawJSON(b'{"n":1}')
    # MASK_EVENT_MODEL sees the event as a moesifapi EventModel: plain values, the json module writes it
    masked = make_config(tmp_path, MASK_EVENT_MODEL=lambda model: model)
    event = capture.run_sync(capture.capture_steps(FakeHandler(body, body, {}), masked, time.time())).event
    assert type(event) is dict and event["request"]["body"] == {"n": [1, 2.5, "x"]}


def test_raw_json_is_written_as_is_and_read_back_by_the_json_module() -> None:
    record = JSONReady(body=RawJSON(b'{"a":[1,2]}'), text="x")
    assert to_json_bytes(record) == b'{"body":{"a":[1,2]},"text":"x"}'
    assert to_json_bytes(dict(record)) == b'{"body":{"a":[1,2]},"text":"x"}'  # the json module's path
    assert to_json_bytes(JSONReady(body=RawJSON(b"[1]"), text="\udc00")) == b'{"body":[1],"text":"\\udc00"}'


def test_a_sampled_out_event_never_has_its_bodies_parsed(tmp_path: Any, monkeypatch: Any) -> None:
    config = make_config(tmp_path, GET_METADATA=lambda handler: {"n": 1})
    handler = FakeHandler(b'{"a": 1}', b'{"b": 2}', {})
    monkeypatch.setattr(capture, "_set_body", lambda *args: pytest.fail("a body was parsed"))
    monkeypatch.setattr(capture.RawJSON, "of", lambda *args, **kwargs: pytest.fail("the metadata was written"))
    outcome = capture.run_sync(capture.capture_steps(handler, config, time.time(), weight_for=lambda event: None))
    assert outcome == capture.Outcome(None, "sampled_out")
