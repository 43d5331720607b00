"""Shared fixtures: a real collector on loopback, a real spool in a temp dir, a real Tornado server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import tornado.httpserver
import tornado.ioloop
import tornado.netutil
import tornado.web

from moesiftornado_durable import MoesifMiddleware, locks
from moesiftornado_durable.journal import read_frames, segments
from moesiftornado_durable.locks import SHIPPER_SLOT, spool_path
from moesiftornado_durable.spool import Spool, SpoolView, directory_stats
from moesiftornado_durable.testing import Collector

HERE = os.path.dirname(os.path.abspath(__file__))
APP_SCRIPT = os.path.join(os.path.dirname(HERE), "examples", "app.py")


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as running:
        yield running


@pytest.fixture
def spool_dir(tmp_path: Any) -> str:
    return str(tmp_path / "spool")


@pytest.fixture
def make_middleware(collector: Collector, spool_dir: str) -> Iterator[Callable[..., MoesifMiddleware]]:
    """Build middlewares sending to the test collector; each is closed at the end of the test."""
    made: List[MoesifMiddleware] = []

    def make(**options: Any) -> MoesifMiddleware:
        config: Dict[str, Any] = {
            "APPLICATION_ID": "test-app-id",
            "SPOOL_DIR": spool_dir,
            "BASE_URI": collector.base_uri,
            "FLUSH_INTERVAL": 0.05,
            "SEND_TIMEOUT": 2.0,
            "RETRY_MAX_WAIT": 0.2,
        }
        config.update(options)
        middleware = MoesifMiddleware(config)
        made.append(middleware)
        return middleware

    yield make
    for middleware in made:
        middleware.close(timeout=2.0)


@contextlib.contextmanager
def serve(application: tornado.web.Application) -> Iterator[str]:
    """Run `application` on 127.0.0.1 in a thread with its own IOLoop; yields its base URL."""
    ready = threading.Event()
    state: Dict[str, Any] = {}

    def run() -> None:
        asyncio.set_event_loop(asyncio.new_event_loop())
        sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
        server = tornado.httpserver.HTTPServer(application)
        server.add_sockets(sockets)
        state["port"] = sockets[0].getsockname()[1]
        state["loop"] = tornado.ioloop.IOLoop.current()
        state["server"] = server
        ready.set()
        state["loop"].start()
        server.stop()
        state["loop"].close(all_fds=True)

    thread = threading.Thread(target=run, name="test-tornado", daemon=True)
    thread.start()
    assert ready.wait(10), "the Tornado test server did not start"
    try:
        yield f"http://127.0.0.1:{state['port']}"
    finally:
        state["loop"].add_callback(state["loop"].stop)
        thread.join(10)


class AppProcess:
    """The example app (examples/app.py) in a real subprocess, for SIGKILL tests."""

    def __init__(self, spool_dir: str, base_uri: str, tmp_dir: str, processes: int = 1, *, strict: bool = False,
                 output: Optional[IO[Any]] = None, **options: Any) -> None:
        """`strict` runs the app with --strict (SpoolBeforeSendMixin); `output` receives its stdout and stderr."""
        self.port_file = os.path.join(tmp_dir, f"port-{time.monotonic_ns()}")
        args = [sys.executable, APP_SCRIPT, "--spool-dir", spool_dir, "--base-uri", base_uri,
                "--port-file", self.port_file, "--processes", str(processes)]
        if strict:
            args.append("--strict")
        for key, value in options.items():
            args += ["--option", f"{key}={value}"]
        # its own session, so that forked children can be stopped with the group, by the leader's PID
        self.process = subprocess.Popen(args, cwd=os.path.dirname(HERE), start_new_session=True,
                                        stdout=output, stderr=output)
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def _wait_for_port(self, timeout: float = 20.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"app process exited with {self.process.returncode}")
            with contextlib.suppress(OSError, ValueError):
                with open(self.port_file) as f:
                    return int(f.read())
            time.sleep(0.05)
        self.kill()
        raise RuntimeError("app process did not report its port")

    def kill(self) -> None:
        """SIGKILL the process and any children it forked: no atexit, no flush, no goodbye."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def terminate(self, timeout: float = 15.0) -> Optional[int]:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return None


@pytest.fixture
def app_processes(tmp_path: Any) -> Iterator[Callable[..., AppProcess]]:
    """Start app subprocesses; every one still running is SIGKILLed by PID at the end of the test."""
    started: List[AppProcess] = []

    def start(spool_dir: str, base_uri: str, processes: int = 1, **options: Any) -> AppProcess:
        app = AppProcess(spool_dir, base_uri, str(tmp_path), processes, **options)
        started.append(app)
        return app

    yield start
    for app in started:
        app.kill()


def children_of(pid: int, shippers: bool = False) -> List[int]:
    """The PIDs of the live child processes of `pid`, read from /proc (Linux); the middleware's shipper
    processes only when `shippers` is true, else the others (the app's forked workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()  # the bootstrap command while it starts, then its title (proctitle.py)
            is_shipper = b"moesiftornado_durable.shipper" in cmdline or b"moesiftornado-durable shipper" in cmdline
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and is_shipper == shippers:
            found.append(int(entry))
    return sorted(found)


def ingestion_requests(collector: Collector) -> List[Any]:
    """The requests the collector received, without the middleware's GET /v1/config and /v1/rules fetches."""
    return [request for request in collector.requests if request.path not in ("/v1/config", "/v1/rules")]


@pytest.fixture
def logs(caplog: Any, capfd: Any) -> Callable[[], List[str]]:
    """Every log line so far: this process's records (`caplog`) and the shipper process's stderr (`capfd`;
    the shipper inherits the test's stderr). Captured stderr is consumed, so lines are kept here."""
    seen: List[str] = []

    def lines() -> List[str]:
        seen.extend(capfd.readouterr().err.splitlines())
        return [record.getMessage() for record in caplog.records] + seen

    return lines


def shipper_spool(spool_dir: str) -> str:
    """The spool file of the default mode (SHIPPER 'process'): the shipper's, fed by the journals."""
    return spool_path(spool_dir, SHIPPER_SLOT)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    """Poll `predicate` until it is true or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def wait_logged(middleware: MoesifMiddleware, count: int, timeout: float = 10.0) -> None:
    """Wait until `middleware` has spooled `count` records, e.g. one event per request a test made. Tornado
    calls log_function (`log_event`) after the response's last bytes went out, on the IOLoop's thread: a
    client can read its answer before the event is written, and a `flush()` waits only for what was written
    before it was called."""
    assert wait_until(lambda: middleware.stats()["spooled"] == count, timeout), middleware.stats()


def shipper_pid(spool_dir: str, timeout: float = 20.0) -> int:
    """The pid of the live shipper of `spool_dir`, once one holds its lock. A shipper writes its pid into the
    lock file just after taking the lock: a look in between finds the lock held and no pid yet."""
    found: List[int] = []

    def named() -> bool:
        pid, live = locks.owner(spool_dir, SHIPPER_SLOT)
        if live and pid is not None:
            found.append(pid)
        return bool(found)

    assert wait_until(named, timeout)
    return found[0]


def iter_records(path: str, offset: int = 0, finished: bool = True) -> Iterator[Tuple[str, bytes, float]]:
    """Every intact (kind, payload, spooled_at) record of one journal segment from `offset`."""
    while True:
        chunk = read_frames(path, offset, 1024 * 1024, finished)
        yield from chunk.rows
        if chunk.at_eof or chunk.end == offset:
            return
        offset = chunk.end


def waiting(directory: str) -> int:
    """Records of a SPOOL_DIR not yet delivered: ready or in flight in a spool file, or in an intake journal
    past the offset the shipper has spooled."""
    stats = directory_stats(directory)
    offsets: Dict[str, int] = {}
    if os.path.exists(shipper_spool(directory)):
        view = SpoolView(shipper_spool(directory))
        try:
            offsets = view.journal_offsets()
        finally:
            view.close()
    unspooled = 0
    for _, _, path in segments(directory):
        with contextlib.suppress(FileNotFoundError):
            unspooled += sum(1 for _ in iter_records(path, offsets.get(os.path.basename(path), 0), finished=False))
    return stats.ready + stats.in_flight + unspooled


def pytest_collection_modifyitems(config: Any, items: List[Any]) -> None:
    """Tests marked `lazyfs` are skipped, with the reason, where LazyFS cannot run (tests/lazyfs.py)."""
    from lazyfs import unavailable

    reason = unavailable()
    if reason is not None:
        for item in items:
            if item.get_closest_marker("lazyfs") is not None:
                item.add_marker(pytest.mark.skip(reason=reason))


def spool_with_events(path: str, count: int, prefix: str = "d") -> Spool:
    """A spool file at `path` holding `count` small events, transaction ids `<prefix>-0`, `<prefix>-1`, ..."""
    spool = Spool(path)
    spool.put_many(("event", {"transaction_id": f"{prefix}-{n}", "request": {"uri": f"http://x/{n}"}}, time.time())
                   for n in range(count))
    return spool
