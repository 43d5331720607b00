"""The intake journal: frames, torn writes, damage, and exactly-once ingestion into the real spool."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
from conftest import iter_records, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from moesiftornado_durable import MoesifMiddleware, cli, journal, locks
from moesiftornado_durable.config import Config
from moesiftornado_durable.journal import (
    INTAKE,
    JournalWriter,
    damaged_segments,
    frame,
    frame_v1,
    read_frames,
    segments,
)
from moesiftornado_durable.kinds import KINDS
from moesiftornado_durable.shipper import Shipper, journal_reader
from moesiftornado_durable.spool import Spool
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


def test_every_record_kind_has_a_frame_code_and_comes_back_as_itself(tmp_path: str) -> None:
    path = os.path.join(str(tmp_path), "intake-0-00000001.jnl2")
    with open(path, "wb") as f:
        f.write(b"".join(frame(kind, b"{}", 1.0) for kind in KINDS))
    assert [kind for kind, _, _ in read_frames(path, 0, 1 << 20, finished=True).rows] == list(KINDS)


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


def ingest_all(directory: str, max_bytes: int = 8 * 1024 * 1024) -> Tuple[List[int], Dict[str, int]]:
    """Spool every journal of `directory` into a real spool, in passes of `max_bytes`; (numbers, counters)."""
    spool = Spool(locks.spool_path(directory, locks.SHIPPER_SLOT))
    try:
        reader = journal_reader(spool)
        for _ in range(10_000):
            reader.ingest(max_bytes=max_bytes)
            if not segments(directory):
                break
        return [item["body"]["n"] for item in spool.records()], reader.counters
    finally:
        spool.close()


def flip(path: str, position: int, mask: int) -> None:
    with open(path, "r+b") as f:
        f.seek(position)
        byte = f.read(1)[0]
        f.seek(position)
        f.write(bytes([byte ^ mask]))


def frame_offsets(frames: List[bytes]) -> List[int]:
    offsets, position = [], 0
    for data in frames:
        offsets.append(position)
        position += len(data)
    return offsets


# where in a frame the bit flips: (byte within the frame, mask)
FLIPS = {
    "length high byte": (7, 0x01),  # still under MAX_PAYLOAD: the length alone looks plausible
    "length low byte": (4, 0x40),
    "magic": (0, 0x08),
    "format byte": (2, 0x01),
    "kind byte": (3, 0x10),
    "spooled_at": (12, 0x02),
    "payload crc": (17, 0x80),
    "header crc": (21, 0x04),
    "payload": (40, 0x20),
}


@pytest.mark.parametrize("where", sorted(FLIPS))
def test_one_flipped_bit_in_a_frame_loses_that_frame_only_and_the_segment_is_kept_aside(tmp_path: str,
                                                                                        where: str) -> None:
    """Issue 13, item 8: 300 frames, one bit flipped in frame 100: the 299 others are spooled, in order,
    and the segment, which had damage before intact frames, is kept aside (0600), not deleted."""
    directory = str(tmp_path)
    frames = [frame("event", record(n), 1000.0 + n) for n in range(300)]
    path = os.path.join(directory, "intake-0-00000001.jnl")
    with open(path, "wb") as f:
        f.write(b"".join(frames))
    os.chmod(path, 0o600)
    byte, mask = FLIPS[where]
    flip(path, frame_offsets(frames)[100] + byte, mask)
    numbers, counters = ingest_all(directory, max_bytes=7000)  # small passes: damage met across reads
    assert numbers == [n for n in range(300) if n != 100]
    assert counters["journal_damaged_bytes"] == len(frames[100])
    assert counters["journal_damaged_segments"] == 1
    assert segments(directory) == []
    assert damaged_segments(directory) == ["intake-0-00000001.jnl.damaged"]
    kept = os.path.join(directory, "intake-0-00000001.jnl.damaged")
    assert os.stat(kept).st_mode & 0o777 == 0o600 and os.path.getsize(kept) == sum(map(len, frames))


def test_status_lists_damaged_segments_kept_aside(tmp_path: str, capsys: Any) -> None:
    directory = str(tmp_path)
    frames = [frame("event", record(n), float(n)) for n in range(3)]
    path = os.path.join(directory, "intake-0-00000001.jnl")
    with open(path, "wb") as f:
        f.write(b"".join(frames))
    flip(path, len(frames[0]) + 7, 0x01)
    ingest_all(directory)
    assert cli.main(["status", "--spool-dir", directory, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["damaged_journals"] == ["intake-0-00000001.jnl.damaged"]
    assert cli.main(["status", "--spool-dir", directory]) == 0
    assert "damaged journal segment" in capsys.readouterr().out


def test_damage_in_a_live_segment_is_skipped_and_the_frames_after_it_spooled(tmp_path: str) -> None:
    directory = str(tmp_path)
    lock = locks.try_lock(directory, 0, INTAKE)
    assert lock is not None
    writer = write_records(directory, 50)
    [(_, _, path)] = segments(directory)
    flip(path, frame_offsets([frame("event", record(n), 1000.0 + n) for n in range(50)])[20] + 7, 0x01)
    spool = Spool(locks.spool_path(directory, locks.SHIPPER_SLOT))
    try:
        reader = journal_reader(spool)
        assert reader.ingest() == 49  # the writer lives: not mistaken for a write in progress
        writer.append("event", record(50), 2000.0)
        assert reader.ingest() == 1
        assert [item["body"]["n"] for item in spool.records()] == [n for n in range(51) if n != 20]
        assert damaged_segments(directory) == [os.path.basename(path) + ".damaged"]
        lock.release()
        writer.close()
        reader.ingest()
        assert segments(directory) == [] and len(damaged_segments(directory)) == 1
    finally:
        spool.close()


def test_a_torn_last_write_is_skipped_and_its_segment_deleted_not_kept_aside(tmp_path: str) -> None:
    directory = str(tmp_path)
    frames = [frame("event", record(n), float(n)) for n in range(10)]
    with open(os.path.join(directory, "intake-0-00000001.jnl"), "wb") as f:
        f.write(b"".join(frames)[:-25])
    numbers, counters = ingest_all(directory)
    assert numbers == list(range(9))
    assert counters["journal_damaged_bytes"] == len(frames[9]) - 25 and counters["journal_damaged_segments"] == 0
    assert segments(directory) == [] and damaged_segments(directory) == []


def test_segments_in_the_old_format_are_still_read_even_with_a_damaged_length(tmp_path: str) -> None:
    """Segments left on disk by an earlier build (format 1, no header check) are spooled after an upgrade;
    a flipped length in one of them no longer costs the frames after it."""
    directory = str(tmp_path)
    old = [frame_v1("event", record(n), 1000.0 + n) for n in range(300)]
    with open(os.path.join(directory, "intake-0-00000001.jnl"), "wb") as f:
        f.write(b"".join(old[:100]))
    damaged_path = os.path.join(directory, "intake-0-00000002.jnl")
    with open(damaged_path, "wb") as f:
        f.write(b"".join(old[100:]))
    flip(damaged_path, frame_offsets(old[100:])[50] + 7, 0x01)  # frame 150's length, high byte
    writer = JournalWriter(directory, 0)  # the upgraded app writes format 2 into a segment of its own
    writer.append("event", record(300), 2000.0)
    writer.close()
    # named so that an earlier build's shipper (`\.jnl$`, `\.jnl2?$`), still running in a rolling upgrade,
    # leaves it alone
    assert writer.path.endswith(".jnl3") and len(segments(directory)) == 3
    numbers, counters = ingest_all(directory)
    assert numbers == [n for n in range(301) if n != 150]
    assert damaged_segments(directory) == ["intake-0-00000002.jnl.damaged"]
    assert counters["journal_damaged_bytes"] == len(old[150])


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
from moesiftornado_durable import MoesifMiddleware, cli, journal, locks
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
from moesiftornado_durable import MoesifMiddleware, cli, journal, locks
from moesiftornado_durable.shipper import journal_reader
from moesiftornado_durable.spool import Spool
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
    first = runtime.host._child
    assert first is not None
    os.kill(first.pid, signal.SIGKILL)
    for n in range(20):
        middleware.update_user({"user_id": f"after-{n}"})  # journaled while no shipper runs
    assert wait_until(lambda: runtime.host._child is not None and runtime.host._child.pid != first.pid,
                      timeout=10)
    assert middleware.flush(15)
    users = sorted(u["user_id"] for u in collector.users)
    assert users == sorted([f"before-{n}" for n in range(20)] + [f"after-{n}" for n in range(20)])


DAMAGE = st.tuples(st.sampled_from(["flip", "zero", "garbage"]), st.integers(0, 1 << 20), st.integers(1, 300),
                   st.binary(min_size=1, max_size=300))


@settings(max_examples=200, deadline=None)
@given(sizes=st.lists(st.integers(0, 400), min_size=1, max_size=30), old_format=st.booleans(),
       damage=st.lists(DAMAGE, max_size=3), cut=st.integers(0, 60), read_bytes=st.integers(1, 3000))
def test_fuzzed_damage_never_spools_a_damaged_frame_and_never_loses_an_intact_one(
        sizes: List[int], old_format: bool, damage: List[Tuple[str, int, int, bytes]], cut: int,
        read_bytes: int) -> None:
    """Bit flips, zeroed blocks and garbage anywhere, a torn end, reads of any size, either format: a
    finished segment yields exactly its frames whose bytes are all intact, in order, once each."""
    make = frame_v1 if old_format else frame
    payloads = [json.dumps({"n": n, "pad": "z" * size}).encode() for n, size in enumerate(sizes)]
    frames = [make("event", payload, float(n)) for n, payload in enumerate(payloads)]
    original = b"".join(frames)
    data = bytearray(original)
    for how, at, length, garbage in damage:
        at %= len(data)
        end = min(len(data), at + length)
        if how == "flip":
            data[at] ^= 1 << (length % 8)
        elif how == "zero":
            data[at:end] = bytes(end - at)
        else:
            data[at:end] = (garbage * (length // len(garbage) + 1))[:end - at]
    del data[len(data) - min(cut, len(data)):]
    # Format 1 has no check over its header: a flipped kind byte (offset 3) is read as another kind with its
    # payload intact. That is why format 2 exists; for format 1 the payload is what must come back intact.
    unchecked = {3} if old_format else set()

    def unchanged(start: int, piece: bytes) -> bool:
        read_back = data[start:start + len(piece)]
        return len(read_back) == len(piece) and all(
            a == b for i, (a, b) in enumerate(zip(read_back, piece)) if i not in unchecked)

    intact = [payload for payload, start, piece in zip(payloads, frame_offsets(frames), frames)
              if unchanged(start, piece)]
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "intake-0-00000001.jnl")
        with open(path, "wb") as f:
            f.write(bytes(data))
        read: List[bytes] = []
        offset, skipped = 0, 0
        for _ in range(100_000):
            chunk = read_frames(path, offset, read_bytes, finished=True)
            read += [payload for _, payload, _ in chunk.rows]
            skipped += chunk.damaged_bytes
            assert chunk.end >= offset and chunk.torn_bytes <= chunk.damaged_bytes
            if chunk.at_eof or chunk.end == offset:
                break
            offset = chunk.end
        assert chunk.at_eof and chunk.end == len(data)
    assert read == intact
    assert skipped == len(data) - sum(len(piece) for payload, piece in zip(payloads, frames) if payload in intact)


@pytest.mark.parametrize("deleted", ["directory", "segment"])
def test_a_writer_whose_segment_was_deleted_writes_the_record_again_in_a_new_one(tmp_path: str, deleted: str,
                                                                                 caplog: Any) -> None:
    """A deleted segment would swallow every later write unseen: the writer notices at once (its file has
    no link left), makes SPOOL_DIR (0700) and a segment again, and writes the record there."""
    directory = os.path.join(str(tmp_path), "spool")
    os.makedirs(directory, mode=0o700)
    writer = write_records(directory, 5)
    if deleted == "directory":
        shutil.rmtree(directory)
    else:
        os.remove(writer.path)
    with caplog.at_level(logging.ERROR, logger="moesiftornado_durable"):
        for n in range(5, 10):
            writer.append("event", record(n), 1000.0 + n)
    writer.close()
    assert os.stat(directory).st_mode & 0o777 == 0o700 and writer.recoveries == 1
    [(_, _, path)] = segments(directory)
    assert [json.loads(data)["n"] for _, data, _ in iter_records(path)] == [5, 6, 7, 8, 9]
    assert sum("was deleted" in r.getMessage() for r in caplog.records) == 1  # one ERROR, not one per record


SPOOL_AND_DIE = """
import os, signal, sys
from moesiftornado_durable import locks
from moesiftornado_durable.shipper import journal_reader
from moesiftornado_durable.spool import Spool
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
            shipper.tick()  # spools the journal again
            assert [item["body"]["n"] for item in shipper.spool.records()] == list(range(1000))
            assert shipper.figures()["counters"]["lost_wal"] == 1000  # what the channel tells app processes
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
    try:
        writer = write_records(directory, 200, segment_bytes=64 * 1024)  # ~30 KB: past 1/16 of the segment
        first = writer.path
        reader = journal_reader(spool)
        assert reader.ingest() == 200
        writer.append("event", record(200), 2000.0)  # the writer is ahead of the shipper again
        assert not writer.retire_if_spooled(spool.journal_folded().get)  # nothing folded yet: kept, open
        spool.fold()
        assert not writer.retire_if_spooled(spool.journal_folded().get)  # not all of it: kept, but closed
        assert reader.ingest() == 1 and os.path.exists(first)  # still the newest of a live writer: kept
        spool.fold()
        assert writer.retire_if_spooled(spool.journal_folded().get)  # folded to its end: deleted
        assert segments(directory) == []
        writer.append("event", record(201), 2001.0)
        assert writer.path != first
        assert reader.ingest() == 1
        assert [item["body"]["n"] for item in spool.records()] == list(range(202))
        writer.close()
    finally:
        spool.close()
        lock.release()


class _Clock:
    """journal.py's clock, moved by the test: the syncer computes its deadlines from it (its waits stay real)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


class _GatedSync:
    """The journal's fdatasync: each call says it started (`started`), waits (bounded) until `release` is
    set, then syncs for real."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.release = threading.Event()
        self._real = os.fdatasync

    def __call__(self, fd: int) -> None:
        self.started.release()
        self.release.wait(30)
        self._real(fd)


@pytest.fixture
def clock(monkeypatch: Any) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(journal, "time", fake)
    return fake


@pytest.fixture
def gated_sync(monkeypatch: Any) -> Iterator[_GatedSync]:
    gate = _GatedSync()
    monkeypatch.setattr(os, "fdatasync", gate)
    yield gate
    gate.release.set()


def test_a_record_written_during_a_slow_sync_is_synced_as_soon_as_that_sync_ends_when_already_due(
    tmp_path: Any, clock: _Clock, gated_sync: _GatedSync
) -> None:
    # the deadline runs from the record's write, not from when the syncer got round to it: a record that waited
    # through a slow sync is not made to wait a whole interval more
    writer = JournalWriter(str(tmp_path), 1, "normal", sync_interval=3600)  # an hour, by the test's clock
    try:
        first = writer.append("event", record(1), time.time())
        writer.on_synced(first, lambda ok: None)  # asks for a round at once
        assert gated_sync.started.acquire(timeout=10)  # round 1 is in its fdatasync
        writer.append("event", record(2), time.time())  # written during round 1
        clock.now += 3601  # round 1 took longer than the interval: record 2 is due
        gated_sync.release.set()
        assert wait_until(lambda: writer.syncs == 2, 10), "record 2 waited for a new interval after the slow round"
    finally:
        gated_sync.release.set()
        writer.close()


def test_a_sync_later_than_the_window_is_counted_and_logged(
    tmp_path: Any, clock: _Clock, gated_sync: _GatedSync, caplog: Any
) -> None:
    writer = JournalWriter(str(tmp_path), 1, "normal")
    done = threading.Event()
    try:
        writer.on_synced(writer.append("event", record(1), time.time()), lambda ok: done.set())
        assert gated_sync.started.acquire(timeout=10)
        clock.now += 0.25  # the record became durable 250 ms after it was written
        gated_sync.release.set()
        assert done.wait(10)
        assert writer.late_syncs == 1
        assert "late syncs so far: 1" in caplog.text
        done.clear()
        writer.on_synced(writer.append("event", record(2), time.time()), lambda ok: done.set())  # on time
        assert done.wait(10)
        assert writer.late_syncs == 1 and writer.syncs == 2
    finally:
        writer.close()


def test_appends_and_syncs_go_on_while_the_supervisor_reads_the_spool(tmp_path: Any) -> None:
    # the supervisor asks the spool how far a segment is folded (SQLite: slow on a busy machine); the IOLoop's
    # appends and the syncer must not wait for that answer
    writer = JournalWriter(str(tmp_path), 1, "normal")
    asked, answer = threading.Event(), threading.Event()

    def slow_folded_offset(name: str) -> Optional[int]:
        asked.set()
        answer.wait(30)
        return None

    synced = threading.Event()
    try:
        writer.append("event", record(1), time.time())
        retiring = threading.Thread(target=writer.retire_if_spooled, args=(slow_folded_offset,))
        retiring.start()
        assert asked.wait(10)
        appended = threading.Event()
        appender = threading.Thread(target=lambda: (writer.append("event", record(2), time.time()), appended.set()))
        appender.start()
        assert appended.wait(10), "an append waited for the supervisor's spool read"
        writer.on_synced(2, lambda ok: synced.set())
        assert synced.wait(10), "the syncer waited for the supervisor's spool read"
    finally:
        answer.set()
        writer.close()
    retiring.join(10)
    appender.join(10)
    assert [payload for _, payload, _ in iter_records(writer.path)] == [record(1), record(2)]


def _waiting(thread: Optional[threading.Thread]) -> bool:
    """True while `thread` is blocked in a `threading.Condition.wait` (its timeout already computed)."""
    frame = sys._current_frames().get(thread.ident) if thread is not None and thread.ident is not None else None
    return frame is not None and frame.f_code.co_name == "wait" and frame.f_code.co_filename == threading.__file__


def test_an_append_syncs_in_place_of_a_syncer_that_has_not_run_in_time(
    tmp_path: Any, clock: _Clock, monkeypatch: Any
) -> None:
    # a machine too busy to give the syncer thread a core (or the GIL): records must not wait for it past the window
    synced_by: List[str] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced_by.append(threading.current_thread().name), real(fd)))
    writer = JournalWriter(str(tmp_path), 1, "normal", sync_interval=3600)  # its round due in an hour, by the clock
    try:
        writer.append("event", record(1), time.time())
        assert wait_until(lambda: _waiting(writer._syncer), 10)  # asleep until the record's deadline
        clock.now += 3601  # ... which passed without the syncer running: it did not get the CPU
        second = writer.append("event", record(2), time.time())
        assert synced_by == [threading.current_thread().name] and writer.syncs == 1 and writer.rescues == 1
        covered: List[bool] = []
        writer.on_synced(second, covered.append)
        assert covered == [True]  # both records are on stable storage already
    finally:
        writer.close()
