"""`MoesifMiddleware`: the drop-in replacement for moesiftornado's, the Tornado side of the durable pipeline.

Thin on purpose: `log_event` captures the event (capture.py, driven by capture_driver.py) and hands it
to this process's runtime (runtime.py), which appends it to the intake journal in SPOOL_DIR with one
`write()`; the shipper of SPOOL_DIR (a process of its own, or with ``SHIPPER: "thread"`` threads of
this one: the same code) spools and delivers it. `log_event` never
raises into Tornado and counts every event it did not write, by reason (`lost.py`). When a user
callable returns an awaitable (an async function), the rest of the capture runs as a task on the running
event loop and the event is written when the awaitables resolve.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import sqlite3
import time
import weakref
from typing import Any, Callable, Counter, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from . import hook, outgoing, rawcapture
from .capture import (
    Outcome,
    ResponseBodyCapture,
    body_capture_transform,
    capture_steps,
    install_body_capture,
    log_user_error,
    run_sync,
)
from .capture_driver import ASYNC_CALLABLE_TIMEOUT, CaptureDriver, Stored, resolve, stored_of
from .config import Config, Handler
from .errors import SpoolFullError, SpoolUnavailableError, is_disk_full
from .holdback import Holdback
from .hook import SETTINGS_KEY, ExecuteHook, Governor
from .kinds import CAPTURE, COMPANY, EVENT, SUBSCRIPTION, USER
from .lost import ERROR_LOG_INTERVAL, REFUSED, ErrorLog, LostRecords
from .profiles import COMPANY_FIELDS, SUBSCRIPTION_FIELDS, USER_FIELDS, normalize_profile, normalize_profiles
from .runtime import _REGISTRY, DEFAULT_CLOSE_TIMEOUT, IDLE_CLOSE_AFTER, _Runtime
from .spool import record_id

__all__ = ["ASYNC_CALLABLE_TIMEOUT", "DEFAULT_CLOSE_TIMEOUT", "IDLE_CLOSE_AFTER", "LOGGED_ATTRIBUTE",
           "MoesifMiddleware", "SpoolBeforeSendMixin"]

logger = logging.getLogger("moesiftornado_durable")

LOGGED_ATTRIBUTE = "_moesiftornado_durable_logged"
_SPOOL_FAILING_FOR = 60.0  # seconds a failed spool write keeps stats()["spool_failing"] true


class MoesifMiddleware(ExecuteHook):
    """Logs every finished Tornado request to Moesif through a crash-safe on-disk spool.

    Use it as moesiftornado's: ``Application(routes, log_function=middleware.log_event)``. Once
    `log_event` has returned, the event is in this process's intake journal in SPOOL_DIR and survives a
    crash of the process or an outage of Moesif of any length; the shipper spools it and deletes it once
    Moesif accepted it. Constructing one installs `hook.install`'s patch, through which it captures response bodies
    from an application's first request and applies the Moesif governance rules before its handlers run.

    Middlewares with the same delivery options in one process (the same SPOOL_DIR, application id,
    BASE_URI, SHIPPER, keys, batching...) share one pipeline: one journal slot, one shipper supervisor or
    flusher, one app-config and rules fetcher. Making one per request costs no thread, file or slot.
    """

    def __init__(self, moesif_config: Mapping[str, Any]) -> None:
        self.config = Config.from_dict(moesif_config)
        if self.config.debug and logger.level == logging.NOTSET:
            logger.setLevel(logging.DEBUG)
        self.counters: Counter[str] = collections.Counter()
        self._body_capture = body_capture_transform(self.config.max_body_bytes)
        self._split = rawcapture.splits(self.config)  # the shipper builds the events (rawcapture.py)
        self._attached: weakref.WeakSet[Any] = weakref.WeakSet()
        self._share: Optional[weakref.finalize] = None  # set while this middleware holds `_pipeline`
        self._pipeline = _REGISTRY.acquire(self)
        self._log_error = ErrorLog()
        self._lost = LostRecords(self.counters, self._log_error)
        self._last_spool_failure = -_SPOOL_FAILING_FOR
        self._user_error_log: Dict[str, Tuple[float, int]] = {}  # option -> (last logged, failures since)
        self._driver = CaptureDriver(self._user_error, self._finish, self._drop)
        self._holdback = Holdback(self._when_durable, self._refused)
        self._governor = Governor(self.config, lambda: self._pipeline.rules,
                                  lambda: self._pipeline.sampler.config.cohorts,
                                  self._user_error, resolve)
        hook.install()
        self._runtime_here()  # start now, so a backlog from an earlier run is sent without new traffic

    # -- capture ---------------------------------------------------------------------------------

    def log_event(self, handler: Handler) -> None:
        """Tornado's log_function: capture the finished request and write it to the journal. Never raises.

        The event is written before this returns, unless a user callable returned an awaitable: then
        it is written by a task on the running event loop once the awaitables have resolved.
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
            self._holdback.hold_until(handler, lambda durable: task.add_done_callback(
                lambda done: self._when_durable(stored_of(done), durable)))
        else:
            self._holdback.hold(handler, stored)

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
            sampler = self._pipeline.sampler
            if self._split:
                steps = rawcapture.capture_steps(handler, self.config, finished_at, sampler, unsent_body)
            else:
                steps = capture_steps(handler, self.config, finished_at, sampler.weight_for, unsent_body)
            return self._driver.advance(steps, None)
        except Exception:
            self._drop("capture_error", "could not capture the request")
            return None

    def _log_outgoing(self, call: outgoing.OutgoingCall) -> None:
        """outgoing.py's recorder (CAPTURE_OUTGOING_REQUESTS): capture a call the app made and spool it as
        `log_event` spools a request, on the caller's thread (any thread: nothing is awaited). Never raises."""
        try:
            self._finish(run_sync(outgoing.outgoing_steps(call, self.config, self._pipeline.sampler.weight_for),
                                  self._user_error))
        except Exception:
            self._drop("capture_error", "could not capture an outgoing call")

    def _finish(self, outcome: Outcome) -> Optional[int]:
        """Spool the captured event (or its raw parts, for the shipper to build): its sequence number (0 when
        there is none to spool), None if dropped."""
        if outcome.packed is not None:
            return self._spool_record(outcome.packed, CAPTURE)
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
        unmaskable, event_too_large), audit_refused (SPOOL_SYNC 'audit': responses refused with 503 because
        their event could not be stored), journal_sync_failures (this process's journal fdatasyncs that
        failed), journal_late_syncs (this process's journal syncs that made records durable later than the
        200 ms a power cut may take by default: an overloaded machine or a slow disk), journal_stalls
        (this process's journal writes and syncs the file system held more than 100 ms), ready, in_flight,
        dead_letter, undecryptable, oldest_age (seconds), spool_bytes,
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
        result["capture_pending"] = len(self._driver.pending)
        pipeline = self._pipeline
        result["app_config_etag"] = pipeline.sampler.config.etag
        result["rules"] = len(pipeline.rules)
        result["rules_tag"] = pipeline.rules.tag
        result["spool_failing"] = time.monotonic() - self._last_spool_failure < _SPOOL_FAILING_FOR
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

    def _spool_record(self, record: Union[Dict[str, Any], bytes], kind: str) -> Optional[int]:
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
            self._drop("spool_full", f"the spool is full (SPOOL_MAX_BYTES, WHEN_FULL={self.config.when_full!r}); "
                                     f"this record was refused", record, kind, audit_reason=REFUSED)
            return None
        except (sqlite3.Error, OSError, ValueError, TypeError) as exc:
            self._last_spool_failure = time.monotonic()
            disk_full = is_disk_full(exc)
            self._drop("disk_full" if disk_full else "spool_error",
                       f"{'the disk is full: ' if disk_full else ''}could not write to the spool ({exc})", record)
            return None
        self.counters["spooled"] += 1
        return sequence

    def _runtime_here(self) -> Optional[_Runtime]:
        """This process's runtime of this middleware's pipeline, taking a share again after a `close()`."""
        for _ in range(2):  # twice if a close() on another thread closed the pipeline just now
            if self._share is None:
                self._pipeline = _REGISTRY.acquire(self)
            try:
                runtime = self._pipeline.runtime_here()
            except (sqlite3.Error, OSError):
                # logged here, with the cause; a record that this costs is counted by the caller
                self._log_error(f"cannot open the spool in {self.config.spool_dir}", "dropped_spool_unavailable")
                return None
            if runtime is not None:
                return runtime
        return None

    def _user_error(self, option: str) -> None:
        """Count a user callable that failed; log its traceback at most every few seconds per option."""
        self.counters["callable_errors"] += 1
        now = time.monotonic()
        last, suppressed = self._user_error_log.get(option, (-ERROR_LOG_INTERVAL, 0))
        if now - last < ERROR_LOG_INTERVAL:
            self._user_error_log[option] = (last, suppressed + 1)
            return
        self._user_error_log[option] = (now, 0)
        log_user_error(option, f" ({suppressed} more failures not logged since the last report)" if suppressed else "")

    def _drop(self, reason: str, message: str, record: Union[Dict[str, Any], bytes, None] = None,
              kind: str = EVENT, audit_reason: Optional[str] = None) -> None:
        """A record that was not spooled: count it, log it (with the traceback, at most every few seconds)
        and, with `audit_reason`, audit it (`LostRecords.record_lost`)."""
        if isinstance(record, dict) or record is None:
            transaction_id, name = (record or {}).get("transaction_id"), record_id(record)
        else:  # a packed capture record (rawrecord.PackedCapture)
            transaction_id = name = getattr(record, "transaction_id", "?")
            kind = EVENT
        self._lost.record_lost(reason, 1, f"{message} (transaction_id={transaction_id})", kind=kind,
                               record_ids=[name] if record is not None and audit_reason else (),
                               audit_reason=audit_reason)


class SpoolBeforeSendMixin:
    """Strict mode: write each request's event to the journal before the response's last bytes are sent.

    Tornado calls log_function after the response is written, so a crash in between can lose an event
    whose client got its answer. Mix this into a RequestHandler (``class H(SpoolBeforeSendMixin,
    RequestHandler)``) and the event is written first; the client never receives a complete response
    whose event is not written. With SPOOL_SYNC 'full' or 'audit' the last bytes also wait for the sync
    that puts the event on stable storage (a power cut), and the response is refused (503) if it fails;
    with 'normal', a failure to spool is counted and the response sent, as everywhere else. SPOOL_SYNC
    'audit' does this for every handler of the application without the mixin.
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


def _middleware_of(handler: Any) -> Optional[MoesifMiddleware]:
    settings = getattr(handler, "application", None) and handler.application.settings
    if not settings:
        return None
    found = settings.get(SETTINGS_KEY) or getattr(settings.get("log_function"), "__self__", None)
    return found if isinstance(found, MoesifMiddleware) else None
