"""The one channel between an app process and the shipper of its SPOOL_DIR: ``shipper.sock``.

A Unix stream socket in SPOOL_DIR, served by whoever holds the shipper lock (`ChannelServer`, on a thread
of the shipper), carrying newline-delimited JSON both ways:

- shipper → app, when they change, at most every `FIGURES_INTERVAL` (the last change always goes out, and
  at once before a flush's answer): ``{"figures": {...}}`` (delivery counters, last error, whether
  delivery is failing, the spool's live bytes for SPOOL_MAX_BYTES, the config ETag and rules tag seen
  on accepted batches, and ``folded``: how far each journal segment is in the spool's main file, so a
  writer may delete its segment);
- app → shipper: ``{"flush": id, "through": {segment: size}}``; the answer ``{"flushed": id, "ok": true}``
  comes once those segments are spooled through those sizes and everything spooled by then (and any
  orphan spool beside it) is delivered or dead-lettered. The shipper re-checks at each change of the
  spool (its flusher pokes it on every ack, dead letter and failed attempt): no one sleeps in a loop.
  Fresh figures always precede the answer on the stream, so `stats()` after a `flush()` sees them.

The app side (`ChannelClient`) keeps one connection per runtime on its own thread, reconnects when the
shipper restarts and sends again the flushes still waiting; `flush` waits on an event with a deadline.

Safety: the socket is bound under a random temporary name in the 0700 SPOOL_DIR, made 0600, and renamed
over ``shipper.sock`` (a rename replaces a planted link or a stale socket, it never follows one), by the
lock holder only. A client connects only to a socket (not a link) owned by its own user. Unix socket
paths are limited to 107 bytes: both sides reach the directory through ``/proc/self/fd/<dirfd>``.

A file system that cannot hold a socket (some FUSE file systems, LazyFS among them) gets the channel in
Linux's abstract socket namespace instead, named for the user and SPOOL_DIR's device and inode; with no
file permissions there, each side checks the other's user id (SO_PEERCRED). A shipper that can make
neither still ships: only figures and flush answers are missing, and `flush` returns False.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import secrets
import selectors
import socket
import stat
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from .lost import ErrorLog
from .worker import ProcessThread

logger = logging.getLogger("moesiftornado_durable")

SOCKET = "shipper.sock"
TEMPORARY_PREFIX = ".shipper-sock-"  # the socket's name between bind and rename (a killed shipper may leave one)
_MAX_LINE = 1 << 20  # a message is a few KB at most: a peer sending more is cut off
_SEND_TIMEOUT = 2.0  # seconds the shipper waits for one client to take a message before dropping it
RECONNECT_INTERVAL = 0.2  # seconds between an app's attempts to reach a shipper that is not (yet) there
# Seconds between two figure messages at most: the counters change on every delivered batch, and each message
# wakes every app's channel thread, which then takes the GIL from its IOLoop. A flush's answer never waits.
FIGURES_INTERVAL = 0.1
_SELECT_TIMEOUT = 1.0  # seconds the server looks again on its own (a change nobody poked about)


def _address(dirfd: int, name: str) -> str:
    """A path to `name` in the directory open as `dirfd`, short enough for a Unix socket address."""
    return f"/proc/self/fd/{dirfd}/{name}"


def _abstract_address(directory: str) -> str:
    """The channel's name in the abstract namespace, for a SPOOL_DIR whose file system holds no socket."""
    info = os.stat(directory)
    return f"\0moesiftornado-durable/{os.geteuid()}/{info.st_dev}:{info.st_ino}"


def _peer_is_us(sock: socket.socket) -> bool:
    """True if the process at the other end runs as this user (an abstract socket has no permissions)."""
    _, uid, _ = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return bool(uid == os.geteuid())


def _open_directory(directory: str) -> int:
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _encode(message: Dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"


class _Lines:
    """Splits what arrives on a stream into JSON messages; raises ValueError on an oversized line."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, data: bytes) -> List[Dict[str, Any]]:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        if len(self._buffer) > _MAX_LINE:
            raise ValueError("a message longer than the channel allows")
        messages = []
        for line in lines:
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("a channel message must be a JSON object")
            messages.append(message)
        return messages


class FlushRequest:
    """One app's flush waiting in the shipper: `mark` is set once `through` is spooled (the spool's last
    id then: what must be delivered)."""

    def __init__(self, client: socket.socket, ident: Any, through: Dict[str, int]) -> None:
        self.client = client
        self.ident = ident
        self.through = through
        self.mark: Optional[int] = None


class ChannelServer:
    """The shipper's side: accepts app processes, pushes `figures()` when they change, and answers each
    flush once `flushed(request)` says it is done. Runs on its own thread; `poke()` (from any thread)
    makes it look again at once. Figures go out at most every `figures_interval` seconds of `clock`: a
    change within the interval goes out when it ends (the latest figures then), or at once before a
    flush's answer."""

    def __init__(self, directory: str, figures: Callable[[], Dict[str, Any]],
                 flushed: Callable[[FlushRequest], bool], on_flush: Callable[[], None],
                 figures_interval: float = FIGURES_INTERVAL, clock: Callable[[], float] = time.monotonic) -> None:
        self._directory = directory
        self._figures = figures
        self._flushed = flushed
        self._on_flush = on_flush
        self._selector = selectors.DefaultSelector()
        # made by `start`: a Shipper that is never started (tests, tools) holds no socket
        self._waker: Optional[socket.socket] = None
        self._wake_end: Optional[socket.socket] = None
        self._listener: Optional[socket.socket] = None
        self._bound = (0, 0)
        self._abstract = False  # bound in the abstract namespace: clients' user ids are checked
        self._clients: Dict[socket.socket, _Lines] = {}
        self._pending: List[FlushRequest] = []
        self._published: Optional[Dict[str, Any]] = None
        self._figures_interval = figures_interval
        self._clock = clock
        self._published_at = -float("inf")
        self._publish_due: Optional[float] = None  # a look at the figures waits for the interval to end
        self._stopped = False
        self._errors = ErrorLog()  # a persistent failure (a damaged spool) logs every few seconds, not per look
        self._worker = ProcessThread("moesif-durable-channel-server", self._run)

    def _bind(self) -> socket.socket:
        try:
            return self._bind_in_directory()
        except OSError as exc:
            logger.info("moesiftornado_durable shipper: cannot make %s in %s (%s); serving the channel in the "
                        "abstract socket namespace instead", SOCKET, self._directory, exc)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(_abstract_address(self._directory))
            listener.listen(16)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._abstract = True
        return listener

    def _bind_in_directory(self) -> socket.socket:
        dirfd = _open_directory(self._directory)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        temporary = f"{TEMPORARY_PREFIX}{secrets.token_hex(8)}.tmp"
        try:
            listener.bind(_address(dirfd, temporary))  # a new name: bind never follows or reuses a file
            os.chmod(temporary, 0o600, dir_fd=dirfd, follow_symlinks=True)
            os.rename(temporary, SOCKET, src_dir_fd=dirfd, dst_dir_fd=dirfd)  # replaces a stale one, or a link
            bound = os.stat(SOCKET, dir_fd=dirfd, follow_symlinks=False)
            self._bound = (bound.st_dev, bound.st_ino)
            listener.listen(16)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            with contextlib.suppress(OSError):
                os.unlink(temporary, dir_fd=dirfd)
            raise
        finally:
            os.close(dirfd)
        return listener

    def start(self) -> None:
        """Bind ``shipper.sock`` (replacing a killed shipper's: only the lock holder starts one) and serve."""
        self._listener = self._bind()
        self._waker, self._wake_end = socket.socketpair()
        self._waker.setblocking(False)
        self._wake_end.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_end, selectors.EVENT_READ)
        self._worker.start()

    def poke(self) -> None:
        """Something changed (records spooled or delivered, a failed attempt): look again now."""
        waker = self._waker
        if waker is not None:
            with contextlib.suppress(OSError):  # BlockingIOError: a wake-up is pending already
                waker.send(b"x")

    def _run(self) -> None:
        while not self._stopped:
            try:
                for key, _ in self._selector.select(timeout=self._select_timeout()):
                    sock = key.fileobj
                    if sock is self._listener:
                        self._accept()
                    elif sock is self._wake_end:
                        with contextlib.suppress(OSError):
                            sock.recv(4096)
                    else:
                        assert isinstance(sock, socket.socket)
                        self._read(sock)
                if not self._stopped:
                    self._publish()
                    self._answer_flushes()
            except Exception:  # the channel must survive anything; the shipper goes on without it meanwhile
                self._errors("shipper: the channel failed (app processes get no figures or flush answers "
                             "meanwhile); going on", "channel")

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        if self._abstract and not _peer_is_us(client):
            client.close()
            return
        client.settimeout(_SEND_TIMEOUT)
        self._clients[client] = _Lines()
        self._selector.register(client, selectors.EVENT_READ)
        self._send(client, {"figures": self._published if self._published is not None else self._figures()})

    def _read(self, client: socket.socket) -> None:
        if client not in self._clients:
            return  # dropped earlier in this round
        try:
            data = client.recv(65536)
            if not data:
                raise ConnectionResetError("the app closed its end")
            messages = self._clients[client].feed(data)
        except (OSError, ValueError):
            self._drop(client)
            return
        for message in messages:
            through = message.get("through")
            if "flush" in message and isinstance(through, dict) and \
                    all(isinstance(k, str) and isinstance(v, int) for k, v in through.items()):
                self._pending.append(FlushRequest(client, message["flush"], through))
                self._on_flush()
            elif "flush" in message:
                self._send(client, {"flushed": message["flush"], "ok": False})

    def _select_timeout(self) -> float:
        if self._publish_due is None:
            return _SELECT_TIMEOUT
        return min(_SELECT_TIMEOUT, max(0.0, self._publish_due - self._clock()))

    def _publish(self, at_once: bool = False) -> None:
        """Send the figures to every client if they changed; within `figures_interval` of the last message
        (unless `at_once`), only note that a look is due when the interval ends."""
        now = self._clock()
        if not at_once and now - self._published_at < self._figures_interval:
            self._publish_due = self._published_at + self._figures_interval
            return
        self._publish_due = None
        figures = self._figures()
        if figures == self._published:
            return
        self._published, self._published_at = figures, now
        for client in list(self._clients):
            self._send(client, {"figures": figures})

    def _answer_flushes(self) -> None:
        if not self._pending:
            return
        done = [request for request in self._pending if self._flushed(request)]
        if not done:
            return
        self._pending = [request for request in self._pending if request not in done]
        self._publish(at_once=True)  # the figures of what was just delivered go out before the answer
        for request in done:
            if request.client in self._clients:
                self._send(request.client, {"flushed": request.ident, "ok": True})

    @property
    def flush_waiting(self) -> bool:
        return bool(self._pending)

    def _send(self, client: socket.socket, message: Dict[str, Any]) -> None:
        try:
            client.sendall(_encode(message))
        except OSError:
            self._drop(client)

    def _drop(self, client: socket.socket) -> None:
        if self._clients.pop(client, None) is not None:
            self._selector.unregister(client)
        self._pending = [request for request in self._pending if request.client is not client]
        client.close()

    def close(self, timeout: float = 2.0) -> None:
        """Stop serving: the clients see the connection end and reconnect to the next shipper."""
        self._stopped = True
        self.poke()
        self._worker.join(timeout)
        for client in list(self._clients):
            self._drop(client)
        with contextlib.suppress(OSError):  # our socket only: after SPOOL_DIR was made again, another's may be there
            dirfd = _open_directory(self._directory)
            try:
                there = os.stat(SOCKET, dir_fd=dirfd, follow_symlinks=False)
                if (there.st_dev, there.st_ino) == self._bound:
                    os.unlink(SOCKET, dir_fd=dirfd)
            finally:
                os.close(dirfd)
        if self._listener is not None:
            self._listener.close()
        self._selector.close()
        for sock in (self._waker, self._wake_end):
            if sock is not None:
                sock.close()

    def abandon_after_fork(self) -> None:
        """In a forked child: close the child's copies of the sockets, touching nothing of the parent's."""
        for sock in [self._listener, self._waker, self._wake_end, *self._clients]:
            if sock is None:
                continue
            with contextlib.suppress(OSError):
                os.close(sock.detach())


def connect(directory: str, timeout: Optional[float] = None) -> Optional[socket.socket]:
    """A connection to the shipper serving `directory`, or None when none answers (no socket, a stale one,
    or something there that is not a socket of this user: never followed). Tries ``shipper.sock``, then the
    abstract namespace (where a shipper serves when the file system holds no socket)."""
    try:
        dirfd = _open_directory(directory)
    except OSError:
        return None
    try:
        try:
            info = os.stat(SOCKET, dir_fd=dirfd, follow_symlinks=False)
        except FileNotFoundError:
            return _connect_abstract(directory, timeout)
        if not stat.S_ISSOCK(info.st_mode) or info.st_uid != os.geteuid():
            logger.debug("%s in %s is not a socket of this user: not connecting", SOCKET, directory)
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(_address(dirfd, SOCKET))
        except OSError:
            sock.close()
            return _connect_abstract(directory, timeout)  # a stale socket: the live shipper may serve there
        return sock
    finally:
        os.close(dirfd)


def _connect_abstract(directory: str, timeout: Optional[float]) -> Optional[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect(_abstract_address(directory))
        if not _peer_is_us(sock):
            logger.debug("the abstract channel of %s is another user's: not talking to it", directory)
            sock.close()
            return None
    except OSError:
        sock.close()
        return None
    return sock


def read_figures(directory: str, timeout: float = 2.0) -> Optional[Dict[str, Any]]:
    """The figures of the shipper serving `directory` (it sends them on connecting), or None when no
    shipper answers within `timeout`: one look, for the CLI's `status`."""
    sock = connect(directory, timeout)
    if sock is None:
        return None
    with sock:
        lines = _Lines()
        try:
            while True:
                data = sock.recv(65536)
                if not data:
                    return None
                for message in lines.feed(data):
                    if isinstance(message.get("figures"), dict):
                        return dict(message["figures"])
        except (OSError, ValueError):  # a timeout, a garbled line
            return None


class _Waiter:
    def __init__(self, through: Dict[str, int]) -> None:
        self.through = through
        self.event = threading.Event()
        self.ok = False


class ChannelClient:
    """An app process's side: one connection to the shipper of `directory`, on its own thread. `figures`
    holds the shipper's latest; `on_figures(figures)` runs on that thread as they arrive."""

    def __init__(self, directory: str, on_figures: Callable[[Dict[str, Any]], None]) -> None:
        self._directory = directory
        self._on_figures = on_figures
        self.figures: Dict[str, Any] = {}
        self.connects = 0  # connections made (a new one after each shipper restart)
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()  # _sock, _waiters and sending
        self._waiters: Dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._stop = threading.Event()
        self._worker = ProcessThread("moesif-durable-channel", self._run)

    @property
    def is_alive(self) -> bool:
        return self._worker.is_alive

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def start(self) -> None:
        self._worker.start()

    def flush(self, through: Dict[str, int], timeout: float) -> bool:
        """Ask the shipper to deliver (see the module docstring); True once it answered within `timeout`.
        Sent again on each new connection until answered; False at the deadline, however the shipper fares."""
        ident = next(self._ids)
        waiter = _Waiter(through)
        with self._lock:
            self._waiters[ident] = waiter
            self._send_locked({"flush": ident, "through": through})
        try:
            waiter.event.wait(max(0.0, timeout))
            return waiter.ok
        finally:
            with self._lock:
                self._waiters.pop(ident, None)

    def _send_locked(self, message: Dict[str, Any]) -> None:
        if self._sock is None:
            return  # sent on connecting
        try:
            self._sock.sendall(_encode(message))
        except OSError:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # the reader sees the end and reconnects

    def _run(self) -> None:
        while not self._stop.is_set():
            sock = self._connect()
            if sock is None:
                self._stop.wait(RECONNECT_INTERVAL)
                continue
            try:
                self._serve(sock)
            except Exception:
                logger.debug("moesiftornado_durable: the shipper channel ended", exc_info=True)
            finally:
                with self._lock:
                    self._sock = None
                sock.close()

    def _connect(self) -> Optional[socket.socket]:
        sock = connect(self._directory)
        if sock is None:
            return None
        with self._lock:
            self._sock = sock
            self.connects += 1
            for ident, waiter in self._waiters.items():  # flushes a previous shipper did not answer
                self._send_locked({"flush": ident, "through": waiter.through})
        return sock

    def _serve(self, sock: socket.socket) -> None:
        lines = _Lines()
        while not self._stop.is_set():
            data = sock.recv(65536)
            if not data:
                return
            for message in lines.feed(data):
                if isinstance(message.get("figures"), dict):
                    self.figures = message["figures"]
                    try:
                        self._on_figures(self.figures)
                    except Exception:
                        logger.exception("moesiftornado_durable: could not take the shipper's figures")
                elif "flushed" in message:
                    with self._lock:
                        waiter = self._waiters.get(message["flushed"])
                    if waiter is not None:
                        waiter.ok = bool(message.get("ok"))
                        waiter.event.set()

    def close(self, timeout: float = 1.0) -> None:
        self._stop.set()
        with self._lock:
            sock = self._sock
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            for waiter in self._waiters.values():
                waiter.event.set()
        self._worker.join(timeout)

    def abandon_after_fork(self) -> None:
        """In a forked child: close the child's copy of the connection (no shutdown: it is the parent's)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                os.close(sock.detach())
        self._lock = threading.Lock()
        self._waiters = {}
