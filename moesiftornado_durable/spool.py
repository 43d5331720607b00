"""The on-disk queue: persist-queue's `SQLiteAckQueue` in SPOOL_DIR, behind a small vocabulary.

An item is committed to SQLite before `put` returns (WAL; ``synchronous`` from SPOOL_SYNC), stored as
JSON (never pickle: a spool file is data and must not run code when read). The flusher `claim`s a batch
(marked in flight in one transaction), then `ack`s it (rows deleted), `nack`s it (ready again) or
`dead_letter`s it (moved, with status and reason, to a table that nothing deletes from). Rows left in
flight by a killed process are made ready again when the spool is next opened: at-least-once delivery.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sqlite3
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

from persistqueue import SQLiteAckQueue
from persistqueue.sqlackqueue import AckStatus

logger = logging.getLogger("moesiftornado_durable")

SPOOL_FILE = "spool.db"

EVENT = "event"
USER = "user"
COMPANY = "company"
SUBSCRIPTION = "subscription"
KINDS = (EVENT, USER, COMPANY, SUBSCRIPTION)

_READY_BELOW = int(AckStatus.unack)  # persist-queue: 0 inited and 1 ready are both takeable
_IN_FLIGHT = int(AckStatus.unack)


class _JsonSerializer:
    """Compact JSON for persist-queue; values JSON cannot express are written as their str()."""

    @staticmethod
    def dumps(value: Any) -> bytes:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")

    @staticmethod
    def loads(data: bytes) -> Any:
        return json.loads(data)


@dataclasses.dataclass(frozen=True)
class SpooledItem:
    """One claimed row: its id in the spool, what kind of record it is, the record, and when it was spooled."""

    id: int
    kind: str
    body: Any
    spooled_at: float


@dataclasses.dataclass(frozen=True)
class SpoolStats:
    """Counts of a spool at one moment."""

    ready: int
    in_flight: int
    dead_letter: int
    oldest_spooled_at: Optional[float]
    bytes_on_disk: int


class _AckQueue(SQLiteAckQueue):
    """`SQLiteAckQueue` with a record kind, an index over takeable rows, a dead-letter table and a sync pragma.

    persist-queue keeps its SQL in class attributes, so the table gains a `kind` column here; the partial
    index lets a claim find the oldest ready rows without scanning acked or in-flight ones.
    """

    _SQL_CREATE = (
        "CREATE TABLE IF NOT EXISTS {table_name} ("
        "{key_column} INTEGER PRIMARY KEY AUTOINCREMENT, "
        "data BLOB, timestamp FLOAT, status INTEGER, kind TEXT NOT NULL DEFAULT 'event')"
    )
    _SQL_INSERT = "INSERT INTO {table_name} (data, timestamp, status, kind) VALUES (?, ?, " + AckStatus.inited + ", ?)"

    def __init__(self, path: str, sync: str) -> None:
        self._sync = sync
        super().__init__(
            path,
            auto_resume=True,
            multithreading=True,
            serializer=_JsonSerializer,
            db_file_name=SPOOL_FILE,
        )

    def _new_db_connection(self, path: str, multithreading: bool, timeout: float) -> sqlite3.Connection:
        conn = super()._new_db_connection(path, multithreading, timeout)
        conn.execute(f"PRAGMA synchronous={self._sync.upper()}")
        return conn

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

    def put_kind(self, item: Any, kind: str) -> int:
        row_id = self._insert_into(self._serializer.dumps(item), time.time(), kind)
        self.put_event.set()
        return int(row_id)


class Spool:
    """A durable queue of Moesif records in one SQLite file under `directory`.

    Safe to use from the IOLoop thread (put) and the flusher thread (claim/ack) at once: every
    statement runs under persist-queue's transaction lock on one connection.
    """

    def __init__(self, directory: str, sync: str = "normal") -> None:
        self.directory = directory
        self.path = os.path.join(directory, SPOOL_FILE)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        _create_private_file(self.path)
        self._queue = _AckQueue(directory, sync)
        self._table = self._queue._table_name
        self._key = self._queue._key_column
        self._closed = False
        self._close_lock = threading.Lock()

    def put(self, body: Any, kind: str = EVENT) -> int:
        """Commit one record to disk; returns its id once SQLite has committed it."""
        return self._queue.put_kind(body, kind)

    def claim(self, limit: int, kind: str = EVENT) -> List[SpooledItem]:
        """Take up to `limit` of the oldest ready records of `kind` and mark them in flight, in one transaction."""
        with self._queue.tran_lock:
            conn = self._conn()
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
                conn.executemany(
                    f"UPDATE {self._table} SET status = {_IN_FLIGHT} WHERE {self._key} = ?",
                    [(row[0],) for row in rows],
                )
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
        return [SpooledItem(row[0], kind, _JsonSerializer.loads(row[1]), row[2]) for row in rows]

    def ack(self, ids: Sequence[int]) -> None:
        """Delivered: delete the rows, in one transaction."""
        self._execute_many(f"DELETE FROM {self._table} WHERE {self._key} = ?", [(i,) for i in ids])

    def nack(self, ids: Sequence[int]) -> None:
        """Not delivered: make the rows ready again, keeping their place in the queue."""
        self._execute_many(
            f"UPDATE {self._table} SET status = {AckStatus.ready} WHERE {self._key} = ?", [(i,) for i in ids]
        )

    def dead_letter(self, ids: Sequence[int], http_status: Optional[int], reason: str) -> None:
        """Permanently rejected: move the rows to the dead-letter table with the status, reason and time."""
        now = time.time()
        with self._queue.tran_lock, self._conn() as conn:
            conn.executemany(
                f"INSERT OR REPLACE INTO dead_letter (id, kind, data, timestamp, http_status, reason, dead_at) "
                f"SELECT {self._key}, kind, data, timestamp, ?, ?, ? FROM {self._table} WHERE {self._key} = ?",
                [(http_status, reason, now, i) for i in ids],
            )
            conn.executemany(f"DELETE FROM {self._table} WHERE {self._key} = ?", [(i,) for i in ids])

    def dead_letters(self) -> List[Dict[str, Any]]:
        """Every dead-lettered record with its status, reason and time, oldest first."""
        with self._queue.tran_lock:
            rows = self._conn().execute(
                "SELECT id, kind, data, timestamp, http_status, reason, dead_at FROM dead_letter ORDER BY id"
            ).fetchall()
        return [
            {"id": r[0], "kind": r[1], "body": _JsonSerializer.loads(r[2]), "spooled_at": r[3],
             "http_status": r[4], "reason": r[5], "dead_at": r[6]}
            for r in rows
        ]

    def last_id(self) -> int:
        """The highest record id ever assigned (0 for a new spool): a mark for `pending_through`."""
        with self._queue.tran_lock:
            row = self._conn().execute(
                "SELECT seq FROM sqlite_sequence WHERE name = ?", (self._table.strip("`"),)
            ).fetchone()
        return int(row[0]) if row else 0

    def pending_through(self, mark: int) -> int:
        """How many records with id <= `mark` are still ready or in flight."""
        with self._queue.tran_lock:
            row = self._conn().execute(
                f"SELECT COUNT(*) FROM {self._table} WHERE {self._key} <= ? AND status <= {_IN_FLIGHT}", (mark,)
            ).fetchone()
        return int(row[0])

    def ready_count(self, kind: Optional[str] = None, limit: Optional[int] = None) -> int:
        """How many records wait to be claimed (of one kind, or of all), counting at most `limit` per kind.

        The flusher only asks "is a batch ready?", so it passes its batch size and never scans a backlog.
        """
        cap = -1 if limit is None else limit
        total = 0
        with self._queue.tran_lock:
            for k in [kind] if kind else KINDS:
                row = self._conn().execute(
                    f"SELECT COUNT(*) FROM (SELECT 1 FROM {self._table} INDEXED BY takeable "
                    f"WHERE kind = ? AND status < {_READY_BELOW} LIMIT ?)",
                    (k, cap),
                ).fetchone()
                total += int(row[0])
        return total

    def stats(self) -> SpoolStats:
        """Ready, in-flight and dead-letter counts, the oldest record's time and the files' size."""
        with self._queue.tran_lock:
            conn = self._conn()
            in_flight, oldest = conn.execute(
                f"SELECT SUM(status = {_IN_FLIGHT}), MIN(timestamp) FROM {self._table} WHERE status <= {_IN_FLIGHT}"
            ).fetchone()
            dead = conn.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0]
        return SpoolStats(
            ready=self.ready_count(),
            in_flight=int(in_flight or 0),
            dead_letter=int(dead),
            oldest_spooled_at=oldest,
            bytes_on_disk=self.bytes_on_disk(),
        )

    def bytes_on_disk(self) -> int:
        """Size of the database and its WAL and shared-memory files."""
        total = 0
        for suffix in ("", "-wal", "-shm"):
            try:
                total += os.path.getsize(self.path + suffix)
            except OSError:
                pass
        return total

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


def read_stats(directory: str) -> SpoolStats:
    """Stats of the spool in `directory` through a read-only connection: safe next to a live app.

    Opening a `Spool` would make in-flight rows ready again (persist-queue's resume), so an operator's
    look must not do that.
    """
    path = os.path.join(directory, SPOOL_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no spool file at {path}")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        table = "ack_queue_default"
        ready, in_flight, oldest = conn.execute(
            f"SELECT SUM(status < {_READY_BELOW}), SUM(status = {_IN_FLIGHT}), MIN(timestamp) FROM {table} "
            f"WHERE status <= {_IN_FLIGHT}"
        ).fetchone()
        has_dead = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'dead_letter'").fetchone()
        dead = conn.execute("SELECT COUNT(*) FROM dead_letter").fetchone()[0] if has_dead else 0
    finally:
        conn.close()
    size = sum(os.path.getsize(path + s) for s in ("", "-wal", "-shm") if os.path.exists(path + s))
    return SpoolStats(int(ready or 0), int(in_flight or 0), int(dead), oldest, size)


def _create_private_file(path: str) -> None:
    """Create the database file 0600 before SQLite does; SQLite gives its WAL files the same mode."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
