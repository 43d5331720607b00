"""Serializing a captured event: the fast paths write the same JSON values as the plain ones they replace."""

from __future__ import annotations

import json
import math
from typing import Any, Dict, List

import requests
import tornado.web
from conftest import serve
from hypothesis import given, settings
from hypothesis import strategies as st

from moesiftornado_durable import MoesifMiddleware
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
