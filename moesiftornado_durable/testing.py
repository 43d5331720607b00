"""A local, Moesif-compatible collector for tests, benchmarks and demos.

``Collector`` is a real HTTP server on the loopback interface that speaks the part of Moesif's ingestion API this
library uses: ``POST /v1/events``, ``/v1/events/batch``, ``/v1/users[/batch]``, ``/v1/companies[/batch]``,
``/v1/subscriptions[/batch]``, ``GET /v1/config`` and ``GET /v1/rules`` (governance rules, none unless set). It
records everything it accepts, so a test can assert on what arrived, and it can be told to misbehave -- answer 503
or 429, stall, drop the connection, stop listening for a while -- so retries and spooling can be exercised without a
Moesif account::

    with Collector() as collector:
        point_the_logger_at(collector.base_uri)
        ...
        assert collector.wait_for_events(3, timeout=5.0)
        collector.respond_with(503, times=2)   # the next two ingestion requests fail

A collector in another process (``python -m moesiftornado_durable.testing``) is controlled over HTTP instead:
``POST /_control/fault``, ``GET /_control/stats``, ``GET /_control/events`` (see ``Collector`` and ``main``).

It serves with Tornado's ``HTTPServer`` on an IOLoop of its own, in a thread of its own: the same from a plain
synchronous test as from the test of a Tornado application running its own IOLoop. Faults that wait (stalls,
trickled answers) wait on that loop without holding up the other connections.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import datetime
import gc
import gzip
import hashlib
import ipaddress
import json
import logging
import signal
import socket
import sys
import threading
import time
import weakref
import zlib
from collections import deque
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Tuple, Type, Union
from urllib.parse import urlsplit

import orjson as _orjson  # checks a batch in less than half the standard parser's time: most of the work here
import tornado.gen
import tornado.httpserver
import tornado.httputil
import tornado.ioloop
import tornado.locks
import tornado.netutil
from tornado.http1connection import HTTP1Connection
from tornado.iostream import IOStream, StreamClosedError
from tornado.util import TimeoutError as _WaitTimeout

__all__ = ["DEFAULT_APP_CONFIG", "Collector", "ReceivedRequest", "main"]

logger = logging.getLogger("moesiftornado_durable.testing")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_APP_CONFIG: Mapping[str, Any] = {
    "sample_rate": 100,
    "user_sample_rate": {},
    "company_sample_rate": {},
    "regex_config": [],
}
APPLICATION_ID_HEADER = "X-Moesif-Application-Id"
CONFIG_ETAG_HEADER = "X-Moesif-Config-ETag"
RULES_TAG_HEADER = "X-Moesif-Rules-Tag"
MAX_BODY_BYTES = 50 * 1024 * 1024  # Moesif's documented limit for one batch
CONTROL_PREFIX = "/_control/"
GC_THRESHOLD = 100_000  # allocations between garbage collections when the collector runs as its own process

_BACKLOG = 128  # connections the kernel queues before the collector accepts them
# How long stop() lets woken stalls and writes finish, then how long it waits for the thread, in total.
_DRAIN_TIMEOUT = 0.5
_JOIN_TIMEOUT = 1.5

# Ingestion path -> (what it carries, whether the body is a list of them).
_INGESTION_ROUTES: Dict[str, Tuple[str, bool]] = {
    "/v1/events": ("events", False),
    "/v1/events/batch": ("events", True),
    "/v1/users": ("users", False),
    "/v1/users/batch": ("users", True),
    "/v1/companies": ("companies", False),
    "/v1/companies/batch": ("companies", True),
    "/v1/subscriptions": ("subscriptions", False),
    "/v1/subscriptions/batch": ("subscriptions", True),
}
_KINDS = ("events", "users", "companies", "subscriptions")
_CONFIG_PATHS = ("/v1/config", "/v1/rules")

JSONObject = Dict[str, Any]


@dataclass(frozen=True)
class ReceivedRequest:
    """One request the collector received, whatever became of it, so tests can check what a client tried.

    ``status`` is the status answered (0 when the connection was dropped without an answer), ``items`` how many
    events, users, companies or subscriptions were recorded from it, ``time`` its arrival (``time.time()``).
    ``headers`` have their names in Tornado's canonical case (``Content-Encoding``); a repeated header keeps its
    last value.
    """

    method: str
    path: str
    headers: Dict[str, str]
    status: int
    items: int
    time: float


# --------------------------------------------------------------------------------------------------------------
# What a request asks, and what the collector answers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Incoming:
    """A request as read off the wire, before the collector decides what to do with it."""

    method: str
    path: str
    headers: Dict[str, str]
    body: bytes
    arrived: float

    def header(self, name: str) -> Optional[str]:
        """The value of header ``name``, compared case-insensitively, or None."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True)
class _Answer:
    """What to send back; status 0 means close the connection without any answer."""

    status: int
    body: bytes = b""
    headers: Dict[str, str] = field(default_factory=dict)
    close: bool = False
    # Run with the request's socket just before the answer is written (used to go down, sparing that socket).
    before_write: Optional[Callable[[IOStream], None]] = None
    # Write the whole answer, status line included, this many bytes at a time, one piece per that many seconds.
    trickle: Optional[Tuple[int, float]] = None
    # A body of this many generated bytes instead of ``body`` (-1: endless, chunked), written until the client quits.
    filler: Optional[int] = None


_DROP = _Answer(0, close=True)


def _json_answer(status: int, payload: Any, headers: Optional[Mapping[str, str]] = None, close: bool = False,
                 before_write: Optional[Callable[[IOStream], None]] = None) -> _Answer:
    """An answer whose body is ``payload`` as JSON."""
    all_headers = {"Content-Type": "application/json; charset=utf-8"}
    all_headers.update(headers or {})
    body = json.dumps(payload).encode("utf-8")
    return _Answer(status, body, all_headers, close, before_write)


def _error(status: int, message: str, close: bool = False) -> _Answer:
    """A short JSON error answer, like Moesif's."""
    return _json_answer(status, {"error": message}, close=close)


# --------------------------------------------------------------------------------------------------------------
# Faults
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Fault:
    """One kind of misbehaviour: answer ``status`` (a redirect is one, with a Location), stall ``seconds`` then
    answer normally, drop, trickle the normal answer ``size`` bytes per ``seconds``, or answer 200 with a body of
    ``size`` bytes (``huge``; -1: endless)."""

    kind: str  # "status", "stall", "drop", "trickle" or "huge"
    status: int = 0
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0
    size: int = 0

    def describe(self) -> str:
        """A short label for logs and for ``faults_pending`` readers."""
        if self.kind == "status":
            return f"status {self.status}"
        if self.kind == "stall":
            return f"stall {self.seconds:.3g}s"
        if self.kind == "trickle":
            return f"trickle {self.size} B per {self.seconds:.3g}s"
        if self.kind == "huge":
            return "endless body" if self.size < 0 else f"{self.size}-byte body"
        return "drop"


class _FaultQueue:
    """Faults waiting for ingestion requests, applied in FIFO order, each to its number of requests.

    A fault with ``times=None`` applies to every request until ``reset()``, so faults queued behind it wait.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: Deque[Tuple[_Fault, Optional[int]]] = deque()

    def add(self, fault: _Fault, times: Optional[int]) -> None:
        """Queue ``fault`` for the next ``times`` requests (None: until reset)."""
        if times is not None and (isinstance(times, bool) or not isinstance(times, int) or times < 1):
            raise ValueError(f"times must be a positive int or None, not {times!r}")
        with self._lock:
            self._pending.append((fault, times))
        logger.debug("fault queued: %s x %s", fault.describe(), "until reset" if times is None else times)

    def take(self) -> Optional[_Fault]:
        """The fault for the request being served, if any, counting it as used once."""
        with self._lock:
            if not self._pending:
                return None
            fault, times = self._pending[0]
            if times is not None:
                if times <= 1:
                    self._pending.popleft()
                else:
                    self._pending[0] = (fault, times - 1)
            return fault

    def reset(self) -> None:
        """Forget every pending fault."""
        with self._lock:
            self._pending.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


def _fault_headers(headers: Optional[Mapping[str, str]]) -> Dict[str, str]:
    """Validated response headers for an injected answer: no line breaks, no Content-Length (we set it)."""
    checked: Dict[str, str] = {}
    for name, value in (headers or {}).items():
        name, value = str(name), str(value)
        if not name or any(c in name + value for c in "\r\n") or ":" in name:
            raise ValueError(f"invalid response header {name!r}: {value!r}")
        if name.lower() in ("content-length", "transfer-encoding"):
            raise ValueError(f"header {name!r} is set by the collector")
        checked[name] = value
    return checked


# --------------------------------------------------------------------------------------------------------------
# Recordings and the app config
# --------------------------------------------------------------------------------------------------------------


class _Accepted:
    """The items of one accepted request, kept as the JSON that carried them and parsed on first look.

    The request was parsed once to validate it; keeping those objects would make every full garbage
    collection walk all of them (a third of the collector's time in a long replay), so only the bytes are
    kept until a test asks. Once parsed, the same objects are returned every time.
    """

    __slots__ = ("_json", "_is_batch", "count", "_items")

    def __init__(self, json_bytes: bytes, is_batch: bool, count: int) -> None:
        self._json: Optional[bytes] = json_bytes
        self._is_batch = is_batch
        self.count = count
        self._items: List[JSONObject] = []

    def items(self) -> List[JSONObject]:
        if self._json is not None:
            payload = json.loads(self._json)
            self._items = payload if self._is_batch else [payload]
            self._json = None
        return self._items


class _Recorder:
    """Everything the collector received, under one lock; waiters are woken on every change."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._accepted: Dict[str, List[_Accepted]] = {kind: [] for kind in _KINDS}
        self._counts: Dict[str, int] = dict.fromkeys(_KINDS, 0)
        self._requests: List[ReceivedRequest] = []

    def record(self, request: ReceivedRequest, kind: Optional[str] = None,
               accepted: Optional[_Accepted] = None) -> None:
        """Remember ``request`` and, if it was accepted, what it carried."""
        with self._changed:
            self._requests.append(request)
            if kind is not None and accepted is not None and accepted.count:
                self._accepted[kind].append(accepted)
                self._counts[kind] += accepted.count
            self._changed.notify_all()

    def items(self, kind: str) -> List[JSONObject]:
        """A copy of the list of recorded ``kind`` items, in arrival order."""
        with self._changed:
            return self._items(kind)

    def _items(self, kind: str) -> List[JSONObject]:
        items: List[JSONObject] = []
        for accepted in self._accepted[kind]:
            items.extend(accepted.items())
        return items

    def requests(self) -> List[ReceivedRequest]:
        """A copy of the list of received requests, in arrival order."""
        with self._changed:
            return list(self._requests)

    def transaction_ids(self) -> List[str]:
        """The ``transaction_id`` of each recorded event that has one, duplicates kept."""
        with self._changed:
            return [str(e["transaction_id"]) for e in self._items("events") if e.get("transaction_id") is not None]

    def wait_until(self, kind: str, count: int, timeout: float) -> bool:
        """Block until at least ``count`` ``kind`` are recorded ("requests" counts requests); False on timeout."""
        def enough() -> bool:
            recorded = len(self._requests) if kind == "requests" else self._counts[kind]
            return recorded >= count

        with self._changed:
            return self._changed.wait_for(enough, timeout)

    def count(self, kind: str) -> int:
        """How many ``kind`` were recorded (without parsing them)."""
        with self._changed:
            return self._counts[kind]

    def counts(self) -> Dict[str, int]:
        """How many of each were recorded, plus the number of distinct transaction ids."""
        with self._changed:
            counts = dict(self._counts)
            counts["unique_transaction_ids"] = len(
                {e.get("transaction_id") for e in self._items("events") if e.get("transaction_id") is not None}
            )
            counts["requests"] = len(self._requests)
            return counts

    def clear(self) -> None:
        """Forget every recording."""
        with self._changed:
            for batches in self._accepted.values():
                batches.clear()
            self._counts = dict.fromkeys(_KINDS, 0)
            self._requests.clear()
            self._changed.notify_all()


class _AppConfig:
    """The app config served on ``GET /v1/config``, kept as JSON bytes with an etag derived from them."""

    def __init__(self, initial: Any) -> None:
        self._lock = threading.Lock()
        self._body = b"{}"
        self._etag = ""
        self.set(initial)

    def set(self, config: Mapping[str, Any]) -> None:
        """Replace the config; the etag changes whenever the JSON does."""
        if not isinstance(config, Mapping):
            raise TypeError(f"app_config must be a dict, not {type(config).__name__}")
        self._store(dict(config))

    def _store(self, value: Any) -> None:
        body = json.dumps(value, sort_keys=True, separators=(",", ":")).encode("utf-8")
        with self._lock:
            self._body = body
            self._etag = hashlib.sha256(body).hexdigest()[:32]

    def get(self) -> Any:
        """A fresh copy of the config."""
        body, _ = self.snapshot()
        return json.loads(body)

    def snapshot(self) -> Tuple[bytes, str]:
        """The config's JSON bytes and etag, read together."""
        with self._lock:
            return self._body, self._etag


class _Rules(_AppConfig):
    """The governance rules served on ``GET /v1/rules``: a JSON list, with a tag that changes with it."""

    def __init__(self) -> None:
        super().__init__([])

    def set(self, rules: Any) -> None:
        if not isinstance(rules, list) or not all(isinstance(rule, Mapping) for rule in rules):
            raise TypeError("rules must be a list of dicts")
        self._store(rules)


# --------------------------------------------------------------------------------------------------------------
# HTTP plumbing: Tornado's HTTPServer, on the collector's own IOLoop thread
# --------------------------------------------------------------------------------------------------------------


class _Server(tornado.httpserver.HTTPServer):
    """Tornado's HTTPServer, telling its period of every connection it accepts (so a period can end them)."""

    period: _Period

    def handle_stream(self, stream: IOStream, address: Any) -> None:
        self.period.track(stream)
        super().handle_stream(stream, address)


class _Period(tornado.httputil.HTTPServerConnectionDelegate):
    """One listening period of a Collector (start or come_up, to go_down or stop): its server, the connections
    it accepted, and ``closing``, set when the period ends so stalls and slow answers stop at once. Gives each
    request an `_Exchange`.

    Used on the collector's IOLoop thread only.
    """

    def __init__(self, collector: Collector, sockets: List[socket.socket]) -> None:
        self.closing = tornado.locks.Event()
        self._collector = collector
        self._streams: weakref.WeakSet[IOStream] = weakref.WeakSet()  # a closed connection's stream goes by itself
        # Bodies are limited per request (Collector.max_request_bytes, answered 413), not by Tornado (a bare 400).
        self.server = _Server(self, max_body_size=_UNLIMITED)
        self.server.period = self
        self.server.add_sockets(sockets)

    def track(self, stream: IOStream) -> None:
        """Remember an accepted connection so ``end`` can close it."""
        self._streams.add(stream)

    def start_request(self, server_conn: object,
                      request_conn: tornado.httputil.HTTPConnection) -> tornado.httputil.HTTPMessageDelegate:
        assert isinstance(request_conn, HTTP1Connection)
        return _Exchange(self._collector, self, request_conn)

    def end(self, spare: Optional[IOStream] = None) -> None:
        """Stop listening (the port refuses connections from here on), wake stalled requests and close every
        connection but ``spare``."""
        self.server.stop()
        self.closing.set()
        for stream in list(self._streams):
            if stream is not spare:
                stream.close()

    async def ends_within(self, seconds: float) -> bool:
        """Wait ``seconds`` without holding up the IOLoop; True if the period ended meanwhile."""
        try:
            await self.closing.wait(timeout=datetime.timedelta(seconds=seconds))
        except _WaitTimeout:
            pass
        return self.closing.is_set()


class _Exchange(tornado.httputil.HTTPMessageDelegate):
    """One request and its answer: reads the body (dropping it past ``max_request_bytes``), lets the Collector
    decide the answer, writes it. Connections are kept alive (HTTP/1.1) unless the answer closes them."""

    def __init__(self, collector: Collector, period: _Period, connection: HTTP1Connection) -> None:
        self._collector = collector
        self._period = period
        self._connection = connection
        self._limit = collector.max_request_bytes
        self._method = ""
        self._path = ""
        self._headers: Dict[str, str] = {}
        self._arrived = 0.0
        self._body: List[bytes] = []
        self._size = 0

    def headers_received(self, start_line: Union[tornado.httputil.RequestStartLine,
                                                 tornado.httputil.ResponseStartLine],
                         headers: tornado.httputil.HTTPHeaders) -> None:
        assert isinstance(start_line, tornado.httputil.RequestStartLine)
        self._arrived = time.time()
        self._method = start_line.method
        self._path = urlsplit(start_line.path).path
        self._headers = dict(headers.get_all())
        try:
            self._size = int(headers.get("Content-Length", "0"))  # chunked bodies are counted as they come
        except ValueError:
            self._size = 0  # Tornado answers such a request 400 itself

    def data_received(self, chunk: bytes) -> None:
        if "Content-Length" not in self._headers:  # chunked: counted as it comes
            self._size += len(chunk)
        if self._size <= self._limit:
            self._body.append(chunk)

    def finish(self) -> None:
        tornado.ioloop.IOLoop.current().add_callback(self._respond)

    def on_connection_close(self) -> None:
        """The client left; an answer still being decided fails to write, quietly."""

    async def _respond(self) -> None:
        collector = self._collector
        collector._serving += 1
        try:
            if self._size > self._limit:
                answer = collector._reject(self._method, self._path, self._headers, self._arrived,
                                           _error(413, f"body larger than {self._limit} bytes", close=True))
            else:
                request = _Incoming(self._method, self._path, self._headers, b"".join(self._body), self._arrived)
                self._body = []
                answer = await collector._answer(request, self._period)
            await self._write(answer)
        except StreamClosedError:
            logger.debug("client left before its answer to %s was written", self._path)
        except Exception:
            logger.exception("collector error while answering %s %s; connection closed", self._method, self._path)
            self._connection.close()
        finally:
            collector._serving -= 1

    async def _write(self, answer: _Answer) -> None:
        connection = self._connection
        if answer.before_write is not None:
            answer.before_write(connection.stream)
        if answer.status == 0:
            connection.detach().close()  # a dropped connection: no answer at all
            return
        if answer.trickle is not None:
            await self._write_trickled(answer, connection.detach())
            return
        start = tornado.httputil.ResponseStartLine(
            "HTTP/1.1", answer.status, tornado.httputil.responses.get(answer.status, "Unknown"))
        headers = tornado.httputil.HTTPHeaders(answer.headers)
        if answer.filler is not None:
            await self._write_filler(start, headers, answer.filler)
            return
        with_body = answer.status not in (204, 304)
        if with_body:
            headers["Content-Length"] = str(len(answer.body))
        if answer.close:
            headers["Connection"] = "close"
        written = connection.write_headers(start, headers, answer.body if with_body and answer.body else None)
        if not answer.close:
            connection.finish()
            return
        await written
        connection.finish()
        connection.detach().close()

    async def _write_trickled(self, answer: _Answer, stream: IOStream) -> None:
        """The whole answer, status line included, a few bytes at a time, until it is out, the client leaves
        or the period ends; then the connection is closed."""
        assert answer.trickle is not None
        size, seconds = answer.trickle
        head = [f"HTTP/1.1 {answer.status} {tornado.httputil.responses.get(answer.status, 'Unknown')}"]
        head += [f"{name}: {value}" for name, value in answer.headers.items()]
        head += [f"Content-Length: {len(answer.body)}", "Connection: close", "", ""]
        data = "\r\n".join(head).encode("latin-1") + answer.body
        stream.set_nodelay(True)  # each piece leaves at once, not merged with the next by Nagle's algorithm
        try:
            for start in range(0, len(data), size):
                await stream.write(data[start:start + size])
                if await self._period.ends_within(seconds):
                    return
        finally:
            stream.close()

    async def _write_filler(self, start: tornado.httputil.ResponseStartLine, headers: tornado.httputil.HTTPHeaders,
                            size: int) -> None:
        """Headers, then ``size`` generated bytes (-1: endless, chunked by Tornado) until done, the client leaves
        or the period ends; each piece is flushed before the next is made, so a client that stops reading
        stops the writing. The connection is closed afterwards."""
        connection = self._connection
        headers["Connection"] = "close"
        if size >= 0:
            headers["Content-Length"] = str(size)
        connection.write_headers(start, headers)
        left = size
        try:
            while (size < 0 or left > 0) and not self._period.closing.is_set():
                piece = _FILLER_BLOCK[:left] if 0 <= left < len(_FILLER_BLOCK) else _FILLER_BLOCK
                await connection.write(piece)
                left -= len(piece)
                self._collector._count_filler(len(piece))
        finally:
            connection.detach().close()


_FILLER_BLOCK = b"x" * (64 * 1024)
_UNLIMITED = 1 << 62

# --------------------------------------------------------------------------------------------------------------
# The collector
# --------------------------------------------------------------------------------------------------------------


def _check_loopback(host: str) -> None:
    """Refuse anything but a loopback host: the collector is for local tests and must never face a network."""
    if host == "localhost":
        return
    try:
        if ipaddress.ip_address(host).is_loopback:
            return
    except ValueError:
        pass
    raise ValueError(f"Collector only listens on loopback (127.0.0.0/8, localhost, ::1), not {host!r}")


class Collector:
    """A local HTTP server speaking Moesif's ingestion API, recording what it accepts and misbehaving on demand.

    Use it as a context manager (``with Collector() as c:``) or call ``start()`` and ``stop()``; it serves from a
    daemon thread named "moesif-collector". It listens on loopback only; ``port=0`` picks a free port, read back
    from ``port`` or ``base_uri``. When ``application_id`` is given, requests carrying another
    ``X-Moesif-Application-Id`` get 401; otherwise any non-empty id is taken.

    Besides Moesif's paths it answers, without faults and without an application id:

    - ``POST /_control/fault`` with one of ``{"status": 503, "times": 3, "headers": {...}, "body": "..."}``,
      ``{"stall": 5.0, "times": 1}``, ``{"drop": true, "times": 2}``, ``{"redirect": "http://...",
      "redirect_status": 307}``, ``{"trickle": 0.5, "size": 1}``, ``{"huge_body": 1073741824}`` (``null``:
      endless; these three take ``"config": true`` to fault GET /v1/config and /v1/rules instead),
      ``{"reset": true}`` or
      ``{"down_for": 2.5}`` (stops listening, answers, and listens again by itself after that long);
      ``"times": null`` means until reset, and the default is 1.
    - ``GET /_control/stats`` (counts), ``GET /_control/events`` (recorded events), ``POST /_control/clear``,
      ``GET`` or ``POST /_control/config`` (read or replace ``app_config``), ``GET`` or ``POST /_control/rules``
      (read or replace the governance ``rules``).

    Control requests are not listed in ``requests``.
    """

    def __init__(self, host: str = DEFAULT_HOST, port: int = 0, application_id: Optional[str] = None) -> None:
        _check_loopback(host)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"port must be an int from 0 to 65535, not {port!r}")
        self._host = host
        self._port = port
        self._held: Optional[socket.socket] = None  # the port, bound but not listening, while down
        self._application_id = application_id
        self._recorder = _Recorder()
        self._faults = _FaultQueue()
        self._config_faults = _FaultQueue()  # for GET /v1/config and /v1/rules
        self._filler_lock = threading.Lock()
        self._filler_bytes = 0
        self._config = _AppConfig(DEFAULT_APP_CONFIG)
        self._rules = _Rules()
        # Requests with a larger body (as sent, i.e. gzipped) are answered 413, as Moesif does past its limits.
        self.max_request_bytes = MAX_BODY_BYTES

        self._lifecycle = threading.Lock()  # start, stop, go_down and come_up from other threads, one at a time
        self._thread: Optional[threading.Thread] = None
        self._started = False
        self._stopped = threading.Event()
        # Used on the IOLoop thread only (``_period`` is read anywhere for ``is_up``):
        self._io_loop: Optional[tornado.ioloop.IOLoop] = None
        self._stop_requested: Optional[tornado.locks.Event] = None
        self._period: Optional[_Period] = None  # None while down
        self._downtime_token = 0  # bumped by every go_down/come_up, so an older down_for timer stands aside
        self._serving = 0  # requests being answered

    def __repr__(self) -> str:
        state = "stopped" if self._stopped.is_set() else ("up" if self.is_up else "down")
        return f"<Collector {self._host}:{self._port} {state} events={self._recorder.count('events')}>"

    # ---- lifecycle ---------------------------------------------------------------------------------------------

    def start(self) -> Collector:
        """Bind, then serve on an IOLoop of its own in a daemon thread named "moesif-collector"; calling it again
        is harmless. Raises OSError if the port cannot be bound."""
        with self._lifecycle:
            if self._stopped.is_set():
                raise RuntimeError("this Collector was stopped; create a new one")
            if self._thread is None:
                sockets = self._bind()
                ready: concurrent.futures.Future[None] = concurrent.futures.Future()
                thread = threading.Thread(target=self._run, args=(sockets, ready), name="moesif-collector",
                                          daemon=True)
                thread.start()
                ready.result()
                self._thread = thread
                self._started = True
        return self

    def stop(self) -> None:
        """Stop listening, end open and stalled connections, and wait briefly for the thread; idempotent."""
        self._stopped.set()  # a pending down_for timer stands aside
        with self._lifecycle:
            thread, io_loop, stop_requested = self._thread, self._io_loop, self._stop_requested
            if thread is None or io_loop is None or stop_requested is None or not thread.is_alive():
                return
            io_loop.add_callback(stop_requested.set)
            if thread is not threading.current_thread():
                thread.join(_JOIN_TIMEOUT)

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port listened on (the one picked by the system once started with port 0)."""
        return self._port

    @property
    def base_uri(self) -> str:
        """The URI to give a Moesif client, such as ``http://127.0.0.1:54321``."""
        if not self._started:
            raise RuntimeError("the Collector has not been started")
        if self._host == "localhost":
            host = "127.0.0.1"  # what "localhost" was bound as (IPv4), and no name lookup for clients
        elif ":" in self._host:
            host = f"[{self._host}]"
        else:
            host = self._host
        return f"http://{host}:{self._port}"

    @property
    def is_up(self) -> bool:
        """Whether the collector is accepting connections right now."""
        return self._period is not None

    def go_down(self, for_seconds: Optional[float] = None) -> None:
        """Stop listening, so clients get "connection refused", as during an outage; ``come_up()`` ends it.

        With ``for_seconds``, the collector comes up again by itself after that long.
        """
        if for_seconds is not None and not for_seconds >= 0:
            raise ValueError(f"for_seconds must be >= 0, not {for_seconds!r}")
        with self._lifecycle:
            self._require_running()
            self._on_loop(self._go_down, for_seconds, None)

    def come_up(self) -> None:
        """Listen again on the same port after ``go_down()``; harmless when already up."""
        with self._lifecycle:
            self._require_running()
            self._on_loop(self._come_up)

    def _require_running(self) -> None:
        if self._thread is None or self._stopped.is_set():
            raise RuntimeError("the Collector is not running (start() it; a stopped one cannot come back)")

    def _family(self) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in self._host else socket.AF_INET  # "localhost": IPv4 only

    def _bind(self) -> List[socket.socket]:
        held, self._held = self._held, None
        if held is not None:  # the port kept while down: listen on it again
            held.setblocking(False)
            held.listen(_BACKLOG)
            return [held]
        sockets = tornado.netutil.bind_sockets(self._port, self._host, family=self._family(), backlog=_BACKLOG)
        self._port = int(sockets[0].getsockname()[1])
        return sockets

    def _hold_port(self) -> None:
        """While down, keep the port bound but not listening: connections are refused, as from a server that
        is down, and no other program can take the port before ``come_up`` (seen in CI: "Address already in
        use"). If it cannot be held, ``come_up`` binds it afresh."""
        sock = socket.socket(self._family(), socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(socket.getaddrinfo(self._host, self._port, self._family(), socket.SOCK_STREAM)[0][4])
        except OSError:
            sock.close()
            return
        self._held = sock

    def _release_port(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.close()

    def _on_loop(self, function: Callable[..., None], *args: Any) -> None:
        """Run ``function(*args)`` on the collector's IOLoop thread and wait for it (its exception is raised)."""
        io_loop = self._io_loop
        assert io_loop is not None
        if threading.current_thread() is self._thread:
            function(*args)
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()

        def call() -> None:
            try:
                function(*args)
            except BaseException as exc:
                done.set_exception(exc)
            else:
                done.set_result(None)

        io_loop.add_callback(call)
        done.result()

    # ---- the IOLoop thread ---------------------------------------------------------------------------------------

    def _run(self, sockets: List[socket.socket], ready: concurrent.futures.Future[None]) -> None:
        """The thread: an asyncio loop of its own (Tornado runs on it), serving until ``stop()``."""
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve(sockets, ready))
        except BaseException as exc:
            if ready.done():
                raise
            for bound in sockets:  # never served: start() raises
                bound.close()
            ready.set_exception(exc)
        finally:
            left = [task for task in asyncio.all_tasks(loop) if not task.done()]
            for task in left:
                task.cancel()
            if left:
                loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
            if self._io_loop is not None:
                self._io_loop.close()  # Tornado's wrapper closes the asyncio loop too
            else:
                loop.close()
            asyncio.set_event_loop(None)

    async def _serve(self, sockets: List[socket.socket], ready: concurrent.futures.Future[None]) -> None:
        self._io_loop = tornado.ioloop.IOLoop.current()
        self._stop_requested = tornado.locks.Event()
        self._period = _Period(self, sockets)
        ready.set_result(None)
        await self._stop_requested.wait()
        self._end_period()
        self._release_port()
        deadline = time.monotonic() + _DRAIN_TIMEOUT  # let woken stalls and writes finish
        while self._serving and time.monotonic() < deadline:
            await tornado.gen.sleep(0.01)

    def _end_period(self, spare: Optional[IOStream] = None) -> None:
        period, self._period = self._period, None
        if period is not None:
            period.end(spare)

    def _go_down(self, for_seconds: Optional[float], spare: Optional[IOStream]) -> None:
        """``go_down``, leaving the connection ``spare`` open (to answer the control request that asked for it)."""
        self._downtime_token += 1
        self._end_period(spare)
        if self._held is None:
            self._hold_port()
        logger.info("collector down on port %d%s", self._port,
                    "" if for_seconds is None else f" for {for_seconds:.3g}s")
        if for_seconds is not None:
            tornado.ioloop.IOLoop.current().call_later(for_seconds, self._come_up_after, self._downtime_token)

    def _come_up(self) -> None:
        self._downtime_token += 1
        if self._period is None:
            self._period = _Period(self, self._bind())
            logger.info("collector up again on port %d", self._port)

    def _come_up_after(self, token: int) -> None:
        if token != self._downtime_token or self._stopped.is_set() or self._period is not None:
            return  # someone called go_down/come_up since, or the collector is stopping
        try:
            self._period = _Period(self, self._bind())
        except OSError:
            logger.warning("collector could not listen on port %d again", self._port, exc_info=True)
            return
        logger.info("collector up again on port %d", self._port)

    # ---- recordings --------------------------------------------------------------------------------------------

    @property
    def events(self) -> List[JSONObject]:
        """The events accepted so far, in arrival order (a new list; the event dicts are the recorded ones)."""
        return self._recorder.items("events")

    @property
    def users(self) -> List[JSONObject]:
        """The user updates accepted so far, in arrival order."""
        return self._recorder.items("users")

    @property
    def companies(self) -> List[JSONObject]:
        """The company updates accepted so far, in arrival order."""
        return self._recorder.items("companies")

    @property
    def subscriptions(self) -> List[JSONObject]:
        """The subscription updates accepted so far, in arrival order."""
        return self._recorder.items("subscriptions")

    @property
    def requests(self) -> List[ReceivedRequest]:
        """Every request received except control ones, faulted and rejected ones included, in arrival order."""
        return self._recorder.requests()

    def transaction_ids(self) -> List[str]:
        """The ``transaction_id`` of each recorded event that has one, in order, duplicates kept (to count them)."""
        return self._recorder.transaction_ids()

    def wait_for_events(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` events are recorded; False if ``timeout`` seconds pass first."""
        return self._recorder.wait_until("events", n, timeout)

    def wait_for_requests(self, n: int, timeout: float) -> bool:
        """Block until at least ``n`` requests are listed in ``requests``, e.g. to see a client's retries."""
        return self._recorder.wait_until("requests", n, timeout)

    def clear(self) -> None:
        """Forget every recording (events, users, companies, subscriptions and requests), not the faults."""
        self._recorder.clear()

    def stats(self) -> Dict[str, int]:
        """Counts of what was recorded and of pending faults, as served on ``GET /_control/stats``."""
        stats = self._recorder.counts()
        stats["faults_pending"] = len(self._faults) + len(self._config_faults)
        stats["filler_bytes_written"] = self.filler_bytes_written
        return stats

    @property
    def filler_bytes_written(self) -> int:
        """How many bytes of ``huge_body`` answers were written to clients so far (what they did not refuse)."""
        with self._filler_lock:
            return self._filler_bytes

    def _count_filler(self, size: int) -> None:
        with self._filler_lock:
            self._filler_bytes += size

    # ---- app config --------------------------------------------------------------------------------------------

    @property
    def app_config(self) -> JSONObject:
        """The config served on ``GET /v1/config`` (a copy: assign a new dict to change it).

        Its ``user_rules`` and ``company_rules`` put users and companies in the cohorts of governance rules:
        ``{"user_rules": {"u1": [{"rules": "<rule _id>", "values": {"name": "value"}}]}}``.
        """
        result: JSONObject = self._config.get()
        return result

    @app_config.setter
    def app_config(self, config: Mapping[str, Any]) -> None:
        self._config.set(config)

    @property
    def config_etag(self) -> str:
        """The etag of ``app_config``, sent as ``X-Moesif-Config-ETag``; it changes when the config does."""
        return self._config.snapshot()[1]

    @property
    def rules(self) -> List[JSONObject]:
        """The governance rules served on ``GET /v1/rules`` (a copy: assign a new list to change them), e.g.
        ``[{"_id": "r1", "type": "regex", "block": True, "regex_config": [{"conditions": [{"path":
        "request.route", "value": "^/login$"}]}], "response": {"status": 403, "headers": {}, "body": {}}}]``."""
        result: List[JSONObject] = self._rules.get()
        return result

    @rules.setter
    def rules(self, rules: List[Mapping[str, Any]]) -> None:
        self._rules.set(rules)

    def set_rules(self, rules: List[Mapping[str, Any]]) -> None:
        """Serve `rules` on ``GET /v1/rules`` from now on (the rules tag changes with them)."""
        self._rules.set(rules)

    @property
    def rules_tag(self) -> str:
        """The tag of ``rules``, sent as ``X-Moesif-Rules-Tag`` with the rules, the config and event batches."""
        return self._rules.snapshot()[1]

    # ---- fault injection ---------------------------------------------------------------------------------------

    def respond_with(self, status: int, times: Optional[int] = 1, headers: Optional[Mapping[str, str]] = None,
                     body: Optional[Union[bytes, str]] = None) -> None:
        """Answer the next ``times`` ingestion requests (None: until reset) with ``status``, recording nothing.

        For example ``respond_with(503, times=2)`` or ``respond_with(429, headers={"Retry-After": "2"})``.
        """
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise ValueError(f"status must be an int from 200 to 599, not {status!r}")
        fault_headers = _fault_headers(headers)
        if body is None:
            payload = json.dumps({"error": f"injected {status}"}).encode("utf-8")
            fault_headers.setdefault("Content-Type", "application/json; charset=utf-8")
        else:
            payload = body.encode("utf-8") if isinstance(body, str) else bytes(body)
            fault_headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        self._faults.add(_Fault("status", status=status, headers=fault_headers, body=payload), times)

    def stall(self, seconds: float, times: Optional[int] = 1) -> None:
        """Hold the next ``times`` ingestion requests ``seconds`` before answering normally, like a slow server.

        ``stop()`` or ``go_down()`` cut a stall short; the stalled connection is then dropped unanswered.
        """
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise ValueError(f"seconds must be a number >= 0, not {seconds!r}")
        self._faults.add(_Fault("stall", seconds=float(seconds)), times)

    def drop_connections(self, times: Optional[int] = 1) -> None:
        """Read the next ``times`` ingestion requests, then close their connections without any answer."""
        self._faults.add(_Fault("drop"), times)

    def redirect(self, location: str, status: int = 301, times: Optional[int] = 1, config: bool = False) -> None:
        """Answer the next ``times`` ingestion requests (``config=True``: GETs of /v1/config and /v1/rules instead)
        with a redirect to ``location``, recording nothing, like a collector moved or a BASE_URI mistyped."""
        if isinstance(status, bool) or not isinstance(status, int) or not 300 <= status <= 399:
            raise ValueError(f"status must be an int from 300 to 399, not {status!r}")
        headers = _fault_headers({"Location": location, "Content-Type": "text/plain; charset=utf-8"})
        self._queue(config).add(_Fault("status", status=status, headers=headers, body=b"moved"), times)

    def trickle(self, seconds: float, size: int = 1, times: Optional[int] = 1, config: bool = False) -> None:
        """Write the answer to the next ``times`` ingestion requests (``config=True``: config/rules GETs), status
        line included, ``size`` bytes per ``seconds``, like a server that is slow on purpose. The request itself is
        handled (and recorded) as usual; ``stop()`` cuts the trickle short."""
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
            raise ValueError(f"seconds must be a number >= 0, not {seconds!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be a positive int, not {size!r}")
        self._queue(config).add(_Fault("trickle", seconds=float(seconds), size=size), times)

    def huge_body(self, size: Optional[int] = None, times: Optional[int] = 1, config: bool = False) -> None:
        """Answer the next ``times`` ingestion requests (``config=True``: config/rules GETs) 200 with a body of
        ``size`` bytes (None: endless), recording nothing; ``filler_bytes_written`` counts what was written."""
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise ValueError(f"size must be an int >= 0 or None, not {size!r}")
        self._queue(config).add(_Fault("huge", size=-1 if size is None else size), times)

    def _queue(self, config: bool) -> _FaultQueue:
        return self._config_faults if config else self._faults

    def reset(self) -> None:
        """Forget every pending fault (the collector stays up or down as it is)."""
        self._faults.reset()
        self._config_faults.reset()

    @property
    def faults_pending(self) -> int:
        """How many queued faults have not been used up yet."""
        return len(self._faults) + len(self._config_faults)

    # ---- answering (on the IOLoop thread) ----------------------------------------------------------------------

    async def _answer(self, request: _Incoming, period: _Period) -> _Answer:
        """Decide the answer to a request and record it, before the answer is written."""
        if request.path.startswith(CONTROL_PREFIX):
            return self._answer_control(request)
        answer, kind, accepted = await self._answer_api(request, period)
        count = 0 if accepted is None else accepted.count
        record = ReceivedRequest(request.method, request.path, request.headers, answer.status, count,
                                 request.arrived)
        self._recorder.record(record, kind, accepted)
        if kind is not None:
            logger.info("accepted %s: %d %s", request.path, count, kind)
        return answer

    def _reject(self, method: str, path: str, headers: Dict[str, str], arrived: float, answer: _Answer) -> _Answer:
        """Record a request whose body could not be read, and pass its error answer on."""
        if not path.startswith(CONTROL_PREFIX):
            self._recorder.record(ReceivedRequest(method, path, headers, answer.status, 0, arrived))
        return answer

    async def _answer_api(self, request: _Incoming,
                          period: _Period) -> Tuple[_Answer, Optional[str], Optional[_Accepted]]:
        """The answer to a Moesif API request, with the kind and items to record if it is accepted."""
        route = None
        if request.path in _CONFIG_PATHS:  # read-only, faulted only by faults queued for config
            if request.method != "GET":
                return _error(405, "use GET"), None, None
            faults = self._config_faults
        else:
            route = _INGESTION_ROUTES.get(request.path)
            if route is None:
                return _error(404, "no such path"), None, None
            if request.method != "POST":
                return _error(405, "use POST"), None, None
            faults = self._faults

        fault = faults.take()
        trickle = None
        if fault is not None:
            logger.debug("fault applied to %s: %s", request.path, fault.describe())
            if fault.kind == "stall":
                if await period.ends_within(fault.seconds):  # cut short by stop() or go_down()
                    return _DROP, None, None
            elif fault.kind == "trickle":
                trickle = (fault.size, fault.seconds)
            else:
                return _fault_answer(fault), None, None

        auth_error = self._auth_error(request)
        if auth_error:
            return _error(401, auth_error), None, None
        if route is None:
            answer = self._answer_config() if request.path == "/v1/config" else self._answer_rules()
            return _trickled(answer, trickle), None, None
        kind, is_batch = route
        try:
            accepted = _parse_items(request, is_batch)
        except ValueError as exc:
            return _error(400, str(exc)), None, None
        headers = {CONFIG_ETAG_HEADER: self.config_etag, RULES_TAG_HEADER: self.rules_tag} if kind == "events" else {}
        return _trickled(_json_answer(201, {}, headers), trickle), kind, accepted

    def _auth_error(self, request: _Incoming) -> Optional[str]:
        application_id = request.header(APPLICATION_ID_HEADER)
        if not application_id:
            return f"missing {APPLICATION_ID_HEADER} header"
        if self._application_id is not None and application_id != self._application_id:
            return "unknown application id"
        return None

    def _answer_config(self) -> _Answer:
        body, etag = self._config.snapshot()
        return _Answer(200, body, {"Content-Type": "application/json; charset=utf-8", CONFIG_ETAG_HEADER: etag,
                                   RULES_TAG_HEADER: self.rules_tag})

    def _answer_rules(self) -> _Answer:
        body, tag = self._rules.snapshot()
        return _Answer(200, body, {"Content-Type": "application/json; charset=utf-8", RULES_TAG_HEADER: tag})

    def _answer_control(self, request: _Incoming) -> _Answer:
        """Answer ``/_control/...``: statistics, recorded events, config, and fault injection from afar."""
        route = (request.method, request.path[len(CONTROL_PREFIX):])
        try:
            if route == ("GET", "stats"):
                return _json_answer(200, self.stats())
            if route == ("GET", "events"):
                return _json_answer(200, self.events)
            if route == ("POST", "clear"):
                self.clear()
                return _json_answer(200, {"ok": True})
            if route == ("GET", "config"):
                return _json_answer(200, self.app_config)
            if route == ("POST", "config"):
                self.app_config = _parse_json(request.body)
                return _json_answer(200, {"ok": True, "etag": self.config_etag})
            if route == ("GET", "rules"):
                return _json_answer(200, self.rules)
            if route == ("POST", "rules"):
                self.rules = _parse_json(request.body)
                return _json_answer(200, {"ok": True, "tag": self.rules_tag})
            if route == ("POST", "fault"):
                return self._apply_fault_spec(_parse_json(request.body))
        except (TypeError, ValueError) as exc:
            return _error(400, str(exc))
        if route[1] in ("stats", "events", "clear", "config", "rules", "fault"):
            return _error(405, "wrong method")
        return _error(404, "no such control path")

    def _apply_fault_spec(self, spec: Any) -> _Answer:
        """Queue the fault a ``POST /_control/fault`` body describes, and say how many are pending."""
        if not isinstance(spec, dict):
            raise ValueError("expected a JSON object")
        times = spec.get("times", 1)
        config = bool(spec.get("config", False))
        if spec.get("reset"):
            self.reset()
        elif "down_for" in spec:
            seconds = float(spec["down_for"])
            if not seconds >= 0:
                raise ValueError("down_for must be >= 0")
            # Stop listening first, then answer on the still-open connection: once the client has the answer,
            # new connections are refused for sure.
            return _json_answer(200, {"ok": True, "down_for": seconds}, close=True,
                                before_write=lambda stream: self._go_down(seconds, stream))
        elif "redirect" in spec:
            self.redirect(spec["redirect"], spec.get("redirect_status", 301), times, config)
        elif "status" in spec:
            self.respond_with(spec["status"], times, headers=spec.get("headers"), body=spec.get("body"))
        elif "stall" in spec:
            self.stall(spec["stall"], times)
        elif spec.get("drop"):
            self.drop_connections(times)
        elif "trickle" in spec:
            self.trickle(spec["trickle"], spec.get("size", 1), times, config)
        elif "huge_body" in spec:
            self.huge_body(spec["huge_body"], times, config)
        else:
            raise ValueError("expected one of: status, redirect, stall, drop, trickle, huge_body, reset, down_for")
        return _json_answer(200, {"ok": True, "faults_pending": self.faults_pending})


def _fault_answer(fault: _Fault) -> _Answer:
    """The answer a status, drop or huge-body fault puts in place of the normal one."""
    if fault.kind == "status":
        return _Answer(fault.status, fault.body, dict(fault.headers))
    if fault.kind == "huge":
        return _Answer(200, headers={"Content-Type": "application/json; charset=utf-8"}, filler=fault.size)
    return _DROP


def _trickled(answer: _Answer, trickle: Optional[Tuple[int, float]]) -> _Answer:
    return answer if trickle is None else dataclasses.replace(answer, trickle=trickle)


def _parse_json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        raise ValueError("body is not valid JSON") from None


def _parse_to_check(body: bytes) -> Any:
    """`body` parsed only to check it, through orjson (in less than half the standard parser's time).

    What orjson refuses (NaN, lone surrogates, UTF-16, numbers past a double) the standard parser decides,
    so the collector accepts exactly what it accepts. The objects are thrown away: orjson reads integers
    past 64 bits as floats, so recorded items are parsed again by the standard parser.
    """
    try:
        return _orjson.loads(body)
    except _orjson.JSONDecodeError:
        return _parse_json(body)


def _parse_items(request: _Incoming, is_batch: bool) -> _Accepted:
    """Check the JSON objects an ingestion request carries (one, or a list for a batch path) and return them
    as JSON, to be parsed again on first look (see `_Accepted`). Raises ValueError."""
    encoding = (request.header("Content-Encoding") or "identity").strip().lower()
    body = request.body
    if encoding in ("gzip", "x-gzip"):
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError, zlib.error):
            raise ValueError("body is not valid gzip") from None
    elif encoding != "identity":
        raise ValueError(f"unsupported Content-Encoding {encoding!r}")
    payload = _parse_to_check(body)
    if not is_batch:
        payload = [payload]
    if not isinstance(payload, list):
        raise ValueError("a batch must be a JSON list")
    if not all(isinstance(item, dict) for item in payload):
        raise ValueError("expected JSON objects")
    return _Accepted(body, is_batch, len(payload))


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------


def _parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m moesiftornado_durable.testing",
        description="Run a local Moesif-compatible collector until Ctrl-C or SIGTERM. The first line of stdout "
                    "is its base URI; control it with POST /_control/fault and GET /_control/stats.",
    )
    parser.add_argument("--host", default=DEFAULT_HOST, help="loopback address to listen on (default %(default)s)")
    parser.add_argument("--port", type=int, default=0, help="port to listen on; 0 picks a free one (default)")
    parser.add_argument("--application-id", default=None,
                        help="accept only this X-Moesif-Application-Id (default: any non-empty id)")
    parser.add_argument("--quiet", action="store_true", help="log warnings only, not each accepted request")
    args = parser.parse_args(argv)
    try:
        _check_loopback(args.host)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Optional[List[str]] = None) -> int:
    """Run a collector in the foreground until Ctrl-C or SIGTERM, printing its base URI on stdout's first line.

    A parent process (the demo, a benchmark) reads that line to find the port; logs go to stderr. Returns 0 after
    a clean stop, 1 if the port could not be bound (argument errors exit with 2, as argparse does).
    """
    args = _parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    collector = Collector(args.host, args.port, args.application_id)
    # Checking a batch builds tens of thousands of containers, all alive until the check ends: at the default
    # threshold (700) that starts dozens of garbage collections per batch (docs/benchmarks.md, "Replay").
    # Run from here the collector usually has a process to itself: collect less often (restored on return).
    previous_thresholds = gc.get_threshold()
    gc.set_threshold(GC_THRESHOLD, *previous_thresholds[1:])
    # SIGTERM stops us like Ctrl-C; signal handlers can only be set from the main thread.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_sigterm = signal.getsignal(signal.SIGTERM) if in_main_thread else None
    if in_main_thread:
        signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        try:
            collector.start()
        except OSError as exc:
            logger.error("cannot listen on %s:%d: %s", args.host, args.port, exc)
            return 1
        print(collector.base_uri, flush=True)
        logger.info("collector listening on %s", collector.base_uri)
        idle = threading.Event()
        while not idle.wait(1.0):  # a timed wait, so Ctrl-C is delivered promptly on every platform
            pass
    except KeyboardInterrupt:
        logger.info("stopping")
    finally:
        collector.stop()
        gc.set_threshold(*previous_thresholds)
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous_sigterm is None else previous_sigterm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
