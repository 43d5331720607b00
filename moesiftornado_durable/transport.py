"""Every HTTP request this library makes, on one persistent connection with three hard limits.

A hostile or broken collector must not be able to lose, leak or stall anything, so `Transport.request`:

- never follows a redirect: a 3xx is returned like any other status, and the caller decides (`sender.py`
  treats it as a failure; only a 2xx to the request itself is an ack);
- ends by one deadline, `timeout` seconds after it starts, from connecting (through a proxy tunnel and the TLS
  handshake) to the last byte of the body: every blocking socket call gets only the time left, so a server
  trickling its answer a byte at a time cannot stretch it (a per-read timeout alone would wait forever);
- reads at most `MAX_RESPONSE_BYTES` of a response body (Moesif answers with a few bytes; the app config is
  small) and raises `ResponseTooLarge` beyond that, without reading the rest into memory.

Proxies (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``) and the CA bundle (``REQUESTS_CA_BUNDLE``,
``CURL_CA_BUNDLE``, else certifi's) come from the environment, read once, as `requests` read them.

http.client connects (a proxy's CONNECT tunnel, TLS); the exchange itself is written here (`_request_head`,
`_read_response`): the request line, headers and body in one write, and a plain HTTP/1.1 parse of the answer
(Content-Length, chunked, or up to the close), without http.client's per-request machinery and its parse of
the headers through the email package, which took three times the CPU per request (docs/benchmarks.md).
Failures surface as `TimeoutError`, `OSError`, `http.client.HTTPException` or `ResponseTooLarge`; `sender.py`
maps them to `errors.py`'s classes.
"""

from __future__ import annotations

import base64
import http.client
import io
import os
import select
import socket
import ssl
import threading
import time
import urllib.request
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple
from urllib.parse import SplitResult, unquote, urlsplit

import certifi

MAX_RESPONSE_BYTES = 1 << 20  # 1 MiB: Moesif's answers are a few bytes, the app config a few KB
_READ_CHUNK = 64 * 1024


class ResponseTooLarge(Exception):
    """The response body was longer than `MAX_RESPONSE_BYTES`; the rest was not read."""


class Headers(Mapping[str, str]):
    """Response headers, looked up case-insensitively (a repeated header keeps its last value)."""

    def __init__(self, pairs: Any) -> None:
        self._items: Dict[str, Tuple[str, str]] = {name.lower(): (name, value) for name, value in pairs}

    def __getitem__(self, name: str) -> str:
        return self._items[name.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


class Response(NamedTuple):
    """A complete answer: its status, headers and whole (capped) body."""

    status: int
    headers: Headers
    body: bytes


class _DeadlineSocket:
    """A connected socket whose every send and receive gets only the time left until `owner.deadline`."""

    def __init__(self, sock: socket.socket, owner: _Connection) -> None:
        self.raw = sock
        self._owner = owner

    def sendall(self, data: Any) -> None:
        self.raw.settimeout(self._owner.time_left())
        self.raw.sendall(data)

    def makefile(self, mode: str = "rb", *args: Any, **kwargs: Any) -> io.BufferedReader:
        """A buffered reader over this socket, as http.client reads a response (status, headers, body).

        It holds the socket's own file object, so the socket stays open until the response is read even when
        http.client closes the connection first (as it does when the server says ``Connection: close``).
        """
        return io.BufferedReader(_Reader(self.raw, self._owner))

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()


class _Reader(io.RawIOBase):
    """Reads from a socket, each read given only the time left until the owner's deadline."""

    def __init__(self, sock: socket.socket, owner: _Connection) -> None:
        super().__init__()
        self._sock = sock
        self._file = sock.makefile("rb", buffering=0)
        self._owner = owner

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        self._sock.settimeout(self._owner.time_left())
        read = self._file.readinto(buffer)
        return 0 if read is None else read  # None only on a non-blocking socket, which this never is

    def close(self) -> None:
        self._file.close()
        super().close()


_MAX_LINE = 65536  # bytes of a status, header or chunk-size line, as http.client allows
_MAX_HEADERS = 100  # header lines in an answer, as http.client allows
_CONTINUE = 100


class _Connection(http.client.HTTPConnection):
    """An HTTP/1.1 connection (TLS when given a context) whose blocking steps all end by `deadline`."""

    def __init__(self, host: str, port: int, tls: Optional[ssl.SSLContext],
                 tunnel: Optional[Tuple[str, int, Dict[str, str]]] = None) -> None:
        super().__init__(host, port)
        self.deadline = 0.0
        self._tls = tls
        self._tls_hostname = host
        self._tunnelled = tunnel is not None
        self._socket: Optional[socket.socket] = None
        self._reader: Optional[io.BufferedReader] = None
        if tunnel is not None:  # through an HTTP proxy at host:port, to tunnel's host and port
            self.set_tunnel(*tunnel)
            self._tls_hostname = tunnel[0]

    def time_left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the send timeout expired")
        return left

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.time_left())
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._socket = raw
        self.sock = _DeadlineSocket(raw, self)
        if self._tunnelled:
            self._tunnel()  # type: ignore[attr-defined]  # its CONNECT answer is read through the deadline socket
        if self._tls is not None:
            raw.settimeout(self.time_left())  # the handshake is one blocking call, bounded by this
            self._socket = self._tls.wrap_socket(raw, server_hostname=self._tls_hostname)
            self.sock = _DeadlineSocket(self._socket, self)

    def reader(self) -> io.BufferedReader:
        """The buffered reader answers are read through, one for the life of the socket (connecting first)."""
        if self.sock is None:
            self.connect()
        if self._reader is None:
            self._reader = self.sock.makefile("rb")
        return self._reader

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()  # it holds a reference to the socket of its own, which would keep it open
        super().close()

    def shut_down(self) -> None:
        """End the connection under a request another thread is making, which then fails at once.

        Only the socket is shut (at the descriptor, not through TLS or http.client's state, which belong to
        that thread); a blocked read or write wakes up.
        """
        if self._socket is not None:
            try:
                socket.socket.shutdown(self._socket, socket.SHUT_RDWR)
            except OSError:
                pass

    def is_idle_and_open(self) -> bool:
        """Whether the kept-alive socket can take a request: open, and nothing (not even EOF) waiting on it."""
        if self.sock is None:
            return False
        if hasattr(select, "poll"):  # select() fails on descriptors past 1023, common in a busy server process
            poller = select.poll()
            poller.register(self.sock.fileno(), select.POLLIN)
            return not poller.poll(0)
        readable, _, _ = select.select([self.sock], [], [], 0)
        return not readable


class Transport:
    """Requests to one base URI over one kept-alive connection, each bounded by `timeout` and the size cap."""

    def __init__(self, base_uri: str, timeout: float, max_response_bytes: int = MAX_RESPONSE_BYTES) -> None:
        parts = urlsplit(base_uri)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URI: {base_uri!r}")
        self.timeout = timeout
        self.max_response_bytes = max_response_bytes
        self._host = parts.netloc.rpartition("@")[2]  # the Host header: the collector, also through a proxy
        self._origin = f"{parts.scheme}://{self._host}"
        self._base_path = parts.path.rstrip("/")
        self._route = _route(parts)
        self._lock = threading.Lock()
        self._connection: Optional[_Connection] = None

    def request(self, method: str, path: str, body: Optional[bytes] = None,
                headers: Optional[Mapping[str, str]] = None,
                while_waiting: Optional[Callable[[], None]] = None) -> Response:
        """Send one request to `path` under the base URI and read its whole answer, within the limits above.

        `while_waiting`, if given, is called once the request is written and before the answer is read: work
        the caller overlaps with the server's (the flusher records the previous batch's ack there). It must
        not raise; its time counts against the timeout.
        """
        target = self._base_path + path
        if self._route.absolute_target:
            target = self._origin + target
        all_headers = dict(headers or {}, **self._route.headers)
        head = _request_head(method, target, self._host, body, all_headers)
        with self._lock:
            connection = self._connection
            if connection is None or not connection.is_idle_and_open():
                if connection is not None:
                    connection.close()
                connection = self._connection = self._route.connect()
            connection.deadline = time.monotonic() + self.timeout
            try:
                reader = connection.reader()
                connection.sock.sendall(head + body if body else head)
                if while_waiting is not None:
                    while_waiting()
                response, keep_alive = _read_response(reader, method, self.max_response_bytes)
                if not keep_alive:
                    connection.close()
                    self._connection = None
                return response
            except BaseException:
                connection.close()  # whatever state it is in, it is not reused
                self._connection = None
                raise

    def close(self) -> None:
        """Close the kept-alive connection at once, even under a request in flight on another thread (which then
        fails and drops it); the next request opens a new connection."""
        connection = self._connection
        if connection is None:
            return
        connection.shut_down()
        if self._lock.acquire(blocking=False):  # else the request in flight closes it as it fails
            try:
                connection.close()
                if self._connection is connection:
                    self._connection = None
            finally:
                self._lock.release()


def _request_head(method: str, target: str, host: str, body: Optional[bytes], headers: Mapping[str, str]) -> bytes:
    """The request line and headers, ready to write; a line break in a header (an injection) is a ValueError."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Accept-Encoding: identity"]
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    lines.extend(f"{name}: {value}" for name, value in headers.items())
    for line in lines:
        if "\r" in line or "\n" in line:
            raise ValueError(f"a line break in a request header: {line[:40]!r}")
    lines.extend(("", ""))
    return "\r\n".join(lines).encode("latin-1")


def _read_response(reader: io.BufferedReader, method: str, cap: int) -> Tuple[Response, bool]:
    """Read one whole answer (after any 100 Continue); returns it and whether the connection may be kept.

    Raises `http.client.HTTPException` (or `RemoteDisconnected`, an OSError) on a malformed or cut answer, and
    `ResponseTooLarge` as soon as the body is known to exceed `cap` bytes.
    """
    while True:
        version, status = _read_status(reader)
        pairs = _read_headers(reader)
        if status != _CONTINUE:
            break
    headers = Headers(pairs)
    connection = {token.strip().lower() for token in headers.get("Connection", "").split(",")}
    keep_alive = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    if method == "HEAD" or status < 200 or status in (204, 304):
        return Response(status, headers, b""), keep_alive
    if headers.get("Transfer-Encoding", "").lower().rstrip().endswith("chunked"):
        return Response(status, headers, _read_chunked(reader, cap)), keep_alive
    length = headers.get("Content-Length")
    if length is None:  # the body runs to the close
        return Response(status, headers, _read_to_close(reader, cap)), False
    if not length.strip().isdigit():
        raise http.client.HTTPException(f"a Content-Length that is not a number: {length[:40]!r}")
    size = int(length)
    if size > cap:
        raise ResponseTooLarge(f"a {size}-byte answer (at most {cap} are read)")
    return Response(status, headers, _read_exactly(reader, size)), keep_alive


def _read_line(reader: io.BufferedReader, what: str) -> bytes:
    line = reader.readline(_MAX_LINE + 1)
    if len(line) > _MAX_LINE:
        raise http.client.LineTooLong(what)
    return line


def _read_status(reader: io.BufferedReader) -> Tuple[str, int]:
    line = _read_line(reader, "status line")
    if not line:
        raise http.client.RemoteDisconnected("the server closed the connection without an answer")
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
        raise http.client.BadStatusLine(line[:100].decode("latin-1"))
    return parts[0], int(parts[1])


def _read_headers(reader: io.BufferedReader) -> List[Tuple[str, str]]:
    pairs: List[Tuple[str, str]] = []
    while True:
        line = _read_line(reader, "header line")
        if line in (b"\r\n", b"\n"):
            return pairs
        if not line:
            raise http.client.IncompleteRead(b"", None)  # the connection ended inside the headers
        if len(pairs) >= _MAX_HEADERS:
            raise http.client.HTTPException(f"got more than {_MAX_HEADERS} headers")
        name, _, value = line.decode("latin-1").partition(":")
        pairs.append((name.strip(), value.strip()))


def _read_exactly(reader: io.BufferedReader, size: int) -> bytes:
    data = reader.read(size)
    if len(data) < size:
        raise http.client.IncompleteRead(data, size - len(data))
    return data


def _read_chunked(reader: io.BufferedReader, cap: int) -> bytes:
    body = bytearray()
    while True:
        line = _read_line(reader, "chunk size")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise http.client.IncompleteRead(bytes(body)) from None
        if size == 0:
            while _read_line(reader, "trailer line") not in (b"\r\n", b"\n", b""):
                pass
            return bytes(body)
        if len(body) + size > cap:
            raise ResponseTooLarge(f"an answer longer than {cap} bytes")
        body += _read_exactly(reader, size)
        _read_exactly(reader, 2)  # the chunk's CRLF


def _read_to_close(reader: io.BufferedReader, cap: int) -> bytes:
    """The body of an answer without a length: up to the end of the connection, or `ResponseTooLarge`."""
    body = bytearray()
    while True:
        chunk = reader.read1(min(_READ_CHUNK, cap + 1 - len(body)))
        if not chunk:
            return bytes(body)
        body += chunk
        if len(body) > cap:
            raise ResponseTooLarge(f"an answer longer than {cap} bytes")


class _Route(NamedTuple):
    """How requests reach the collector: a connection maker, headers for every request, the request-target form."""

    connect: Callable[[], _Connection]
    headers: Dict[str, str]
    absolute_target: bool  # through a plain-HTTP proxy the request line names the full URL


def _route(parts: SplitResult) -> _Route:
    """Straight to the collector, or through the proxy the environment names (as requests would)."""
    tls = _tls_context() if parts.scheme == "https" else None
    host, port = parts.hostname or "", parts.port or (443 if tls else 80)
    proxy = _proxy_for(parts.scheme, host)
    if proxy is None:
        return _Route(lambda: _Connection(host, port, tls), {}, False)
    via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    credentials: Dict[str, str] = {}
    if via.username is not None:
        user_password = f"{unquote(via.username)}:{unquote(via.password or '')}".encode()
        credentials["Proxy-Authorization"] = "Basic " + base64.b64encode(user_password).decode()
    if tls is None:  # plain HTTP: each request goes to the proxy, naming the full URL, with the credentials
        via_tls = _tls_context() if via.scheme == "https" else None
        via_port = via.port or (443 if via_tls else 80)
        return _Route(lambda: _Connection(via.hostname or "", via_port, via_tls), credentials, True)
    if via.scheme != "http":
        return _Route(_unsupported_proxy(via.scheme), {}, False)
    # HTTPS: a CONNECT tunnel through the proxy (the credentials go on the CONNECT only), TLS to the collector
    return _Route(lambda: _Connection(via.hostname or "", via.port or 80, tls, (host, port, credentials)), {}, False)


def _unsupported_proxy(scheme: str) -> Callable[[], _Connection]:
    """A connection maker that fails each request (retried, logged; nothing lost) with the reason."""

    def refuse() -> _Connection:
        raise OSError(f"a {scheme}:// proxy for an https:// collector is not supported: use an http:// proxy URL "
                      "(the tunnel through it is TLS to the collector anyway)")

    return refuse


def _tls_context() -> ssl.SSLContext:
    """Certificate-verifying TLS with the CA bundle requests would use: the environment's, else certifi's."""
    bundle = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or certifi.where()
    if os.path.isdir(bundle):
        return ssl.create_default_context(capath=bundle)
    return ssl.create_default_context(cafile=bundle)


def _proxy_for(scheme: str, host: str) -> Optional[str]:
    """The proxy URL the environment names for `scheme` (or ALL_PROXY), unless NO_PROXY exempts `host`."""
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(host, proxies):  # type: ignore[attr-defined]
        return None
    return proxy
