"""Fuzzing the capture path (issue 4, point 7) with hypothesis, against a real server, spool and collector.

Whatever a client sends -- binary, invalid UTF-8, gzip, deeply nested and huge bodies, odd, empty and repeated
headers in any case, query strings, methods -- and whatever the user's callbacks do -- raise, or return None,
ints, sets, bytes, objects, huge strings, values JSON cannot hold, objects whose str() raises:

- `log_event` raises 0 times;
- every request gets the response its handler meant (status and body);
- every event that was not skipped is spooled (no `dropped_*` counter), and reaches the collector.

"Skipped" is what the user asked for: SKIP returned something true, or MASK_EVENT_MODEL returned None (the
documented way to drop an event). Anything else -- a callback that raises or returns the wrong type -- must
still leave an event in the spool.
"""

from __future__ import annotations

import base64
import dataclasses
import gzip
import http.client
import json
import random
import string
import threading
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import quote_from_bytes, urlsplit

import tornado.web
from conftest import serve, wait_until
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from moesiftornado_durable import MoesifMiddleware
from moesiftornado_durable.spool import directory_stats
from moesiftornado_durable.testing import Collector

MAX_BODY_BYTES = 4096  # small, so that bodies over the limit are cheap to send
CALLBACKS = ("SKIP", "IDENTIFY_USER", "IDENTIFY_COMPANY", "GET_METADATA", "GET_SESSION_TOKEN", "API_VERSION",
             "MASK_EVENT_MODEL")
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
STATUSES = (200, 201, 202, 204, 301, 400, 401, 403, 404, 409, 418, 422, 429, 500, 502, 503)

# Headers that change the framing or the connection: the wire must stay valid HTTP/1.1 for one request.
FRAMING_HEADERS = {"content-length", "transfer-encoding", "host", "connection", "expect", "upgrade", "te",
                   "trailer", "keep-alive", "proxy-connection"}
INTERESTING_NAMES = ("Authorization", "X-Forwarded-For", "Forwarded", "X-Real-Ip", "X-Client-Ip", "Content-Type",
                     "Content-Encoding", "Cookie", "User-Agent", "Accept-Encoding", "If-None-Match", "X-User-Id",
                     "Set-Cookie", "X-Empty")
TCHARS = "!#$%&'*+-.^_`|~" + string.ascii_letters + string.digits
FIELD_VCHARS = "".join(chr(c) for c in range(0x21, 0x7F)) + "".join(chr(c) for c in range(0x80, 0x100))


# ---------------------------------------------------------------------------------------------------------------
# What the user's callbacks do
# ---------------------------------------------------------------------------------------------------------------


class Unprintable:
    """An object whose str() and repr() raise, like a lazy ORM object whose session has closed."""

    def __str__(self) -> str:
        raise RuntimeError("cannot render this object")

    __repr__ = __str__


class Opaque:
    """A plain object: str() works, JSON cannot hold it."""


def _circular() -> Dict[str, Any]:
    value: Dict[str, Any] = {"name": "loop"}
    value["self"] = value
    return value


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What one callback does on each call: return what `make` builds (fresh each time), or raise `error`."""

    label: str
    make: Callable[[], Any] = dataclasses.field(compare=False, default=lambda: None)
    error: Optional[type] = None

    def __call__(self, argument: Any) -> Any:
        if self.error is not None:
            raise self.error(f"fuzzed {self.label}")
        return self.make()

    def __repr__(self) -> str:
        return f"<{self.label}>"


NORMAL = {
    "SKIP": Outcome("False", lambda: False),
    "IDENTIFY_USER": Outcome("'user-1'", lambda: "user-1"),
    "IDENTIFY_COMPANY": Outcome("'company-1'", lambda: "company-1"),
    "GET_METADATA": Outcome("{'plan': 'gold'}", lambda: {"plan": "gold"}),
    "GET_SESSION_TOKEN": Outcome("'token-1'", lambda: "token-1"),
    "API_VERSION": Outcome("'1.0'", lambda: "1.0"),
    "MASK_EVENT_MODEL": Outcome("identity", lambda: None),  # special-cased in `mask`
}

ODD_VALUES = [
    Outcome("set", lambda: {1, 2, 3}),
    Outcome("frozenset", lambda: frozenset({"a"})),
    Outcome("empty set", lambda: set()),
    Outcome("bytes", lambda: b"\xff\xfe user"),
    Outcome("bytearray", lambda: bytearray(b"abc")),
    Outcome("object()", lambda: object()),
    Outcome("Opaque()", lambda: Opaque()),
    Outcome("Unprintable()", lambda: Unprintable()),
    Outcome("dict with tuple keys", lambda: {(1, 2): "pair", "ok": 1}),
    Outcome("dict with object keys", lambda: {Opaque(): 1}),
    Outcome("dict holding a set and an object", lambda: {"tags": {"a", "b"}, "obj": Opaque(), "raw": b"\x00"}),
    Outcome("circular dict", _circular),
    Outcome("nan", lambda: float("nan")),
    Outcome("list of Unprintable", lambda: [Unprintable()]),
    Outcome("type", lambda: int),
    Outcome("function", lambda: (lambda: None)),
    Outcome("deep list", lambda: json.loads("[" * 500 + "]" * 500)),
]
ERRORS = [ValueError, KeyError, TypeError, RuntimeError, AttributeError, UnicodeError, RecursionError]

simple_values = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30), st.binary(max_size=30),
    st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


def _returning(value: Any) -> Outcome:
    return Outcome(repr(value), lambda: value)


def _huge_string(size: int) -> Outcome:
    return Outcome(f"'u' * {size}", lambda: "u" * size)


outcomes = st.one_of(
    simple_values.map(_returning),
    st.integers(10_000, 300_000).map(_huge_string),
    st.sampled_from(ODD_VALUES),
    st.sampled_from(ERRORS).map(lambda e: Outcome(f"raise {e.__name__}", error=e)),
)


@dataclasses.dataclass(frozen=True)
class MaskOutcome:
    """MASK_EVENT_MODEL: keep the model, put an odd value in it (`metadata`), or behave as `outcome`."""

    how: str  # "identity", "set metadata" or "replace"
    outcome: Outcome = NORMAL["MASK_EVENT_MODEL"]

    def __call__(self, model: Any) -> Any:
        if self.how == "identity":
            return model
        if self.how == "set metadata":
            model.metadata = self.outcome(model)
            return model
        return self.outcome(model)

    @property
    def drops(self) -> bool:
        """Returning None is the documented way to drop an event."""
        return self.how == "replace" and self.outcome.error is None and self.outcome.make() is None


mask_outcomes = st.one_of(
    st.just(MaskOutcome("identity")),
    outcomes.map(lambda o: MaskOutcome("set metadata", o)),
    outcomes.map(lambda o: MaskOutcome("replace", o)),
)


# ---------------------------------------------------------------------------------------------------------------
# What the client sends
# ---------------------------------------------------------------------------------------------------------------


def _jwt(payload: bytes) -> str:
    encode = base64.urlsafe_b64encode
    return f"{encode(b'{}').decode()}.{encode(payload).decode().rstrip('=')}.sig"


header_names = st.tuples(
    st.one_of(st.sampled_from(INTERESTING_NAMES), st.text(alphabet=TCHARS, min_size=1, max_size=24)),
    st.sampled_from(("as is", "lower", "upper", "swapcase")),
).map(lambda pair: pair[0] if pair[1] == "as is" else getattr(pair[0], pair[1])()).filter(
    lambda name: name.lower() not in FRAMING_HEADERS
)
header_values = st.one_of(
    st.just(""),
    st.text(alphabet=FIELD_VCHARS, min_size=1, max_size=1),
    st.builds(lambda a, middle, b: a + middle + b, st.sampled_from(FIELD_VCHARS),
              st.text(alphabet=FIELD_VCHARS + " \t", max_size=120), st.sampled_from(FIELD_VCHARS)),
    st.sampled_from([
        "unknown", "unknown, 10.0.0.1", "[::1]:8080, 2001:db8::1", "for=\"[2001:db8::17]:4711\";proto=http",
        "for=unknown, for=192.0.2.60", "1.2.3.4:99999", "application/json", "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz", "text/plain; charset=utf-16", "gzip", "deflate, gzip",
        "Basic " + base64.b64encode(b"alice:secret").decode(), "Basic " + base64.b64encode(b"\xff\xfe:x").decode(),
        "Basic !!!", "Bearer", "Bearer a.b.c", "Bearer " + _jwt(b'{"sub": "bob"}'), "Bearer " + _jwt(b'["sub"]'),
        "Bearer " + _jwt(b'{"sub": {"nested": [1, 2]}}'), "Bearer " + _jwt(b"\xff\xfe"),
        "Bearer " + _jwt(b"[" * 3000), "Bearer " + _jwt(b'{"sub":' * 1500), _jwt(b'{"SUB": 42}'),
    ]),
)


def headers_strategy() -> st.SearchStrategy[List[Tuple[str, str]]]:
    """A few names, each used zero or more times: repeated headers with different values come naturally."""
    return st.lists(header_names, min_size=1, max_size=4, unique_by=str.lower).flatmap(
        lambda names: st.lists(st.tuples(st.sampled_from(names), header_values), max_size=8)
    )


def _huge(size: int, seed: int) -> bytes:
    return random.Random(seed).getrandbits(8 * size).to_bytes(size, "little")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
bodies = st.one_of(
    st.just((b"", None)),
    st.binary(max_size=300).map(lambda b: (b, None)),
    st.binary(max_size=100).map(lambda b: (b"\xff\xfe\xc3\x28" + b, None)),  # invalid UTF-8
    json_values.map(lambda v: (json.dumps(v).encode(), None)),
    st.binary(max_size=60).map(lambda b: (b"{" + b, None)),  # looks like JSON, is not
    st.builds(lambda depth, closed: (b"[" * depth + (b"]" * depth if closed else b""), None),
              st.integers(1, 4000), st.booleans()),  # deeply nested JSON
    st.binary(max_size=300).map(lambda b: (gzip.compress(b), "gzip")),
    st.binary(max_size=60).map(lambda b: (b"\x1f\x8b" + b, "gzip")),  # says gzip, is not
    st.builds(lambda size, seed: (_huge(size, seed), None), st.integers(MAX_BODY_BYTES + 1, 400_000),
              st.integers(0, 2**32)),  # over MAX_BODY_BYTES
    st.integers(MAX_BODY_BYTES, 100_000).map(lambda size: (gzip.compress(b"z" * size), "gzip")),  # gzip bomb-ish
)
query_strings = st.lists(
    st.tuples(st.binary(max_size=12), st.binary(max_size=20)), max_size=5
).map(lambda pairs: "&".join(quote_from_bytes(k) + "=" + quote_from_bytes(v) for k, v in pairs))


@dataclasses.dataclass(frozen=True)
class Case:
    method: str
    status: int
    path_tail: str
    query: str
    headers: List[Tuple[str, str]]
    body: bytes
    content_encoding: Optional[str]
    callbacks: Dict[str, Any]

    @property
    def skipped(self) -> bool:
        skip = self.callbacks["SKIP"]
        if skip.error is None and bool(skip.make()):
            return True
        return bool(self.callbacks["MASK_EVENT_MODEL"].drops)

    @property
    def expected_body(self) -> bytes:
        return b"" if self.status == 204 or self.method == "HEAD" else self.body

    def __repr__(self) -> str:
        body = repr(self.body) if len(self.body) <= 80 else f"{self.body[:60]!r}... ({len(self.body)} bytes)"
        return (f"Case({self.method} /fuzz/{self.status}/{self.path_tail}?{self.query}, headers={self.headers!r}, "
                f"body={body}, content_encoding={self.content_encoding!r}, callbacks={self.callbacks!r})")


CALLBACK_STRATEGIES = {
    name: mask_outcomes if name == "MASK_EVENT_MODEL" else st.one_of(st.just(NORMAL[name]), outcomes)
    for name in CALLBACKS
}
# most odd SKIP results are true (skip the event): keep SKIP normal 3 times in 4, so most requests reach capture
CALLBACK_STRATEGIES["SKIP"] = st.integers(0, 3).flatmap(lambda n: outcomes if n == 0 else st.just(NORMAL["SKIP"]))


@st.composite
def cases(draw: Any) -> Case:
    body, content_encoding = draw(bodies)
    return Case(
        method=draw(st.sampled_from(METHODS)),
        status=draw(st.sampled_from(STATUSES)),
        path_tail=quote_from_bytes(draw(st.binary(max_size=10))),
        query=draw(query_strings),
        headers=draw(headers_strategy()),
        body=body,
        content_encoding=content_encoding,
        callbacks={name: draw(strategy) for name, strategy in CALLBACK_STRATEGIES.items()},
    )


def plain_case(**changes: Any) -> Case:
    """A plain GET with normal callbacks, changed as given: the explicit examples below."""
    callbacks: Dict[str, Any] = dict(NORMAL, MASK_EVENT_MODEL=MaskOutcome("identity"))
    callbacks.update(changes.pop("callbacks", {}))
    fields: Dict[str, Any] = dict(method="GET", status=200, path_tail="", query="", headers=[], body=b"",
                                  content_encoding=None, callbacks=callbacks)
    fields.update(changes)
    return Case(**fields)


def _by_label(label: str) -> Outcome:
    return next(outcome for outcome in ODD_VALUES if outcome.label == label)


# Each of these once dropped its event (see the commits that fixed them); they run on every test run.
KNOWN_BREAKERS = [
    plain_case(method="POST", body=b"[" * 5000),
    plain_case(method="POST", body=b"[" * 985 + b"]" * 985),
    plain_case(headers=[("Authorization", "Bearer " + _jwt(b"[" * 3000))]),
    plain_case(callbacks={"MASK_EVENT_MODEL": MaskOutcome("replace", _returning(0))}),
    plain_case(callbacks={"IDENTIFY_USER": _by_label("Unprintable()")}),
    plain_case(callbacks={"GET_METADATA": _by_label("dict with tuple keys")}),
    plain_case(callbacks={"GET_METADATA": _by_label("circular dict")}),
    plain_case(callbacks={"GET_METADATA": _by_label("list of Unprintable")}),
]


# ---------------------------------------------------------------------------------------------------------------
# The server side
# ---------------------------------------------------------------------------------------------------------------


class Fuzzed(tornado.web.RequestHandler):
    """Answers with the status in the path and echoes the request body (none for HEAD and 204)."""

    def compute_etag(self) -> Optional[str]:
        return None  # no 304 for a fuzzed If-None-Match: the intended response is the one below

    def answer(self, status: str) -> None:
        self.set_status(int(status))
        self.add_header("X-Echo", "one")
        self.add_header("X-Echo", "two")
        if int(status) != 204 and self.request.method != "HEAD":
            self.set_header("Content-Type", "application/octet-stream")
            self.write(self.request.body)

    get = head = post = put = patch = delete = options = answer


class CountingLogFunction:
    """Wraps log_event: counts calls, returns and exceptions (and lets an exception through, as Tornado sees it)."""

    def __init__(self, log_event: Callable[[Any], None]) -> None:
        self._log_event = log_event
        self._lock = threading.Lock()
        self.calls = self.returned = self.raised = 0

    def __call__(self, handler: Any) -> None:
        with self._lock:
            self.calls += 1
        try:
            self._log_event(handler)
        except BaseException:
            with self._lock:
                self.raised += 1
            raise
        with self._lock:
            self.returned += 1


def send(url: str, case: Case) -> Tuple[int, bytes]:
    """One request on its own connection, headers exactly as drawn (repeats and case kept)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        target = f"/fuzz/{case.status}/{case.path_tail}" + (f"?{case.query}" if case.query else "")
        connection.putrequest(case.method, target, skip_accept_encoding=True)
        for name, value in case.headers:
            connection.putheader(name, value.encode("latin-1"))
        if case.content_encoding:
            connection.putheader("Content-Encoding", case.content_encoding)
        if case.body or case.method in ("POST", "PUT", "PATCH"):
            connection.putheader("Content-Length", str(len(case.body)))
        connection.endheaders(case.body or None)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_fuzzed_requests_and_callbacks_never_break_logging(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    current: Dict[str, Any] = dict(NORMAL)
    current["MASK_EVENT_MODEL"] = MaskOutcome("identity")

    def dispatch(name: str) -> Callable[[Any], Any]:
        return lambda argument: current[name](argument)

    middleware = make_middleware(MAX_BODY_BYTES=MAX_BODY_BYTES, **{name: dispatch(name) for name in CALLBACKS})
    log_function = CountingLogFunction(middleware.log_event)
    app = middleware.attach(tornado.web.Application([(r"/fuzz/(\d+)(?:/.*)?", Fuzzed)], log_function=log_function))
    totals = {"examples": 0, "requests": 0, "expected_spooled": 0, "skipped": 0}

    with serve(app) as url:

        @settings(max_examples=200, deadline=None, derandomize=True, database=None, print_blob=True,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        @given(case=cases())
        def one_request(case: Case) -> None:
            current.update(case.callbacks)
            before = middleware.stats()
            calls_before = log_function.calls
            status, body = send(url, case)
            totals["examples"] += 1
            totals["requests"] += 1
            assert (status, body) == (case.status, case.expected_body)
            # log_function runs after the response is written: wait until it has returned
            assert wait_until(lambda: log_function.calls == calls_before + 1
                              and log_function.returned + log_function.raised == log_function.calls,
                              timeout=10), vars(log_function)
            assert log_function.raised == 0
            after = middleware.stats()
            dropped = {k: v - before.get(k, 0) for k, v in after.items() if k.startswith("dropped_")}
            assert not any(dropped.values()), dropped
            expected = 0 if case.skipped else 1
            totals["expected_spooled"] += expected
            totals["skipped"] += 1 - expected
            assert after.get("spooled", 0) - before.get("spooled", 0) == expected

        for known in KNOWN_BREAKERS:
            one_request = example(case=known)(one_request)
        one_request()

    assert log_function.raised == 0
    stats = middleware.stats()
    assert [key for key in stats if key.startswith("dropped_")] == []
    assert stats.get("spooled", 0) == totals["expected_spooled"]
    assert middleware.flush(60), middleware.stats()
    assert len(set(collector.transaction_ids())) == totals["expected_spooled"]
    for event in collector.events:  # strict JSON went out: no NaN or Infinity, which Moesif would reject
        json.dumps(event, allow_nan=False)
    assert directory_stats(spool_dir).dead_letter == 0
    print(f"\nfuzz: {totals['examples']} examples, {totals['requests']} requests, {log_function.calls} log_event "
          f"calls, {stats.get('spooled', 0)} events spooled, {totals['skipped']} skipped, "
          f"{log_function.raised} log_event exceptions, {len(set(collector.transaction_ids()))} delivered")
