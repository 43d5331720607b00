"""`MoesifMiddleware`: the drop-in replacement for moesiftornado's, wired to the durable pipeline.

Thin on purpose: `log_event` captures the event, commits it to the spool and returns; it never raises
into Tornado and counts every event it could not spool, by reason. The spool and the flusher thread
belong to one process: after a fork the child abandons the parent's (a SQLite connection or a thread
must not cross a fork) and opens its own.
"""

from __future__ import annotations

import atexit
import collections
import logging
import os
import sqlite3
import sys
import threading
import time
import weakref
from typing import Any, Callable, Counter, Dict, Iterable, List, Mapping, Optional

from . import audit, locks
from .capture import body_capture_transform, capture_event, install_body_capture
from .codec import Codec
from .config import Config, Handler
from .errors import ConfigError, SpoolFullError
from .flusher import Flusher
from .profiles import normalize_profile, normalize_profiles
from .sender import Sender
from .spool import COMPANY, EVENT, USER, open_spool, record_id

logger = logging.getLogger("moesiftornado_durable")

DEFAULT_CLOSE_TIMEOUT = 10.0
LOGGED_ATTRIBUTE = "_moesiftornado_durable_logged"
_SETTINGS_KEY = "moesiftornado_durable"
_ERROR_LOG_INTERVAL = 10.0  # seconds between repeated spool-failure logs
_SPOOL_FAILING_FOR = 60.0  # seconds a failed spool write keeps stats()["spool_failing"] true


class _Runtime:
    """The per-process parts: this process's spool slot (locked), its spool and the flusher draining it."""

    def __init__(self, config: Config, on_evict: Callable[[List[str]], None]) -> None:
        self.pid = os.getpid()
        self.lock = locks.lock_free_slot(config.spool_dir)
        try:
            self.spool = open_spool(self.lock.spool_path, sync=config.spool_sync, max_bytes=config.spool_max_bytes,
                                    when_full=config.when_full, on_evict=on_evict,
                                    codec=Codec(config.spool_encryption_keys))
            problem = self.spool.unreadable_sample()
            if problem is not None:
                self.spool.close()
                raise ConfigError("SPOOL_ENCRYPTION_KEY", f"{problem} ({self.lock.spool_path}); "
                                  "start with the key the spool was written with (a list keeps old keys readable)")
        except BaseException:
            self.lock.release()
            raise
        sender = Sender(config.base_uri, config.application_id, config.send_timeout)
        self.flusher = Flusher(self.spool, sender, config)
        self.flusher.start()

    def close(self, timeout: float) -> None:
        self.flusher.close(timeout)
        if not self.flusher.is_alive:
            self.spool.close()
            self.lock.release()

    def abandon_after_fork(self) -> None:
        """In a forked child: drop the child's copy of the parent's lock fd. The SQLite connections are left
        alone (closing them here could write to the parent's files); the parent keeps its lock."""
        self.lock.release()


class MoesifMiddleware:
    """Logs every finished Tornado request to Moesif through a crash-safe on-disk spool.

    Use it as moesiftornado's: ``Application(routes, log_function=middleware.log_event)``. Once
    `log_event` has returned, the event is committed to SQLite in SPOOL_DIR and survives a crash of the
    process or an outage of Moesif of any length.
    """

    def __init__(self, moesif_config: Mapping[str, Any]) -> None:
        self.config = Config.from_dict(moesif_config)
        if self.config.debug and logger.level == logging.NOTSET:
            logger.setLevel(logging.DEBUG)
        self.counters: Counter[str] = collections.Counter()
        self._body_capture = body_capture_transform(self.config.max_body_bytes)
        self._attached: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._runtime: Optional[_Runtime] = None
        self._abandoned: List[_Runtime] = []  # inherited across a fork: kept, never used or closed
        self._last_error_log = 0.0
        self._last_spool_failure = -_SPOOL_FAILING_FOR
        _register_process_hooks(self)
        self._runtime_here()  # start now, so a backlog from an earlier run is sent without new traffic

    # -- capture ---------------------------------------------------------------------------------

    def log_event(self, handler: Handler) -> None:
        """Tornado's log_function: capture the finished request and commit it to the spool. Never raises."""
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
            event = capture_event(handler, self.config, finished_at, unsent_body)
            if event is None:
                self.counters["skipped"] += 1
                return
            self._spool_record(event, EVENT)
        except Exception:
            self._drop("capture_error", "could not capture the request")

    def attach(self, application: Any) -> Any:
        """Capture response bodies of `application` from its first request; returns the application.

        `log_event` does this itself on the first request it sees, whose response body is then missed;
        call this once after building the Application to capture that one too.
        """
        if application is not None and application not in self._attached:
            install_body_capture(application, self._body_capture)
            application.settings.setdefault(_SETTINGS_KEY, self)  # where SpoolBeforeSendMixin finds us
            self._attached.add(application)
        return application

    # -- users and companies ---------------------------------------------------------------------

    def update_user(self, user_profile: Any) -> None:
        """Queue a user update (dict, moesifapi `UserModel` or JSON) durably; ValueError without user_id."""
        self._spool_record(normalize_profile(user_profile, "user_id"), USER)

    def update_users_batch(self, user_profiles: Iterable[Any]) -> None:
        """Queue several user updates; all are validated before any is queued."""
        for profile in normalize_profiles(user_profiles, "user_id"):
            self._spool_record(profile, USER)

    def update_company(self, company_profile: Any) -> None:
        """Queue a company update (dict, moesifapi `CompanyModel` or JSON); ValueError without company_id."""
        self._spool_record(normalize_profile(company_profile, "company_id"), COMPANY)

    def update_companies_batch(self, companies_profiles: Iterable[Any]) -> None:
        """Queue several company updates; all are validated before any is queued."""
        for profile in normalize_profiles(companies_profiles, "company_id"):
            self._spool_record(profile, COMPANY)

    # -- lifecycle -------------------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until everything spooled so far is delivered; False if `timeout` passed first."""
        runtime = self._runtime_here()
        return runtime is not None and runtime.flusher.flush(timeout)

    def close(self, timeout: float = DEFAULT_CLOSE_TIMEOUT) -> None:
        """Deliver what can be delivered within `timeout`, stop the flusher; the rest stays on disk.

        Returns within `timeout` even during a backoff or a stalled send. A later `log_event` starts
        the pipeline again.
        """
        with self._lock:
            runtime, self._runtime = self._runtime, None
        if runtime is not None and runtime.pid == os.getpid():
            runtime.close(timeout)

    def stats(self) -> Dict[str, Any]:
        """Counters of this process and the spool's current state; never raises.

        Keys: spooled, skipped, sent, send_attempts, retries, dead_lettered, dropped_<reason> (one per
        reason seen), ready, in_flight, dead_letter, undecryptable, oldest_age (seconds), spool_bytes,
        last_error and last_error_at (the last delivery error), spool_failing (a write to the spool failed
        in the last minute, or the spool cannot be read) and spool_error.
        """
        result: Dict[str, Any] = {name: 0 for name in ("spooled", "skipped", "sent", "send_attempts", "retries",
                                                       "dead_lettered")}
        result.update(self.counters)
        result.update(ready=None, in_flight=None, dead_letter=None, undecryptable=None, oldest_age=None,
                      spool_bytes=None, last_error=None, last_error_at=None, spool_error=None)
        result["spool_failing"] = time.monotonic() - self._last_spool_failure < _SPOOL_FAILING_FOR
        runtime = self._runtime
        if runtime is None or runtime.pid != os.getpid():
            return result
        courier = runtime.flusher.courier
        result.update(courier.counters)
        result["last_error"] = None if courier.last_error is None else str(courier.last_error)
        result["last_error_at"] = courier.last_error_at
        try:
            spool = runtime.spool.stats()
        except sqlite3.Error as exc:
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
            runtime.spool.put(record, kind)
        except SpoolFullError:
            audit.record_left([record_id(record)], "refused: spool full (WHEN_FULL='drop_newest')", kind)
            self._drop("spool_full", f"the spool is full (SPOOL_MAX_BYTES, WHEN_FULL={self.config.when_full!r}); "
                                     f"this record was refused", record)
            return
        except sqlite3.OperationalError as exc:
            self._last_spool_failure = time.monotonic()
            reason = "disk_full" if "full" in str(exc).lower() else "spool_error"
            self._drop(reason, f"could not write to the spool ({exc})", record)
            return
        except (sqlite3.Error, OSError, ValueError, TypeError):
            self._last_spool_failure = time.monotonic()
            self._drop("spool_error", "could not write to the spool", record)
            return
        self.counters["spooled"] += 1

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
                try:
                    self._runtime = _Runtime(self.config, self._evicted)
                except (sqlite3.Error, OSError):
                    # logged here, with the cause; a record that this costs is counted by the caller
                    self._log_error(f"cannot open the spool in {self.config.spool_dir}")
                    return None
            return self._runtime

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
            runtime.spool.hold_for_fork()

    def _after_fork_in_parent(self) -> None:
        runtime = self._runtime
        if runtime is not None and runtime.pid == os.getpid():
            runtime.spool.release_after_fork()

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
    found = settings.get(_SETTINGS_KEY) or getattr(settings.get("log_function"), "__self__", None)
    return found if isinstance(found, MoesifMiddleware) else None
