"""The spool: persist-queue's SQLiteAckQueue on real SQLite files in a temp dir."""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import stat
import threading
import time
from typing import Any, List

import pytest

from moesiftornado_durable.kinds import COMPANY, EVENT, USER
from moesiftornado_durable.spool import Spool, bytes_on_disk


@pytest.fixture
def spool(tmp_path: Any) -> Any:
    opened = Spool(str(tmp_path / "spool" / "spool-0.db"))
    yield opened
    opened.close()


def test_put_commits_json_readable_by_any_sqlite_client(spool: Spool) -> None:
    spool.put({"transaction_id": "t-1", "text": "héllo"})
    # a second, independent connection sees the committed row, and it is JSON, not pickle
    with contextlib.closing(sqlite3.connect(spool.path)) as other:
        [(data,)] = other.execute("SELECT data FROM ack_queue_default").fetchall()
    assert json.loads(data) == {"transaction_id": "t-1", "text": "héllo"}


def test_claim_ack_nack_dead_letter(spool: Spool) -> None:
    ids = [spool.put({"n": n}) for n in range(5)]
    first = spool.claim(3)
    assert [item.body["n"] for item in first] == [0, 1, 2]
    assert spool.stats().in_flight == 3 and spool.stats().ready == 2
    assert spool.claim(10) and spool.claim(10) == []  # nothing is claimed twice
    spool.ack([first[0].id])
    spool.nack([first[1].id])
    spool.dead_letter([first[2].id], 400, "HTTP 400: rejected")
    stats = spool.stats()
    assert (stats.ready, stats.in_flight, stats.dead_letter) == (1, 2, 1)
    again = spool.claim(10)
    assert [item.id for item in again] == [ids[1]]  # a nacked record keeps its place
    [dead] = spool.dead_letters()
    assert dead["body"] == {"n": 2} and dead["http_status"] == 400 and "rejected" in dead["reason"]


def test_kinds_are_claimed_separately(spool: Spool) -> None:
    spool.put({"transaction_id": "e"}, EVENT)
    spool.put({"user_id": "u"}, USER)
    spool.put({"company_id": "c"}, COMPANY)
    assert [i.body for i in spool.claim(10, USER)] == [{"user_id": "u"}]
    assert [i.body for i in spool.claim(10, EVENT)] == [{"transaction_id": "e"}]
    assert spool.ready_count() == 1


def test_records_survive_reopen_and_in_flight_ones_become_ready(tmp_path: Any) -> None:
    path = str(tmp_path / "spool" / "spool-0.db")
    first = Spool(path)
    for n in range(4):
        first.put({"n": n})
    first.claim(2)  # in flight, as when a process dies mid-send
    first.close()
    second = Spool(path)
    try:
        assert second.stats().in_flight == 0
        assert [item.body["n"] for item in second.claim(10)] == [0, 1, 2, 3]
    finally:
        second.close()


def test_acked_rows_are_deleted_not_kept(spool: Spool) -> None:
    for n in range(50):
        spool.put({"n": n})
    spool.ack([item.id for item in spool.claim(50)])
    with contextlib.closing(sqlite3.connect(spool.path)) as other:
        assert other.execute("SELECT COUNT(*) FROM ack_queue_default").fetchone()[0] == 0


def test_read_ready_reads_past_a_cursor_and_writes_nothing(spool: Spool) -> None:
    ids = [spool.put({"n": n}) for n in range(5)]
    spool.put({"user_id": "u"}, USER)
    first = spool.read_ready(2)
    assert [item.body["n"] for item in first] == [0, 1]
    stats = spool.stats()
    assert (stats.ready, stats.in_flight) == (6, 0)  # nothing marked: if the reader dies, nothing changes
    rest = spool.read_ready(10, after=first[-1].id)
    assert [item.id for item in rest] == ids[2:]
    assert spool.read_ready(10, after=rest[-1].id) == []
    assert [item.body for item in spool.read_ready(10, USER)] == [{"user_id": "u"}]


def test_an_ack_of_more_ids_than_one_statement_takes_deletes_them_all(spool: Spool) -> None:
    spool.put_many(("event", {"n": n}, 0.0) for n in range(1_234))
    spool.ack([item.id for item in spool.read_ready(1_234)])
    with contextlib.closing(sqlite3.connect(spool.path)) as other:
        assert other.execute("SELECT COUNT(*) FROM ack_queue_default").fetchone()[0] == 0
    assert spool.stats().ready == 0


def test_with_checkpoints_aside_a_thread_folds_the_wal_and_commits_fold_it_again_after(spool: Spool) -> None:
    filler = "x" * 1500
    spool.put_many(("event", {"n": n, "filler": filler}, 0.0) for n in range(3_000))  # ~4.5 MB of records
    assert spool.scrub()
    spool.put({"n": -1})  # the WAL has a header again
    wal = spool.path + "-wal"
    restarts_before = wal_restarts(wal)
    wal_sizes = []
    with spool.checkpoints_aside(wal_bytes=256 * 1024, interval=0.005):
        assert pragma(spool, "wal_autocheckpoint") == 0  # no commit folds the WAL in this block
        after = 0
        while True:
            batch = spool.read_ready(100, after=after)
            if not batch:
                break
            after = batch[-1].id
            spool.ack([item.id for item in batch])
            wal_sizes.append(bytes_on_disk(wal))
            time.sleep(0.01)
    assert wal_restarts(wal) > restarts_before  # the thread folded it, so writing began again at its start
    assert max(wal_sizes) < 6 * 1024 * 1024, max(wal_sizes)  # the acks wrote ~7 MB of pages
    assert pragma(spool, "wal_autocheckpoint") == 1000
    assert spool.stats().ready == 0
    assert not [t for t in threading.enumerate() if t.name == "moesif-durable-wal-fold"]


def wal_restarts(wal: str) -> int:
    """The WAL header's checkpoint sequence number, which grows each time writing starts over at its beginning."""
    with open(wal, "rb") as file:
        return int.from_bytes(file.read(16)[12:16], "big")


def pragma(spool: Spool, name: str) -> int:
    with contextlib.closing(spool._conn().execute(f"PRAGMA {name}")) as cursor:
        return int(cursor.fetchone()[0])


def test_pending_through_a_mark(spool: Spool) -> None:
    spool.put({"n": 1})
    mark = spool.last_id()
    spool.put({"n": 2})
    assert spool.pending_through(mark) == 1
    [item] = spool.claim(1)
    assert spool.pending_through(mark) == 1  # in flight still counts
    spool.ack([item.id])
    assert spool.pending_through(mark) == 0
    assert spool.ready_count() == 1


def test_files_are_private(tmp_path: Any) -> None:
    directory = tmp_path / "private"
    spool = Spool(str(directory / "spool-0.db"))
    spool.put({"n": 1})
    try:
        assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
        for name in os.listdir(directory):
            assert stat.S_IMODE(os.stat(directory / name).st_mode) == 0o600, name
        assert "spool-0.db" in os.listdir(directory)
    finally:
        spool.close()


@pytest.mark.parametrize("mode, expected", [("normal", 1), ("full", 2)])
def test_spool_sync_sets_the_synchronous_pragma(tmp_path: Any, mode: str, expected: int) -> None:
    spool = Spool(str(tmp_path / mode / "s.db"), sync=mode)
    try:
        assert spool._conn().execute("PRAGMA synchronous").fetchone()[0] == expected
        assert spool._conn().execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        spool.close()


def test_values_json_cannot_express_are_stored_as_text(spool: Spool) -> None:
    spool.put({"metadata": {"when": object.__new__(object), "set": {1}}})
    [item] = spool.claim(1)
    assert isinstance(item.body["metadata"]["when"], str)


def test_close_is_idempotent(tmp_path: Any) -> None:
    spool = Spool(str(tmp_path / "s" / "s.db"))
    spool.close()
    spool.close()
    assert spool.closed


class _Unprintable:
    def __str__(self) -> str:
        raise RuntimeError("detached instance")


def _circular() -> Any:
    value: Any = {"name": "loop"}
    value["self"] = value
    return value


@pytest.mark.parametrize("value, stored", [
    ({(1, 2): "pair", "ok": 1}, {"(1, 2)": "pair", "ok": 1}),
    (_circular(), {"name": "loop", "self": "<circular reference>"}),
    ({"score": float("nan"), "top": float("inf")}, {"score": "nan", "top": "inf"}),
    ({"who": _Unprintable()}, {"who": "<unprintable _Unprintable>"}),
    ({"tags": {"only"}}, {"tags": "{'only'}"}),  # the fast path: str() of what JSON does not know
])
def test_values_json_cannot_hold_are_stored_as_text_and_the_record_is_kept(
    spool: Spool, value: Any, stored: Any
) -> None:
    spool.put({"transaction_id": "t-1", "metadata": value})
    with contextlib.closing(sqlite3.connect(spool.path)) as other:
        [(data,)] = other.execute("SELECT data FROM ack_queue_default").fetchall()
    assert json.loads(data, parse_constant=lambda name: pytest.fail(f"{name} is not JSON")) == {
        "transaction_id": "t-1", "metadata": stored}


def test_a_record_nested_too_deep_is_kept_with_the_deep_part_as_text(spool: Spool) -> None:
    deep: Any = "bottom"
    for _ in range(5000):
        deep = [deep]
    spool.put({"transaction_id": "t-1", "metadata": deep})
    [item] = spool.claim(1)
    assert item.body["transaction_id"] == "t-1"
    assert "<nested too deep>" in json.dumps(item.body)


# -- size on disk ------------------------------------------------------------------------------------


def _event(n: int) -> Any:
    """A record of ~1.5 KB of JSON, like a captured event with small bodies."""
    return {"transaction_id": f"t-{n:06d}", "request": {"uri": f"/orders/{n}", "body": "r" * 700},
            "response": {"status": 200, "body": "s" * 700}}


def _json_bytes(count: int) -> int:
    return sum(len(json.dumps(_event(n), separators=(",", ":")).encode()) for n in range(count))


def _drain(spool: Spool) -> None:
    while True:
        batch = spool.claim(500)
        if not batch:
            return
        spool.ack([item.id for item in batch])


def _backlog(spool: Spool, count: int) -> None:
    spool.put_many(("event", _event(n), 0.0) for n in range(count))


def test_a_backlog_takes_little_more_disk_than_its_json(spool: Spool) -> None:
    _backlog(spool, 3000)
    assert spool.scrub()  # nothing to give back; folds the WAL in, so only the database file counts
    assert spool.bytes_on_disk() <= 1.2 * _json_bytes(3000)  # 4 KiB pages held two records each: 1.36x


def test_a_drained_backlog_gives_its_pages_back(spool: Spool) -> None:
    _backlog(spool, 3000)  # ~4.6 MB of JSON
    _drain(spool)
    assert spool.scrub()
    assert spool.bytes_on_disk() < 256 * 1024
    assert spool.is_empty()


def test_giving_pages_back_keeps_every_record_its_state_and_id(spool: Spool) -> None:
    _backlog(spool, 3000)
    spool.claim(3)  # in flight
    spool.dead_letter([item.id for item in spool.claim(2)], 400, "HTTP 400")
    _drain(spool)  # the rest is delivered
    for n in range(4):
        spool.put(_event(n))  # ready
    last, before = spool.last_id(), list(spool.records())
    assert spool.scrub()
    assert spool.bytes_on_disk() < 256 * 1024
    assert list(spool.records()) == before
    stats = spool.stats()
    assert (stats.ready, stats.in_flight, stats.dead_letter) == (4, 3, 2)
    assert spool.put(_event(5)) == last + 1  # ids go on from where they were


def test_a_file_made_with_4_kib_pages_keeps_them_and_still_shrinks(tmp_path: Any) -> None:
    path = tmp_path / "spool" / "spool-0.db"
    path.parent.mkdir()
    with contextlib.closing(sqlite3.connect(str(path))) as older:  # as a release before 8 KiB pages made it
        older.execute("PRAGMA page_size=4096")
        older.execute("PRAGMA journal_mode=WAL")
    spool = Spool(str(path))
    try:
        assert spool._conn().execute("PRAGMA page_size").fetchone()[0] == 4096
        _backlog(spool, 1000)
        _drain(spool)
        assert spool.scrub()
        assert spool.bytes_on_disk() < 256 * 1024
    finally:
        spool.close()


def test_a_spool_keeping_many_records_is_not_vacuumed(spool: Spool, monkeypatch: Any) -> None:
    monkeypatch.setattr("moesiftornado_durable.spool.SHRINK_MAX_LIVE_BYTES", 64 * 1024)
    _backlog(spool, 1000)
    spool.dead_letter([item.id for item in spool.claim(100)], 400, "HTTP 400")  # ~150 KB kept
    _drain(spool)
    assert spool.scrub()
    assert spool.bytes_on_disk() > 1024 * 1024  # the free pages stay, for the next backlog to reuse
    assert spool.stats().dead_letter == 100



class _ClaimingAfterCommit(Spool):
    """A spool whose flusher claims a batch (and keeps it on the wire) the moment an ingest's rows are
    committed: the worst moment for WHEN_FULL 'drop_oldest'."""

    claimed: List[Any] = []

    def _write_mark(self, last_id: int) -> None:  # the first step after an ingest's commit
        super()._write_mark(last_id)
        self.claimed = self.claim(25)


def test_drop_oldest_at_ingest_evicts_the_oldest_even_if_a_flusher_claims_right_after_the_commit(
        tmp_path: Any) -> None:
    """Ingest commits journal rows and evicts for them in one transaction, so a claim right after the commit
    takes the oldest survivors. Were the eviction a second transaction, that claim would put the oldest on the
    wire, out of reach, and the newest would be evicted instead."""
    evicted: List[str] = []
    spool = _ClaimingAfterCommit(str(tmp_path / "spool-0.db"), max_bytes=20_000, when_full="drop_oldest",
                                 on_evict=evicted.extend)
    try:
        rows = [(EVENT, spool.codec.encode({"transaction_id": f"e-{n}", "padding": "p" * 900}), time.time())
                for n in range(40)]
        spool.ingest(rows, "intake-0-1.jnl", 1)
        assert evicted and evicted == [f"e-{n}" for n in range(len(evicted))], evicted  # the oldest
        assert json.loads(spool.claimed[0].json)["transaction_id"] == f"e-{len(evicted)}"
        assert spool.live_bytes <= 20_000
    finally:
        spool.close()
