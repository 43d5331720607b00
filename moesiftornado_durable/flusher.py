"""The background worker that moves records from the spool to the collector.

One daemon thread per process. Its loop reads top to bottom: wait for a batch → claim it → send it
(with the tenacity policy) → ack on a 2xx, dead-letter on a permanent rejection, nack when stopping.
A record is deleted from the spool only after the collector accepted it.

The contract follows sentry-python's worker: `flush(timeout)` blocks at most `timeout` and says whether
everything spooled before the call was delivered; `close(timeout)` returns within `timeout` even in a
backoff or a stalled send, leaving undelivered records on disk for the next start.
"""

from __future__ import annotations

import collections
import logging
import os
import sqlite3
import threading
import time
from typing import Callable, Counter, List, Optional

from .errors import PermanentError, RetryableError
from .sampling import CONFIG_ETAG_HEADER
from .sender import Sender, ShutdownRequested, delivery_policy
from .spool import EVENT, KINDS, Spool, SpooledItem

logger = logging.getLogger("moesiftornado_durable")

_POLL = 0.05  # seconds between looks at a partial batch, and while waiting for a flush to finish


class Flusher:
    """Drains one `Spool` through one `Sender` on a named daemon thread.

    `on_config_etag`, if given, is called on this thread with the ``X-Moesif-Config-ETag`` of every
    accepted event batch (None when absent); it must return quickly and never raise into the loop.
    """

    def __init__(
        self,
        spool: Spool,
        sender: Sender,
        batch_size: int,
        flush_interval: float,
        retry_max_wait: float,
        on_config_etag: Optional[Callable[[Optional[str]], None]] = None,
    ) -> None:
        self._spool = spool
        self._sender = sender
        self._on_config_etag = on_config_etag
        self._batch_size = batch_size
        self._flush_interval = flush_interval
        self._stop = threading.Event()
        self._policy = delivery_policy(self._stop, max_wait=retry_max_wait)
        self._urgent_until = 0.0  # while monotonic() is below this, partial batches are sent at once
        self._failing = False
        self.counters: Counter[str] = collections.Counter()
        self.last_error: Optional[str] = None
        self._thread: Optional[threading.Thread] = None
        self._pid = 0

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (once per process)."""
        if self.is_alive:
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name="moesif-durable-flusher", daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """True if the thread runs in this process (a thread does not survive a fork)."""
        return self._pid == os.getpid() and self._thread is not None and self._thread.is_alive()

    @property
    def is_failing(self) -> bool:
        """True while the last delivery attempt failed and the flusher is backing off."""
        return self._failing

    def flush(self, timeout: float, while_healthy: bool = False) -> bool:
        """Send everything spooled before this call; True if it was all delivered within `timeout` seconds.

        With `while_healthy`, stop waiting as soon as a delivery attempt fails (used by `close`).
        """
        deadline = time.monotonic() + timeout
        try:
            mark = self._spool.last_id()
            self._urgent_until = max(self._urgent_until, deadline)
            self._spool.wake()
            while self._spool.pending_through(mark) > 0:
                if time.monotonic() >= deadline or not self.is_alive or (while_healthy and self._failing):
                    return False
                time.sleep(_POLL)
        except sqlite3.Error:
            logger.exception("flush could not read the spool")
            return False
        return True

    def close(self, timeout: float) -> None:
        """Deliver what can be delivered within `timeout`, then stop; undelivered records stay on disk."""
        deadline = time.monotonic() + timeout
        if self.is_alive and not self._failing:
            self.flush(timeout, while_healthy=True)
        self._stop.set()
        self._spool.wake()
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self.is_alive:
            logger.warning("flusher still busy in a send after %.1f s; its batch stays on disk for the next start",
                           timeout)
            return
        self._sender.close()

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._wait_for_batch()
                for kind in KINDS:
                    if self._stop.is_set():
                        break
                    batch = self._spool.claim(self._batch_size, kind)
                    if batch:
                        self._deliver(kind, batch)
            except Exception as exc:  # the loop must survive anything: a spool error, a bug
                self.last_error = repr(exc)
                self.counters["loop_errors"] += 1
                logger.exception("moesiftornado_durable flusher error; retrying in 1 s")
                self._stop.wait(1.0)

    def _wait_for_batch(self) -> None:
        """Return when a full batch is ready, when a partial one has waited FLUSH_INTERVAL, or on flush/stop."""
        waiting_since: Optional[float] = None
        while not self._stop.is_set():
            ready = self._spool.ready_count(limit=self._batch_size)
            now = time.monotonic()
            if ready >= self._batch_size or (ready and now < self._urgent_until):
                return
            if not ready:
                waiting_since = None
                self._spool.wait_for_put(self._flush_interval)
                continue
            waiting_since = waiting_since or now
            remaining = self._flush_interval - (now - waiting_since)
            if remaining <= 0:
                return
            self._stop.wait(min(remaining, _POLL))

    def _deliver(self, kind: str, batch: List[SpooledItem]) -> None:
        ids = [item.id for item in batch]
        bodies = [item.body for item in batch]
        try:
            self._policy(self._send, kind, bodies)
        except (ShutdownRequested, RetryableError):  # stopping: in a backoff, or after a failed last try
            self._spool.nack(ids)
            return
        except PermanentError as exc:
            self._spool.dead_letter(ids, exc.status, str(exc))
            self.counters["dead_lettered"] += len(ids)
            self._failing = False
            logger.error("Moesif rejected a batch of %d %s record(s) (%s); moved to the dead-letter store",
                         len(ids), kind, exc)
            return
        except BaseException:
            self._spool.nack(ids)
            raise
        self._spool.ack(ids)
        self.counters["sent"] += len(ids)
        self._failing = False

    def _send(self, kind: str, bodies: List[object]) -> None:
        self.counters["send_attempts"] += 1
        try:
            headers = self._sender.send(kind, bodies)
        except Exception as exc:
            self._failing = True
            self.last_error = f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {exc}"
            raise
        if kind == EVENT and self._on_config_etag is not None:
            try:
                self._on_config_etag((headers or {}).get(CONFIG_ETAG_HEADER))
            except Exception:  # a callback bug must not turn a delivered batch into a resend
                logger.exception("the config etag callback raised")
