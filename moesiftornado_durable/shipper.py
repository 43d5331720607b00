"""The shipper: the one piece of code that moves journaled records into the spool and on to Moesif.

One shipper per SPOOL_DIR (`serve` → `Shipper`): journals → spool (group commits) → `Flusher`
(batches, tenacity, moesifapi, ack), and the channel (`channel.py`) through which every app process
writing to the directory gets its figures and asks it to flush. Two hosts run the same code:

- SHIPPER 'process' (the default): a child process, kept running by a `Supervisor` thread in each app
  process. Whatever a thread in the app does (ingesting, encoding, gzip, HTTP) is paid for by the
  IOLoop through the GIL; in a process of its own it is not.
- SHIPPER 'thread': `InProcessHost`, threads inside the app process, for environments that cannot spawn
  a process.

Election: the shipper holds an exclusive `flock` on ``shipper.lock`` (`locks.SHIPPER_SLOT`) for its life,
so a SPOOL_DIR has one shipper however many app processes write to it, whatever their host. A host
that finds the lock taken does not ship, and looks again every `SUPERVISE_INTERVAL` (at start, after
a crash of the shipper, after the shipper's app exited).

Lifetime: the shipper process stops on SIGTERM (its app's `close`) or when its parent process is gone:
it spools what the journals hold, sends what it can within CLOSE_TIMEOUT, and leaves the rest on disk
for the next shipper. It ignores SIGINT: a Ctrl-C belongs to the app, whose exit then stops it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from . import audit, eventbuild, locks, proctitle, spooldir
from .channel import TEMPORARY_PREFIX, ChannelServer, FlushRequest
from .codec import Codec
from .config import Config
from .errors import ConfigError
from .flusher import Flusher
from .journal import INTAKE, SEGMENT_PATTERN, JournalReader
from .lost import LostRecords
from .sender import Sender
from .spool import Spool, open_spool, read_stats
from .worker import ProcessThread

logger = logging.getLogger("moesiftornado_durable")

_RETIRED_FILES = ("shipper-stats.json", "flush-request")  # what older builds used instead of the channel
EXIT_ANOTHER_SHIPPER = 3  # this SPOOL_DIR already has a live shipper
EXIT_REFUSED = 4  # SPOOL_DIR is unsafe or belongs to another application (the reason is on stderr)
CLOSE_TIMEOUT = 10.0  # seconds the shipper spends delivering when asked to stop; the rest stays on disk
TICK = 0.05  # seconds between looks at the journals (and the channel's look at the figures)
SUPERVISE_INTERVAL = 1.0  # seconds between an app process's looks at whether a shipper runs
_FLUSH_URGENCY = 10.0  # seconds partial batches go out at once after a flush request
_EARLY_SIGTERM = "_moesiftornado_durable_sigterm"
# The shipper's command line. A SIGTERM that arrives while the imports still run (an app that closes at
# once) is remembered, not fatal: the shipper then spools the journals and delivers before it exits.
_BOOTSTRAP = (f"import signal, sys; signal.signal(signal.SIGTERM, lambda *a: setattr(sys, {_EARLY_SIGTERM!r}, True)); "
              "from moesiftornado_durable.shipper import main; sys.exit(main())")


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
    """The shipper's parts, wherever it is hosted: the spool, the journal reader feeding it, the flusher,
    and the channel (`channel.py`) through which app processes get its figures and ask it to flush."""

    def __init__(self, config: Config) -> None:
        self.directory = config.spool_dir
        self.lost = LostRecords()
        self.spool: Spool = open_spool(locks.spool_path(self.directory, locks.SHIPPER_SLOT), sync=config.sqlite_sync,
                                       max_bytes=config.spool_max_bytes, when_full=config.when_full,
                                       on_evict=self.lost.evicted, codec=Codec(config.spool_encryption_keys))
        self.reader = journal_reader(self.spool)
        self._config_etag: Optional[str] = None
        self._rules_tag: Optional[str] = None
        self.look_now = threading.Event()  # a flush is waiting: read the journals now, not at the next TICK
        try:
            self.channel = ChannelServer(self.directory, self.figures, self._flushed, self._flush_requested)
        except BaseException:
            self.spool.close()
            raise
        self.flusher = Flusher(self.spool, Sender(config.base_uri, config.application_id, config.send_timeout),
                               config, on_config_etag=self._notice_etag, on_rules_tag=self._notice_rules_tag,
                               on_progress=self.channel.poke)
        for name in os.listdir(self.directory):  # what older builds wrote, and a socket a kill left half-made
            leftover = name.startswith((".shipper-stats-", TEMPORARY_PREFIX)) and name.endswith(".tmp")
            if name in _RETIRED_FILES or leftover:
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(self.directory, name))

    def tick(self) -> None:
        """One look, on the host's thread (the flusher's thread may be in a send or a backoff): spool what
        the journals gained and, if anything changed or a flush waits, let the channel look again (the
        flusher pokes it after each delivery; it also looks every second on its own)."""
        spooled = 0
        if not self.spool.acks_first():  # a tight disk: delivered records are deleted before more are spooled
            spooled = self.reader.ingest()
        folded = self.spool.fold_if_due()  # so the app processes may delete their segments (`retire_if_spooled`)
        if spooled or folded or self.channel.flush_waiting:
            self.channel.poke()

    def _notice_etag(self, etag: Optional[str]) -> None:
        self._config_etag = etag or self._config_etag

    def _notice_rules_tag(self, tag: Optional[str]) -> None:
        self._rules_tag = tag or self._rules_tag

    def start(self) -> None:
        """Serve the channel, then deliver. Without a channel (no socket could be made anywhere) the shipper
        still ships: app processes then get no figures and their `flush` returns False."""
        try:
            self.channel.start()
        except OSError:
            logger.exception("moesiftornado_durable shipper: cannot serve the channel for %s; shipping without "
                             "it (flush() returns False, stats() has no delivery figures)", self.directory)
            self.channel.close(0)
        self.flusher.start()

    def figures(self) -> Dict[str, Any]:
        """What app processes are told (on the channel's thread, whenever it changes)."""
        courier = self.flusher.courier
        counters = dict(courier.counters)
        counters.update(self.reader.counters)
        counters.update(+self.lost.counters)  # a dropped_<reason> key only once something was dropped
        if self.spool.lost_wal:  # committed records SQLite discarded with a damaged WAL (spooled again)
            counters["lost_wal"] = self.spool.lost_wal
        return {
            "pid": os.getpid(), "counters": counters,
            "last_error": None if courier.last_error is None else str(courier.last_error),
            "last_error_at": courier.last_error_at, "failing": courier.failing,
            "config_etag": self._config_etag, "rules_tag": self._rules_tag, "live_bytes": self.spool.live_bytes,
            "folded": self.spool.journal_folded(),
        }

    def _flush_requested(self) -> None:
        self.look_now.set()
        self.flusher.hurry(_FLUSH_URGENCY)  # partial batches go out now, orphans are looked at now

    def _flushed(self, request: FlushRequest) -> bool:
        """Whether `request` is done: its segments spooled through their sizes, then everything spooled by
        that moment delivered (or dead-lettered), orphan spools included. Never while SPOOL_DIR is gone:
        this shipper is about to stop, and the app asks the next one, in the directory made again."""
        if not os.path.exists(self.spool.path):
            return False
        if request.mark is None:
            offsets = self.spool.journal_offsets()
            for name, size in request.through.items():
                if not SEGMENT_PATTERN.match(name):
                    continue  # not a journal segment: nothing of ours to wait for
                if size and offsets.get(name, 0) < size and os.path.exists(os.path.join(self.directory, name)):
                    return False  # a segment is deleted only once spooled (and folded)
            request.mark = self.spool.last_id()
        if self.spool.pending_through(request.mark) or self._orphans_waiting():
            if not self.flusher.hurried:
                self._flush_requested()
            return False
        return True

    def _orphans_waiting(self) -> bool:
        """True while a spool file left by a stopped process (adopted by the flusher) still holds records."""
        for slot in locks.slots(self.directory):
            if slot != locks.SHIPPER_SLOT:
                with contextlib.suppress(FileNotFoundError, sqlite3.Error):
                    stats = read_stats(locks.spool_path(self.directory, slot))
                    if stats.ready or stats.in_flight:
                        return True
        return False

    def close(self, timeout: float, spool_journals: bool = True) -> None:
        """Spool everything the journals hold (unless `spool_journals` is false: they belong to another
        spool now), deliver what can be delivered within `timeout`, stop."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(Exception):
            while spool_journals and self.reader.ingest() and time.monotonic() < deadline:
                pass
        self.flusher.close(max(0.0, deadline - time.monotonic()))
        self.channel.close()
        if not self.flusher.is_alive:
            self.spool.close()


class StopRequest:
    """A stop asked for by a signal handler. A plain attribute, no lock: a `threading.Event` set from a
    handler can deadlock, the handler waiting for the lock of the very `wait` it interrupted."""

    def __init__(self) -> None:
        self.requested = False
        self.within = CLOSE_TIMEOUT  # seconds the shipper then spends delivering before it stops

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


def serve(config: Config, stop: StopRequest, keep_going: Callable[[], bool] = lambda: True,
          hosted: Callable[[Optional[Shipper], Optional[locks.SlotLock]], None] = lambda *_: None) -> int:
    """Be the shipper of SPOOL_DIR until `stop` is requested or `keep_going()` turns false, then spool the
    journals and deliver what can be delivered within `stop.within`. EXIT_ANOTHER_SHIPPER if one runs.
    If SPOOL_DIR is deleted meanwhile, deliver what this spool holds, make the directory again and go on.
    `hosted(shipper, lock)` is told what runs while it runs (None, None after). Raises `ConfigError` if
    SPOOL_DIR belongs to another application (its records are not ours to send)."""
    while True:
        os.makedirs(config.spool_dir, mode=0o700, exist_ok=True)
        spooldir.claim(config.spool_dir, config.application_id, config.base_uri)
        lock = locks.try_lock(config.spool_dir, locks.SHIPPER_SLOT)
        if lock is None:
            return EXIT_ANOTHER_SHIPPER
        try:
            lost = _ship(config, stop, keep_going, lock, hosted)
        finally:
            hosted(None, None)
            lock.release()
        if not lost or stop.requested or not keep_going():
            return 0


def _ship(config: Config, stop: StopRequest, keep_going: Callable[[], bool], lock: locks.SlotLock,
          hosted: Callable[[Optional[Shipper], Optional[locks.SlotLock]], None]) -> bool:
    """`serve` while `lock` holds; True if it stopped because SPOOL_DIR (or its shipper.lock) was deleted."""
    hosted(None, lock)
    shipper = Shipper(config)
    hosted(shipper, lock)
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
        shipper.look_now.wait(TICK)
        shipper.look_now.clear()
    shipper.close(stop.within, spool_journals=not lost)
    return lost


class InProcessHost:
    """SHIPPER 'thread': the shipper (`serve`, the very code of the shipper process) on a thread of the app
    process, for environments that cannot spawn one. It ships only while it wins the election (the
    shipper lock); while another process ships SPOOL_DIR it looks again every SUPERVISE_INTERVAL."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._stop = StopRequest()
        self._stopped = threading.Event()
        self._shipper: Optional[Shipper] = None
        self._lock: Optional[locks.SlotLock] = None
        self._fork_held: Optional[Spool] = None
        self.ships = 0  # times this host became the shipper
        self._worker = ProcessThread("moesif-durable-shipper", self._run)

    @property
    def is_alive(self) -> bool:
        return self._worker.is_alive

    def start(self) -> None:
        self._worker.start()

    def _hosted(self, shipper: Optional[Shipper], lock: Optional[locks.SlotLock]) -> None:
        if shipper is not None and shipper is not self._shipper:
            self.ships += 1
        self._shipper, self._lock = shipper, lock

    def _run(self) -> None:
        while not self._stop.requested:
            try:
                serve(self._config, self._stop, hosted=self._hosted)
            except ConfigError as exc:
                logger.error("moesiftornado_durable: the in-process shipper refused %s: %s",
                             self._config.spool_dir, exc)
            except Exception:  # a full disk at start, say: logged, tried again
                logger.exception("moesiftornado_durable: the in-process shipper failed; retrying")
            self._stopped.wait(SUPERVISE_INTERVAL)

    def close(self, timeout: float) -> None:
        """Stop: the shipper (if this host is it) delivers what it can within `timeout`, the rest stays on disk."""
        self._stop.within = max(0.0, timeout - TICK)  # the look in progress ends within TICK
        self._stop.set()
        self._stopped.set()
        self._worker.join(timeout)  # a send still stalled after that ends on its own, its batch kept on disk

    def before_fork(self) -> None:
        shipper = self._shipper
        if shipper is not None and not shipper.spool.closed:
            shipper.spool.hold_for_fork()  # no statement half-way when the process forks
            self._fork_held = shipper.spool

    def after_fork_in_parent(self) -> None:
        held, self._fork_held = self._fork_held, None
        if held is not None:
            held.release_after_fork()

    def abandon_after_fork(self) -> None:
        """In a forked child: drop the child's copies of the parent's shipper lock and channel; the parent
        ships on, and the child's own runtime elects anew."""
        self._fork_held = None
        if self._lock is not None:
            self._lock.release()  # in a child this only closes the child's copy of the fd
        if self._shipper is not None:
            self._shipper.channel.abandon_after_fork()
        self._shipper = self._lock = None


class Supervisor:
    """SHIPPER 'process' (the default), in each app process: keep a shipper process running for SPOOL_DIR.

    Starts one at once and then checks every `SUPERVISE_INTERVAL`; a shipper that exits (crash, or its
    parent app stopped) is replaced by whichever app process looks first.
    """

    def __init__(self, config: Config) -> None:
        self._config = config
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
        while locks.owner(self._config.spool_dir, locks.SHIPPER_SLOT) != (child.pid, True) \
                and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # a shipper holding its lock is past its start-up: a SIGTERM is now a request
        with contextlib.suppress(ProcessLookupError):
            child.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(max(0.0, deadline - time.monotonic()))
        logger.debug("the shipper (pid %d) stopped with %s", child.pid, child.returncode)
        if child.poll() is None:
            _LINGERING.append(child)  # it stops by itself within CLOSE_TIMEOUT; keep it referenced until then

    def before_fork(self) -> None:
        pass

    def after_fork_in_parent(self) -> None:
        pass

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
