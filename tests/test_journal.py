"""The intake journal: frames, torn writes, damage, and exactly-once ingestion into the real spool."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from typing import Any, Callable

from conftest import wait_until

from moesiftornado_durable import MoesifMiddleware, locks
from moesiftornado_durable.config import Config
from moesiftornado_durable.journal import INTAKE, JournalWriter, frame, iter_records, read_frames, segments
from moesiftornado_durable.shipper import Shipper, journal_reader, read_stats_file
from moesiftornado_durable.spool import Spool, SpoolView
from moesiftornado_durable.testing import Collector


def record(n: int) -> bytes:
    return json.dumps({"transaction_id": f"t-{n}", "n": n, "pad": "x" * 100}).encode()


def write_records(directory: str, count: int, slot: int = 0, segment_bytes: int = 1 << 20) -> JournalWriter:
    writer = JournalWriter(directory, slot, segment_bytes=segment_bytes)
    for n in range(count):
        writer.append("event", record(n), 1000.0 + n)
    return writer


def test_frames_round_trip_with_kind_and_time(tmp_path: str) -> None:
    directory = str(tmp_path)
    writer = write_records(directory, 3)
    writer.append("user", b'{"user_id":"u"}', 5.5)
    writer.close()
    [(_, _, path)] = segments(directory)
    rows = list(iter_records(path))
    assert [kind for kind, _, _ in rows] == ["event"] * 3 + ["user"]
    assert rows[0] == ("event", record(0), 1000.0) and rows[3] == ("user", b'{"user_id":"u"}', 5.5)


def test_a_partial_frame_at_the_end_of_a_live_segment_waits_and_is_read_once_complete(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "intake-0-00000001.jnl")
    whole = frame("event", record(0), 1.0) + frame("event", record(1), 2.0)
    with open(path, "wb") as f:
        f.write(whole[:-10])  # the second frame is still being written
    chunk = read_frames(path, 0, 1 << 20, finished=False)
    assert [data for _, data, _ in chunk.rows] == [record(0)] and chunk.damaged_bytes == 0
    with open(path, "ab") as f:
        f.write(whole[-10:])
    rest = read_frames(path, chunk.end, 1 << 20, finished=False)
    assert [data for _, data, _ in rest.rows] == [record(1)] and rest.at_eof


def test_a_torn_last_write_of_a_dead_writer_is_counted_and_skipped(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "intake-0-00000001.jnl")
    torn = frame("event", record(1), 2.0)[:-7]
    with open(path, "wb") as f:
        f.write(frame("event", record(0), 1.0) + torn)
    chunk = read_frames(path, 0, 1 << 20, finished=True)
    assert [data for _, data, _ in chunk.rows] == [record(0)]
    assert chunk.damaged_bytes == len(torn) and chunk.at_eof and chunk.end == os.path.getsize(path)


def test_damaged_bytes_in_the_middle_are_skipped_and_later_frames_kept(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "intake-0-00000001.jnl")
    frames = [frame("event", record(n), float(n)) for n in range(3)]
    damaged = bytearray(frames[1])
    damaged[30] ^= 0xFF  # one flipped byte in the payload: the CRC no longer matches
    with open(path, "wb") as f:
        f.write(frames[0] + bytes(damaged) + frames[2])
    chunk = read_frames(path, 0, 1 << 20, finished=True)
    assert [data for _, data, _ in chunk.rows] == [record(0), record(2)]
    assert chunk.damaged_bytes == len(damaged)


def test_ingest_moves_every_record_once_and_deletes_finished_segments(tmp_path: str) -> None:
    directory = str(tmp_path)
    writer = write_records(directory, 500, segment_bytes=16 * 1024)  # many small segments
    writer.close()
    assert len(segments(directory)) > 3
    spool = Spool(locks.spool_path(directory, locks.SHIPPER_SLOT))
    try:
        reader = journal_reader(spool)
        while reader.ingest(max_bytes=20_000):  # small passes: offsets carry over between them
            pass
        numbers = [item["body"]["n"] for item in spool.records()]
        assert numbers == list(range(500))
        assert segments(directory) == []  # no live writer holds slot 0: every segment was finished
        assert spool.journal_offsets() == {}
        assert reader.ingest() == 0
    finally:
        spool.close()


def test_a_live_writers_segment_is_read_as_it_grows_and_kept(tmp_path: str) -> None:
    directory = str(tmp_path)
    lock = locks.try_lock(directory, 0, INTAKE)
    assert lock is not None
    spool = Spool(locks.spool_path(directory, locks.SHIPPER_SLOT))
    try:
        writer = write_records(directory, 10)
        reader = journal_reader(spool)
        assert reader.ingest() == 10
        writer.append("event", record(10), 2000.0)
        assert reader.ingest() == 1
        assert len(segments(directory)) == 1  # still being written: kept
        lock.release()
        writer.close()
        assert reader.ingest() == 0 and segments(directory) == []  # writer gone, fully spooled: deleted
        assert [item["body"]["n"] for item in spool.records()] == list(range(11))
    finally:
        spool.close()


WRITER = """
import sys, json, time
from moesiftornado_durable import MoesifMiddleware, locks
from moesiftornado_durable.journal import INTAKE, JournalWriter
directory = sys.argv[1]
lock = locks.try_lock(directory, 0, INTAKE)
writer = JournalWriter(directory, 0, segment_bytes=256 * 1024)
print("ready", flush=True)
n = 0
while n < 10_000_000:
    body = json.dumps({"transaction_id": "t-%d" % n, "n": n, "pad": "y" * (n % 3000)}).encode()
    writer.append("event", body, time.time())
    n += 1
"""

INGESTER = """
import sys
from moesiftornado_durable import MoesifMiddleware, locks
from moesiftornado_durable.shipper import journal_reader
from moesiftornado_durable.spool import Spool, SpoolView
from moesiftornado_durable.testing import Collector
spool = Spool(locks.spool_path(sys.argv[1], locks.SHIPPER_SLOT))
reader = journal_reader(spool)
print("ready", flush=True)
while True:
    reader.ingest(max_bytes=64 * 1024)
"""


def start(code: str, directory: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), directory], stdout=subprocess.PIPE,
                               text=True)
    assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    return process


def kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    process.wait(10)
    assert process.stdout is not None
    process.stdout.close()


def test_sigkilled_writer_and_ingester_lose_nothing_written_and_spool_nothing_twice(tmp_path: str) -> None:
    """A real writer and a real ingester, both SIGKILLed mid-stream (the writer possibly mid-write()):
    every intact frame is spooled exactly once, in order, and only a torn last frame may be skipped."""
    directory = str(tmp_path)
    writer = start(WRITER, directory)
    ingester = start(INGESTER, directory)
    time.sleep(1.0)
    kill(ingester)  # killed in the middle of its passes: some offsets committed, some not
    ingester = start(INGESTER, directory)
    time.sleep(0.5)
    kill(writer)  # killed at an arbitrary point, possibly inside write()
    time.sleep(0.3)
    kill(ingester)
    spool = Spool(locks.spool_path(directory, locks.SHIPPER_SLOT))
    try:
        reader = journal_reader(spool)
        while reader.ingest():
            pass
        numbers = [item["body"]["n"] for item in spool.records()]
        assert len(numbers) > 100
        assert numbers == list(range(len(numbers)))  # a prefix of what was written: nothing lost, nothing twice
        assert reader.counters["journal_damaged_bytes"] < 3200  # at most the one torn frame
        assert segments(directory) == []
    finally:
        spool.close()


def test_the_shipper_restarts_after_a_sigkill_and_nothing_is_lost(make_middleware: Callable[..., MoesifMiddleware],
                                                                  collector: Collector) -> None:
    middleware = make_middleware()
    for n in range(20):
        middleware.update_user({"user_id": f"before-{n}"})
    assert middleware.flush(10)
    runtime: Any = middleware._runtime_here()
    first = runtime.supervisor._child
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)
    for n in range(20):
        middleware.update_user({"user_id": f"after-{n}"})  # journaled while no shipper runs
    assert wait_until(lambda: runtime.supervisor._child is not None and runtime.supervisor._child.pid != first.pid,
                      timeout=10)
    assert middleware.flush(15)
    users = sorted(u["user_id"] for u in collector.users)
    assert users == sorted([f"before-{n}" for n in range(20)] + [f"after-{n}" for n in range(20)])


SPOOL_AND_DIE = """
import os, signal, sys
from moesiftornado_durable import locks
from moesiftornado_durable.shipper import journal_reader
from moesiftornado_durable.spool import Spool, SpoolView
spool = Spool(locks.spool_path(sys.argv[1], locks.SHIPPER_SLOT))
reader = journal_reader(spool)
while reader.ingest():
    pass
print("ready", flush=True)
os.kill(os.getpid(), signal.SIGKILL)  # no close: SQLite does not fold the WAL into the database file
"""


def test_records_sqlite_discards_with_a_damaged_wal_are_detected_counted_and_spooled_again(
    tmp_path: str, caplog: Any
) -> None:
    """1,000 records spooled only into the WAL (no fold yet, the segment still being written), the shipper
    killed, garbage at the start of the WAL: SQLite discards the WAL whole. The next open says so in an
    ERROR, counts the lost records in the shipper's figures, and spools them again from the journal,
    which was kept because they never reached the database file."""
    directory = str(tmp_path)
    lock = locks.try_lock(directory, 0, INTAKE)  # a live writer: its segment is not finished
    assert lock is not None
    try:
        write_records(directory, 1000).close()
        kill(start(SPOOL_AND_DIE, directory))
        path = locks.spool_path(directory, locks.SHIPPER_SLOT)
        assert os.path.getsize(path + "-wal") > 100_000  # the records are in the WAL only
        with open(path + "-wal", "r+b") as wal:
            wal.write(os.urandom(200))
        with caplog.at_level(logging.ERROR, logger="moesiftornado_durable"):
            shipper = Shipper(Config.from_dict({"APPLICATION_ID": "x", "SPOOL_DIR": directory,
                                                "BASE_URI": "http://127.0.0.1:9"}))
        try:
            assert shipper.spool.lost_wal == 1000
            assert any("lost 1000 committed record(s)" in r.getMessage() for r in caplog.records)
            assert any("has a WAL SQLite will discard" in r.getMessage() for r in caplog.records)
            shipper.tick()  # spools the journal again and publishes the figures
            assert [item["body"]["n"] for item in shipper.spool.records()] == list(range(1000))
            assert read_stats_file(directory)["counters"]["lost_wal"] == 1000
        finally:
            shipper.spool.close()
    finally:
        lock.release()


def test_a_live_writer_closes_its_segment_once_part_of_it_is_folded_so_the_reader_can_delete_it(
    tmp_path: str
) -> None:
    """A record stays in the journal until the spool's database file holds it; a busy writer never catches
    up with the shipper, so it starts a new segment once 1/16 of the open one is folded (a tight disk
    would otherwise hold every record twice, up to a whole segment). A closed segment that is still the
    newest (the app went quiet) is deleted by its writer once folded to its end."""
    directory = str(tmp_path)
    lock = locks.try_lock(directory, 0, INTAKE)
    assert lock is not None
    spool = Spool(locks.spool_path(directory, locks.SHIPPER_SLOT))
    view = SpoolView(spool.path)
    try:
        writer = write_records(directory, 200, segment_bytes=64 * 1024)  # ~30 KB: past 1/16 of the segment
        first = writer.path
        reader = journal_reader(spool)
        assert reader.ingest() == 200
        writer.append("event", record(200), 2000.0)  # the writer is ahead of the shipper again
        assert not writer.retire_if_spooled(view.journal_folded_offset)  # nothing folded yet: kept, open
        spool.fold()
        assert not writer.retire_if_spooled(view.journal_folded_offset)  # not all of it: kept, but closed
        assert reader.ingest() == 1 and os.path.exists(first)  # still the newest of a live writer: kept
        spool.fold()
        assert writer.retire_if_spooled(view.journal_folded_offset)  # folded to its end: deleted
        assert segments(directory) == []
        writer.append("event", record(201), 2001.0)
        assert writer.path != first
        assert reader.ingest() == 1
        assert [item["body"]["n"] for item in spool.records()] == list(range(202))
        writer.close()
    finally:
        view.close()
        spool.close()
        lock.release()
