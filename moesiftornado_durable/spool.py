"""The on-disk queue: persist-queue's `SQLiteAckQueue` in one SQLite file, behind a small vocabulary.

An item is committed to SQLite before `put` returns (WAL; ``synchronous`` from SPOOL_SYNC), stored as
JSON (never pickle: a spool file is data and must not run code when read). The flusher `claim`s a batch
(marked in flight in one transaction), then `ack`s it (rows deleted), `nack`s it (ready again) or
`dead_letter`s it (moved, with status and reason, to a table that nothing deletes from). Rows left in
flight by a killed process are made ready again when the spool is next opened: at-least-once delivery.

Size on disk: a backlog takes little more than its records' JSON bytes (a new file uses 8 KiB pages, which
waste less per ~1.5 KB record than 4 KiB pages), plus a WAL of up to 1000 pages (SQLite's fold point), less on
a nearly full disk (`_keep_wal_small` folds it and truncates it past 1/8 of the free space). Once a backlog is
delivered, `scrub` gives the pages back (VACUUM) and empties the WAL, so a drained spool is a few pages again;
benchmarks/backlog.py measures both (figures in docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Set, Tuple

from persistqueue import SQLiteAckQueue
from persistqueue.sqlackqueue import AckStatus

from . import audit, eventbuild, pagescan, spooldir
from .codec import Codec, UndecryptableError, to_json_bytes
from .errors import SpoolFullError, is_disk_full
from .kinds import COMPANY, EVENT, KINDS, SUBSCRIPTION, USER  # noqa: F401 (re-exported: older imports)
from .lost import LostRecords
from .spooldir import free_bytes

logger = logging.getLogger("moesiftornado_durable")

TABLE = "ack_queue_default"  # persist-queue's table name for a queue named "default"

_READY_BELOW = int(AckStatus.unack)  # persist-queue: 0 inited and 1 ready are both takeable
_IN_FLIGHT = int(AckStatus.unack)
_UNDECRYPTABLE = 7  # our own status: no configured key opens it; kept untouched, retried at the next open
WAL_AUTOCHECKPOINT_PAGES = 1000  # SQLite's default: a commit folds the WAL into the database past 1000 pages
WAL_FOLD_BYTES = 4 * 1024 * 1024  # `checkpoints_aside` folds past this
WAL_SHARE_OF_FREE_SPACE = 8  # a WAL past 1/8 of the file system's free space is folded and cut (`_keep_wal_small`)
WAL_CHECK_COMMITS = 16  # `put` looks at the WAL's size every this many commits (`ingest` and `ack` at each)
FOLD_INTERVAL = 1.0  # seconds between the shipper's folds (so fully spooled journal segments can go)
MARK_SUFFIX = "-mark"  # beside the database: the highest record id committed (see `_check_mark`)
RESERVE_SUFFIX = "-reserve"  # beside the database: space held back for acks and folds on a full disk
RESERVE_BYTES = 256 * 1024  # enough for an ack of a few batches and a fold of a small WAL (`_release_reserve`)
RESERVE_ROOM = 4 * RESERVE_BYTES  # the free space below which no reserve is taken (it would hasten a full disk)

PAGE_SIZE = 8192  # of a new spool file: less space wasted per ~1.5 KB record than 4 KiB pages (docs/benchmarks.md)
SHRINK_MIN_FREE_BYTES = 512 * 1024  # `scrub` gives free pages back once they add up to this much
SHRINK_MAX_LIVE_BYTES = 4 * 1024 * 1024  # ... and only while the records kept are this small (VACUUM copies them)


class _JsonSerializer:
    """Compact, strict JSON for persist-queue's own calls; this module writes and reads through a `Codec`."""

    @staticmethod
    def dumps(value: Any) -> bytes:
        return to_json_bytes(value)

    @staticmethod
    def loads(data: bytes) -> Any:
        return json.loads(data)


@dataclasses.dataclass(frozen=True)
class SpooledItem:
    """One claimed row: its id in the spool, what kind of record it is, the record as JSON bytes (decrypted),
    and when it was spooled. `body` parses the JSON on first use; event batches are sent without it."""

    id: int
    kind: str
    json: bytes
    spooled_at: float

    @functools.cached_property
    def body(self) -> Any:
        return json.loads(self.json)


@dataclasses.dataclass(frozen=True)
class SpoolStats:
    """Counts of a spool at one moment."""

    ready: int
    in_flight: int
    dead_letter: int
    oldest_spooled_at: Optional[float]
    bytes_on_disk: int
    undecryptable: int = 0


class _AckQueue(SQLiteAckQueue):
    """`SQLiteAckQueue` with a record kind, an index over takeable rows, a dead-letter table and a sync pragma.

    persist-queue keeps its SQL in class attributes, so the table gains a `kind` column here; the partial
    index lets a claim find the oldest ready rows without scanning acked or in-flight ones.

    A new file gets `PAGE_SIZE` pages. SQLite fixes the page size when it writes the file's first page,
    which persist-queue's connection method does by switching to WAL at once; so `_new_db_connection`
    connects itself (persist-queue's does no more than connect and set WAL) and sets the size first. An
    existing file keeps its page size: SQLite cannot change it in WAL mode.
    """

    _SQL_CREATE = (
        "CREATE TABLE IF NOT EXISTS {table_name} ("
        "{key_column} INTEGER PRIMARY KEY AUTOINCREMENT, "
        "data BLOB, timestamp FLOAT, status INTEGER, kind TEXT NOT NULL DEFAULT 'event')"
    )
    _SQL_INSERT = "INSERT INTO {table_name} (data, timestamp, status, kind) VALUES (?, ?, " + AckStatus.inited + ", ?)"

    def __init__(self, path: str, sync: str, resume: bool) -> None:
        self._sync = sync
        try:
            super().__init__(
                os.path.dirname(path),
                auto_resume=resume,
                multithreading=True,
                serializer=_JsonSerializer,
                db_file_name=os.path.basename(path),
            )
        except BaseException:  # a damaged file (resuming reads every row): close what was opened before
            for conn in (getattr(self, "_getter", None), getattr(self, "_putter", None)):
                if conn is not None:
                    conn.close()  # closing one twice (getter and putter may be the same) is harmless
            raise

    def _new_db_connection(self, path: str, multithreading: bool, timeout: float) -> sqlite3.Connection:
        conn = sqlite3.connect(os.path.join(path, self.db_file_name), timeout=timeout,
                               check_same_thread=not multithreading)
        try:
            conn.execute(f"PRAGMA page_size={PAGE_SIZE}")  # only a file SQLite has not written yet takes it
            conn.execute("PRAGMA journal_mode=WAL")  # the first read: a file that is not a database fails here
            conn.execute(f"PRAGMA synchronous={self._sync.upper()}")
            conn.execute("PRAGMA secure_delete=ON")  # deleted records are overwritten, not left in free pages
        except BaseException:
            conn.close()
            raise
        return conn

    def _count(self) -> int:
        """persist-queue's count of takeable rows (its `total`), through the partial index instead of a scan
        of the table (which holds every record's data): such scans were most of the time opening a large
        spool took."""
        getter = self._getter
        assert getter is not None
        row = getter.execute(f"SELECT COUNT(*) FROM {self._table_name} WHERE status < {_READY_BELOW}").fetchone()
        return int(row[0]) if row else 0

    def resume_unack_tasks(self) -> None:
        """persist-queue's resume (rows left in flight become ready) without its extra scan to count them."""
        putter = self._putter
        assert putter is not None
        with self.tran_lock:
            with putter as conn:
                resumed = conn.execute(f"UPDATE {self._table_name} SET status = {AckStatus.ready} "
                                       f"WHERE status = {AckStatus.unack}").rowcount
            self.total = self._count()
        if resumed:
            logger.info("%d record(s) left in flight by a stopped process are ready again", resumed)

    def _init(self) -> None:
        super()._init()
        table = self._table_name
        putter = self._putter
        assert putter is not None
        with self.tran_lock, putter as conn:
            conn.execute(
                f"CREATE INDEX IF NOT EXISTS takeable ON {table} (kind, {self._key_column}) "
                f"WHERE status < {_READY_BELOW}"
            )
            conn.execute(
                "CREATE TABLE IF NOT EXISTS dead_letter (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, "
                "data BLOB, timestamp FLOAT, http_status INTEGER, reason TEXT, dead_at FLOAT)"
            )
            conn.execute("CREATE TABLE IF NOT EXISTS journal_offsets (segment TEXT PRIMARY KEY, offset INTEGER)")
            # how far each segment's records are in the database file itself, not only in the WAL (`fold`)
            conn.execute("CREATE TABLE IF NOT EXISTS journal_folded (segment TEXT PRIMARY KEY, offset INTEGER)")


class Spool:
    """A durable queue of Moesif records in the SQLite file `path`.

    Safe to use from the IOLoop thread (put) and the flusher thread (claim/ack) at once: every
    statement runs under persist-queue's transaction lock on one connection. Opening makes rows left
    in flight by a dead owner ready again; pass ``resume=False`` when the owner may be alive (the CLI's
    dead-letter commands on a live app's file).
    """

    def __init__(
        self,
        path: str,
        sync: str = "normal",
        resume: bool = True,
        max_bytes: Optional[int] = None,
        when_full: str = "drop_newest",
        on_evict: Optional[Callable[[List[str]], None]] = None,
        codec: Optional[Codec] = None,
    ) -> None:
        self.path = path
        self._codec = codec or Codec()
        self.directory = os.path.dirname(path)
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        _create_private_file(path)
        self._sync = sync
        _set_aside_damaged_wal(path)  # before SQLite opens it: SQLite would ignore it, then overwrite it
        self._queue = _AckQueue(path, sync, resume)
        self._table = self._queue._table_name
        self._key = self._queue._key_column
        self._max_bytes = max_bytes
        self._when_full = when_full
        self._on_evict = on_evict if on_evict is not None else LostRecords().evicted  # counts, logs, audits
        self._backing_off: Set[int] = set()  # claimed, but their batch waits out a backoff (see `back_off`)
        self._closed = False
        self._close_lock = threading.Lock()
        try:  # a damaged file fails here: its connections must not outlive this failed open
            with self._queue.tran_lock:  # one scan of the table for both figures
                live_bytes, undecryptable = self._conn().execute(
                    f"SELECT COALESCE(SUM(CASE WHEN status <= {_IN_FLIGHT} THEN length(data) END), 0), "
                    f"COUNT(CASE WHEN status = {_UNDECRYPTABLE} THEN 1 END) FROM {self._table}"
                ).fetchone()
            # JSON bytes of the ready and in-flight records: what SPOOL_MAX_BYTES bounds
            self._live_bytes = int(live_bytes)
            self._size_lock = threading.Lock()  # put (IOLoop thread) and ack (flusher) both move _live_bytes
            if resume and undecryptable:  # records no key opened last time: try again with today's keys
                self._execute_many(f"UPDATE {self._table} SET status = {AckStatus.ready} WHERE status = ?",
                                   [(_UNDECRYPTABLE,)])
            self._mark_fd: Optional[int] = None
            self._commits_unchecked = 0  # commits since the WAL's size was last looked at
            self._reserved = reserve_space(path)
            self._folded_at = 0.0  # monotonic time of the last `fold`
            self._committed_since_fold = True
            self.lost_wal = self._check_mark()  # records SQLite discarded with a damaged or deleted WAL
        except BaseException:
            self._queue.close()
            raise

    def put(self, body: Any, kind: str = EVENT) -> int:
        """Commit one record to disk; returns its id once SQLite has committed it.

        At SPOOL_MAX_BYTES, 'drop_newest' refuses this record (`SpoolFullError`); 'drop_oldest' deletes the
        oldest waiting records to make room and reports their ids through `on_evict`.
        """
        data = self._codec.encode(body)
        if self._max_bytes is not None and self._live_bytes + len(data) > self._max_bytes:
            if self._when_full == "drop_newest":
                raise SpoolFullError(f"the spool holds {self._live_bytes} bytes (SPOOL_MAX_BYTES {self._max_bytes})")
            self._evict_oldest(len(data))
        try:
            row_id = self._queue._insert_into(data, time.time(), kind)
        except sqlite3.OperationalError as exc:
            self._after_failed_commit(exc)
            raise
        self._grow(len(data))
        self._keep_wal_small(1)
        self._queue.put_event.set()
        return int(row_id)

    @property
    def live_bytes(self) -> int:
        """Stored bytes of the ready and in-flight records: what SPOOL_MAX_BYTES bounds."""
        return self._live_bytes

    @property
    def codec(self) -> Codec:
        """How this spool encodes records (JSON, encrypted with SPOOL_ENCRYPTION_KEY if set)."""
        return self._codec

    def _evict_oldest(self, needed: int) -> None:
        """Delete the oldest waiting records until `needed` more bytes fit; report their ids."""
        assert self._max_bytes is not None
        with self._queue.tran_lock:
            with self._conn() as conn:
                evicted = self._delete_oldest(conn, self._live_bytes + needed - self._max_bytes)
            self._forget_evicted(evicted)
        self._report_evicted(evicted)

    def _delete_oldest(self, conn: sqlite3.Connection, excess: int) -> List[Tuple[int, int, str]]:
        """In `conn`'s open transaction, delete the oldest waiting records until `excess` bytes are freed;
        returns (row id, bytes, record id) of each. Waiting means ready, or claimed by a batch that waits out
        a backoff; a batch on the wire is left alone (when it is all that is left, the spool stays over)."""
        deleted: List[Tuple[int, int, str]] = []
        freed = after = 0
        while freed < excess:
            rows = conn.execute(
                f"SELECT {self._key}, data, status FROM {self._table} WHERE status <= {_IN_FLIGHT} "
                f"AND {self._key} > ? ORDER BY {self._key} LIMIT 100", (after,)
            ).fetchall()
            if not rows:
                break
            after = rows[-1][0]
            for row_id, data, status in rows:
                if status == _IN_FLIGHT and row_id not in self._backing_off:
                    continue
                conn.execute(f"DELETE FROM {self._table} WHERE {self._key} = ?", (row_id,))
                deleted.append((row_id, len(data), self._record_id(data)))
                freed += len(data)
                if freed >= excess:
                    break
        return deleted

    def _forget_evicted(self, evicted: List[Tuple[int, int, str]]) -> None:
        """Once their deletion is committed (under the transaction lock): their bytes and backoffs go."""
        for row_id, _, _ in evicted:
            self._backing_off.discard(row_id)
        self._grow(-sum(size for _, size, _ in evicted))

    def _report_evicted(self, evicted: List[Tuple[int, int, str]]) -> None:
        if evicted:
            self._on_evict([name for _, _, name in evicted])

    def back_off(self, ids: Sequence[int]) -> None:
        """The claimed batch of `ids` failed and waits before its next attempt. Until `resume`, WHEN_FULL
        'drop_oldest' may evict its records like ready ones: through a long outage they are the oldest, and
        the oldest are what the user chose to lose."""
        with self._queue.tran_lock:
            self._backing_off.update(ids)

    def resume(self, ids: Sequence[int]) -> Set[int]:
        """The batch of `ids` is sent again, or done with (the courier calls this on every way out of its retries):
        the ones still spooled (not evicted since `back_off`)."""
        with self._queue.tran_lock:
            kept = self._backing_off.intersection(ids)
            self._backing_off.difference_update(ids)
            return kept

    def claim(self, limit: int, kind: str = EVENT) -> List[SpooledItem]:
        """Take up to `limit` of the oldest ready records of `kind` and mark them in flight, in one transaction.

        A record no configured key decrypts is set aside (status 'undecryptable'), untouched, for `status`
        to report and the next start with the right key to retry. A kind with nothing ready costs one read
        and no write lock (the flusher asks for every kind each round).
        """
        with self._queue.tran_lock:
            conn = self._conn()
            if conn.execute(f"SELECT 1 FROM {self._table} INDEXED BY takeable WHERE kind = ? "
                            f"AND status < {_READY_BELOW} LIMIT 1", (kind,)).fetchone() is None:
                return []
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(
                    f"SELECT {self._key}, data, timestamp FROM {self._table} INDEXED BY takeable "
                    f"WHERE kind = ? AND status < {_READY_BELOW} ORDER BY {self._key} LIMIT ?",
                    (kind, limit),
                ).fetchall()
                if not rows:
                    conn.rollback()  # nothing to mark: end the transaction without writing
                    return []
                claimed, unreadable = self._decode_rows(kind, rows)
                for status, ids in ((_IN_FLIGHT, [item.id for item in claimed]), (_UNDECRYPTABLE, unreadable)):
                    for marks, chunk in _in_chunks(ids):  # one statement per 500 rows, as `ack`
                        conn.execute(f"UPDATE {self._table} SET status = {status} WHERE {self._key} IN ({marks})",
                                     chunk)
                conn.commit()
            except BaseException as exc:
                conn.rollback()
                if isinstance(exc, sqlite3.OperationalError) and is_disk_full(exc):
                    self._release_reserve()  # claiming is the first step of a delivery, which gives space back
                raise
        if unreadable:
            logger.error("%d spooled record(s) in %s cannot be decrypted with the configured "
                         "SPOOL_ENCRYPTION_KEY; kept untouched", len(unreadable), self.path)
        return claimed

    def read_ready(self, limit: int, kind: str = EVENT, after: int = 0) -> List[SpooledItem]:
        """Up to `limit` of the oldest ready records of `kind` with ids above `after`, without marking them.

        Only for a process that holds this file's slot lock (replay, an adopted orphan): no other process
        takes from the file, so a record need not be marked in flight to be sent once, and one that is not
        acked simply stays ready, also if the process dies. That saves `claim`'s write of every row, a large
        part of a replay's SQLite time. Records no configured key decrypts are set aside as `claim` does.
        """
        while True:
            with self._queue.tran_lock:
                rows = self._conn().execute(
                    f"SELECT {self._key}, data, timestamp FROM {self._table} INDEXED BY takeable "
                    f"WHERE kind = ? AND status < {_READY_BELOW} AND {self._key} > ? ORDER BY {self._key} LIMIT ?",
                    (kind, after, limit),
                ).fetchall()
            if not rows:
                return []
            items, unreadable = self._decode_rows(kind, rows)
            if unreadable:
                self._execute_many(f"UPDATE {self._table} SET status = {_UNDECRYPTABLE} WHERE {self._key} = ?",
                                   [(row_id,) for row_id in unreadable])
                logger.error("%d spooled record(s) in %s cannot be decrypted with the configured "
                             "SPOOL_ENCRYPTION_KEY; kept untouched", len(unreadable), self.path)
            if items:
                return items
            after = rows[-1][0]  # a whole batch set aside: look further

    def _decode_rows(self, kind: str, rows: List[Tuple[int, bytes, float]]) -> Tuple[List[SpooledItem], List[int]]:
        claimed: List[SpooledItem] = []
        unreadable: List[int] = []
        for row_id, data, spooled_at in rows:
            try:
                plain = self._codec.decrypt(data)
            except UndecryptableError:
                unreadable.append(row_id)
                continue
            if kind == EVENT and eventbuild.is_capture_record(plain):  # no key opened it at ingest: build it now
                plain = _built_late(plain)
            claimed.append(SpooledItem(row_id, kind, plain, spooled_at))
        return claimed, unreadable

    def ack(self, ids: Sequence[int]) -> None:
        """Delivered: delete the rows, in one transaction."""
        try:
            with self._queue.tran_lock, self._conn() as conn:
                freed = self._bytes_of(conn, ids)
                for marks, chunk in _in_chunks(ids):  # one statement per 500 rows, not one per row (docs/benchmarks.md)
                    conn.execute(f"DELETE FROM {self._table} WHERE {self._key} IN ({marks})", chunk)
        except sqlite3.OperationalError as exc:
            if is_disk_full(exc):
                self._release_reserve()  # deleting delivered rows is how space comes back: let it happen
            raise
        self._grow(-freed)
        self._keep_wal_small(WAL_CHECK_COMMITS)  # secure_delete rewrites the pages: acks grow the WAL too

    def _record_id(self, data: bytes) -> str:
        """The id that names a record in logs: its transaction_id (events) or user/company id."""
        return record_id(self._decode_or_none(data))

    def _decode_or_none(self, data: bytes) -> Any:
        """The record as its delivery would send it (a capture record no key opened at ingest built now, as
        `_decode_rows` does), or None when it cannot be read."""
        try:
            plain = self._codec.decrypt(data)
            if eventbuild.is_capture_record(plain):
                plain = _built_late(plain)
            return json.loads(plain)
        except (UndecryptableError, ValueError):
            return None

    def _grow(self, delta: int) -> None:
        with self._size_lock:
            self._live_bytes += delta

    def _bytes_of(self, conn: sqlite3.Connection, ids: Sequence[int]) -> int:
        total = 0
        for marks, chunk in _in_chunks(ids):
            row = conn.execute(
                f"SELECT COALESCE(SUM(length(data)), 0) FROM {self._table} "
                f"WHERE {self._key} IN ({marks}) AND status <= {_IN_FLIGHT}",
                chunk,
            ).fetchone()
            total += int(row[0])
        return total

    def nack(self, ids: Sequence[int]) -> None:
        """Not delivered: make the rows ready again, keeping their place in the queue."""
        self._execute_many(
            f"UPDATE {self._table} SET status = {AckStatus.ready} WHERE {self._key} = ?", [(i,) for i in ids]
        )

    def dead_letter(self, ids: Sequence[int], http_status: Optional[int], reason: str) -> None:
        """Permanently rejected: move the rows to the dead-letter table with the status, reason and time."""
        now = time.time()
        with self._queue.tran_lock, self._conn() as conn:
            freed = self._bytes_of(conn, ids)
            self._audit(conn, self._table, self._key, ids, f"dead-lettered: {reason}")
            conn.executemany(
                f"INSERT OR REPLACE INTO dead_letter (id, kind, data, timestamp, http_status, reason, dead_at) "
                f"SELECT {self._key}, kind, data, timestamp, ?, ?, ? FROM {self._table} WHERE {self._key} = ?",
                [(http_status, reason, now, i) for i in ids],
            )
            conn.executemany(f"DELETE FROM {self._table} WHERE {self._key} = ?", [(i,) for i in ids])
        self._grow(-freed)

    def dead_letters(self, reason: Optional[str] = None, older_than: Optional[float] = None) -> List[Dict[str, Any]]:
        """Dead-lettered records, oldest first; optionally only those whose reason contains `reason`
        and that were dead-lettered more than `older_than` seconds ago."""
        sql = "SELECT id, kind, data, timestamp, http_status, reason, dead_at FROM dead_letter WHERE 1"
        params: List[Any] = []
        if reason:
            sql, params = sql + " AND instr(reason, ?) > 0", params + [reason]
        if older_than is not None:
            sql, params = sql + " AND dead_at < ?", params + [time.time() - older_than]
        with self._queue.tran_lock:
            rows = self._conn().execute(sql + " ORDER BY id", params).fetchall()
        return [
            {"id": r[0], "kind": r[1], "body": self._decode_or_none(r[2]), "spooled_at": r[3],
             "http_status": r[4], "reason": r[5], "dead_at": r[6]}
            for r in rows
        ]

    def requeue_dead_letters(self, ids: Sequence[int]) -> int:
        """Put dead-lettered records back in the ready queue, unchanged (same transaction_id); returns how many."""
        with self._queue.tran_lock, self._conn() as conn:
            moved = 0
            for dead_id in ids:
                cursor = conn.execute(
                    f"INSERT INTO {self._table} (data, timestamp, status, kind) "
                    f"SELECT data, timestamp, {AckStatus.ready}, kind FROM dead_letter WHERE id = ?",
                    (dead_id,),
                )
                if cursor.rowcount:
                    size = conn.execute("SELECT length(data) FROM dead_letter WHERE id = ?", (dead_id,)).fetchone()
                    conn.execute("DELETE FROM dead_letter WHERE id = ?", (dead_id,))
                    self._grow(int(size[0] or 0))
                    moved += 1
        self.wake()
        return moved

    def purge_dead_letters(self, ids: Sequence[int], reason: str = "purged by an operator") -> int:
        """Delete dead-lettered records for good (each one audited); returns how many were deleted."""
        with self._queue.tran_lock, self._conn() as conn:
            self._audit(conn, "dead_letter", "id", ids, reason)
            return sum(conn.execute("DELETE FROM dead_letter WHERE id = ?", (i,)).rowcount for i in ids)

    def expire_dead_letters(self, retention: float) -> int:
        """Delete dead letters older than `retention` seconds (DEAD_LETTER_RETENTION); returns how many."""
        with self._queue.tran_lock:
            ids = [row[0] for row in self._conn().execute(
                "SELECT id FROM dead_letter WHERE dead_at < ?", (time.time() - retention,)).fetchall()]
        return self.purge_dead_letters(ids, "dead-letter retention (DEAD_LETTER_RETENTION) passed") if ids else 0

    def _audit(self, conn: sqlite3.Connection, table: str, key: str, ids: Sequence[int], reason: str) -> None:
        """One audit record per row about to leave, by its transaction_id (read before the row goes)."""
        for row_id in ids:
            row = conn.execute(f"SELECT kind, data FROM {table} WHERE {key} = ?", (row_id,)).fetchone()
            if row is not None:
                audit.record_left([self._record_id(row[1])], reason, row[0])

    def unreadable_sample(self) -> Optional[str]:
        """Why the oldest waiting record and the oldest dead letter cannot be decoded with this spool's
        keys, or None when they can (or there are none): the start-up check of SPOOL_ENCRYPTION_KEY."""
        with self._queue.tran_lock:
            return _unreadable_sample(self._conn(), self._codec)

    def scrub(self) -> bool:
        """Give the pages of delivered records back to the file system, fold the WAL into the database and
        truncate it, so delivered records leave no bytes behind (deleted rows are already overwritten:
        secure_delete). True if the WAL was emptied. The flusher calls it when nothing is ready.

        SQLite keeps a deleted row's page in the file for reuse: without the VACUUM here, a drained backlog
        left the file at its high-water mark. VACUUM copies the records still kept (dead letters, mostly), so
        it runs only while they are under `SHRINK_MAX_LIVE_BYTES` (a few ms), and only once at least
        `SHRINK_MIN_FREE_BYTES` are free; otherwise the free pages wait to be reused by the next backlog.
        The file is cut at the checkpoint, under the lock `put` takes, so a large scrub briefly holds up
        writers; it happens once, after a drain (its cost: docs/benchmarks.md, "Backlog").
        """
        with self._queue.tran_lock:
            conn = self._conn()
            page_size, pages, free = (conn.execute(f"PRAGMA {name}").fetchone()[0]
                                      for name in ("page_size", "page_count", "freelist_count"))
            if free * page_size >= SHRINK_MIN_FREE_BYTES and (pages - free) * page_size <= SHRINK_MAX_LIVE_BYTES:
                try:
                    conn.executescript("VACUUM;")  # in WAL mode the file shrinks at the checkpoint below
                except sqlite3.Error as exc:  # e.g. no room for VACUUM's copy: the spool works as it is
                    logger.warning("could not give spool file %s's free pages back: %s", self.path, exc)
            busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        return not busy

    @contextlib.contextmanager
    def checkpoints_aside(self, wal_bytes: int = WAL_FOLD_BYTES, interval: float = 0.05) -> Iterator[None]:
        """For a long drain (replay): commits stop folding the WAL into the database themselves, and a thread
        with a connection of its own folds it instead whenever it has grown past `wal_bytes`.

        A fold waits for two fsyncs (the WAL, then the database); inside a commit it holds the spool's
        lock meanwhile, stalling every read and ack of the drain (measured in docs/benchmarks.md, "Replay").
        The thread's folds are PASSIVE: they never block the drain, and sync the same way, so nothing changes
        for durability.
        """
        with self._queue.tran_lock:
            self._conn().execute("PRAGMA wal_autocheckpoint=0")
        stop = threading.Event()
        folder = threading.Thread(target=self._fold_wal, args=(stop, wal_bytes, interval), daemon=True,
                                  name="moesif-durable-wal-fold")
        folder.start()
        try:
            yield
        finally:
            stop.set()
            folder.join()
            self._fold_in_commits()

    def _fold_wal(self, stop: threading.Event, wal_bytes: int, interval: float) -> None:
        try:
            spooldir.refuse_link(self.path)
            conn = sqlite3.connect(self.path, timeout=10)
            try:
                conn.execute(f"PRAGMA synchronous={self._sync.upper()}")
                while not stop.wait(interval):
                    if bytes_on_disk(self.path + "-wal") > wal_bytes:
                        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            finally:
                conn.close()
        except (sqlite3.Error, OSError):
            logger.warning("folding the WAL of %s aside failed; commits fold it again", self.path, exc_info=True)
            self._fold_in_commits()

    def _fold_in_commits(self) -> None:
        with self._queue.tran_lock:
            if not self._closed:
                self._conn().execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")

    def put_many(self, records: Iterable[Tuple[str, Any, float]]) -> int:
        """Commit (kind, body, spooled_at) records in one transaction, keeping their original times."""
        return self.put_raw_many((kind, self._codec.encode(body), spooled_at) for kind, body, spooled_at in records)

    def put_raw_many(self, rows: Iterable[Tuple[str, bytes, float]]) -> int:
        """Commit (kind, stored bytes, spooled_at) rows as they are, e.g. still encrypted (salvage)."""
        values = [(data, spooled_at, kind) for kind, data, spooled_at in rows]
        with self._queue.tran_lock, self._conn() as conn:
            conn.executemany(f"INSERT INTO {self._table} (data, timestamp, status, kind) VALUES (?, ?, 0, ?)", values)
        self._grow(sum(len(v[0]) for v in values))
        self.wake()
        return len(values)

    def ingest(self, rows: Sequence[Tuple[str, bytes, float]], segment: str, offset: int) -> None:
        """Commit rows read from a journal segment together with how far the segment has been read, in one
        transaction: a crash either keeps both or neither, so a record is never lost nor spooled twice.

        Rows are already durable in the journal, so SPOOL_MAX_BYTES never refuses them here; with
        WHEN_FULL 'drop_oldest' the oldest waiting records make room.
        """
        added = sum(len(data) for _, data, _ in rows)
        evicted: List[Tuple[int, int, str]] = []
        try:
            with self._queue.tran_lock:
                with self._conn() as conn:
                    conn.executemany(f"INSERT INTO {self._table} (data, timestamp, status, kind) VALUES (?, ?, 0, ?)",
                                     [(data, spooled_at, kind) for kind, data, spooled_at in rows])
                    conn.execute("INSERT OR REPLACE INTO journal_offsets (segment, offset) VALUES (?, ?)",
                                 (segment, offset))
                    last_id = self._last_id(conn)
                    if self._max_bytes is not None and self._when_full == "drop_oldest":
                        # the oldest make room in this same transaction: were the rows committed first, the
                        # flusher could claim the oldest in between, and the newest would be evicted instead
                        evicted = self._delete_oldest(conn, self._live_bytes + added - self._max_bytes)
                self._forget_evicted(evicted)
        except sqlite3.OperationalError as exc:
            self._after_failed_commit(exc)
            raise
        self._write_mark(last_id)
        self._committed_since_fold = True
        self._grow(added)
        self._report_evicted(evicted)
        self._keep_wal_small(WAL_CHECK_COMMITS)
        if rows:
            self.wake()

    def journal_offsets(self) -> Dict[str, int]:
        """How far each journal segment has been spooled: {segment file name: byte offset}."""
        with self._queue.tran_lock:
            return _journal_offsets(self._conn())

    def forget_segment(self, segment: str) -> None:
        """Drop the offsets of a journal segment that was spooled completely, folded and deleted."""
        with self._queue.tran_lock, self._conn() as conn:
            conn.execute("DELETE FROM journal_offsets WHERE segment = ?", (segment,))
            conn.execute("DELETE FROM journal_folded WHERE segment = ?", (segment,))

    def journal_folded(self) -> Dict[str, int]:
        """How far each journal segment's records are in the database file itself (see `fold`)."""
        with self._queue.tran_lock:
            return _journal_folded(self._conn())

    def fold(self, truncate: bool = False) -> Dict[str, int]:
        """Checkpoint: copy every committed page from the WAL into the database file, then record the
        journal offsets that this covered as folded; returns the folded offsets ({segment: offset}).

        Why: a journal segment may be deleted only once its records are in the database file. Records that
        are only in the WAL are lost if SQLite discards it (garbage at its start, a deleted file), and the
        journal is then their only other copy. The order that makes this hold through a power cut: with
        ``synchronous`` NORMAL or FULL (SPOOL_SYNC), a checkpoint syncs the WAL before it copies and the
        database file after (SQLite's PRAGMA synchronous documentation), so once it reports every frame
        copied, the offsets read before it (under the lock every commit takes) are on disk in the database
        file; only then are they written to ``journal_folded``, which the deleters read. A checkpoint that
        readers held back leaves the previous folded offsets: the segments wait for the next one.
        `truncate` also cuts the WAL file to zero bytes, giving its space back (a tight disk).
        """
        with self._queue.tran_lock:
            conn = self._conn()
            offsets = _journal_offsets(conn)
            busy, frames, copied = conn.execute(
                f"PRAGMA wal_checkpoint({'TRUNCATE' if truncate else 'PASSIVE'})").fetchone()
            self._folded_at = time.monotonic()
            if busy or frames != copied:
                return _journal_folded(conn)
            self._committed_since_fold = False
            if _journal_folded(conn) != offsets:
                with conn:
                    conn.execute("DELETE FROM journal_folded")
                    conn.executemany("INSERT INTO journal_folded (segment, offset) VALUES (?, ?)", offsets.items())
            return offsets

    def fold_if_due(self) -> bool:
        """`fold` if records were spooled since the last one and FOLD_INTERVAL has passed (the shipper's
        tick), so segments are deleted soon after they are spooled; True if it folded."""
        if self._committed_since_fold and time.monotonic() - self._folded_at >= FOLD_INTERVAL:
            self.fold()
            return True
        return False

    def _keep_wal_small(self, commits: int) -> None:
        """Fold and truncate the WAL once it outgrows its share of the disk (looked at every WAL_CHECK_COMMITS).

        SQLite folds the WAL only past 1000 pages (8 MiB here), and a fold has to grow the database file
        before the WAL can shrink: on a nearly full disk, a WAL left to grow can take the last free bytes and
        then never be folded, every write refused for good (seen on a small tmpfs). So the WAL is kept under
        1/WAL_SHARE_OF_FREE_SPACE of the free space, which leaves room for the fold to copy it. A fold that
        fails (the disk is full) is retried at the next commit's check.
        """
        self._commits_unchecked += commits
        if self._commits_unchecked < WAL_CHECK_COMMITS:
            return
        self._commits_unchecked = 0
        wal = bytes_on_disk(self.path + "-wal")
        free = free_bytes(self.directory, default=WAL_FOLD_BYTES * WAL_SHARE_OF_FREE_SPACE)
        if not self._reserved and free >= RESERVE_ROOM:
            self._make_reserve()
        if wal <= free // WAL_SHARE_OF_FREE_SPACE:
            return  # a roomy disk: SQLite's own folds (WAL_AUTOCHECKPOINT_PAGES) do
        try:
            self.fold(truncate=True)
        except sqlite3.OperationalError as exc:  # e.g. the disk is full: the database file cannot grow yet
            self._commits_unchecked = WAL_CHECK_COMMITS  # try again at the next commit
            logger.warning("could not fold the WAL of %s into the database (%s); trying again", self.path, exc)

    def _make_reserve(self) -> None:
        """Set the reserve aside now that there is room to spare (see `reserve_space`)."""
        self._reserved = reserve_space(self.path)

    def acks_first(self) -> bool:
        """True while the disk is too tight to spool more: the reserve went to acks, records wait to be
        delivered, and the free space is below RESERVE_ROOM. Spooling more now would take the space the
        acks of delivered records need (seen on a 2 MB tmpfs: ingest ate the released reserve and every ack
        was refused); once the spool is empty, spooling goes on (the acks have nothing to free)."""
        return not self._reserved and self._live_bytes > 0 and free_bytes(self.directory, RESERVE_ROOM) < RESERVE_ROOM

    def _release_reserve(self) -> None:
        """Give the reserved space back (the disk is full), so the next ack or fold finds room; it is set
        aside again once there is room to spare."""
        if self._reserved:
            self._reserved = False
            release_reserve(self.path)

    def _after_failed_commit(self, exc: sqlite3.OperationalError) -> None:
        """A commit the full disk refused: fold and truncate the WAL now if it is over its share, so the
        space it holds comes back and the next commit finds room. With nothing spooled, no ack can free
        space either (the journals filled the disk before a shipper spooled them): the reserve is what lets
        the first records in, to be delivered, acked and their journal deleted."""
        if is_disk_full(exc):
            self._keep_wal_small(WAL_CHECK_COMMITS)
            if self._live_bytes == 0:
                self._release_reserve()

    def _last_id(self, conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (self._table.strip("`"),)).fetchone()
        return int(row[0]) if row else 0

    def _check_mark(self) -> int:
        """How many committed records SQLite has lost since the last commit `ingest` recorded in the mark
        file: the highest record id it wrote there is above the highest id the database knows when SQLite
        discarded a WAL (garbage in it, or a deleted file). Logged as an ERROR; the journal segments those
        records came from are still on disk (they go only once folded), so the reader spools them again."""
        try:
            with os.fdopen(spooldir.open_file(self.path + MARK_SUFFIX, os.O_RDONLY, create=False), "rb") as f:
                committed = int(f.read(64).strip() or 0)
        except (OSError, ValueError):
            return 0
        last_id = self.last_id()
        if committed <= last_id:
            return 0
        logger.error("moesiftornado_durable: spool file %s lost %d committed record(s) (ids %d to %d): SQLite "
                     "discarded its WAL (damaged or deleted); they are spooled again from the intake journals",
                     self.path, committed - last_id, last_id + 1, committed)
        self._write_mark(last_id)
        return committed - last_id

    def _write_mark(self, last_id: int) -> None:
        """Record the highest committed record id beside the database (one small write, no sync: a power
        cut may lose it, which only hides a loss it could not have caused)."""
        if self._mark_fd is None:
            self._mark_fd = spooldir.open_file(self.path + MARK_SUFFIX, os.O_WRONLY)
        os.pwrite(self._mark_fd, b"%20d\n" % last_id, 0)

    def records(self) -> Iterator[Dict[str, Any]]:
        """Every record in the file, live ones then dead letters, with its state (for export and audit)."""
        with self._queue.tran_lock:
            live = self._conn().execute(
                f"SELECT {self._key}, kind, data, timestamp, status FROM {self._table} "
                f"WHERE status <= {_IN_FLIGHT} OR status = {_UNDECRYPTABLE} ORDER BY {self._key}"
            ).fetchall()
        for row_id, kind, data, spooled_at, status in live:
            state = {_IN_FLIGHT: "in_flight", _UNDECRYPTABLE: "undecryptable"}.get(status, "ready")
            yield {"state": state, "id": row_id, "kind": kind, "spooled_at": spooled_at,
                   "body": self._decode_or_none(data)}
        for dead in self.dead_letters():
            yield dict(dead, state="dead_letter")

    def last_id(self) -> int:
        """The highest record id ever assigned (0 for a new spool): a mark for `pending_through`."""
        with self._queue.tran_lock:
            return self._last_id(self._conn())

    def pending_through(self, mark: int) -> int:
        """How many records with id <= `mark` are still ready or in flight."""
        with self._queue.tran_lock:
            row = self._conn().execute(
                f"SELECT COUNT(*) FROM {self._table} WHERE {self._key} <= ? AND status <= {_IN_FLIGHT}", (mark,)
            ).fetchone()
        return int(row[0])

    def ready_count(self, limit: Optional[int] = None) -> int:
        """How many records wait to be claimed, counting at most `limit` of each kind.

        The flusher only asks "is a batch ready?", so it passes its batch size and never scans a backlog.
        """
        cap = -1 if limit is None else limit
        one_kind = (f"(SELECT COUNT(*) FROM (SELECT 1 FROM {self._table} INDEXED BY takeable "
                    f"WHERE kind = ? AND status < {_READY_BELOW} LIMIT ?))")
        with self._queue.tran_lock:  # one statement for every kind: the flusher asks before each batch
            row = self._conn().execute("SELECT " + " + ".join([one_kind] * len(KINDS)),
                                       [value for kind in KINDS for value in (kind, cap)]).fetchone()
        return int(row[0])

    def stats(self) -> SpoolStats:
        """Ready, in-flight, dead-letter and undecryptable counts, the oldest record's time and the files'
        size, as one consistent snapshot."""
        with self._queue.tran_lock:
            return _stats_of(self._conn(), self.path)

    def check(self) -> Optional[str]:
        """SQLite's quick integrity check: None when the file is sound, else what is wrong."""
        try:
            with self._queue.tran_lock:
                rows = self._conn().execute("PRAGMA quick_check").fetchall()
        except sqlite3.DatabaseError as exc:
            return str(exc)
        result = "; ".join(str(row[0]) for row in rows)
        return None if result == "ok" else result

    def is_empty(self) -> bool:
        """True when the file holds no record at all: none ready, in flight or dead-lettered."""
        with self._queue.tran_lock:
            conn = self._conn()
            live = conn.execute(f"SELECT EXISTS (SELECT 1 FROM {self._table} WHERE status <= {_IN_FLIGHT})")
            dead = conn.execute("SELECT EXISTS (SELECT 1 FROM dead_letter)")
            return not live.fetchone()[0] and not dead.fetchone()[0]

    def bytes_on_disk(self) -> int:
        """Size of the database and its WAL and shared-memory files."""
        return bytes_on_disk(self.path)

    def wait_for_put(self, timeout: float) -> bool:
        """Block until a record is put in this process or `timeout` passes; True if one was put."""
        put_event = self._queue.put_event
        woke = put_event.wait(timeout)
        put_event.clear()
        return woke

    def wake(self) -> None:
        """Wake a thread blocked in `wait_for_put` (used for flush and shutdown)."""
        self._queue.put_event.set()

    def hold_for_fork(self) -> None:
        """Take the transaction lock so no statement is half-way when the process forks."""
        self._queue.tran_lock.acquire()

    def release_after_fork(self) -> None:
        """Give back the lock taken by `hold_for_fork` (in the parent; the child abandons this spool)."""
        self._queue.tran_lock.release()

    def close(self) -> None:
        """Close the SQLite connections; idempotent. Rows in flight stay in flight until the next open."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            with self._queue.tran_lock:
                self._queue.close()
            if self._mark_fd is not None:
                os.close(self._mark_fd)
                self._mark_fd = None

    @property
    def closed(self) -> bool:
        return self._closed

    def _conn(self) -> sqlite3.Connection:
        conn = self._queue._putter
        assert conn is not None, "persist-queue opened no connection"
        return conn

    def _execute_many(self, sql: str, params: List[tuple]) -> None:
        if not params:
            return
        with self._queue.tran_lock, self._conn() as conn:
            conn.executemany(sql, params)


def _in_chunks(ids: Sequence[int], size: int = 500) -> Iterator[Tuple[str, List[int]]]:
    """`ids` in chunks of at most `size`, each with its "?,?,..." placeholders for an IN list."""
    for first in range(0, len(ids), size):
        chunk = list(ids[first:first + size])
        yield ",".join("?" * len(chunk)), chunk


def bytes_on_disk(path: str) -> int:
    """Size of a spool file with its WAL and shared-memory files."""
    total = 0
    for suffix in ("", "-wal", "-shm"):
        try:
            total += os.path.getsize(path + suffix)
        except OSError:
            pass
    return total


def read_stats(path: str) -> SpoolStats:
    """Stats of the spool file `path` through a read-only connection: safe next to a live app.

    Opening a `Spool` would make in-flight rows ready again (persist-queue's resume), so an operator's
    look must not do that.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"no spool file at {path}")
    spooldir.refuse_link(path)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return _stats_of(conn, path)
    finally:
        conn.close()


def read_journal_offsets(path: str) -> Dict[str, int]:
    """{journal segment name: offset spooled through} of the spool file `path`, read-only ({} if none)."""
    if not os.path.exists(path):
        return {}
    spooldir.refuse_link(path)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return _journal_offsets(conn)
    except sqlite3.OperationalError:  # a spool from before journals: nothing spooled from them
        return {}
    finally:
        conn.close()


class SpoolView:
    """A read-only look at a spool that another process owns (the shipper's, from an app process): the
    start-up check that SPOOL_ENCRYPTION_KEY opens its records, and inspection (tests, benchmarks), through
    one read-only connection opened on first use. Progress and figures come over the channel instead."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: Optional[sqlite3.Connection] = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            if not os.path.exists(self.path):
                raise FileNotFoundError(f"no spool file at {self.path}")
            spooldir.refuse_link(self.path)
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10,
                                         check_same_thread=False)
        return self._conn

    def journal_offsets(self) -> Dict[str, int]:
        """How far each journal segment has been spooled."""
        try:
            return _journal_offsets(self._connection())
        except sqlite3.OperationalError:  # a spool still being created, or one from before journals
            return {}

    def unreadable_sample(self, codec: Codec) -> Optional[str]:
        """As `Spool.unreadable_sample`, with `codec`'s keys."""
        return _unreadable_sample(self._connection(), codec)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _journal_offsets(conn: sqlite3.Connection) -> Dict[str, int]:
    return dict(conn.execute("SELECT segment, offset FROM journal_offsets").fetchall())


def _journal_folded(conn: sqlite3.Connection) -> Dict[str, int]:
    return dict(conn.execute("SELECT segment, offset FROM journal_folded").fetchall())


def _unreadable_sample(conn: sqlite3.Connection, codec: Codec) -> Optional[str]:
    samples = [conn.execute(f"SELECT data FROM {TABLE} WHERE status <= {_IN_FLIGHT} ORDER BY _id LIMIT 1").fetchone(),
               conn.execute("SELECT data FROM dead_letter ORDER BY id LIMIT 1").fetchone()]
    for sample in samples:
        if sample is not None:
            try:
                codec.decode(sample[0])
            except UndecryptableError as exc:
                return str(exc)
            except ValueError:
                pass  # a damaged record is the integrity check's business, not the key's
    return None


def _stats_of(conn: sqlite3.Connection, path: str) -> SpoolStats:
    """One consistent snapshot of a spool file's counts (shared by `Spool.stats` and `read_stats`)."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (TABLE,)).fetchone() is None:
        return SpoolStats(ready=0, in_flight=0, dead_letter=0, oldest_spooled_at=None,
                          bytes_on_disk=bytes_on_disk(path))  # being created by its owner right now
    ready, in_flight, undecryptable, oldest = conn.execute(
        f"SELECT SUM(status < {_READY_BELOW}), SUM(status = {_IN_FLIGHT}), SUM(status = {_UNDECRYPTABLE}), "
        f"MIN(CASE WHEN status <= {_IN_FLIGHT} THEN timestamp END) FROM {TABLE}"
    ).fetchone()
    has_dead = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'dead_letter'").fetchone()
    dead = conn.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0] if has_dead else 0
    return SpoolStats(
        ready=int(ready or 0),
        in_flight=int(in_flight or 0),
        dead_letter=int(dead),
        oldest_spooled_at=oldest,
        bytes_on_disk=bytes_on_disk(path),
        undecryptable=int(undecryptable or 0),
    )


def open_spool(path: str, **options: Any) -> Spool:
    """Open the spool at `path`; a file SQLite cannot open, or that fails its integrity check, is renamed
    aside (kept, never deleted, for `salvage`), an ERROR names it, and a fresh spool starts in its place."""
    try:
        spool = Spool(path, **options)
    except sqlite3.DatabaseError as exc:
        if is_disk_full(exc) and release_reserve(path):  # a full disk is not damage: use the space held back
            return Spool(path, **options)
        if is_disk_full(exc):
            raise
        quarantine(path, str(exc))
        return Spool(path, **options)
    problem = spool.check()
    if problem is None:
        return spool
    spool.close()
    quarantine(path, problem)
    return Spool(path, **options)


def quarantine(path: str, problem: str) -> str:
    """Rename a damaged spool file (and its WAL and shared-memory files) aside; returns the new name."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = f"{path}.corrupt-{stamp}-{os.getpid()}"
    for suffix in ("", "-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, aside + suffix)
    for suffix in (MARK_SUFFIX, RESERVE_SUFFIX):  # they speak of the file set aside; the fresh spool starts anew
        with contextlib.suppress(FileNotFoundError):
            os.remove(path + suffix)
    spooldir.fsync_directory(os.path.dirname(path) or ".")  # the names aside before a fresh spool takes the name
    logger.error("spool file %s is damaged (%s); kept as %s for `moesiftornado-durable salvage`, "
                 "a fresh spool starts in its place", path, problem, aside)
    return aside


def directory_stats(directory: str) -> SpoolStats:
    """Stats of every spool file in a SPOOL_DIR added up (read-only); the oldest record of any file."""
    from .locks import slots, spool_path

    parts = []
    for slot in slots(directory):
        path = spool_path(directory, slot)
        try:
            parts.append(read_stats(path))
        except (FileNotFoundError, sqlite3.OperationalError):
            if os.path.exists(path):
                raise
            # journals awaiting a shipper, or an emptied orphan deleted while we looked
    oldest = [p.oldest_spooled_at for p in parts if p.oldest_spooled_at is not None]
    return SpoolStats(
        ready=sum(p.ready for p in parts),
        in_flight=sum(p.in_flight for p in parts),
        dead_letter=sum(p.dead_letter for p in parts),
        oldest_spooled_at=min(oldest) if oldest else None,
        bytes_on_disk=sum(p.bytes_on_disk for p in parts),
        undecryptable=sum(p.undecryptable for p in parts),
    )


@dataclasses.dataclass(frozen=True)
class SalvageReport:
    """What `salvage` copied out of a damaged spool file, and what it could not read."""

    copied: int  # records put into the new spool (dead letters included)
    dead_letters: int  # of those, records that were dead letters (they come back ready)
    duplicates: int  # rows found twice (e.g. a page and its newer copy in the WAL): copied once
    damaged: int  # rows found whose record is not a readable record (torn JSON): not copied
    unopened: int  # encrypted records no key in hand opens (checked no further): copied as stored
    census: pagescan.Census

    def unreadable(self) -> str:
        """What could not be read, in words: pages cut off or unreadable, cells and records damaged."""
        census = self.census
        parts = []
        if census.header_damaged:
            parts.append(f"the file's header is damaged ({_page_size_found(census)})")
        if census.pages_missing:
            parts.append(f"{census.pages_missing} of {census.pages_present + census.pages_missing} pages "
                         f"missing, the file cut short ({census.pages_missing * census.page_size} bytes; how many "
                         f"records they held is unknown)")
        if census.unreadable_pages:
            parts.append(f"{len(census.unreadable_pages)} page(s) unreadable "
                         f"({len(census.unreadable_pages) * census.page_size} bytes; how many records they held is "
                         f"unknown)")
        if census.zero_pages:
            parts.append(f"{census.zero_pages} page(s) of zeros not on the freelist (free, or wiped: unknown)")
        if census.damaged_cells or self.damaged:
            parts.append(f"{census.damaged_cells + self.damaged} damaged record(s)")
        return "; ".join(parts) or "nothing"


def _page_size_found(census: pagescan.Census) -> str:
    """How the page size of a file whose header is damaged was found, in words."""
    if census.page_size_from == "wal":
        return f"page size {census.page_size} taken from its WAL"
    if census.page_size_from == "pages":
        return (f"page size {census.page_size} found from its pages: {census.btree_pages_found} of "
                f"{census.pages_sampled} pages sampled parse as b-tree pages at that size, more than at any other")
    return f"no page parses as a b-tree page at any page size; pages read as {census.page_size} bytes"


def salvage(source: str, into: Spool) -> SalvageReport:
    """Copy every record that can be read from a damaged spool file into `into`.

    The file (and its WAL, if any) is read page by page (`pagescan`), not through its b-trees, so a
    damaged page, or a file cut short, costs only the records on the pages lost. Rows are told apart by
    their shape: queue rows (ready, in flight or set aside) and dead letters, which come back as ready
    records. Records are copied as stored (encrypted ones stay encrypted), after a check with `into`'s
    codec that they are whole JSON; a row found twice with the same id and bytes is copied once.
    The source is never changed.
    """
    census = pagescan.Census()
    seen: Set[Tuple[int, bytes]] = set()
    batch: List[Tuple[str, bytes, float]] = []
    copied = dead = duplicates = damaged = unopened = 0
    for row in pagescan.scan(source, census):
        found = _salvaged_record(row.values)
        if found is None:
            continue  # a row of another table (the schema, journal offsets)
        kind, data, spooled_at, was_dead = found
        key = (row.rowid, hashlib.blake2b(data, digest_size=16).digest())
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        try:
            body = json.loads(into.codec.decrypt(data))
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
        except UndecryptableError:
            unopened += 1  # kept as stored: the right key may come later
        except ValueError:
            damaged += 1
            logger.warning("salvage: record %d on page %d of %s is damaged; not copied", row.rowid, row.page, source)
            continue
        batch.append((kind, data, spooled_at or time.time()))
        dead += was_dead
        if len(batch) >= 500:
            copied += into.put_raw_many(batch)
            batch = []
    copied += into.put_raw_many(batch)
    return SalvageReport(copied, dead, duplicates, damaged, unopened, census)


def _salvaged_record(values: Tuple[pagescan.Value, ...]) -> Optional[Tuple[str, bytes, Optional[float], bool]]:
    """(kind, stored bytes, spooled_at, was a dead letter) of a row shaped like a queue row
    (_id, data, timestamp, status, kind) or a dead letter (id, kind, data, timestamp, http_status, reason,
    dead_at); None for any other row."""
    def number(value: pagescan.Value) -> bool:
        return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))

    if len(values) == 5 and values[0] is None and isinstance(values[3], int) and values[4] in KINDS:
        _, data, spooled_at, _, kind = values
        was_dead = False
    elif (len(values) == 7 and values[0] is None and values[1] in KINDS and number(values[4])
          and isinstance(values[5], (str, type(None))) and number(values[6])):
        _, kind, data, spooled_at = values[:4]
        was_dead = True
    else:
        return None
    if not isinstance(data, (bytes, str)) or not number(spooled_at) or not isinstance(kind, str):
        return None
    stored = data.encode("utf-8") if isinstance(data, str) else data
    return kind, stored, None if spooled_at is None else float(spooled_at), was_dead


def _built_late(plain: bytes) -> bytes:
    """The event of a capture record that was spooled as it was (`eventbuild.build_rows`); the record itself
    if it cannot be built (logged: Moesif refuses it, alone, into dead letters)."""
    try:
        return eventbuild.built(plain)
    except Exception:
        logger.exception("could not build the event of a spooled capture record; it is sent as it is")
        return plain


def record_id(body: Any) -> str:
    """The id that names a record in logs: its transaction_id (events) or user/company/subscription id."""
    if isinstance(body, dict):
        for key in ("transaction_id", "user_id", "company_id", "subscription_id"):
            if body.get(key):
                return str(body[key])
    return "?"


def _wal_header_damaged(wal: bytes) -> bool:
    """True if `wal` (a WAL file's first 32 bytes, or fewer) is a header SQLite would reject, which makes it
    ignore every frame in the file. Fewer than 32 bytes hold no commit at all."""
    return len(wal) >= 32 and not pagescan.wal_header_ok(wal)


def _set_aside_damaged_wal(path: str) -> None:
    """Copy a WAL whose header SQLite would reject aside (0600) and log an ERROR naming the copy: SQLite
    ignores such a WAL, and every commit in it, and overwrites it at its next write."""
    wal = path + "-wal"
    try:
        with os.fdopen(spooldir.open_file(wal, os.O_RDONLY, create=False), "rb") as f:
            if not _wal_header_damaged(f.read(32)):
                return
            f.seek(0)
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            aside = f"{path}.corrupt-{stamp}-{os.getpid()}-wal"
            with os.fdopen(spooldir.open_file(aside, os.O_WRONLY, new=True), "wb") as copy:
                while True:
                    block = f.read(1 << 20)
                    if not block:
                        break
                    copy.write(block)
    except FileNotFoundError:
        return
    except OSError as exc:
        logger.error("spool file %s has a WAL SQLite will discard (damaged header); could not copy it aside: %s",
                     path, exc)
        return
    logger.error("spool file %s has a WAL SQLite will discard (damaged header); its commits are lost to SQLite, "
                 "a copy is kept as %s; records still in the intake journals are spooled again", path, aside)


def reserve_space(spool_path: str) -> bool:
    """Set RESERVE_BYTES of the disk aside beside `spool_path`, if not done yet and the disk has RESERVE_ROOM
    free; True when the reserve is there. On a disk that fills up, deleting delivered records and folding
    the WAL need a little space themselves, and without it a full spool could never be emptied (on a small
    tmpfs every ack was refused after the collector came back). App processes call this before they write
    their first journal record, so the shipper's reserve exists even when the journals fill the disk before
    a shipper has started."""
    if os.path.exists(spool_path + RESERVE_SUFFIX):
        return True
    if free_bytes(os.path.dirname(spool_path), default=0) < RESERVE_ROOM:
        return False
    try:
        fd = spooldir.open_file(spool_path + RESERVE_SUFFIX, os.O_WRONLY, new=True)
    except FileExistsError:
        return True
    except OSError:
        return False
    try:
        os.posix_fallocate(fd, 0, RESERVE_BYTES)
        return True
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(spool_path + RESERVE_SUFFIX)
        return False
    finally:
        os.close(fd)


def release_reserve(spool_path: str) -> bool:
    """Delete the reserve beside `spool_path` (the disk is full); True if there was one to give back."""
    try:
        os.remove(spool_path + RESERVE_SUFFIX)
    except FileNotFoundError:
        return False
    logger.warning("the disk of %s is full: released the spool's reserve of %d bytes so its records can be "
                   "spooled, delivered and deleted", spool_path, RESERVE_BYTES)
    return True


def _create_private_file(path: str) -> None:
    """Create the database file 0600 before SQLite does (SQLite gives its -wal and -shm files the same
    mode), and refuse a symbolic link at its name: SQLite would follow it."""
    os.close(spooldir.open_file(path))
