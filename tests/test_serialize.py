"""Serializing a captured event: the fast paths write the same JSON values as the plain ones they replace."""

from __future__ import annotations

import datetime
import json
import math
import uuid
from typing import Any, Dict, List, Optional, Tuple

import requests
import tornado.web
from conftest import serve
from hypothesis import given, settings
from hypothesis import strategies as st
from tornado.httputil import HTTPHeaders

from moesiftornado_durable import MoesifMiddleware, capture
from moesiftornado_durable.codec import to_json_bytes
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
    """What json.dumps (compact, strict, default=str) writes for `value`, read back."""
    return json.loads(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str))


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
