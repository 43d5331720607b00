"""The per-process runtime of the middlewares: where records go and who delivers them.

A record is appended to this process's intake journal in SPOOL_DIR; the directory's shipper (shipper.py)
spools and delivers it, hosted in a child process kept running by a supervisor thread (SHIPPER 'process',
the default) or on threads of this process (SHIPPER 'thread'): the same code either way, reached over
one channel (channel.py). Middlewares with the same delivery options share one runtime through a
`_Pipeline`; `_Registry` counts their shares, closes idle pipelines and handles fork and exit.
"""

from __future__ import annotations

import atexit
import collections
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from typing import Any, Callable, Deque, Dict, List, Optional, Protocol, Tuple, Union

from . import locks, outgoing, spooldir
from .channel import ChannelClient
from .codec import Codec, UndecryptableError
from .config import Config
from .errors import ConfigError, SpoolFullError
from .governance import DEFAULT_RULES_REFRESH_INTERVAL, RuleSet
from .holdback import prompt_switching
from .journal import INTAKE, JournalWriter, file_size, first_record, segments
from .sampling import DEFAULT_REFRESH_INTERVAL, AppConfig, ConfigFetcher, Sampler
from .sender import Sender
from .shipper import InProcessHost, Supervisor, shipper_running
from .spool import SpoolStats, SpoolView, directory_stats, reserve_space

logger = logging.getLogger("moesiftornado_durable")

DEFAULT_CLOSE_TIMEOUT = 10.0
_CONFIG_CLOSE_WAIT = 0.2  # seconds close() waits for an app-config fetch in flight (its thread is a daemon)
# Seconds a pipeline stays open after its last middleware was garbage-collected without close(): an app that
# builds a middleware per request would otherwise start and stop a runtime (and a shipper) per request.
IDLE_CLOSE_AFTER = 30.0
_REAP_INTERVAL = 1.0  # seconds between the reaper's looks at collected middlewares and idle pipelines


class Holder(Protocol):
    """What the registry needs of a middleware that holds a share of a pipeline."""

    config: Config
    _share: Optional[weakref.finalize]

    def _log_outgoing(self, call: outgoing.OutgoingCall) -> None: ...


class _Runtime:
    """This process's part of a pipeline: its journal slot (locked) and writer, the host that keeps
    SPOOL_DIR's shipper running (a `Supervisor` of a shipper process, or an `InProcessHost`), the channel
    to that shipper (`ChannelClient`: its figures, flush), and the app-config and rules fetchers.

    The rules are fetched at start, at least every `DEFAULT_RULES_REFRESH_INTERVAL` seconds, whenever an
    accepted event batch carried a new ``X-Moesif-Rules-Tag`` (the shipper sees it and tells every app
    process over the channel), and whenever a new app config arrives."""

    def __init__(self, config: Config, on_app_config: Callable[[AppConfig], None],
                 on_rules: Callable[[RuleSet], None]) -> None:
        self.pid = os.getpid()
        self.config = config
        # The start-up checks of what SPOOL_DIR already holds, before anything is written there: that it is
        # this application's (here) and that SPOOL_ENCRYPTION_KEY opens its records (`_stored_records_problem`).
        spooldir.claim(config.spool_dir, config.application_id, config.base_uri)
        self.lock = locks.lock_free_slot(config.spool_dir, INTAKE)
        self.codec = Codec(config.spool_encryption_keys)
        spool_path = locks.spool_path(config.spool_dir, locks.SHIPPER_SLOT)
        try:
            _check_readable(*_stored_records_problem(config.spool_dir, spool_path, self.codec))
        except BaseException:
            self.lock.release()
            raise
        reserve_space(spool_path)  # before any journal write: the shipper may start after the disk filled up
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
        self.writer = JournalWriter(config.spool_dir, self.lock.slot, config.spool_sync,
                                    reclaim_slot=self._reclaim_slot)
        if config.spool_sync != "normal":
            prompt_switching()  # responses wait for the syncer thread (holdback)
        self._live_bytes = 0  # the shipper's figure, as last told
        self._written_since_figures = 0  # bytes journaled here since: the figure does not count them yet
        self.channel = ChannelClient(config.spool_dir, self._figures_arrived)
        self.channel.start()
        self.host: Union[Supervisor, InProcessHost] = (Supervisor(config) if config.shipper == "process"
                                                       else InProcessHost(config))
        self.host.start()
        self.fetcher.start()
        self.rules_fetcher.start()

    def _app_config_arrived(self, app_config: AppConfig) -> None:
        self._on_app_config(app_config)
        if self._config_etag is not None and app_config.etag != self._config_etag:
            self.rules_fetcher.refresh()  # the config changed: the rules may have too
        self._config_etag = app_config.etag

    def _figures_arrived(self, figures: Dict[str, Any]) -> None:
        """On the channel's thread: take the shipper's figures, and delete our journal segment once it is
        all in the spool's main file."""
        self._live_bytes, self._written_since_figures = int(figures.get("live_bytes") or 0), 0
        self.fetcher.notice_etag(figures.get("config_etag"))
        self.rules_fetcher.notice_etag(figures.get("rules_tag"))
        folded = figures.get("folded") or {}
        self.writer.retire_if_spooled(folded.get)

    def _reclaim_slot(self) -> int:
        """The writer found SPOOL_DIR deleted and made it again: hold a slot lock in the directory as it
        is now (the old lock file went with it), so the shipper sees our new segment's writer as alive."""
        if not self.lock.intact():
            self.lock.release()
            self.lock = locks.lock_free_slot(self.config.spool_dir, INTAKE)
        return self.lock.slot

    def put(self, record: Union[Dict[str, Any], bytes], kind: str) -> int:
        """Journal one record (bytes: a packed capture record, kind CAPTURE, whose event the shipper builds);
        returns its sequence number for `on_synced`. With SPOOL_MAX_BYTES and
        WHEN_FULL 'drop_newest', refuses it (`SpoolFullError`) when the spool, as the shipper last told
        (at most every 100 ms), plus what this process wrote since, would pass the bound."""
        data = self.codec.encode(record)
        max_bytes = self.config.spool_max_bytes
        if max_bytes is not None and self.config.when_full == "drop_newest":
            backlog = self._live_bytes + self._written_since_figures
            if backlog + len(data) > max_bytes:
                raise SpoolFullError(f"the spool holds about {backlog} bytes (SPOOL_MAX_BYTES {max_bytes})")
        sequence = self.writer.append(kind, data, time.time())
        self._written_since_figures += len(data)
        return sequence

    def on_synced(self, sequence: int, callback: Callable[[bool], None]) -> None:
        """`callback(ok)` once record `sequence` is on stable storage (ok False if its sync failed)."""
        self.writer.on_synced(sequence, callback)

    def flush(self, timeout: float) -> bool:
        """Wait until this process's journal is spooled and everything spooled by then is delivered: the
        shipper answers over the channel once it is (a wait on an event, at most `timeout`)."""
        through = {os.path.basename(path): file_size(path)
                   for slot, _, path in segments(self.config.spool_dir) if slot == self.writer.slot}
        return self.channel.flush(through, timeout)

    def delivery_stats(self) -> Tuple[Dict[str, Any], SpoolStats]:
        """(delivery counters and errors, the spool's state); the spool part may raise sqlite3.Error."""
        shipper = self.channel.figures
        delivery: Dict[str, Any] = dict(shipper.get("counters") or {})
        delivery["last_error"] = shipper.get("last_error")
        delivery["last_error_at"] = shipper.get("last_error_at")
        delivery["shipper_pid"] = shipper.get("pid")
        delivery["shipper_running"] = shipper_running(self.config.spool_dir)
        delivery["journal_sync_failures"] = self.writer.sync_failures  # this process's; see JournalWriter
        delivery["journal_late_syncs"] = self.writer.late_syncs  # this process's rounds later than 200 ms
        delivery["journal_stalls"] = self.writer.stalls  # this process's writes/syncs the file system held > 100 ms
        # the shipper serves the whole directory: its spool and the orphans it adopts
        return delivery, directory_stats(self.config.spool_dir)

    def close(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        self.fetcher.close(min(timeout, _CONFIG_CLOSE_WAIT))
        self.rules_fetcher.close(min(timeout, _CONFIG_CLOSE_WAIT))
        if not self.fetcher.is_alive:
            self._config_sender.close()
        if not self.rules_fetcher.is_alive:
            self._rules_sender.close()
        self.writer.close()
        self.lock.release()  # our segment is finished now: the shipper may spool its tail and delete it
        self.host.close(max(0.0, deadline - time.monotonic()))
        self.channel.close()

    def before_fork(self) -> None:
        self.host.before_fork()

    def after_fork_in_parent(self) -> None:
        self.host.after_fork_in_parent()

    def abandon_after_fork(self) -> None:
        """In a forked child: drop the child's copies of the parent's lock, journal, host and channel; the
        parent keeps them."""
        self.lock.release()
        self.writer.close()
        self.host.abandon_after_fork()
        self.channel.abandon_after_fork()


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


class _Pipeline:
    """What every middleware with the same delivery options (`Config.delivery_options`) shares in this
    process: the runtime (journal slot, shipper host and channel, the app-config and rules fetchers)
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
        self.holders: weakref.WeakSet[Holder] = weakref.WeakSet()
        self.idle_since: Optional[float] = None
        self.outgoing_owner: Optional[weakref.ReferenceType[Holder]] = None  # captures for all

    def runtime_here(self) -> Optional[_Runtime]:
        """This process's runtime, opened on first use; None once closed. Raises what opening raises."""
        runtime = self.runtime
        if runtime is not None and runtime.pid == os.getpid():
            return runtime
        with self.lock:
            if self.closed:
                return None
            if self.runtime is None or self.runtime.pid != os.getpid():
                self.runtime = _Runtime(self.config, self.sampler.update, self._rules_arrived)
            return self.runtime

    def _rules_arrived(self, rules: RuleSet) -> None:
        self.rules = rules

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

    def acquire(self, middleware: Holder) -> _Pipeline:
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

    def release(self, pipeline: _Pipeline, middleware: Holder, timeout: float) -> None:
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

    def _offer_outgoing(self, pipeline: _Pipeline, candidate: Optional[Holder] = None) -> None:
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
