"""The background worker that moves records from the spool to the collector.

One daemon thread per process (the shipper's, or the app's in SHIPPER 'thread'). Its loop reads top to
bottom, as analytics-python's consumer: `_run` → `_upload` (`_next` waits for a batch to be due → claim
it → the `Courier` sends it with the tenacity policy → ack on a 2xx (recorded while the next batch's
request is at the collector, or before the loop waits), dead-letter on a permanent rejection
after narrowing a 400, 413 or 422 down to the events rejected on their own, nack when stopping) →
`_housekeeping` (empty the WAL once all is delivered; on its own timer, expire old dead letters and adopt
orphans: spool files in the same SPOOL_DIR whose owning process is gone, see `locks.py`). A record is
deleted from the spool only after the collector accepted it.

The contract follows sentry-python's worker: `flush(timeout)` blocks at most `timeout` and says whether
everything spooled before the call was delivered; `close(timeout)` returns within `timeout` even in a
backoff or a stalled send, leaving undelivered records on disk for the next start.
"""

from __future__ import annotations

import collections
import enum
import logging
import os
import sqlite3
import threading
import time
from typing import Callable, Counter, List, Optional, Tuple

from . import locks
from .config import Config
from .errors import DeliveryError, PayloadTooLargeError, PermanentError, RetryableError
from .governance import RULES_TAG_HEADER
from .kinds import EVENT, KINDS
from .sampling import CONFIG_ETAG_HEADER
from .sender import Sender, ShutdownRequested, delivery_policy
from .spool import Spool, SpooledItem, open_spool
from .worker import ProcessThread

logger = logging.getLogger("moesiftornado_durable")

_POLL = 0.05  # seconds between looks at a partial batch (it may fill up or age)
# seconds between housekeeping rounds: dead-letter retention and looks for spool files whose owner is gone
HOUSEKEEPING_INTERVAL = 5.0
_ORPHAN_EVENTS_PER_SCAN = 5_000  # then back to our own spool, so our own events never wait long


SPLIT_ON_STATUSES = frozenset({400, 422})  # a rejection that may be one bad record's: narrowed down, as 413 is


class _ChangedDuringBackoff(Exception):
    """While the batch waited to be retried, an event passed EVENT_MAX_AGE or WHEN_FULL 'drop_oldest'
    evicted records of it: not sent again as is."""


class Outcome(enum.Enum):
    """What became of one claimed batch."""

    DELIVERED = "delivered"
    DEAD_LETTERED = "dead_lettered"
    EVICTED = "evicted"  # WHEN_FULL 'drop_oldest' took every record of it while it waited out a backoff
    RETURNED = "returned"  # not delivered (stopping, or the policy gave up): back in the ready queue


class Courier:
    """Takes claimed batches to the collector: send under the retry policy, then ack, dead-letter or nack.

    Shared by the flusher thread and the replay command, so both treat every answer the same way.
    Thread-safe: a drain over several connections delivers from several threads at once.
    """

    def __init__(self, sender: Sender, policy: Callable[..., object], event_max_age: Optional[float] = None,
                 on_config_etag: Optional[Callable[[Optional[str]], None]] = None,
                 on_rules_tag: Optional[Callable[[Optional[str]], None]] = None,
                 on_progress: Callable[[], None] = lambda: None) -> None:
        self._sender = sender
        self._on_progress = on_progress  # after each ack, dead letter, nack and failed attempt
        self._tag_callbacks = [(header, callback) for header, callback in
                               ((CONFIG_ETAG_HEADER, on_config_etag), (RULES_TAG_HEADER, on_rules_tag)) if callback]
        self._policy = policy
        self._event_max_age = event_max_age
        self._lock = threading.Lock()  # counters and the unacked list, updated from every drain thread
        self.counters: Counter[str] = collections.Counter()
        self.last_error: Optional[DeliveryError] = None
        self.last_error_at: Optional[float] = None
        self.failing = False
        self._unacked: List[Tuple[Spool, List[int]]] = []  # delivered, but the ack failed (e.g. disk full)
        self._acks_due: List[Tuple[Spool, List[int]]] = []  # delivered with `ack_later`, not acked yet

    def deliver(self, spool: Spool, kind: str, batch: List[SpooledItem], sender: Optional[Sender] = None,
                ack_later: bool = False) -> Outcome:
        """Deliver one claimed batch (through `sender`, default this courier's); every record ends acked,
        dead-lettered or ready again.

        Events older than EVENT_MAX_AGE are dead-lettered as 'expired' instead of sent (Moesif rejects
        events older than 30 days), checked before every attempt: a batch retried through a long outage
        sends only the events still young enough. A 413, 400 or 422 on a batch of several records splits
        it in halves (see `_deliver_halves`), so only the records still rejected alone are dead-lettered.

        With `ack_later`, a delivered batch is acked while the next request is in flight (or by
        `record_acks`, which the caller runs before it waits or stops): the spool's delete overlaps the
        collector's work instead of adding to each batch's time. Until then the records stay in flight
        (`claim` does not take them again); a crash in between sends them again, as a crash between an
        answer and its ack always could (Moesif deduplicates on transaction_id).
        """
        self.retry_acks()
        if kind == EVENT and self._event_max_age is not None:
            batch = self._expire(spool, batch)
            if not batch:
                return Outcome.DEAD_LETTERED
        ids = [item.id for item in batch]
        try:
            self._send_with_retries(spool, sender or self._sender, kind, batch)
        except _ChangedDuringBackoff:
            if not batch:
                return Outcome.EVICTED
            return self.deliver(spool, kind, batch, sender, ack_later)  # expires the aged events, sends the rest
        except (ShutdownRequested, RetryableError):
            spool.nack(ids)
            self._on_progress()
            return Outcome.RETURNED
        except PermanentError as exc:
            if len(batch) > 1 and (isinstance(exc, PayloadTooLargeError) or exc.status in SPLIT_ON_STATUSES):
                return self._deliver_halves(spool, kind, batch, sender, ack_later)
            return self._dead_letter(spool, kind, batch, exc.status, str(exc))
        except BaseException:
            spool.nack(ids)
            raise
        self._count("sent", len(ids))
        self.failing = False
        if ack_later:
            with self._lock:
                self._acks_due.append((spool, ids))
        else:
            self._ack(spool, ids)
            self._on_progress()
        return Outcome.DELIVERED

    def _deliver_halves(self, spool: Spool, kind: str, batch: List[SpooledItem], sender: Optional[Sender],
                        ack_later: bool) -> Outcome:
        """Deliver a rejected batch as two halves, each split again while rejected: a bisection that ends
        with only the records rejected on their own dead-lettered.

        Bounded: the halves nest at most ceil(log2(n)) deep, so one bad record among n costs
        2 * ceil(log2(n)) more requests (10 for a batch of 25, 18 for 500); a batch in which every record
        is rejected costs 2n - 1 requests in all. If the first half comes back undelivered (stopping, or
        the collector went away), the second is made ready again unsent.
        """
        half = len(batch) // 2
        first = self.deliver(spool, kind, batch[:half], sender, ack_later)
        if first is Outcome.RETURNED:
            spool.nack([item.id for item in batch[half:]])
            return first
        second = self.deliver(spool, kind, batch[half:], sender, ack_later)
        if second is Outcome.RETURNED or first is second:
            return second
        return Outcome.DELIVERED  # partly delivered, partly dead-lettered: the collector took what it could

    def _count(self, name: str, amount: int) -> None:
        with self._lock:
            self.counters[name] += amount

    def _ack(self, spool: Spool, ids: List[int]) -> None:
        """Ack delivered records; if the spool cannot take the write now, remember them and try again later
        (until then they are not taken again here: in flight after a claim, behind a drain's cursor; a
        restart or a later drain of the same file may resend them, which Moesif deduplicates)."""
        try:
            spool.ack(ids)
        except sqlite3.Error:
            with self._lock:
                self._unacked.append((spool, ids))
            raise

    def record_acks(self) -> None:
        """Ack the batches delivered with `ack_later` (from any thread). Never raises: an ack the spool
        refuses now (e.g. a full disk) is logged and left to `retry_acks`."""
        while True:
            with self._lock:
                if not self._acks_due:
                    return
                spool, ids = self._acks_due.pop(0)
            try:
                if not spool.closed:
                    self._ack(spool, ids)
                    self._on_progress()
            except Exception:  # `_ack` kept the ids for `retry_acks` (a closed spool's records stay on disk)
                logger.exception("could not ack %d delivered record(s); trying again later", len(ids))

    def retry_acks(self) -> None:
        """Ack what was delivered while the spool could not be written."""
        while self._unacked:
            with self._lock:
                if not self._unacked:
                    return
                spool, ids = self._unacked[0]
                if not spool.closed:
                    spool.ack(ids)
                self._unacked.pop(0)

    def _expire(self, spool: Spool, batch: List[SpooledItem]) -> List[SpooledItem]:
        """Dead-letter the events older than EVENT_MAX_AGE; return the rest."""
        assert self._event_max_age is not None
        oldest_allowed = time.time() - self._event_max_age
        expired = [item for item in batch if item.spooled_at < oldest_allowed]
        if expired:
            days = self._event_max_age / 86400
            self._dead_letter(spool, EVENT, expired, None, f"expired: older than EVENT_MAX_AGE ({days:g} days)")
        return [item for item in batch if item.spooled_at >= oldest_allowed]

    def _has_aged(self, kind: str, batch: List[SpooledItem]) -> bool:
        """True if an event of `batch` has grown older than EVENT_MAX_AGE since it was claimed."""
        if kind != EVENT or self._event_max_age is None:
            return False
        oldest_allowed = time.time() - self._event_max_age
        return any(item.spooled_at < oldest_allowed for item in batch)

    def _dead_letter(self, spool: Spool, kind: str, batch: List[SpooledItem], status: Optional[int],
                     reason: str) -> Outcome:
        spool.dead_letter([item.id for item in batch], status, reason)
        self._count("dead_lettered", len(batch))
        if status is not None:
            self.failing = False  # the collector answered
        logger.error("%d %s record(s) moved to the dead-letter store: %s", len(batch), kind, reason)
        self._on_progress()
        return Outcome.DEAD_LETTERED

    def drain(self, spool: Spool, batch_size: int, stop: threading.Event, max_records: Optional[int] = None,
              on_batch: Optional[Callable[[int], None]] = None, connections: int = 1) -> Outcome:
        """Deliver `spool`'s ready records batch by batch until none is left, `max_records` are done,
        `stop` is set, or a batch comes back undelivered (that outcome is returned).

        Only for a spool this process holds alone (its slot lock: replay, an adopted orphan): records are
        read without being marked in flight (`Spool.read_ready`), so one that is not delivered simply stays
        ready. With `connections` above 1, that many threads each take the next batch and deliver it over
        their own connection, so batches are read, compressed and acked while others are in flight (and
        arrive in no strict order). After a failed batch no new one is taken; the others in flight finish.
        """
        if connections < 1:
            raise ValueError("connections must be at least 1")
        batches = _Batches(spool, batch_size, max_records)
        run = _Run(stop)
        if connections == 1:
            try:
                self._drain_with(self._sender, spool, batches, run, on_batch)
            finally:
                self.record_acks()
            return run.outcome
        senders = [self._sender] + [self._sender.clone() for _ in range(connections - 1)]
        threads = [threading.Thread(target=self._drain_thread, args=(sender, spool, batches, run, on_batch),
                                    name=f"moesif-durable-drain-{number}", daemon=True)
                   for number, sender in enumerate(senders)]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()  # a second Ctrl-C interrupts this: the batches in hand stay ready in the spool
        except BaseException:
            run.abandon()
            raise
        finally:
            if not run.abandoned:
                self.record_acks()
                for sender in senders[1:]:
                    sender.close()
        if run.error is not None:
            raise run.error
        return run.outcome

    def _drain_thread(self, sender: Sender, spool: Spool, batches: _Batches, run: _Run,
                      on_batch: Optional[Callable[[int], None]]) -> None:
        try:
            self._drain_with(sender, spool, batches, run, on_batch)
        except BaseException as exc:  # handed to the thread that called drain()
            run.fail(exc)

    def _drain_with(self, sender: Sender, spool: Spool, batches: _Batches, run: _Run,
                    on_batch: Optional[Callable[[int], None]]) -> None:
        while run.going():
            taken = batches.next()
            if taken is None:
                return
            kind, batch = taken
            if self.deliver(spool, kind, batch, sender, ack_later=True) is Outcome.RETURNED:
                run.returned()
                return
            if on_batch is not None and not run.abandoned:
                with self._lock:
                    on_batch(len(batch))

    def _send_with_retries(self, spool: Spool, sender: Sender, kind: str, batch: List[SpooledItem]) -> None:
        """Send `batch` under the retry policy; between attempts its records may be evicted (`Spool.back_off`),
        and then `batch` is left holding the ones still spooled."""
        attempts = [0]
        ids = [item.id for item in batch]
        try:
            self._policy(self._send, spool, sender, kind, batch, attempts)
        finally:
            spool.resume(ids)
            self._count("retries", max(0, attempts[0] - 1))

    def _send(self, spool: Spool, sender: Sender, kind: str, batch: List[SpooledItem], attempts: List[int]) -> None:
        if attempts[0]:
            kept = spool.resume([item.id for item in batch])
            if len(kept) < len(batch) or self._has_aged(kind, batch):
                batch[:] = [item for item in batch if item.id in kept]
                raise _ChangedDuringBackoff()  # not retryable: the policy lets it through to `deliver`
        attempts[0] += 1
        self._count("send_attempts", 1)
        try:
            headers = sender.send(kind, batch, while_waiting=self.record_acks)
        except DeliveryError as exc:
            self.failing = True
            self.last_error, self.last_error_at = exc, time.time()
            self.record_acks()  # the earlier batches' acks this request did not get to carry: not through a backoff
            spool.back_off([item.id for item in batch])
            self._on_progress()
            raise
        for header, callback in self._tag_callbacks if kind == EVENT else ():
            try:
                callback((headers or {}).get(header))
            except Exception:  # a callback bug must not turn a delivered batch into a resend
                logger.exception("the %s callback raised", header)


class _Batches:
    """The batches of one drain, oldest first, handed out one at a time to however many threads deliver them."""

    def __init__(self, spool: Spool, batch_size: int, max_records: Optional[int]) -> None:
        self._spool = spool
        self._batch_size = batch_size
        self._left = max_records
        self._after = dict.fromkeys(KINDS, 0)  # the last id read of each kind
        self._lock = threading.Lock()

    def next(self) -> Optional[Tuple[str, List[SpooledItem]]]:
        """The next (kind, batch), or None when nothing is left to take."""
        with self._lock:
            if self._left is not None and self._left <= 0:
                return None
            size = self._batch_size if self._left is None else min(self._batch_size, self._left)
            for kind in KINDS:
                batch = self._spool.read_ready(size, kind, after=self._after[kind])
                if batch:
                    self._after[kind] = batch[-1].id
                    if self._left is not None:
                        self._left -= len(batch)
                    return kind, batch
            return None


class _Run:
    """The state of one drain shared by its threads: whether to go on, how it ended, what went wrong."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._halt = threading.Event()  # set when a batch came back, an error was raised, or the drain was abandoned
        self.outcome = Outcome.DELIVERED
        self.error: Optional[BaseException] = None
        self.abandoned = False

    def going(self) -> bool:
        return not self._stop.is_set() and not self._halt.is_set()

    def returned(self) -> None:
        self.outcome = Outcome.RETURNED
        self._halt.set()

    def fail(self, error: BaseException) -> None:
        if self.error is None and not self.abandoned:  # after abandon(), the spool may be closed under a thread
            self.error = error
        self._halt.set()

    def abandon(self) -> None:
        """The caller gave up waiting (a second Ctrl-C): threads take no new batch, and their errors are moot."""
        self.abandoned = True
        self._halt.set()


class Flusher:
    """Drains one `Spool` (and any orphans beside it) through one `Sender` on a named daemon thread.

    `on_config_etag` and `on_rules_tag`, if given, are called on this thread with the
    ``X-Moesif-Config-ETag`` and ``X-Moesif-Rules-Tag`` of every accepted event batch (None when absent);
    they must return quickly and never raise into the loop.
    """

    def __init__(self, spool: Spool, sender: Sender, config: Config, adopt_orphans: bool = True,
                 on_config_etag: Optional[Callable[[Optional[str]], None]] = None,
                 on_rules_tag: Optional[Callable[[Optional[str]], None]] = None,
                 on_progress: Callable[[], None] = lambda: None) -> None:
        self._spool = spool
        self._sender = sender
        self._batch_size = config.batch_size
        self._flush_interval = config.flush_interval
        self._stop = threading.Event()
        policy = delivery_policy(self._stop, max_wait=config.retry_max_wait, auth_wait=config.auth_retry_interval)
        self._on_progress = on_progress
        self._progress = threading.Condition()  # notified by the courier after each outcome: `flush` waits on it
        self.courier = Courier(sender, policy, event_max_age=config.event_max_age, on_config_etag=on_config_etag,
                               on_rules_tag=on_rules_tag, on_progress=self._progressed)
        self._adopt_orphans = adopt_orphans
        self._dead_letter_retention = config.dead_letter_retention
        self._scrubbed_at_sent = 0  # counters["sent"] when the WAL was last emptied
        self._housekeeping_at = 0.0  # monotonic time of the next housekeeping round (at once, first)
        self._urgent_until = 0.0  # while monotonic() is below this, partial batches are sent at once
        self._partial_since: Optional[float] = None  # when the partial batch now waiting was first seen
        self.counters: Counter[str] = self.courier.counters
        self._worker = ProcessThread("moesif-durable-flusher", self._run)

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the thread (once per process)."""
        self._worker.start()

    @property
    def is_alive(self) -> bool:
        """True if the thread runs in this process (a thread does not survive a fork)."""
        return self._worker.is_alive

    @property
    def is_failing(self) -> bool:
        """True while the last delivery attempt failed and the flusher is backing off."""
        return self.courier.failing

    def hurry(self, seconds: float) -> None:
        """Send partial batches at once for the next `seconds` (a flush asked for by another process)."""
        self._urgent_until = max(self._urgent_until, time.monotonic() + seconds)
        self._housekeeping_at = 0.0  # and look for orphans now: a flush waits for them too
        self._spool.wake()

    @property
    def hurried(self) -> bool:
        """True while partial batches are sent at once (a flush is waiting)."""
        return time.monotonic() < self._urgent_until

    def flush(self, timeout: float, while_healthy: bool = False) -> bool:
        """Send everything spooled before this call; True if it was all delivered within `timeout` seconds.

        With `while_healthy`, stop waiting as soon as a delivery attempt fails (used by `close`).
        """
        deadline = time.monotonic() + timeout
        try:
            mark = self._spool.last_id()
            self._urgent_until = max(self._urgent_until, deadline)
            self._spool.wake()
            with self._progress:
                while self._spool.pending_through(mark) > 0:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self.is_alive or (while_healthy and self.is_failing):
                        return False
                    self._progress.wait(left)
        except sqlite3.Error:
            logger.exception("flush could not read the spool")
            return False
        return True

    def _progressed(self) -> None:
        """A batch was acked, dead-lettered or returned, or an attempt failed: wake `flush` and tell the host."""
        with self._progress:
            self._progress.notify_all()
        self._on_progress()

    def close(self, timeout: float) -> None:
        """Deliver what can be delivered within `timeout`, then stop; undelivered records stay on disk."""
        deadline = time.monotonic() + timeout
        if self.is_alive and not self.is_failing:
            self.flush(timeout, while_healthy=True)
        self._stop.set()
        self._spool.wake()
        self._progressed()
        self._worker.join(deadline - time.monotonic())
        if self.is_alive:
            logger.warning("flusher still busy in a send after %.1f s; its batch stays on disk for the next start",
                           timeout)
            return
        self._sender.close()

    # -- the loop --------------------------------------------------------------------------------

    def _run(self) -> None:
        """The thread: upload, then keep house, until stopped. An error (a spool error, a bug) is counted
        and logged, and the loop goes on a second later: it must survive anything."""
        while not self._stop.is_set():
            try:
                self._upload()
                self._housekeeping()
            except Exception:
                self.counters["loop_errors"] += 1
                logger.exception("moesiftornado_durable flusher error; retrying in 1 s")
                self._stop.wait(1.0)
        self.courier.record_acks()

    def _upload(self) -> None:
        """Once a batch is due (`_next`), claim and deliver one batch of each kind: the courier sends it
        under the retry policy and acks, dead-letters or nacks it."""
        self.courier.retry_acks()  # acks an earlier round could not record
        if not self._next():
            return
        for kind in KINDS:
            if self._stop.is_set():
                return
            batch = self._spool.claim(self._batch_size, kind)
            if batch:
                self.courier.deliver(self._spool, kind, batch, ack_later=True)  # acked during the next send

    def _next(self) -> bool:
        """Wait until a batch is due (True), or until housekeeping is due or the flusher stops (False).

        A batch is due when a full one is ready, when a partial one has waited FLUSH_INTERVAL, and at
        once while a flush is waiting (`hurry`)."""
        while not self._stop.is_set():
            ready = self._spool.ready_count(limit=self._batch_size)
            now = time.monotonic()
            if self._batch_due(ready, now):
                return True
            self.courier.record_acks()  # no request to overlap them with now
            until_housekeeping = self._housekeeping_at - now
            if until_housekeeping <= 0:
                return False
            if ready:  # a partial batch: look again shortly, it may fill up or age
                self._stop.wait(min(_POLL, until_housekeeping))
            else:
                self._spool.wait_for_put(min(self._flush_interval, until_housekeeping))
        return False

    def _batch_due(self, ready: int, now: float) -> bool:
        """With `ready` records waiting: is a batch due? Notes when a partial batch was first seen."""
        if not ready:
            self._partial_since = None
            return False
        since = self._partial_since = now if self._partial_since is None else self._partial_since
        due = ready >= self._batch_size or now < self._urgent_until or now - since >= self._flush_interval
        if due:
            self._partial_since = None
        return due

    def _housekeeping(self) -> None:
        """Between batches: empty the WAL once everything is delivered; and every HOUSEKEEPING_INTERVAL
        expire dead letters past DEAD_LETTER_RETENTION and adopt orphans (unless delivery is failing)."""
        self._scrub_when_idle()
        started = time.monotonic()
        if started < self._housekeeping_at:
            return
        self._housekeeping_at = started + HOUSEKEEPING_INTERVAL
        self.courier.record_acks()
        if self._dead_letter_retention is not None:
            self._spool.expire_dead_letters(self._dead_letter_retention)
        if self._adopt_orphans and not self.is_failing:
            self._drain_orphans()
        logger.debug("flusher housekeeping took %.3f s", time.monotonic() - started)

    def _scrub_when_idle(self) -> None:
        """Once everything is delivered, empty the WAL so no delivered record's bytes stay on disk."""
        sent = self.counters["sent"] + self.counters["dead_lettered"]
        if sent != self._scrubbed_at_sent and not self._spool.ready_count(limit=1):
            self.courier.record_acks()
            if self._spool.scrub():
                self._scrubbed_at_sent = sent

    def _drain_orphans(self) -> None:
        """Adopt spool files whose owner is gone: drain them (a bounded amount per scan) under their lock,
        and delete a file once it holds nothing at all."""
        own = os.path.abspath(self._spool.path)
        for lock in locks.orphans(self._spool.directory):
            try:
                if os.path.abspath(lock.spool_path) == own:
                    continue
                orphan = open_spool(lock.spool_path, codec=self._spool.codec)
                try:
                    if self._dead_letter_retention is not None:
                        orphan.expire_dead_letters(self._dead_letter_retention)
                    if orphan.stats().ready:
                        logger.info("adopting orphan spool %s", lock.spool_path)
                    self.courier.drain(orphan, self._batch_size, self._stop, max_records=_ORPHAN_EVENTS_PER_SCAN)
                    empty = orphan.is_empty()
                finally:
                    orphan.close()
                if empty:
                    remove_spool_files(lock.spool_path)
            finally:
                lock.release()
            if self._stop.is_set() or self.is_failing:
                return


def remove_spool_files(path: str) -> None:
    """Delete a spool file and its WAL and shared-memory files (only ever with its lock held)."""
    for suffix in ("-wal", "-shm", "-mark", "-reserve", ""):
        try:
            os.remove(path + suffix)
        except FileNotFoundError:
            pass
