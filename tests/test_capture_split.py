"""The capture split: `log_event` journals a request's raw parts and the shipper builds the event.

The proof that nothing changed for Moesif: the same requests captured both ways -- today's full capture in
the app (capture.capture_steps, encoded as the spool stores it) and the split (rawcapture.capture_steps,
packed, then built and encoded by the shipper's ingest hook) -- give the same bytes, transaction id aside.
"""

from __future__ import annotations

import base64
import codecs
import gzip
import http.client
import json
import os
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest
import tornado.web
from conftest import iter_records, serve, wait_logged, wait_until

from moesiftornado_durable import capture, rawcapture
from moesiftornado_durable.capture import BLOCKED_BY_ATTRIBUTE, body_capture_transform, install_body_capture
from moesiftornado_durable.codec import Codec
from moesiftornado_durable.config import Config
from moesiftornado_durable.eventbuild import build_rows
from moesiftornado_durable.journal import segments
from moesiftornado_durable.kinds import CAPTURE, EVENT
from moesiftornado_durable.sampling import AppConfig, Sampler
from moesiftornado_durable.testing import Collector


def jwt(claims: Dict[str, Any]) -> str:
    payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
    return f"Bearer eyJhbGciOiJIUzI1NiJ9.{payload}.c2ln"


class EchoHandler(tornado.web.RequestHandler):
    """Echoes the request body with the request's Content-Type; a few paths change the response."""

    def prepare(self) -> None:
        if self.get_argument("blocked", ""):
            setattr(self, BLOCKED_BY_ATTRIBUTE, "rule-42")

    def get(self) -> None:
        self.respond()

    def post(self) -> None:
        self.respond()

    def respond(self) -> None:
        self.add_header("Set-Cookie", "a=1")
        self.add_header("Set-Cookie", "b=2")
        kind = self.get_argument("response", "echo")
        if kind == "gzip":
            self.set_header("Content-Encoding", "gzip")
            self.write(gzip.compress(b'{"zipped": true}'))
        elif kind == "binary":
            self.set_header("Content-Type", "application/octet-stream")
            self.write(bytes(range(256)))
        elif kind == "huge":
            self.write(b"[" + b"1," * 300_000 + b"1]")
        elif kind == "none":
            self.set_status(204)
        else:
            self.set_header("Content-Type", self.request.headers.get("Content-Type", "text/plain"))
            self.write(self.request.body)


class RawConnection(http.client.HTTPConnection):
    """Sends the request line's bytes as they are (a raw UTF-8 path), as a client may."""

    def _encode_request(self, request: str) -> bytes:
        return request.encode("latin-1")


def call(url: str, method: str, path: str, body: Optional[bytes] = None,
         headers: Tuple[Tuple[str, str], ...] = ()) -> None:
    """One request with exactly these header lines (repeated names kept), on a connection of its own."""
    host, port = url.rsplit("/", 1)[-1].split(":")
    connection = RawConnection(host, int(port), timeout=5)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        connection.getresponse().read()
    finally:
        connection.close()


JSON = b'{"order": {"id": 7, "price": 9.99, "big": 12345678901234567890123, "tags": ["a", "\\u00e9"]}}'
# (method, path, body, header lines): every kind of body, header and address capture tells apart
REQUESTS: List[Tuple[str, str, Optional[bytes], Tuple[Tuple[str, str], ...]]] = [
    ("GET", "/echo", None, ()),
    ("POST", "/echo", JSON, (("Content-Type", "application/json"),)),
    ("POST", "/echo", b'{"n": 1.5e300, "s": "\\ud800"}', (("Content-Type", "application/json"),)),
    ("POST", "/echo", b"plain text, not JSON", (("Content-Type", "text/plain"),)),
    ("POST", "/echo", bytes(range(256)) * 4, (("Content-Type", "application/octet-stream"),)),
    ("POST", "/echo", codecs.BOM_UTF8 + b'{"bom": 1}', (("Content-Type", "application/json"),)),
    ("POST", "/echo", '{"utf16": "\u00e9"}'.encode("utf-16"), (("Content-Type", "application/json"),)),
    ("POST", "/echo", b"[" * 150 + b"]" * 150, (("Content-Type", "application/json"),)),
    ("POST", "/echo", gzip.compress(JSON), (("Content-Encoding", "gzip"), ("Content-Type", "application/json"))),
    ("POST", "/echo", gzip.compress(b"y" * 5000), (("Content-Encoding", "gzip"),)),
    ("POST", "/echo", b"not gzip at all", (("Content-Encoding", "gzip"),)),
    ("POST", "/echo", b"x" * 5000, ()),  # over MAX_BODY_BYTES
    ("GET", "/echo?response=gzip", None, ()),
    ("GET", "/echo?response=binary", None, ()),
    ("GET", "/echo?response=none", None, ()),
    ("GET", "/echo?response=huge", None, ()),  # over MAX_BODY_BYTES
    ("POST", "/echo?response=huge", b"[" + b"2," * 300_000 + b"2]", (("Content-Type", "application/json"),)),
    ("GET", "/echo?x=%C3%A9t%C3%A9&blocked=1", None, (("X-Multi", "first"), ("X-Multi", "second"))),
    ("GET", "/caf\u00e9/\u00fc".encode().decode("latin-1"), None, ()),  # raw UTF-8 bytes in the path
    ("GET", "/echo", None, (("X-Forwarded-For", "unknown, 2001:db8::1"), ("X-Real-Ip", "198.51.100.7"))),
    ("GET", "/echo", None, (("Forwarded", 'for="[2001:db8::3]:4711";proto=https'),)),
    ("GET", "/echo", None, (("X-Forwarded-For", "garbage, [, ]:80"),)),
    ("GET", "/echo", None, (("Authorization", jwt({"sub": "jwt-user", "UID": 99})),)),
    ("GET", "/echo", None, (("Authorization", "Basic " + base64.b64encode(b"basic-user:pw").decode()),)),
    ("GET", "/echo", None, (("Authorization", "Bearer not.a-jwt"),)),
    ("GET", "/echo?user=none", None, (("Authorization", jwt({"sub": "fallback"})),)),
    ("GET", "/echo?user=surrogate", None, ()),
    ("GET", "/echo?skip=1", None, ()),
]


def identify_user(handler: Any) -> Any:
    user = handler.get_argument("user", "")
    if user == "none":
        return None
    if user == "surrogate":
        return "lone \ud800 surrogate"  # orjson refuses it: the app builds that event itself
    if handler.request.headers.get("Authorization"):
        return None  # the user id comes from the header
    return 1234


def get_metadata(handler: Any) -> Any:
    return {"path": handler.request.path, "score": float("nan"), (1, 2): "pair", "deep": {"f": 0.1}}


OPTIONS: Dict[str, Any] = {
    "APPLICATION_ID": "split-app", "MAX_BODY_BYTES": 4096,
    "IDENTIFY_USER": identify_user, "IDENTIFY_COMPANY": lambda handler: "acme",
    "GET_SESSION_TOKEN": lambda handler: handler.request.headers.get("X-Session"),
    "GET_METADATA": get_metadata, "API_VERSION": lambda handler: "v2",
    "SKIP": lambda handler: handler.get_argument("skip", "") == "1",
}


def both_ways(config: Config, sampler: Sampler, every_body: bool) -> Tuple[List[bytes], List[bytes], List[str]]:
    """Serve REQUESTS and capture each finished request both ways: (full capture's stored bytes, the split's
    stored bytes with the full capture's transaction id, how each split outcome went)."""
    full: List[bytes] = []
    split: List[bytes] = []
    ways: List[str] = []
    coder = Codec()

    def log_function(handler: Any) -> None:
        finished_at = time.time()
        elapsed = handler.request.request_time()  # still running (Tornado sets no finish time): one for both
        handler.request.request_time = lambda: elapsed
        old = capture.run_sync(capture.capture_steps(handler, config, finished_at, sampler.weight_for))
        new = capture.run_sync(rawcapture.capture_steps(handler, config, finished_at, sampler,
                                                         every_body=every_body))
        if old.event is None:
            assert new == old
            ways.append(old.dropped or "")
            return
        full.append(coder.encode(old.event))
        if new.packed is not None:
            [(kind, data, _)] = build_rows([(CAPTURE, new.packed, 1.0)], coder)
            assert kind == EVENT
            ways.append("packed")
        else:
            assert new.event is not None
            data = coder.encode(new.event)
            ways.append("event in the app")
        old_id, new_id = old.event["transaction_id"], json.loads(data)["transaction_id"]
        split.append(data.replace(new_id.encode(), old_id.encode()))

    app = tornado.web.Application([(r"/.*", EchoHandler)], log_function=log_function)
    install_body_capture(app, body_capture_transform(config.max_body_bytes))
    with serve(app) as url:
        for method, path, body, headers in REQUESTS:
            call(url, method, path, body, headers)
    return full, split, ways


@pytest.mark.parametrize("every_body", [True, False], ids=["every-body-packed", "as-log_event-does"])
@pytest.mark.parametrize("sampling", ["none", "reads-events"])
def test_the_split_gives_the_same_bytes_as_the_full_capture(tmp_path: Any, every_body: bool, sampling: str) -> None:
    config = Config.from_dict(dict(OPTIONS, SPOOL_DIR=str(tmp_path / "spool")))
    sampler = Sampler(draw=lambda: 0.0)  # kept whatever the rate: the weight shows the rate used
    if sampling == "reads-events":
        sampler.update(AppConfig.parse({"user_sample_rate": {"jwt-user": 25, "1234": 50},
                                        "company_sample_rate": {"acme": 40}}))
    full, split, ways = both_ways(config, sampler, every_body)
    assert len(full) == len(REQUESTS) - 1 and ways.count("skipped") == 1
    for number, (expected, got) in enumerate(zip(full, split)):
        assert got == expected, number
    # the app builds the event whose user id orjson refuses (a lone surrogate); without every_body, it also
    # captures in full the 7 requests with gzip or large bodies
    assert ways.count("event in the app") == (1 if every_body else 8)
    assert ways.count("packed") == len(REQUESTS) - 1 - ways.count("event in the app")
    events = [json.loads(data) for data in full]
    assert {event["weight"] for event in events} == ({1} if sampling == "none" else {2, 4})
    assert {event.get("user_id") for event in events} >= {"1234", "jwt-user", "basic-user", "fallback"}
    assert any(event.get("blocked_by") == "rule-42" for event in events)
    assert any(event["request"].get("body") == {"msg": "request.body.length exceeded MAX_BODY_BYTES of 4096"}
               for event in events)


def test_a_sampled_out_request_is_sampled_out_by_the_split_too(tmp_path: Any) -> None:
    config = Config.from_dict(dict(OPTIONS, SPOOL_DIR=str(tmp_path / "spool")))
    sampler = Sampler(draw=lambda: 0.99)
    sampler.update(AppConfig.parse({"user_sample_rate": {"jwt-user": 10}}))
    full, split, ways = both_ways(config, sampler, every_body=False)
    assert ways.count("sampled_out") == 1 and full == split


def journal_kinds(spool_dir: str) -> List[str]:
    return [kind for _, _, path in segments(spool_dir) for kind, _, _ in iter_records(path, finished=False)]


def test_log_event_journals_raw_parts_and_the_collector_gets_the_full_captures_events(
    make_middleware: Any, collector: Collector, spool_dir: str
) -> None:
    """End to end, through the journal, the shipper and the collector: each event Moesif gets is the one the
    app's full capture makes of the same request (the transaction id and the times aside)."""
    middleware = make_middleware(**OPTIONS)
    expected: List[Dict[str, Any]] = []

    def log_function(handler: Any) -> None:
        outcome = capture.run_sync(capture.capture_steps(handler, middleware.config, time.time()))
        if outcome.event is not None:
            expected.append(json.loads(Codec().encode(outcome.event)))
        middleware.log_event(handler)

    collector.go_down()
    app = middleware.attach(tornado.web.Application([(r"/.*", EchoHandler)], log_function=log_function))
    with serve(app) as url:
        for method, path, body, headers in REQUESTS:
            call(url, method, path, body, headers)
    kinds = journal_kinds(spool_dir)
    assert kinds.count(CAPTURE) >= 15 and set(kinds) == {CAPTURE, EVENT}
    collector.come_up()
    assert middleware.flush(10), middleware.stats()
    assert wait_until(lambda: len(collector.events) == len(expected), 5)

    def comparable(event: Dict[str, Any]) -> Dict[str, Any]:
        event = json.loads(json.dumps(event))
        del event["transaction_id"], event["request"]["time"], event["response"]["time"]
        return event

    assert [comparable(event) for event in collector.events] == [comparable(event) for event in expected]
    too_large = sum(json.dumps(event).count("exceeded MAX_BODY_BYTES") for event in expected)
    assert too_large >= 4 and middleware.stats()["body_omitted_too_large"] == too_large


def test_records_are_encrypted_at_rest_and_built_with_the_key(make_middleware: Any, collector: Collector,
                                                              spool_dir: str) -> None:
    from cryptography.fernet import Fernet

    middleware = make_middleware(SPOOL_ENCRYPTION_KEY=Fernet.generate_key().decode())
    collector.go_down()
    app = middleware.attach(tornado.web.Application([(r"/.*", EchoHandler)], log_function=middleware.log_event))
    with serve(app) as url:
        call(url, "POST", "/echo", b'{"card": "secret-4111"}', (("Content-Type", "application/json"),))
    records = [(kind, data) for _, _, path in segments(spool_dir)
               for kind, data, _ in iter_records(path, finished=False)]
    assert [kind for kind, _ in records] == [CAPTURE]
    assert not any(b"secret-4111" in data for _, data in records) and records[0][1].startswith(b"gAAAAA")
    for name in os.listdir(spool_dir):
        path = os.path.join(spool_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                assert b"secret-4111" not in f.read(), name
    collector.come_up()
    assert middleware.flush(10), middleware.stats()
    [event] = collector.events
    assert event["request"]["body"] == {"card": "secret-4111"} == event["response"]["body"]


def test_app_processes_with_different_capture_options_share_one_shipper(
    make_middleware: Any, collector: Collector, spool_dir: str
) -> None:
    """Each record carries the capture options its build needs: two middlewares with different
    AUTHORIZATION_USER_ID_FIELD, one journal, one shipper, each event built with its own."""
    by_sub = make_middleware()
    by_uid = make_middleware(AUTHORIZATION_USER_ID_FIELD="uid")
    for middleware, field in ((by_sub, "sub"), (by_uid, "uid")):
        app = middleware.attach(tornado.web.Application([(r"/.*", EchoHandler)],
                                                        log_function=middleware.log_event))
        with serve(app) as url:
            call(url, "GET", f"/echo?field={field}", None, (("Authorization", jwt({"sub": "s-1", "uid": "u-2"})),))
    assert set(journal_kinds(spool_dir)) <= {CAPTURE}
    assert by_sub.flush(10) and by_uid.flush(10)
    assert wait_until(lambda: len(collector.events) == 2, 5)
    users = {event["request"]["uri"].rsplit("=", 1)[1]: event["user_id"] for event in collector.events}
    assert users == {"sub": "s-1", "uid": "u-2"}


@pytest.mark.parametrize("option", [{"REQUEST_BODY_MASKS": ["card"]}, {"RESPONSE_HEADER_MASKS": ["set-cookie"]},
                                    {"REQUEST_HEADER_MASKS": ["authorization"]}, {"RESPONSE_BODY_MASKS": ["x"]},
                                    {"MASK_EVENT_MODEL": lambda event: event}, {"SHIPPER": "thread"}])
def test_masks_and_the_thread_mode_keep_the_full_capture_in_the_app(
    make_middleware: Any, collector: Collector, spool_dir: str, option: Dict[str, Any]
) -> None:
    middleware = make_middleware(**option)
    assert not rawcapture.splits(middleware.config)
    collector.go_down()
    app = middleware.attach(tornado.web.Application([(r"/.*", EchoHandler)], log_function=middleware.log_event))
    with serve(app) as url:
        call(url, "POST", "/echo", b'{"card": "4111"}', (("Content-Type", "application/json"),))
    assert CAPTURE not in journal_kinds(spool_dir)
    assert rawcapture.splits(Config.from_dict({"APPLICATION_ID": "x", "SPOOL_DIR": spool_dir}))


def a_record(transaction_id: str = "tx-1") -> bytes:
    from moesiftornado_durable.rawrecord import NO_BODY, RawCapture, Settings, pack

    return pack(RawCapture(1.5, 2.5, "POST", "http://h/p", "10.0.0.1", 201, {"Host": ["h"]}, {}, None, None,
                           "u-1", True, None, None, 1, transaction_id, None, Settings(1000, ("Authorization",), "sub"),
                           b'{"a": 1}', NO_BODY, None))


def test_a_built_event_keeps_the_key_its_record_was_written_with() -> None:
    from cryptography.fernet import Fernet

    old, new = Fernet.generate_key(), Fernet.generate_key()
    [(kind, data, _)] = build_rows([(CAPTURE, Codec([old]).encode(a_record()), 1.0)], Codec([new, old]))
    assert kind == EVENT and Codec([old]).decode(data)["transaction_id"] == "tx-1"
    [(kind, data, _)] = build_rows([(CAPTURE, a_record(), 1.0)], Codec([new, old]))  # written without a key
    assert json.loads(data)["request"]["body"] == {"a": 1}


def test_a_capture_record_no_key_opens_is_kept_and_built_once_a_key_opens_it(tmp_path: Any) -> None:
    """As an event encrypted with a key the shipper lacks (a rotation under way): set aside, untouched, and
    sent once a shipper with the key claims it, built then."""
    from cryptography.fernet import Fernet

    from moesiftornado_durable.eventbuild import built
    from moesiftornado_durable.spool import open_spool

    key, other = Fernet.generate_key(), Fernet.generate_key()
    sealed = Codec([key]).encode(a_record())
    rows = build_rows([(CAPTURE, sealed, 2.0), ("user", b'{"user_id": "u"}', 3.0)], Codec([other]))
    assert rows == [(EVENT, sealed, 2.0), ("user", b'{"user_id": "u"}', 3.0)]
    path = str(tmp_path / "shipper.db")
    spool = open_spool(path, codec=Codec([other]))
    try:
        spool.ingest(rows, "intake-1-00000001.jnl3", 100)
        assert spool.claim(10) == [] and spool.stats().undecryptable == 1
    finally:
        spool.close()
    spool = open_spool(path, codec=Codec([other, key]))
    try:
        # export and audit see it as delivery will send it (they saw None: a capture record is not JSON)
        [record] = [r for r in spool.records() if r["kind"] == EVENT]
        assert record["body"] == json.loads(built(a_record()))
        [item] = spool.claim(10)
    finally:
        spool.close()
    assert item.json == built(a_record()) and item.body["transaction_id"] == "tx-1"


def test_a_damaged_capture_record_is_logged_and_kept(caplog: Any) -> None:
    [(kind, data, _)] = build_rows([(CAPTURE, b"MC\x01\x00\x00", 2.0)], Codec())
    assert (kind, data) == (EVENT, b"MC\x01\x00\x00")
    assert "could not build the event" in caplog.text



def test_segments_with_capture_records_are_kept_from_an_earlier_builds_shipper(tmp_path: Any) -> None:
    """An earlier build's shipper (segments `.jnl` or `.jnl2`) would take a capture record for damage: this
    build's segments have a name it does not read, and this build still reads the earlier `.jnl2` ones."""
    import re

    from moesiftornado_durable.journal import JournalWriter
    from moesiftornado_durable.locks import SHIPPER_SLOT, spool_path
    from moesiftornado_durable.rawrecord import NO_BODY, RawCapture, Settings, pack
    from moesiftornado_durable.shipper import journal_reader
    from moesiftornado_durable.spool import open_spool

    directory = str(tmp_path)
    earlier = JournalWriter(directory, 0)  # an earlier build's segment: an event, in a .jnl2 segment
    earlier.append(EVENT, Codec().encode({"transaction_id": "from-jnl2", "request": {}}), 1.0)
    earlier.close()
    os.rename(earlier.path, earlier.path[:-len(".jnl3")] + ".jnl2")
    writer = JournalWriter(directory, 1)
    raw = RawCapture(1.5, 2.5, "GET", "http://h/p", "::1", 200, {"Host": ["h"]}, {}, None, None, None, False, None,
                     None, 1, "from-jnl3", None, Settings(1000, ("Authorization",), "sub"), b"", NO_BODY, None)
    writer.append(CAPTURE, pack(raw), 2.0)
    writer.close()
    names = sorted(os.listdir(directory))
    earlier_pattern = re.compile(r"^intake-(\d+)-(\d+)\.jnl2?$")  # what an earlier build's shipper reads
    assert [name for name in names if name.endswith(".jnl3") and not earlier_pattern.match(name)] == \
        [os.path.basename(writer.path)]
    spool = open_spool(spool_path(directory, SHIPPER_SLOT))
    try:
        assert journal_reader(spool).ingest() == 2
        events = [item.body for item in spool.read_ready(10)]
    finally:
        spool.close()
    assert [event["transaction_id"] for event in events] == ["from-jnl2", "from-jnl3"]
    assert events[1]["request"] == {"time": "1970-01-01T00:00:01.500000", "uri": "http://h/p", "verb": "GET",
                                    "api_version": None, "ip_address": "::1", "headers": {"Host": "h"}}


def test_headers_are_read_before_an_async_callable_is_awaited(make_middleware: Any, collector: Collector) -> None:
    """Strict mode captures before the last flush, which may still change the response's headers (gzip): with
    an async callable awaited meanwhile, the record holds the headers as they were when capture began, as
    the full capture's event does."""
    import asyncio

    from moesiftornado_durable import SpoolBeforeSendMixin

    class Strict(SpoolBeforeSendMixin, EchoHandler):
        pass

    async def identify_user(handler: Any) -> str:
        await asyncio.sleep(0.05)
        return "async-user"

    events = []
    for masks in ([], ["x-not-sent"]):  # the split, then the app's full capture (a mask turns it on)
        middleware = make_middleware(IDENTIFY_USER=identify_user, RESPONSE_HEADER_MASKS=masks)
        assert rawcapture.splits(middleware.config) == (not masks)
        app = middleware.attach(tornado.web.Application([(r"/.*", Strict)], log_function=middleware.log_event,
                                                        compress_response=True))
        with serve(app) as url:
            call(url, "POST", "/echo", b'{"k": "%s"}' % (b"v" * 3000,),
                 (("Content-Type", "application/json"), ("Accept-Encoding", "gzip")))
            wait_logged(middleware, 1)  # the awaited capture is done
        assert middleware.flush(10), middleware.stats()
        assert wait_until(lambda: len(collector.events) == len(events) + 1, 5)
        events.append(collector.events[-1])
        middleware.close(2)
    split, full = events
    assert split["user_id"] == full["user_id"] == "async-user"
    for event in events:
        del event["response"]["headers"]["Date"]  # the two requests may fall in different seconds
    assert split["response"]["headers"] == full["response"]["headers"]
    assert "Content-Encoding" not in split["response"]["headers"]
    assert split["response"]["body"] == full["response"]["body"] == {"k": "v" * 3000}
