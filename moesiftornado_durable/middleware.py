"""`MoesifMiddleware`: the drop-in replacement for moesiftornado's, wired to the durable pipeline.

Thin on purpose: `log_event` captures the event, commits it to the spool and returns; it never raises
into Tornado and counts every event it did not spool, by reason. When a user callable returns an
awaitable (an async function), the rest of the capture runs as a task on the running event loop and
the event is spooled when the awaitables resolve. The spool, the flusher thread and the app-config
thread belong to one process: after a fork the child abandons the parent's (a SQLite connection or a
thread must not cross a fork) and opens its own. Middlewares with the same delivery options share them
(`_Pipeline`): an app may build one per request, as Moesif's own Tornado example does.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import errno
import inspect
import json
import logging
import os
import sqlite3
import sys
import threading
import time
import weakref
from typing import Any, Callable, Counter, Deque, Dict, Iterable, List, Mapping, Optional, Set, Tuple

from . import audit, hook, locks, outgoing, spooldir
from .capture import (
    RAISED,
    Outcome,
    ResponseBodyCapture,
    Steps,
    UserCall,
    body_capture_transform,
    call_user_functions,
    capture_steps,
    install_body_capture,
    log_user_error,
    refuse_awaitables,
    run_sync,
)
from .codec import Codec, UndecryptableError
from .config import Config, Handler
from .errors import ConfigError, SpoolFullError, SpoolUnavailableError
from .flusher import Flusher
from .governance import DEFAULT_RULES_REFRESH_INTERVAL, RuleSet
from .hook import SETTINGS_KEY, ExecuteHook, Governor
from .journal import INTAKE, JournalWriter, first_record
from .profiles import COMPANY_FIELDS, SUBSCRIPTION_FIELDS, USER_FIELDS, normalize_profile, normalize_profiles
from .sampling import DEFAULT_REFRESH_INTERVAL, AppConfig, ConfigFetcher, Sampler
from .sender import Sender
from .shipper import Supervisor, read_stats_file, request_flush, shipper_running
from .spool import (
    COMPANY,
    EVENT,
    SUBSCRIPTION,
    USER,
    SpoolStats,
    SpoolView,
    directory_stats,
    open_spool,
    read_stats,
    record_id,
)

logger = logging.getLogger("moesiftornado_durable")

DEFAULT_CLOSE_TIMEOUT = 10.0
ASYNC_CALLABLE_TIMEOUT = 30.0  # seconds an awaitable returned by a user callable may take; then it counts as failed
_CONFIG_CLOSE_WAIT = 0.2  # seconds close() waits for an app-config fetch in flight (its thread is a daemon)
LOGGED_ATTRIBUTE = "_moesiftornado_durable_logged"
_ERROR_LOG_INTERVAL = 10.0  # seconds between repeated spool-failure logs
_SPOOL_FAILING_FOR = 60.0  # seconds a failed spool write keeps stats()["spool_failing"] true
_FLUSH_POLL = 0.05  # seconds between looks at the shipper's progress in flush()
# Seconds a pipeline stays open after its last middleware was garbage-collected without close(): an app that
# builds a middleware per request would otherwise start and stop a runtime (and a shipper) per request.
IDLE_CLOSE_AFTER = 30.0
_REAP_INTERVAL = 1.0  # seconds between the reaper's looks at collected middlewares and idle pipelines


class _Runtime:
    """The per-process parts, shared by both SHIPPER modes: this process's slot (locked), the app-config
    fetcher and the governance-rules fetcher. `put` makes one record durable; the subclasses say where
    and who delivers it.

    The rules are fetched at start, at least every `DEFAULT_RULES_REFRESH_INTERVAL` seconds, whenever an
    accepted event batch carried a new ``X-Moesif-Rules-Tag`` (in the default mode the shipper process
    sees it and publishes it in its stats file, read here every second), and whenever a new app config
    arrives."""

    slot_kind = "spool"

    def __init__(self, config: Config, on_app_config: Callable[[AppConfig], None],
                 on_rules: Callable[[RuleSet], None]) -> None:
        self.pid = os.getpid()
        self.config = config
        # The start-up checks of what SPOOL_DIR already holds, before anything is written there: that it is
        # this application's (here) and that SPOOL_ENCRYPTION_KEY opens its records (`_stored_records_problem`).
        spooldir.claim(config.spool_dir, config.application_id, config.base_uri)
        self.lock = locks.lock_free_slot(config.spool_dir, self.slot_kind)
        self._on_app_config = on_app_config
        self._config_etag: Optional[str] = None
        # their own HTTP sessions: each fetcher runs on its own thread
        self._config_sender = Sender(config.base_uri, config.application_id, config.send_timeout)
        self._rules_sender = Sender(config.base_uri, config.application_id, config.send_timeout)
        self.fetcher = ConfigFetcher(self._config_sender.fetch_app_config, self._app_config_arrived,
                                     refresh_interval=DEFAULT_REFRESH_INTERVAL, retry_wait=config.retry_max_wait)
        self.rules_fetcher = ConfigFetcher(self._rules_sender.fetch_rules, on_rules,
                                           refresh_interval=DEFAULT_RULES_REFRESH_INTERVAL,
                                           retry_wait=config.retry_max_wait, parse=RuleSet.parse,
                                           what="governance rules", thread_name="moesif-durable-rules")

    def _app_config_arrived(self, app_config: AppConfig) -> None:
        self._on_app_config(app_config)
        if self._config_etag is not None and app_config.etag != self._config_etag:
            self.rules_fetcher.refresh()  # the config changed: the rules may have too
        self._config_etag = app_config.etag

    def start_fetchers(self) -> None:
        self.fetcher.start()
        self.rules_fetcher.start()

    def put(self, record: Dict[str, Any], kind: str) -> None:
        raise NotImplementedError

    def flush(self, timeout: float) -> bool:
        raise NotImplementedError

    def delivery_stats(self) -> Tuple[Dict[str, Any], SpoolStats]:
        """(delivery counters and errors, the spool's state); the spool part may raise sqlite3.Error."""
        raise NotImplementedError

    def close(self, timeout: float) -> None:
        self.fetcher.close(min(timeout, _CONFIG_CLOSE_WAIT))
        self.rules_fetcher.close(min(timeout, _CONFIG_CLOSE_WAIT))
        if not self.fetcher.is_alive:
            self._config_sender.close()
        if not self.rules_fetcher.is_alive:
            self._rules_sender.close()

    def abandon_after_fork(self) -> None:
        """In a forked child: drop the child's copy of the parent's lock fd; the parent keeps its lock."""
        self.lock.release()

    def before_fork(self) -> None:
        pass

    def after_fork_in_parent(self) -> None:
        pass


class _ThreadRuntime(_Runtime):
    """SHIPPER 'thread': records are committed to this process's own SQLite spool (``spool-N.db``), and a
    flusher thread in this process delivers them."""

    def __init__(self, config: Config, on_evict: Callable[[List[str]], None],
                 on_app_config: Callable[[AppConfig], None], on_rules: Callable[[RuleSet], None]) -> None:
        super().__init__(config, on_app_config, on_rules)
        try:
            self.spool = open_spool(self.lock.spool_path, sync=config.spool_sync, max_bytes=config.spool_max_bytes,
                                    when_full=config.when_full, on_evict=on_evict,
                                    codec=Codec(config.spool_encryption_keys))
        except BaseException:
            self.lock.release()
            raise
        try:
            _check_readable(self.spool.path, self.spool.unreadable_sample())
        except BaseException:
            self.spool.close()
            self.lock.release()
            raise
        sender = Sender(config.base_uri, config.application_id, config.send_timeout)
        self.flusher = Flusher(self.spool, sender, config, on_config_etag=self.fetcher.notice_etag,
                               on_rules_tag=self.rules_fetcher.notice_etag)
        self.flusher.start()
        self.start_fetchers()

    def put(self, record: Dict[str, Any], kind: str) -> None:
        self.spool.put(record, kind)

    def flush(self, timeout: float) -> bool:
        return self.flusher.flush(timeout)

    def delivery_stats(self) -> Tuple[Dict[str, Any], SpoolStats]:
        courier = self.flusher.courier
        delivery: Dict[str, Any] = dict(courier.counters)
        delivery["last_error"] = None if courier.last_error is None else str(courier.last_error)
        delivery["last_error_at"] = courier.last_error_at
        return delivery, self.spool.stats()

    def close(self, timeout: float) -> None:
        super().close(timeout)
        self.flusher.close(timeout)
        if not self.flusher.is_alive:
            self.spool.close()
            self.lock.release()

    def before_fork(self) -> None:
        self.spool.hold_for_fork()

    def after_fork_in_parent(self) -> None:
        self.spool.release_after_fork()


class _ProcessRuntime(_Runtime):
    """SHIPPER 'process' (the default): records are appended to this process's intake journal with one
    `write()`; the shipper process of SPOOL_DIR spools and delivers them, and a supervisor thread here
    keeps one running."""

    slot_kind = INTAKE

    def __init__(self, config: Config, on_app_config: Callable[[AppConfig], None],
                 on_rules: Callable[[RuleSet], None]) -> None:
        super().__init__(config, on_app_config, on_rules)
        self.codec = Codec(config.spool_encryption_keys)
        spool_path = locks.spool_path(config.spool_dir, locks.SHIPPER_SLOT)
        try:
            _check_readable(*_stored_records_problem(config.spool_dir, spool_path, self.codec))
        except BaseException:
            self.lock.release()
            raise
        self.writer = JournalWriter(config.spool_dir, self.lock.slot, config.spool_sync,
                                    reclaim_slot=self._reclaim_slot)
        self._shipper: Dict[str, Any] = {}
        self._written_since_stats = 0
        self._view = SpoolView(spool_path)  # the supervisor thread's own read-only look at the spool
        self._view_recoveries = 0  # the writer's `recoveries` when `_view` was opened
        self.supervisor = Supervisor(config, self._tick)
        self.supervisor.start()
        self.start_fetchers()

    def _tick(self, stats: Dict[str, Any]) -> None:
        """Every second, on the supervisor thread: take the shipper's figures, and delete our journal
        segment once it is all spooled."""
        if stats.get("time") != self._shipper.get("time"):
            self._shipper = stats
            self._written_since_stats = 0
            self.fetcher.notice_etag(stats.get("config_etag"))
            self.rules_fetcher.notice_etag(stats.get("rules_tag"))
        if self.writer.recoveries != self._view_recoveries:  # SPOOL_DIR was made again: so is the spool
            self._view_recoveries = self.writer.recoveries
            self._view.close()
            self._view = SpoolView(self._view.path)
        try:
            self.writer.retire_if_spooled(self._view.journal_folded_offset)
        except (sqlite3.Error, FileNotFoundError):
            pass  # no shipper has created its spool yet

    def _reclaim_slot(self) -> int:
        """The writer found SPOOL_DIR deleted and made it again: hold a slot lock in the directory as it
        is now (the old lock file went with it), so the shipper sees our new segment's writer as alive."""
        if not self.lock.intact():
            self.lock.release()
            self.lock = locks.lock_free_slot(self.config.spool_dir, INTAKE)
        return self.lock.slot

    def put(self, record: Dict[str, Any], kind: str) -> None:
        data = self.codec.encode(record)
        max_bytes = self.config.spool_max_bytes
        if max_bytes is not None and self.config.when_full == "drop_newest":
            backlog = int(self._shipper.get("live_bytes") or 0) + self._written_since_stats
            if backlog + len(data) > max_bytes:
                raise SpoolFullError(f"the spool holds about {backlog} bytes (SPOOL_MAX_BYTES {max_bytes})")
        self.writer.append(kind, data, time.time())
        self._written_since_stats += len(data)

    def flush(self, timeout: float) -> bool:
        """Wait until this process's journal is spooled and everything spooled by then is delivered."""
        deadline = time.monotonic() + timeout
        segment, size = os.path.basename(self.writer.path), self.writer.size
        view = SpoolView(locks.spool_path(self.config.spool_dir, locks.SHIPPER_SLOT))
        try:
            with contextlib.suppress(OSError):  # SPOOL_DIR deleted: the next write or shipper makes it again
                request_flush(self.config.spool_dir)
            mark: Optional[int] = None
            while time.monotonic() < deadline:
                try:
                    if mark is None and self._spooled(view, segment, size):
                        mark = view.last_id()
                    if mark is not None and view.pending_through(mark) == 0 and not self._orphans_waiting():
                        self._await_stats_after(time.time(), deadline)
                        return True
                except (sqlite3.Error, FileNotFoundError):
                    pass  # the shipper has not created its spool yet
                time.sleep(_FLUSH_POLL)
            return False
        finally:
            view.close()

    def _await_stats_after(self, moment: float, deadline: float) -> None:
        """Give the shipper a moment to publish the figures of what was just delivered (for `stats`)."""
        until = min(deadline, time.monotonic() + 1.0)
        while time.monotonic() < until:
            if float(read_stats_file(self.config.spool_dir).get("time") or 0) >= moment:
                return
            time.sleep(_FLUSH_POLL / 5)

    def _orphans_waiting(self) -> bool:
        """True while a spool file left by a stopped process (which the shipper adopts, under its lock)
        still holds records."""
        directory = self.config.spool_dir
        for slot in locks.slots(directory):
            if slot != locks.SHIPPER_SLOT:
                stats = read_stats(locks.spool_path(directory, slot))
                if stats.ready or stats.in_flight:
                    return True
        return False

    def _spooled(self, view: SpoolView, segment: str, size: int) -> bool:
        if not segment or size == 0:
            return True  # this process wrote nothing (or its newest segment is empty: a write the full disk refused)
        offset = view.journal_offset(segment)
        if offset is None:
            return not os.path.exists(self.writer.path)  # deleted once spooled completely
        return offset >= size

    def delivery_stats(self) -> Tuple[Dict[str, Any], SpoolStats]:
        shipper = read_stats_file(self.config.spool_dir)
        delivery: Dict[str, Any] = dict(shipper.get("counters") or {})
        delivery["last_error"] = shipper.get("last_error")
        delivery["last_error_at"] = shipper.get("last_error_at")
        delivery["shipper_pid"] = shipper.get("pid")
        delivery["shipper_running"] = shipper_running(self.config.spool_dir)
        # the shipper serves the whole directory: its spool and the orphans it adopts
        return delivery, directory_stats(self.config.spool_dir)

    def close(self, timeout: float) -> None:
        super().close(timeout)
        self.writer.close()
        self.lock.release()  # our segment is finished now: the shipper may spool its tail and delete it
        self.supervisor.close(timeout)
        if not self.supervisor.is_alive:
            self._view.close()

    def abandon_after_fork(self) -> None:
        super().abandon_after_fork()
        self.writer.close()
        self.supervisor.abandon_after_fork()


def _stored_records_problem(directory: str, spool_path: str, codec: Codec) -> Tuple[str, Optional[str]]:
    """(where, why) the oldest journaled record or the shipper's spool cannot be decoded with `codec`'s
    SPOOL_ENCRYPTION_KEY; why is None when they can."""
    sample = first_record(directory)
    if sample is not None:
        try:
            codec.decode(sample)
        except UndecryptableError as exc:
            return directory, str(exc)
        except ValueError:
            pass  # damage is the reader's business
    if not os.path.exists(spool_path):
        return spool_path, None
    view = SpoolView(spool_path)
    try:
        return spool_path, view.unreadable_sample(codec)
    except sqlite3.DatabaseError:
        return spool_path, None  # a damaged spool: the shipper sets it aside (quarantine) and starts afresh
    finally:
        view.close()


def _check_readable(path: str, problem: Optional[str]) -> None:
    """Fail at construction when the spool holds records that SPOOL_ENCRYPTION_KEY cannot open."""
    if problem is not None:
        raise ConfigError("SPOOL_ENCRYPTION_KEY", f"{problem} ({path}); "
                          "start with the key the spool was written with (a list keeps old keys readable)")


class _ErrorLog:
    """Log an ERROR, with the current traceback, at most once every few seconds."""

    def __init__(self) -> None:
        self._last = -_ERROR_LOG_INTERVAL

    def __call__(self, message: str) -> None:
        now = time.monotonic()
        if now - self._last < _ERROR_LOG_INTERVAL:
            return
        self._last = now
        logger.error("moesiftornado_durable: %s", message, exc_info=sys.exc_info()[0] is not None)


class _Pipeline:
    """What every middleware with the same delivery options (`Config.delivery_options`) shares in this
    process: the runtime (journal slot, shipper supervisor or flusher, the app-config and rules fetchers)
    and what it fetched (the sampler's app config, the governance rules). `_Registry` counts its users."""

    def __init__(self, key: str, config: Config) -> None:
        self.key = key
        self.config = config  # the first user's; the runtime reads only delivery options, the same for all
        self.sampler = Sampler()
        self.rules = RuleSet()  # none until the first fetch; replaced by one reference swap
        self.runtime: Optional[_Runtime] = None
        self.abandoned: List[_Runtime] = []  # inherited across a fork: kept, never used or closed
        self.lock = threading.Lock()
        self.closed = False
        self.users = 0  # middlewares holding it (changed under the registry's lock)
        self.holders: weakref.WeakSet[MoesifMiddleware] = weakref.WeakSet()
        self.idle_since: Optional[float] = None
        self.outgoing_owner: Optional[weakref.ReferenceType[MoesifMiddleware]] = None  # captures for all
        self.dropped_oldest = 0
        self._log_error = _ErrorLog()

    def runtime_here(self) -> Optional[_Runtime]:
        """This process's runtime, opened on first use; None once closed. Raises what opening raises."""
        runtime = self.runtime
        if runtime is not None and runtime.pid == os.getpid():
            return runtime
        with self.lock:
            if self.closed:
                return None
            if self.runtime is None or self.runtime.pid != os.getpid():
                self.runtime = (_ProcessRuntime(self.config, self.sampler.update, self._rules_arrived)
                                if self.config.shipper == "process"
                                else _ThreadRuntime(self.config, self._evicted, self.sampler.update,
                                                    self._rules_arrived))
            return self.runtime

    def _rules_arrived(self, rules: RuleSet) -> None:
        self.rules = rules

    def _evicted(self, record_ids: List[str]) -> None:
        """WHEN_FULL='drop_oldest' deleted these waiting records to make room: count and log them."""
        self.dropped_oldest += len(record_ids)
        shown = ", ".join(record_ids[:20]) + (" …" if len(record_ids) > 20 else "")
        self._log_error(f"the spool is full (SPOOL_MAX_BYTES); dropped the {len(record_ids)} oldest waiting "
                        f"record(s): {shown}; dropped so far: {self.dropped_oldest}")

    def close(self, timeout: float) -> None:
        """Close the runtime (deliver within `timeout`, release the slot); a later user opens a new pipeline."""
        with self.lock:
            runtime, self.runtime, self.closed = self.runtime, None, True
        if runtime is not None and runtime.pid == os.getpid():
            runtime.close(timeout)

    def before_fork(self) -> None:
        runtime = self.runtime
        if runtime is not None and runtime.pid == os.getpid():
            runtime.before_fork()

    def after_fork_in_parent(self) -> None:
        runtime = self.runtime
        if runtime is not None and runtime.pid == os.getpid():
            runtime.after_fork_in_parent()

    def after_fork_in_child(self) -> None:
        """Leave the parent's runtime alone (its lock fd dropped), and start this process's own if used."""
        self.lock = threading.Lock()
        if self.runtime is not None:
            self.runtime.abandon_after_fork()
            self.abandoned.append(self.runtime)
            self.runtime = None
        if self.users:
            try:
                self.runtime_here()
            except Exception:
                logger.exception("moesiftornado_durable: could not start after fork")


class _Registry:
    """The process's pipelines, one per set of delivery options, and how many middlewares use each.

    A middleware takes a share when it is made (or used again after `close`) and gives it back on
    `close`, which closes the pipeline at once when it was the last share. A middleware collected without
    `close` is noticed by the reaper thread, which closes its pipeline `IDLE_CLOSE_AFTER` seconds after
    the last one went, unless a new middleware took it meanwhile. One fork hook and one exit hook serve
    every pipeline (`os.register_at_fork` cannot unregister: one per middleware would leak).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pipelines: Dict[str, _Pipeline] = {}
        # The pipelines of collected middlewares: appended by a weakref.finalize callback, which may run in
        # any thread at any allocation, so it takes no lock (deque.append is atomic); `_settle` counts them.
        self.collected: Deque[_Pipeline] = collections.deque()
        self._reaper: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._hooks_installed = False

    def acquire(self, middleware: MoesifMiddleware) -> _Pipeline:
        """A share of the pipeline of `middleware`'s delivery options (made if there is none), recorded
        in `middleware._share`."""
        key = json.dumps(middleware.config.delivery_options(), sort_keys=True)
        with self.lock:
            self._install_hooks()
            self._settle()
            pipeline = self.pipelines.get(key)
            if pipeline is None:
                pipeline = self.pipelines[key] = _Pipeline(key, middleware.config)
            pipeline.users += 1
            pipeline.idle_since = None
            pipeline.holders.add(middleware)
            share = weakref.finalize(middleware, self.collected.append, pipeline)
            share.atexit = False
            middleware._share = share
            self._offer_outgoing(pipeline, middleware)
            if self._reaper is None or not self._reaper.is_alive():
                self._reaper = threading.Thread(target=self._reap, name="moesif-durable-reaper", daemon=True)
                self._reaper.start()
            return pipeline

    def release(self, pipeline: _Pipeline, middleware: MoesifMiddleware, timeout: float) -> None:
        """`middleware.close()`: give its share back; the last one closes the pipeline now, within `timeout`."""
        with self.lock:
            self._settle()  # middlewares collected meanwhile count no more
            pipeline.holders.discard(middleware)
            pipeline.users -= 1
            if pipeline.outgoing_owner is not None and pipeline.outgoing_owner() is middleware:
                outgoing.unregister(middleware._log_outgoing)
                pipeline.outgoing_owner = None
                self._offer_outgoing(pipeline)
            if pipeline.users > 0:
                return
            if self.pipelines.get(pipeline.key) is pipeline:
                del self.pipelines[pipeline.key]
        pipeline.close(timeout)

    def _offer_outgoing(self, pipeline: _Pipeline, candidate: Optional[MoesifMiddleware] = None) -> None:
        """Under the lock: one middleware per pipeline captures the app's outgoing calls (one event per call
        and destination): the first with CAPTURE_OUTGOING_REQUESTS and, when it goes, another that has it."""
        if pipeline.outgoing_owner is not None and pipeline.outgoing_owner() is not None:
            return
        pipeline.outgoing_owner = None
        for middleware in [candidate] if candidate is not None else list(pipeline.holders):
            if middleware.config.capture_outgoing_requests:
                outgoing.register(middleware._log_outgoing, middleware.config.base_uri)
                pipeline.outgoing_owner = weakref.ref(middleware)
                return

    def _settle(self) -> None:
        """Under the lock: count the shares of collected middlewares as given back."""
        while self.collected:
            pipeline = self.collected.popleft()
            pipeline.users -= 1
            if pipeline.users == 0:
                pipeline.idle_since = time.monotonic()
            self._offer_outgoing(pipeline)

    def _reap(self) -> None:
        """The reaper thread: settle collected shares and close the pipelines idle for IDLE_CLOSE_AFTER; it
        ends when no pipeline is left (the next `acquire` starts another)."""
        while not self._stop.is_set():
            with self.lock:
                self._settle()
                now = time.monotonic()
                idle = [pipeline for pipeline in self.pipelines.values()
                        if pipeline.idle_since is not None and now - pipeline.idle_since >= IDLE_CLOSE_AFTER]
                for pipeline in idle:
                    del self.pipelines[pipeline.key]
                done = not self.pipelines
                if done and self._reaper is threading.current_thread():
                    self._reaper = None
            for pipeline in idle:
                try:
                    pipeline.close(DEFAULT_CLOSE_TIMEOUT)
                except Exception:
                    logger.exception("moesiftornado_durable: could not close an unused pipeline")
            if done:
                return
            self._stop.wait(min(_REAP_INTERVAL, IDLE_CLOSE_AFTER))

    def _install_hooks(self) -> None:
        if self._hooks_installed:
            return
        self._hooks_installed = True
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(before=self._before_fork, after_in_parent=self._after_fork_in_parent,
                                after_in_child=self._after_fork_in_child)
        atexit.register(self.close_all)

    def _before_fork(self) -> None:
        self.lock.acquire()  # the child gets the registry whole, not halfway through a change
        for pipeline in self.pipelines.values():
            pipeline.before_fork()

    def _after_fork_in_parent(self) -> None:
        for pipeline in self.pipelines.values():
            pipeline.after_fork_in_parent()
        self.lock.release()

    def _after_fork_in_child(self) -> None:
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._settle()
        for key, pipeline in list(self.pipelines.items()):
            if not pipeline.users:  # idle in the parent: nothing of it is the child's
                del self.pipelines[key]
            pipeline.after_fork_in_child()
        self._reaper = None
        if self.pipelines:
            self._reaper = threading.Thread(target=self._reap, name="moesif-durable-reaper", daemon=True)
            self._reaper.start()

    def close_all(self) -> None:
        """At exit: close every pipeline of this process, each within DEFAULT_CLOSE_TIMEOUT."""
        with self.lock:
            pipelines = list(self.pipelines.values())
            self.pipelines.clear()
            self._stop.set()
        for pipeline in pipelines:
            pipeline.close(DEFAULT_CLOSE_TIMEOUT)


_REGISTRY = _Registry()


class MoesifMiddleware(ExecuteHook):
    """Logs every finished Tornado request to Moesif through a crash-safe on-disk spool.

    Use it as moesiftornado's: ``Application(routes, log_function=middleware.log_event)``. Once
    `log_event` has returned, the event is committed to SQLite in SPOOL_DIR and survives a crash of the
    process or an outage of Moesif of any length. Constructing one installs `hook.install`'s patch,
    through which it captures response bodies from an application's first request and applies the
    Moesif governance rules before its handlers run.

    Middlewares with the same delivery options in one process (the same SPOOL_DIR, application id,
    BASE_URI, SHIPPER, keys, batching...) share one pipeline: one journal slot, one shipper supervisor or
    flusher, one app-config and rules fetcher. Making one per request costs no thread, file or slot.
    """

    def __init__(self, moesif_config: Mapping[str, Any]) -> None:
        self.config = Config.from_dict(moesif_config)
        if self.config.debug and logger.level == logging.NOTSET:
            logger.setLevel(logging.DEBUG)
        self.counters: Counter[str] = collections.Counter()
        self._pending: Set[Any] = set()  # captures waiting for awaitables (asyncio tasks, kept alive here)
        self._body_capture = body_capture_transform(self.config.max_body_bytes)
        self._attached: weakref.WeakSet[Any] = weakref.WeakSet()
        self._share: Optional[weakref.finalize] = None  # set while this middleware holds `_pipeline`
        self._pipeline = _REGISTRY.acquire(self)
        self._log_error = _ErrorLog()
        self._last_spool_failure = -_SPOOL_FAILING_FOR
        self._user_error_log: Dict[str, Tuple[float, int]] = {}  # option -> (last logged, failures since)
        self._governor = Governor(self.config, lambda: self._pipeline.rules,
                                  lambda: self._pipeline.sampler.config.cohorts,
                                  self._user_error, _resolve)
        hook.install()
        self._runtime_here()  # start now, so a backlog from an earlier run is sent without new traffic

    # -- capture ---------------------------------------------------------------------------------

    def log_event(self, handler: Handler) -> None:
        """Tornado's log_function: capture the finished request and commit it to the spool. Never raises.

        The event is committed before this returns, unless a user callable returned an awaitable: then
        it is committed by a task on the running event loop once the awaitables have resolved.
        """
        if getattr(handler, LOGGED_ATTRIBUTE, False):
            return  # strict mode spooled it before the response was sent
        self._capture_and_spool(handler, b"")

    def log_event_before_send(self, handler: Handler) -> None:
        """Strict mode (`SpoolBeforeSendMixin`): spool the event while the last bytes are still unsent."""
        setattr(handler, LOGGED_ATTRIBUTE, True)
        self._capture_and_spool(handler, b"".join(getattr(handler, "_write_buffer", [])))

    def _capture_and_spool(self, handler: Handler, unsent_body: bytes) -> None:
        try:
            finished_at = time.time()
            self.attach(handler.application)
            steps = capture_steps(handler, self.config, finished_at, self._pipeline.sampler.weight_for, unsent_body)
            self._advance(steps, None)
        except Exception:
            self._drop("capture_error", "could not capture the request")

    def _advance(self, steps: Steps, answers: Optional[List[Any]]) -> None:
        """Run the capture steps here until they finish, or hand them to the event loop at the first awaitable."""
        try:
            while True:
                calls = steps.send(answers)  # type: ignore[arg-type]  # the first send is None
                answers = call_user_functions(calls, self._user_error)
                if any(inspect.isawaitable(answer) for answer in answers):
                    self._continue_on_loop(steps, calls, answers)
                    return
        except StopIteration as stop:
            self._finish(stop.value)

    def _continue_on_loop(self, steps: Steps, calls: List[UserCall], answers: List[Any]) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # log_event called outside an event loop: nothing can await these
            self._advance(steps, refuse_awaitables(calls, answers))
            return
        task = loop.create_task(self._capture_on_loop(steps, calls, answers))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _capture_on_loop(self, steps: Steps, calls: List[UserCall], answers: List[Any]) -> None:
        try:
            while True:
                answers = await _resolve(calls, answers, self._user_error)
                calls = steps.send(answers)
                answers = call_user_functions(calls, self._user_error)
        except StopIteration as stop:
            self._finish(stop.value)
        except Exception:
            self._drop("capture_error", "could not capture the request")

    def _log_outgoing(self, call: outgoing.OutgoingCall) -> None:
        """outgoing.py's recorder (CAPTURE_OUTGOING_REQUESTS): capture a call the app made and spool it as
        `log_event` spools a request, on the caller's thread (any thread: nothing is awaited). Never raises."""
        try:
            self._finish(run_sync(outgoing.outgoing_steps(call, self.config, self._pipeline.sampler.weight_for),
                                  self._user_error))
        except Exception:
            self._drop("capture_error", "could not capture an outgoing call")

    def _finish(self, outcome: Outcome) -> None:
        if outcome.event is None:
            self.counters[outcome.dropped or "skipped"] += 1
            return
        for reason in outcome.omitted_bodies:
            self.counters[f"body_omitted_{reason}"] += 1
        self._spool_record(outcome.event, EVENT)

    def attach(self, application: Any) -> Any:
        """Capture response bodies of `application` and apply governance rules to it; returns it.

        Optional: an application whose log_function is this middleware's `log_event` is attached at the
        start of its first request (`before_execute`). Call it for an application that logs otherwise
        (e.g. through your own log_function that calls `log_event`).
        """
        if application is not None and application not in self._attached:
            if self.config.log_body:
                install_body_capture(application, self._body_capture)
            application.settings.setdefault(SETTINGS_KEY, self)  # where SpoolBeforeSendMixin and the hook find us
            self._attached.add(application)
        return application

    def before_execute(self, handler: Any, transforms: List[Any]) -> None:
        """At the start of each request of an application using this middleware (`hook.install`): attach
        the application, capture this request's response body too (its transforms were built before),
        and have its `prepare` apply the governance rules first."""
        self.attach(handler.application)
        if self.config.log_body and not any(isinstance(t, ResponseBodyCapture) for t in transforms):
            transforms.insert(0, self._body_capture(handler.request))
        self._governor.wrap_prepare(handler)

    # -- users, companies and subscriptions ------------------------------------------------------

    def update_user(self, user_profile: Any) -> None:
        """Queue a user update (dict, moesifapi `UserModel` or JSON) durably; ValueError without user_id."""
        self._spool_record(normalize_profile(user_profile, USER_FIELDS), USER)

    def update_users_batch(self, user_profiles: Iterable[Any]) -> None:
        """Queue several user updates; all are validated before any is queued."""
        for profile in normalize_profiles(user_profiles, USER_FIELDS):
            self._spool_record(profile, USER)

    def update_company(self, company_profile: Any) -> None:
        """Queue a company update (dict, moesifapi `CompanyModel` or JSON); ValueError without company_id."""
        self._spool_record(normalize_profile(company_profile, COMPANY_FIELDS), COMPANY)

    def update_companies_batch(self, companies_profiles: Iterable[Any]) -> None:
        """Queue several company updates; all are validated before any is queued."""
        for profile in normalize_profiles(companies_profiles, COMPANY_FIELDS):
            self._spool_record(profile, COMPANY)

    def update_subscription(self, subscription: Any) -> None:
        """Queue a subscription update (dict, moesifapi `SubscriptionModel` or JSON) durably.

        ValueError naming the field when `subscription_id`, `company_id` or `status` is missing.
        """
        self._spool_record(normalize_profile(subscription, SUBSCRIPTION_FIELDS), SUBSCRIPTION)

    def update_subscriptions_batch(self, subscriptions: Iterable[Any]) -> None:
        """Queue several subscription updates; all are validated before any is queued."""
        for profile in normalize_profiles(subscriptions, SUBSCRIPTION_FIELDS):
            self._spool_record(profile, SUBSCRIPTION)

    # -- lifecycle -------------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything spooled so far is delivered; False if `timeout` passed first."""
        runtime = self._runtime_here()
        return runtime is not None and runtime.flush(timeout)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Deliver what can be delivered within `timeout`, stop the flusher; the rest stays on disk.

        Returns within `timeout` even during a backoff or a stalled send. A later `log_event` starts
        the pipeline again. While other middlewares of this process share the pipeline, it stays open
        for them and this one only lets go of it: the last one to close closes it.
        """
        share, self._share = self._share, None
        if share is None or share.detach() is None:
            return  # not holding the pipeline (closed already)
        _REGISTRY.release(self._pipeline, self, timeout)

    def stats(self) -> Dict[str, Any]:
        """This middleware's capture counters, and the delivery counters and spool state of its pipeline
        (shared by the middlewares with the same delivery options, as the spool is); never raises.

        Keys: spooled, skipped, sent, send_attempts, retries, dead_lettered, dropped_<reason> (one per
        reason seen), body_omitted_<reason> (bodies left out of events that were kept: too_large,
        unmaskable, event_too_large), ready, in_flight, dead_letter, undecryptable, oldest_age (seconds), spool_bytes,
        last_error and last_error_at (the last delivery error), spool_failing (a write to the spool failed
        in the last minute, or the spool cannot be read) and spool_error; lost_wal once the shipper found
        committed records SQLite had discarded with a damaged WAL (spooled again from the journals).
        """
        result: Dict[str, Any] = {name: 0 for name in ("spooled", "skipped", "sent", "send_attempts", "retries",
                                                       "dead_lettered")}
        result.update(self.counters)
        result.update(ready=None, in_flight=None, dead_letter=None, undecryptable=None, oldest_age=None,
                      spool_bytes=None, last_error=None, last_error_at=None, spool_error=None,
                      app_config_error=None, rules_error=None)
        result["capture_pending"] = len(self._pending)
        pipeline = self._pipeline
        result["app_config_etag"] = pipeline.sampler.config.etag
        result["rules"] = len(pipeline.rules)
        result["rules_tag"] = pipeline.rules.tag
        result["spool_failing"] = time.monotonic() - self._last_spool_failure < _SPOOL_FAILING_FOR
        if pipeline.dropped_oldest:
            result["dropped_oldest"] = pipeline.dropped_oldest
        runtime = pipeline.runtime if self._share is not None else None
        if runtime is None or runtime.pid != os.getpid():
            return result
        result["app_config_error"] = runtime.fetcher.last_error
        result["rules_error"] = runtime.rules_fetcher.last_error
        try:
            delivery, spool = runtime.delivery_stats()
            result.update(delivery)
        except (sqlite3.Error, OSError) as exc:
            result.update(spool_error=repr(exc), spool_failing=True)
            return result
        result.update(
            ready=spool.ready,
            in_flight=spool.in_flight,
            dead_letter=spool.dead_letter,
            undecryptable=spool.undecryptable,
            oldest_age=None if spool.oldest_spooled_at is None else max(0.0, time.time() - spool.oldest_spooled_at),
            spool_bytes=spool.bytes_on_disk,
        )
        return result

    # -- internals -------------------------------------------------------------------------------

    def _spool_record(self, record: Dict[str, Any], kind: str) -> None:
        runtime = self._runtime_here()
        if runtime is None:
            self._last_spool_failure = time.monotonic()
            self._drop("spool_unavailable", "the spool could not be opened", record)
            return
        try:
            runtime.put(record, kind)
        except SpoolUnavailableError as exc:
            self._last_spool_failure = time.monotonic()
            self._drop("spool_unavailable", str(exc), record)
            return
        except SpoolFullError:
            audit.record_left([record_id(record)], "refused: spool full (WHEN_FULL='drop_newest')", kind)
            self._drop("spool_full", f"the spool is full (SPOOL_MAX_BYTES, WHEN_FULL={self.config.when_full!r}); "
                                     f"this record was refused", record)
            return
        except (sqlite3.Error, OSError, ValueError, TypeError) as exc:
            self._last_spool_failure = time.monotonic()
            disk_full = (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()) or \
                (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
            self._drop("disk_full" if disk_full else "spool_error",
                       f"{'the disk is full: ' if disk_full else ''}could not write to the spool ({exc})", record)
            return
        self.counters["spooled"] += 1

    def _runtime_here(self) -> Optional[_Runtime]:
        """This process's runtime of this middleware's pipeline, taking a share again after a `close()`."""
        for _ in range(2):  # twice if a close() on another thread closed the pipeline just now
            if self._share is None:
                self._pipeline = _REGISTRY.acquire(self)
            try:
                runtime = self._pipeline.runtime_here()
            except (sqlite3.Error, OSError):
                # logged here, with the cause; a record that this costs is counted by the caller
                self._log_error(f"cannot open the spool in {self.config.spool_dir}")
                return None
            if runtime is not None:
                return runtime
        return None

    def _user_error(self, option: str) -> None:
        """Count a user callable that failed; log its traceback at most every few seconds per option."""
        self.counters["callable_errors"] += 1
        now = time.monotonic()
        last, suppressed = self._user_error_log.get(option, (-_ERROR_LOG_INTERVAL, 0))
        if now - last < _ERROR_LOG_INTERVAL:
            self._user_error_log[option] = (last, suppressed + 1)
            return
        self._user_error_log[option] = (now, 0)
        log_user_error(option, f" ({suppressed} more failures not logged since the last report)" if suppressed else "")

    def _drop(self, reason: str, message: str, record: Optional[Dict[str, Any]] = None) -> None:
        """Count a record that was not spooled, and log it (with the traceback, at most every few seconds)."""
        self.counters[f"dropped_{reason}"] += 1
        transaction_id = (record or {}).get("transaction_id")
        self._log_error(f"{message} (transaction_id={transaction_id}); dropped so far: "
                        f"{self.counters[f'dropped_{reason}']}")


class SpoolBeforeSendMixin:
    """Strict mode: commit each request's event to the spool before the response's last bytes are sent.

    Tornado calls log_function after the response is written, so a crash in between can lose an event
    whose client got its answer. Mix this into a RequestHandler (``class H(SpoolBeforeSendMixin,
    RequestHandler)``) and the event is committed first; the client never receives a complete response
    that is not in the spool. It costs the commit's latency on every response. If spooling fails, the
    response is still sent and the failure counted, as everywhere else.
    """

    def flush(self, include_footers: bool = False) -> Any:
        if include_footers and not getattr(self, LOGGED_ATTRIBUTE, False):
            middleware = _middleware_of(self)
            if middleware is not None:
                middleware.log_event_before_send(self)
        return super().flush(include_footers)  # type: ignore[misc]


def _middleware_of(handler: Any) -> Optional[MoesifMiddleware]:
    settings = getattr(handler, "application", None) and handler.application.settings
    if not settings:
        return None
    found = settings.get(SETTINGS_KEY) or getattr(settings.get("log_function"), "__self__", None)
    return found if isinstance(found, MoesifMiddleware) else None


async def _resolve(calls: List[UserCall], answers: List[Any], on_error: Callable[[str], None]) -> List[Any]:
    """Await the awaitable answers together; one that fails or takes too long becomes `RAISED` (`on_error`)."""

    async def settle(option: str, answer: Any) -> Any:
        if not inspect.isawaitable(answer):
            return answer
        try:
            try:
                return await asyncio.wait_for(answer, ASYNC_CALLABLE_TIMEOUT)
            except asyncio.TimeoutError:
                raise TimeoutError(f"{option} did not finish within {ASYNC_CALLABLE_TIMEOUT:g} s") from None
        except Exception:
            on_error(option)
            return RAISED

    return list(await asyncio.gather(*(settle(call[0], answer) for call, answer in zip(calls, answers))))
