"""`MoesifMiddleware`: the drop-in replacement for moesiftornado's, wired to the durable pipeline.

Thin on purpose: `log_event` captures the event, commits it to the spool and returns; it never raises
into Tornado and counts every event it did not spool, by reason. When a user callable returns an
awaitable (an async function), the rest of the capture runs as a task on the running event loop and
the event is spooled when the awaitables resolve. The spool, the flusher thread and the app-config
thread belong to one process: after a fork the child abandons the parent's (a SQLite connection or a
thread must not cross a fork) and opens its own.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import contextlib
import errno
import functools
import inspect
import logging
import os
import sqlite3
import sys
import threading
import time
import weakref
from typing import Any, Callable, Counter, Dict, Iterable, List, Mapping, Optional, Set, Tuple, Union

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
from .holdback import hold_response, prompt_switching
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
# What spooling a request's event gave: None (it could not be stored), the record's journal sequence number to
# wait for (0: nothing to wait for), or the task that will say (a user callable is still being awaited).
Stored = Union[Optional[int], "asyncio.Task[Optional[int]]"]


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

    def put(self, record: Dict[str, Any], kind: str) -> int:
        """Store one record; returns its sequence number for `on_synced` (0 where there is none)."""
        raise NotImplementedError

    def on_synced(self, sequence: int, callback: Callable[[bool], None]) -> None:
        """`callback(ok)` once record `sequence` is on stable storage (ok False if its sync failed). Thread
        mode: at once (a commit with SPOOL_SYNC 'full' is synced before `put` returns)."""
        callback(True)

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
            self.spool = open_spool(self.lock.spool_path, sync=config.sqlite_sync, max_bytes=config.spool_max_bytes,
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

    def put(self, record: Dict[str, Any], kind: str) -> int:
        self.spool.put(record, kind)
        return 0

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
        if config.spool_sync != "normal":
            prompt_switching()  # responses wait for the syncer thread (holdback)
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
            self.writer.retire_if_spooled(self._view.journal_offset)
        except (sqlite3.Error, FileNotFoundError):
            pass  # no shipper has created its spool yet

    def _reclaim_slot(self) -> int:
        """The writer found SPOOL_DIR deleted and made it again: hold a slot lock in the directory as it
        is now (the old lock file went with it), so the shipper sees our new segment's writer as alive."""
        if not self.lock.intact():
            self.lock.release()
            self.lock = locks.lock_free_slot(self.config.spool_dir, INTAKE)
        return self.lock.slot

    def put(self, record: Dict[str, Any], kind: str) -> int:
        data = self.codec.encode(record)
        max_bytes = self.config.spool_max_bytes
        if max_bytes is not None and self.config.when_full == "drop_newest":
            backlog = int(self._shipper.get("live_bytes") or 0) + self._written_since_stats
            if backlog + len(data) > max_bytes:
                raise SpoolFullError(f"the spool holds about {backlog} bytes (SPOOL_MAX_BYTES {max_bytes})")
        sequence = self.writer.append(kind, data, time.time())
        self._written_since_stats += len(data)
        return sequence

    def on_synced(self, sequence: int, callback: Callable[[bool], None]) -> None:
        self.writer.on_synced(sequence, callback)

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
        if not segment:
            return True  # this process wrote nothing
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
        delivery["journal_sync_failures"] = self.writer.sync_failures  # this process's; see JournalWriter
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


class MoesifMiddleware(ExecuteHook):
    """Logs every finished Tornado request to Moesif through a crash-safe on-disk spool.

    Use it as moesiftornado's: ``Application(routes, log_function=middleware.log_event)``. Once
    `log_event` has returned, the event is committed to SQLite in SPOOL_DIR and survives a crash of the
    process or an outage of Moesif of any length. Constructing one installs `hook.install`'s patch,
    through which it captures response bodies from an application's first request and applies the
    Moesif governance rules before its handlers run.
    """

    def __init__(self, moesif_config: Mapping[str, Any]) -> None:
        self.config = Config.from_dict(moesif_config)
        if self.config.debug and logger.level == logging.NOTSET:
            logger.setLevel(logging.DEBUG)
        self.counters: Counter[str] = collections.Counter()
        self._sampler = Sampler()
        self._pending: Set[Any] = set()  # captures waiting for awaitables (asyncio tasks, kept alive here)
        self._body_capture = body_capture_transform(self.config.max_body_bytes)
        self._attached: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._runtime: Optional[_Runtime] = None
        self._abandoned: List[_Runtime] = []  # inherited across a fork: kept, never used or closed
        self._last_error_log = 0.0
        self._last_spool_failure = -_SPOOL_FAILING_FOR
        self._user_error_log: Dict[str, Tuple[float, int]] = {}  # option -> (last logged, failures since)
        self._rules = RuleSet()  # none until the first fetch; replaced by one reference swap
        self._governor = Governor(self.config, lambda: self._rules, lambda: self._sampler.config.cohorts,
                                  self._user_error, _resolve)
        hook.install()
        _register_process_hooks(self)
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
        """Strict mode (`SpoolBeforeSendMixin`, and every handler with SPOOL_SYNC 'audit'): spool the event
        while the last bytes are still unsent; with SPOOL_SYNC 'full' or 'audit' they also wait for the
        sync that puts the event on stable storage (`holdback`)."""
        setattr(handler, LOGGED_ATTRIBUTE, True)
        stored = self._capture_and_spool(handler, b"".join(getattr(handler, "_write_buffer", [])))
        if self.config.spool_sync == "normal":
            return
        if isinstance(stored, asyncio.Task):  # a user callable is still being awaited
            task = stored
            hold_response(handler, True, lambda durable: task.add_done_callback(
                lambda done: self._when_durable(_stored(done), durable)), self._refused)
        else:
            hold_response(handler, stored is not None, lambda durable: self._when_durable(stored, durable),
                          self._refused)

    def _when_durable(self, sequence: Optional[int], callback: Callable[[bool], None]) -> None:
        """`callback(ok)` once record `sequence` (and every one before it) went through a sync: ok if that
        sync succeeded. None: the record could not be stored (ok False at once)."""
        runtime = self._runtime_here()
        if sequence is None or runtime is None:
            callback(False)
        else:
            runtime.on_synced(sequence, callback)

    def _refused(self) -> None:
        self.counters["audit_refused"] += 1

    def _capture_and_spool(self, handler: Handler, unsent_body: bytes) -> Stored:
        try:
            finished_at = time.time()
            self.attach(handler.application)
            steps = capture_steps(handler, self.config, finished_at, self._sampler.weight_for, unsent_body)
            return self._advance(steps, None)
        except Exception:
            self._drop("capture_error", "could not capture the request")
            return None

    def _advance(self, steps: Steps, answers: Optional[List[Any]]) -> Stored:
        """Run the capture steps here until they finish, or hand them to the event loop at the first awaitable
        (then the task is returned); see `Stored`."""
        try:
            while True:
                calls = steps.send(answers)  # type: ignore[arg-type]  # the first send is None
                answers = call_user_functions(calls, self._user_error)
                if any(inspect.isawaitable(answer) for answer in answers):
                    return self._continue_on_loop(steps, calls, answers)
        except StopIteration as stop:
            return self._finish(stop.value)

    def _continue_on_loop(self, steps: Steps, calls: List[UserCall], answers: List[Any]) -> Stored:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # log_event called outside an event loop: nothing can await these
            return self._advance(steps, refuse_awaitables(calls, answers))
        task = loop.create_task(self._capture_on_loop(steps, calls, answers))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _capture_on_loop(self, steps: Steps, calls: List[UserCall], answers: List[Any]) -> Optional[int]:
        try:
            while True:
                answers = await _resolve(calls, answers, self._user_error)
                calls = steps.send(answers)
                answers = call_user_functions(calls, self._user_error)
        except StopIteration as stop:
            return self._finish(stop.value)
        except Exception:
            self._drop("capture_error", "could not capture the request")
            return None

    def _log_outgoing(self, call: outgoing.OutgoingCall) -> None:
        """outgoing.py's recorder (CAPTURE_OUTGOING_REQUESTS): capture a call the app made and spool it as
        `log_event` spools a request, on the caller's thread (any thread: nothing is awaited). Never raises."""
        try:
            self._finish(run_sync(outgoing.outgoing_steps(call, self.config, self._sampler.weight_for),
                                  self._user_error))
        except Exception:
            self._drop("capture_error", "could not capture an outgoing call")

    def _finish(self, outcome: Outcome) -> Optional[int]:
        """Spool the captured event: its sequence number (0 when there is none to spool), None if dropped."""
        if outcome.event is None:
            self.counters[outcome.dropped or "skipped"] += 1
            return 0
        for reason in outcome.omitted_bodies:
            self.counters[f"body_omitted_{reason}"] += 1
        return self._spool_record(outcome.event, EVENT)

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
        have its `prepare` apply the governance rules first, and with SPOOL_SYNC 'audit' make its final
        flush spool the event and wait for its sync, as `SpoolBeforeSendMixin` does."""
        self.attach(handler.application)
        if self.config.log_body and not any(isinstance(t, ResponseBodyCapture) for t in transforms):
            transforms.insert(0, self._body_capture(handler.request))
        self._governor.wrap_prepare(handler)
        if self.config.audit and not isinstance(handler, SpoolBeforeSendMixin):
            handler.flush = functools.partial(_flush_before_send, self, handler, handler.flush)

    def _rules_arrived(self, rules: RuleSet) -> None:
        self._rules = rules

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
        the pipeline again.
        """
        with self._lock:
            runtime, self._runtime = self._runtime, None
        outgoing.unregister(self._log_outgoing)
        if runtime is not None and runtime.pid == os.getpid():
            runtime.close(timeout)

    def stats(self) -> Dict[str, Any]:
        """Counters of this process and the spool's current state; never raises.

        Keys: spooled, skipped, sent, send_attempts, retries, dead_lettered, dropped_<reason> (one per
        reason seen), body_omitted_<reason> (bodies left out of events that were kept: too_large,
        unmaskable, event_too_large), audit_refused (SPOOL_SYNC 'audit': responses refused with 503 because their
        event could not be stored), journal_sync_failures (this process's journal fdatasyncs that failed),
        ready, in_flight, dead_letter, undecryptable, oldest_age (seconds), spool_bytes,
        last_error and last_error_at (the last delivery error), spool_failing (a write to the spool failed
        in the last minute, or the spool cannot be read) and spool_error.
        """
        result: Dict[str, Any] = {name: 0 for name in ("spooled", "skipped", "sent", "send_attempts", "retries",
                                                       "dead_lettered")}
        result.update(self.counters)
        result.update(ready=None, in_flight=None, dead_letter=None, undecryptable=None, oldest_age=None,
                      spool_bytes=None, last_error=None, last_error_at=None, spool_error=None,
                      app_config_error=None, rules_error=None)
        result["capture_pending"] = len(self._pending)
        result["app_config_etag"] = self._sampler.config.etag
        result["rules"] = len(self._rules)
        result["rules_tag"] = self._rules.tag
        result["spool_failing"] = time.monotonic() - self._last_spool_failure < _SPOOL_FAILING_FOR
        runtime = self._runtime
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

    def _spool_record(self, record: Dict[str, Any], kind: str) -> Optional[int]:
        """Spool one record: its sequence number (`_Runtime.put`), or None (counted and logged) if it could not be."""
        runtime = self._runtime_here()
        if runtime is None:
            self._last_spool_failure = time.monotonic()
            self._drop("spool_unavailable", "the spool could not be opened", record)
            return None
        try:
            sequence = runtime.put(record, kind)
        except SpoolUnavailableError as exc:
            self._last_spool_failure = time.monotonic()
            self._drop("spool_unavailable", str(exc), record)
            return None
        except SpoolFullError:
            audit.record_left([record_id(record)], "refused: spool full (WHEN_FULL='drop_newest')", kind)
            self._drop("spool_full", f"the spool is full (SPOOL_MAX_BYTES, WHEN_FULL={self.config.when_full!r}); "
                                     f"this record was refused", record)
            return None
        except (sqlite3.Error, OSError, ValueError, TypeError) as exc:
            self._last_spool_failure = time.monotonic()
            disk_full = (isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()) or \
                (isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT))
            self._drop("disk_full" if disk_full else "spool_error",
                       f"{'the disk is full: ' if disk_full else ''}could not write to the spool ({exc})", record)
            return None
        self.counters["spooled"] += 1
        return sequence

    def _evicted(self, record_ids: List[str]) -> None:
        """WHEN_FULL='drop_oldest' deleted these waiting records to make room: count and log them."""
        self.counters["dropped_oldest"] += len(record_ids)
        shown = ", ".join(record_ids[:20]) + (" …" if len(record_ids) > 20 else "")
        self._log_error(f"the spool is full (SPOOL_MAX_BYTES); dropped the {len(record_ids)} oldest waiting "
                        f"record(s): {shown}; dropped so far: {self.counters['dropped_oldest']}")

    def _runtime_here(self) -> Optional[_Runtime]:
        """This process's runtime, opening the spool and starting the flusher on first use."""
        runtime = self._runtime
        if runtime is not None and runtime.pid == os.getpid():
            return runtime
        with self._lock:
            if self._runtime is None or self._runtime.pid != os.getpid():
                if self.config.capture_outgoing_requests:  # again after a close(), as the pipeline starts again
                    outgoing.register(self._log_outgoing, self.config.base_uri)
                try:
                    self._runtime = (_ProcessRuntime(self.config, self._sampler.update, self._rules_arrived)
                                     if self.config.shipper == "process"
                                     else _ThreadRuntime(self.config, self._evicted, self._sampler.update,
                                                         self._rules_arrived))
                except (sqlite3.Error, OSError):
                    # logged here, with the cause; a record that this costs is counted by the caller
                    self._log_error(f"cannot open the spool in {self.config.spool_dir}")
                    return None
            return self._runtime

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

    def _log_error(self, message: str) -> None:
        """Log an ERROR with the current traceback, at most once every few seconds."""
        now = time.monotonic()
        if now - self._last_error_log < _ERROR_LOG_INTERVAL:
            return
        self._last_error_log = now
        logger.error("moesiftornado_durable: %s", message, exc_info=sys.exc_info()[0] is not None)

    def _before_fork(self) -> None:
        runtime = self._runtime
        if runtime is not None and runtime.pid == os.getpid():
            runtime.before_fork()

    def _after_fork_in_parent(self) -> None:
        runtime = self._runtime
        if runtime is not None and runtime.pid == os.getpid():
            runtime.after_fork_in_parent()

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        if self._runtime is not None:
            self._runtime.abandon_after_fork()
            self._abandoned.append(self._runtime)
            self._runtime = None
        try:
            self._runtime_here()
        except Exception:
            logger.exception("moesiftornado_durable: could not start after fork")


def _register_process_hooks(middleware: MoesifMiddleware) -> None:
    """Fork and exit hooks that hold only a weak reference, so a discarded middleware can be collected."""
    ref = weakref.ref(middleware)

    def call(method: str) -> Any:
        def hook() -> None:
            target = ref()
            if target is not None:
                getattr(target, method)()

        return hook

    if hasattr(os, "register_at_fork"):
        os.register_at_fork(
            before=call("_before_fork"),
            after_in_parent=call("_after_fork_in_parent"),
            after_in_child=call("_after_fork_in_child"),
        )
    atexit.register(call("close"))


class SpoolBeforeSendMixin:
    """Strict mode: commit each request's event to the spool before the response's last bytes are sent.

    Tornado calls log_function after the response is written, so a crash in between can lose an event
    whose client got its answer. Mix this into a RequestHandler (``class H(SpoolBeforeSendMixin,
    RequestHandler)``) and the event is committed first; the client never receives a complete response
    that is not in the spool. With SPOOL_SYNC 'full' or 'audit' the last bytes also wait for the sync that
    puts the event on stable storage (a power cut), and the response is refused (503) if it fails; with
    'normal', a failure to spool is counted and the response sent, as everywhere else. SPOOL_SYNC 'audit'
    does this for every handler of the application without the mixin.
    """

    def flush(self, include_footers: bool = False, *args: Any, **kwargs: Any) -> Any:
        middleware = _middleware_of(self)
        if middleware is None:
            return super().flush(include_footers, *args, **kwargs)  # type: ignore[misc]
        return _flush_before_send(middleware, self, super().flush, include_footers,  # type: ignore[misc]
                                  *args, **kwargs)


def _flush_before_send(middleware: MoesifMiddleware, handler: Any, flush: Callable[..., Any],
                       include_footers: bool = False, *args: Any, **kwargs: Any) -> Any:
    """A handler's `flush`: the final one (from `finish`) spools the event first (strict and audit mode)."""
    if include_footers and not getattr(handler, LOGGED_ATTRIBUTE, False):
        middleware.log_event_before_send(handler)
    return flush(include_footers, *args, **kwargs)


def _stored(task: asyncio.Task[Optional[int]]) -> Optional[int]:
    return None if task.cancelled() or task.exception() is not None else task.result()


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
