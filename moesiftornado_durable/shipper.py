"""The shipper: one process per SPOOL_DIR that moves journaled records into the spool and on to Moesif.

Why a process: whatever a thread in the app process does (ingesting, encoding batches, gzip, HTTP) is
paid for by the IOLoop through the GIL. With SHIPPER 'process' (the default) the app process only
appends each record to its journal (`journal.py`); this process does the rest: journals → spool
(group commits) → the same `Flusher` as the thread mode (batches, tenacity, moesifapi, ack).

Election: the shipper holds an exclusive `flock` on ``shipper.lock`` (`locks.SHIPPER_SLOT`) for its life,
so a SPOOL_DIR has one shipper however many app processes write to it. Each app process runs a `Supervisor` thread that
starts a shipper whenever that lock is free (at start, after a crash of the shipper, after the
shipper's parent app exited) and reads the shipper's figures from ``shipper-stats.json``.

Lifetime: the shipper stops on SIGTERM (its app's `close`) or when its parent process is gone: it
spools what the journals hold, sends what it can within CLOSE_TIMEOUT, and leaves the rest on disk
for the next shipper. It ignores SIGINT: a Ctrl-C belongs to the app, whose exit then stops it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import audit, eventbuild, locks, proctitle, spooldir
from .codec import Codec
from .config import Config
from .errors import ConfigError
from .flusher import Flusher
from .journal import INTAKE, JournalReader
from .lost import LostRecords
from .sender import Sender
from .spool import Spool, open_spool
from .worker import ProcessThread

logger = logging.getLogger("moesiftornado_durable")

STATS_FILE = "shipper-stats.json"
FLUSH_REQUEST = "flush-request"
_STATS_TEMPORARY = ".shipper-stats-"  # the prefix of the stats file's temporary twin (name made unpredictable)
EXIT_ANOTHER_SHIPPER = 3  # this SPOOL_DIR already has a live shipper
EXIT_REFUSED = 4  # SPOOL_DIR is unsafe or belongs to another application (the reason is on stderr)
CLOSE_TIMEOUT = 10.0  # seconds the shipper spends delivering when asked to stop; the rest stays on disk
TICK = 0.05  # seconds between looks at the journals (and the figures, published when they change)
SUPERVISE_INTERVAL = 1.0  # seconds between an app process's looks at whether a shipper runs
_FLUSH_URGENCY = 10.0  # seconds partial batches go out at once after a flush request
_EARLY_SIGTERM = "_moesiftornado_durable_sigterm"
# The shipper's command line. A SIGTERM that arrives while the imports still run (an app that closes at
# once) is remembered, not fatal: the shipper then spools the journals and delivers before it exits.
_BOOTSTRAP = (f"import signal, sys; signal.signal(signal.SIGTERM, lambda *a: setattr(sys, {_EARLY_SIGTERM!r}, True)); "
              "from moesiftornado_durable.shipper import main; sys.exit(main())")


_MAX_STATS_BYTES = 1 << 20  # the stats file is a few hundred bytes: never read more than this of it


def read_stats_file(directory: str) -> Dict[str, Any]:
    """What the shipper last published about itself; {} when there is none yet."""
    try:
        return dict(json.loads(spooldir.read_bytes(os.path.join(directory, STATS_FILE), _MAX_STATS_BYTES)))
    except (OSError, ValueError, TypeError):
        return {}


def request_flush(directory: str) -> None:
    """Ask the shipper to send partial batches at once (what `flush` needs), by touching a file."""
    fd = spooldir.open_file(os.path.join(directory, FLUSH_REQUEST), os.O_WRONLY)
    try:
        os.utime(fd)
    finally:
        os.close(fd)


def shipper_running(directory: str) -> bool:
    """True if a live process holds the shipper lock of `directory` (changes nothing)."""
    return bool(locks.owner(directory, locks.SHIPPER_SLOT)[1])


def journal_reader(spool: Spool) -> JournalReader:
    """A reader that spools the journals beside `spool` into it (whoever holds the shipper lock)."""
    directory = spool.directory

    def writer_alive(slot: int) -> bool:
        return bool(locks.owner(directory, slot, INTAKE)[1])

    # capture records are built into their events on the way in (eventbuild.py): the spool sees events only
    return JournalReader(directory, writer_alive, eventbuild.building(spool.ingest, spool.codec), spool.journal_offsets,
                         spool.forget_segment, spool.fold)


class Shipper:
    """The shipper's parts in its own process: the spool, the journal reader feeding it, and the flusher."""

    def __init__(self, config: Config) -> None:
        self.directory = config.spool_dir
        self.lost = LostRecords()
        self.spool: Spool = open_spool(locks.spool_path(self.directory, locks.SHIPPER_SLOT), sync=config.sqlite_sync,
                                       max_bytes=config.spool_max_bytes, when_full=config.when_full,
                                       on_evict=self.lost.evicted, codec=Codec(config.spool_encryption_keys))
        self.reader = journal_reader(self.spool)
        self.flusher = Flusher(self.spool, Sender(config.base_uri, config.application_id, config.send_timeout),
                               config, on_config_etag=self._notice_etag, on_rules_tag=self._notice_rules_tag)
        self._config_etag: Optional[str] = None
        self._rules_tag: Optional[str] = None
        self._flush_seen = self._flush_requested_at()
        self._published: Dict[str, Any] = {}
        for name in os.listdir(self.directory):  # a stats file a killed shipper left half-written
            if name.startswith(_STATS_TEMPORARY) and name.endswith(".tmp"):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self.directory, name))

    def tick(self) -> None:
        """One look, on the main thread (the flusher's thread may be in a send or a backoff): spool what
        the journals gained, pass on a flush request, publish the figures."""
        requested = self._flush_requested_at()
        if requested != self._flush_seen:
            self._flush_seen = requested
            self.flusher.hurry(_FLUSH_URGENCY)
        if not self.spool.acks_first():  # a tight disk: delivered records are deleted before more are spooled
            self.reader.ingest()
        self.spool.fold_if_due()  # so the app processes may delete the segments they wrote (`retire_if_spooled`)
        self.publish_stats()

    def _flush_requested_at(self) -> float:
        try:
            return os.lstat(os.path.join(self.directory, FLUSH_REQUEST)).st_mtime
        except FileNotFoundError:
            return 0.0

    def _notice_etag(self, etag: Optional[str]) -> None:
        self._config_etag = etag or self._config_etag

    def _notice_rules_tag(self, tag: Optional[str]) -> None:
        self._rules_tag = tag or self._rules_tag

    def start(self) -> None:
        self.flusher.start()

    def publish_stats(self) -> None:
        """Write shipper-stats.json atomically when the figures changed: app processes read them there."""
        courier = self.flusher.courier
        figures = dict(courier.counters)
        figures.update(self.reader.counters)
        figures.update(+self.lost.counters)  # a dropped_<reason> key only once something was dropped
        if self.spool.lost_wal:  # committed records SQLite discarded with a damaged WAL (spooled again)
            figures["lost_wal"] = self.spool.lost_wal
        stats = {
            "pid": os.getpid(), "counters": figures,
            "last_error": None if courier.last_error is None else str(courier.last_error),
            "last_error_at": courier.last_error_at, "failing": courier.failing,
            "config_etag": self._config_etag, "rules_tag": self._rules_tag, "live_bytes": self.spool.live_bytes,
        }
        if stats == self._published and not self.flusher.hurried:
            return  # unchanged; while a flush is waiting, every look is published (it waits for a fresh one)
        self._published = stats
        stats = dict(stats, time=time.time())
        # a private temporary file (0600, a name no one can guess, never through a link) renamed over the last
        fd, temporary = tempfile.mkstemp(dir=self.directory, prefix=_STATS_TEMPORARY, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(stats, f)
            os.replace(temporary, os.path.join(self.directory, STATS_FILE))
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(temporary)
            raise

    def close(self, timeout: float, spool_journals: bool = True) -> None:
        """Spool everything the journals hold (unless `spool_journals` is false: they belong to another
        spool now), deliver what can be delivered within `timeout`, stop."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(Exception):
            while spool_journals and self.reader.ingest() and time.monotonic() < deadline:
                pass
        self.flusher.close(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(Exception):
            self.publish_stats()
        if not self.flusher.is_alive:
            self.spool.close()


class StopRequest:
    """A stop asked for by a signal handler. A plain attribute, no lock: a `threading.Event` set from a
    handler can deadlock, the handler waiting for the lock of the very `wait` it interrupted."""

    def __init__(self) -> None:
        self.requested = False

    def set(self, *_: Any) -> None:
        self.requested = True


def main() -> int:
    """The shipper process's entry point: the options arrive as JSON on stdin (they hold secrets)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop.set)
    if getattr(sys, _EARLY_SIGTERM, False):  # it came while this module was still being imported
        stop.set()
    handed = json.loads(sys.stdin.read())
    parent = int(handed["parent"])  # not os.getppid(): the parent may have exited while this one started
    try:
        config = Config.from_dict(handed["options"])
        proctitle.set_title(proctitle.shipper_title(config.spool_dir))  # not `python -c import signal, …` in ps
        logging.basicConfig(level=logging.DEBUG if config.debug else logging.WARNING,
                            format="%(asctime)s moesif-shipper[%(process)d] %(levelname)s %(message)s")
        audit.audit_logger.setLevel(logging.INFO)  # relayed to the app process, which logs it where the user wants
        audit.audit_logger.propagate = False
        audit.audit_logger.addHandler(audit.RelayHandler(sys.stdout))
        return serve(config, stop, lambda: os.getppid() == parent)
    except ConfigError as exc:  # SPOOL_DIR turned unsafe, or bound to another application, since the app started
        print(f"moesif-shipper[{os.getpid()}]: {exc}", file=sys.stderr)
        return EXIT_REFUSED


def serve(config: Config, stop: StopRequest, keep_going: Callable[[], bool] = lambda: True) -> int:
    """Be the shipper of SPOOL_DIR until `stop` is requested or `keep_going()` turns false, then spool the
    journals and deliver what can be delivered within CLOSE_TIMEOUT. EXIT_ANOTHER_SHIPPER if one runs.
    If SPOOL_DIR is deleted meanwhile, deliver what this spool holds, make the directory again and go on.
    Raises `ConfigError` if SPOOL_DIR belongs to another application (its records are not ours to send)."""
    while True:
        os.makedirs(config.spool_dir, mode=0o700, exist_ok=True)
        spooldir.claim(config.spool_dir, config.application_id, config.base_uri)
        lock = locks.try_lock(config.spool_dir, locks.SHIPPER_SLOT)
        if lock is None:
            return EXIT_ANOTHER_SHIPPER
        try:
            lost = _ship(config, stop, keep_going, lock)
        finally:
            lock.release()
        if not lost or stop.requested or not keep_going():
            return 0


def _ship(config: Config, stop: StopRequest, keep_going: Callable[[], bool], lock: locks.SlotLock) -> bool:
    """`serve` while `lock` holds; True if it stopped because SPOOL_DIR (or its shipper.lock) was deleted."""
    shipper = Shipper(config)
    shipper.start()
    lost = False
    while not (stop.requested or not keep_going()):
        if not lock.intact():  # checked before each look, so no new segment goes into the deleted spool
            lost = True
            logger.error("moesiftornado_durable shipper: SPOOL_DIR %s was deleted (or its shipper.lock); "
                         "delivering what this shipper's spool still holds, then starting again in a new one",
                         config.spool_dir)
            break
        try:
            shipper.tick()
        except Exception:  # a full disk, a damaged spool: logged, and tried again at the next tick
            logger.exception("moesiftornado_durable shipper: could not spool the journals; retrying")
            time.sleep(1.0)
        time.sleep(TICK)
    shipper.close(CLOSE_TIMEOUT, spool_journals=not lost)
    return lost


class Supervisor:
    """In each app process: keep a shipper running for SPOOL_DIR, and read what it publishes.

    Starts one at once and then checks every `SUPERVISE_INTERVAL`; a shipper that exits (crash, or its
    parent app stopped) is replaced by whichever app process looks first.
    """

    def __init__(self, config: Config, on_stats: Callable[[Dict[str, Any]], None]) -> None:
        self._config = config
        self._on_stats = on_stats
        self._child: Optional[subprocess.Popen] = None
        self._stop = threading.Event()
        self._spawn_lock = threading.Lock()
        self.starts = 0
        self._worker = ProcessThread("moesif-durable-supervisor", self._run)

    @property
    def is_alive(self) -> bool:
        return self._worker.is_alive

    def start(self) -> None:
        """Start a shipper now if none runs (so a backlog moves without waiting), then supervise."""
        try:
            self._keep_shipper_running()
        except OSError:
            logger.exception("moesiftornado_durable: could not start the shipper; the supervisor retries")
        self._worker.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._on_stats(read_stats_file(self._config.spool_dir))
                self._keep_shipper_running()
            except Exception:  # the supervisor must survive anything
                logger.exception("moesiftornado_durable: the shipper supervisor failed; retrying")
            self._stop.wait(SUPERVISE_INTERVAL)

    def _keep_shipper_running(self) -> None:
        child = self._child
        if child is not None:
            if child.poll() is None:
                return
            self._child = None
            if child.returncode == EXIT_REFUSED:
                logger.error("moesiftornado_durable: the shipper (pid %d) refused %s (its reason is on stderr: the "
                             "directory became unsafe or another application's); starting another",
                             child.pid, self._config.spool_dir)
            elif child.returncode not in (0, EXIT_ANOTHER_SHIPPER):
                logger.error("moesiftornado_durable: the shipper (pid %d) exited with %s; starting another",
                             child.pid, child.returncode)
        with self._spawn_lock:  # `close` reads `_child` under it: a shipper started now is one it stops
            if not self._stop.is_set() and not shipper_running(self._config.spool_dir):
                self._child = _spawn(self._config)
                self.starts += 1

    def close(self, timeout: float) -> None:
        """Stop supervising; ask our shipper (if this process started the live one) to finish within
        `timeout`. A shipper still sending after that finishes on its own within CLOSE_TIMEOUT."""
        self._stop.set()
        self._worker.join(timeout)
        with self._spawn_lock:
            child, self._child = self._child, None
        if child is None or child.poll() is not None:
            return
        deadline = time.monotonic() + timeout
        while read_stats_file(self._config.spool_dir).get("pid") != child.pid and child.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.01)  # a shipper that has published is past its start-up: a SIGTERM is now a request
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(max(0.0, deadline - time.monotonic()))
        logger.debug("the shipper (pid %d) stopped with %s", child.pid, child.returncode)
        if child.poll() is None:
            _LINGERING.append(child)  # it stops by itself within CLOSE_TIMEOUT; keep it referenced until then

    def abandon_after_fork(self) -> None:
        """In a forked child: the parent's shipper is the parent's to stop."""
        self._child = None
        self._spawn_lock = threading.Lock()  # the parent's supervisor may have held it at the fork


_LINGERING: List[subprocess.Popen] = []


def _relay_audit(stream: Any) -> None:
    """Log the shipper's audit records in this process, until the shipper exits (end of the pipe)."""
    with stream:
        for line in stream:
            audit.relay(line)


def _spawn(config: Config) -> subprocess.Popen:
    _LINGERING[:] = [child for child in _LINGERING if child.poll() is None]
    package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    child = subprocess.Popen([sys.executable, "-c", _BOOTSTRAP], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=env, close_fds=True, text=True)
    assert child.stdin is not None and child.stdout is not None
    try:
        child.stdin.write(json.dumps({"options": config.delivery_options(), "parent": os.getpid()}))
    finally:
        child.stdin.close()
    threading.Thread(target=_relay_audit, args=(child.stdout,), name="moesif-durable-audit-relay", daemon=True).start()
    logger.debug("started a shipper (pid %d) for %s", child.pid, config.spool_dir)
    return child


if __name__ == "__main__":
    sys.exit(main())
