"""The intake journal: how `log_event` makes a record durable with one `write()`, off the SQLite path.

Each app process appends its records to its own segment files, ``intake-<slot>-<seq>.jnl`` in SPOOL_DIR
(the slot is the one `locks` gave the process, so the slot lock also says whether the writer lives).
A record is one frame, written with a single ``os.write``: once it returns, the bytes are in the page
cache and survive a crash of the process, as a SQLite commit with ``synchronous=NORMAL`` does; with
SPOOL_SYNC 'full' the writer also ``fdatasync``s, which survives a power cut.

The shipper (`JournalReader`) reads the frames into the spool in group commits. How far it got in a
segment is stored in the spool, in the same transaction as the records, so a crash at any point neither
loses nor duplicates a record. Every frame carries a CRC-32: a torn last write (the process died in the
middle of ``write``) or damaged bytes are detected, counted and skipped, never spooled.

Frame: magic ``MJ``, format byte, kind byte, payload length (u32), CRC-32 of the rest (u32),
spooled_at (f64), then the payload (the record as the spool stores it: JSON, or a Fernet token).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import struct
import threading
import time
import zlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple

logger = logging.getLogger("moesiftornado_durable")

INTAKE = "intake"  # the lock-file prefix of journal slots: intake-<slot>.lock
SEGMENT_PATTERN = re.compile(r"^intake-(\d+)-(\d+)\.jnl$")
SEGMENT_BYTES = 4 * 1024 * 1024  # a writer starts a new segment past this; the reader deletes ingested ones
_ROTATE_SHARE = 16  # ... or once 1/16 of it is in the spool: a record is not kept twice for long (a tight disk)
_MIN_CHUNK_BYTES = 16 * 1024  # the reader's smallest commit, after commits failed (a full disk)
_MAGIC = b"MJ"
_FORMAT = 1
_HEADER = struct.Struct("<2sBBIId")  # magic, format, kind, payload length, crc32(spooled_at + payload), spooled_at
_CHECKED = struct.Struct("<d")
MAX_PAYLOAD = 64 * 1024 * 1024  # a length beyond this is damage, not a record
KIND_CODES = {"event": 1, "user": 2, "company": 3, "subscription": 4}
KIND_NAMES = {code: name for name, code in KIND_CODES.items()}


def segment_name(slot: int, seq: int) -> str:
    return f"intake-{slot}-{seq:08d}.jnl"


def segments(directory: str) -> List[Tuple[int, int, str]]:
    """(slot, seq, path) of every journal segment in `directory`, oldest first within each slot."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = [(int(m.group(1)), int(m.group(2)), os.path.join(directory, m.group(0)))
             for m in map(SEGMENT_PATTERN.match, names) if m]
    return sorted(found)


def frame(kind: str, payload: bytes, spooled_at: float) -> bytes:
    """One record as the journal stores it."""
    checked = _CHECKED.pack(spooled_at) + payload
    return _HEADER.pack(_MAGIC, _FORMAT, KIND_CODES[kind], len(payload), zlib.crc32(checked), spooled_at) + payload


class JournalWriter:
    """Appends records to this process's segments of one slot. Not thread-safe: one writer, one thread
    (the IOLoop's); `append` raises OSError on a failed write (disk full) and loses nothing already written."""

    def __init__(self, directory: str, slot: int, sync: str = "normal", segment_bytes: int = SEGMENT_BYTES) -> None:
        self.directory = directory
        self.slot = slot
        self._fsync = sync == "full"
        self._segment_bytes = segment_bytes
        self._fd: Optional[int] = None
        self._lock = threading.Lock()  # uncontended on the IOLoop; user updates may come from other threads
        self.path = ""
        self.size = 0
        self.pid = os.getpid()

    def append(self, kind: str, payload: bytes, spooled_at: float) -> None:
        """Write one record with one ``write()``; it survives a process crash once this returns."""
        data = frame(kind, payload, spooled_at)
        with self._lock:
            fd = self._fd if self._fd is not None and self.size < self._segment_bytes else self._next_segment()
            try:
                written = os.write(fd, data)
                while written < len(data):  # a short write: only on a nearly full disk or a signal
                    written += os.write(fd, data[written:])
                if self._fsync:
                    os.fdatasync(fd)
            except OSError:
                self._abandon_segment()  # its tail may be torn: the next record starts a clean segment
                raise
            self.size += len(data)

    def _next_segment(self) -> int:
        self._abandon_segment()
        taken = [seq for slot, seq, _ in segments(self.directory) if slot == self.slot]
        # from the clock, so a name is never used twice (the spool may still hold a deleted segment's offset)
        seq = max(max(taken, default=0) + 1, time.time_ns() // 1000)
        self.path = os.path.join(self.directory, segment_name(self.slot, seq))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        self.size = 0
        if self._fsync:
            _fsync_directory(self.directory)  # the new file's name must survive a power cut too
        return self._fd

    def _abandon_segment(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self.pid == os.getpid():
            with contextlib.suppress(OSError):  # closing after a failed write may fail the same way
                os.close(fd)

    def retire_if_spooled(self, spooled_offset: Callable[[str], Optional[int]]) -> bool:
        """Delete the open segment if the shipper has spooled all of it into its main file, not only its WAL
        (`spooled_offset(name)`: the folded offset), so the journal keeps no copy of a record once the spool
        holds it for good; the next record starts a new segment. A segment already closed (after a failed
        write, or closed early below) and still the newest is deleted here too: the reader waits for a newer one."""
        with self._lock:
            if not self.path or self.pid != os.getpid() or (self._fd is None and not os.path.exists(self.path)):
                return False
            offset = spooled_offset(os.path.basename(self.path))
            if offset is None or offset < self.size:
                if self._fd is not None and offset is not None and offset >= self._segment_bytes // _ROTATE_SHARE:
                    self._abandon_segment()  # the next record starts a new segment; the reader deletes this one
                return False
            self._abandon_segment()
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path)
            return True

    def close(self) -> None:
        """Close the open segment (in a forked child: forget the parent's without touching it)."""
        if self.pid != os.getpid():
            self._fd = None
            return
        with self._lock:
            self._abandon_segment()


@dataclasses.dataclass
class Chunk:
    """What one read of a segment found: its intact records, where the next read starts, the damaged
    bytes it skipped, and whether it reached the end of the file."""

    rows: List[Tuple[str, bytes, float]]
    end: int
    damaged_bytes: int = 0
    at_eof: bool = False


def read_frames(path: str, offset: int, limit_bytes: int, finished: bool) -> Chunk:
    """Parse the frames of segment `path` from `offset`, about `limit_bytes` of them.

    An incomplete frame at the end of a segment still being written is a write in progress: the read
    stops before it. In a `finished` segment (its writer is gone or moved on) it is a torn last write,
    and bad bytes anywhere are damage: the reader skips to the next good frame and reports the bytes.
    """
    with open(path, "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        f.seek(offset)
        data = f.read(limit_bytes)
        rows: List[Tuple[str, bytes, float]] = []
        position = damaged = 0
        while position < len(data):
            header_end = position + _HEADER.size
            if header_end > len(data):
                length = None  # not even the header is here
            else:
                magic, version, kind, length, crc, spooled_at = _HEADER.unpack_from(data, position)
                if magic != _MAGIC or version != _FORMAT or kind not in KIND_NAMES or length > MAX_PAYLOAD:
                    damaged, position = _skip_damage(data, position, damaged)
                    continue
                if header_end + length <= len(data):
                    payload = data[header_end:header_end + length]
                    if zlib.crc32(_CHECKED.pack(spooled_at) + payload) != crc:
                        damaged, position = _skip_damage(data, position, damaged)
                        continue
                    rows.append((KIND_NAMES[kind], payload, spooled_at))
                    position = header_end + length
                    continue
            # the frame at `position` is incomplete in what was read
            if offset + len(data) < file_size:  # the file goes on: read further
                if rows or damaged:
                    break  # return what we have; the next read starts at this frame
                data += f.read((length or 0) + _HEADER.size)
                continue
            if finished:  # the file ends in the middle of a frame: a torn last write
                return Chunk(rows, offset + len(data), damaged + len(data) - position, at_eof=True)
            return Chunk(rows, offset + position, damaged, at_eof=True)  # being written right now
    return Chunk(rows, offset + position, damaged, at_eof=offset + position >= file_size)


def _skip_damage(data: bytes, position: int, damaged: int) -> Tuple[int, int]:
    """Skip from a bad frame at `position` to the next place a frame may start."""
    found = data.find(_MAGIC, position + 1)
    after = len(data) if found < 0 else found
    return damaged + after - position, after


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class JournalReader:
    """Moves records from every segment in a directory into a spool, oldest segment first.

    `writer_alive(slot)` says whether a live process still writes to that slot's newest segment;
    `commit(rows, segment, offset)` must store the rows and the new offset in one transaction, and
    `offsets()` returns what was committed so far ({segment name: offset}). `fold()` makes everything
    committed so far durable in the spool's main file and returns how far that covers each segment: a
    finished segment is deleted only once it is covered to its end, since a commit still in SQLite's
    WAL is lost if SQLite discards the WAL, and the segment is then the records' only other copy.
    """

    def __init__(self, directory: str, writer_alive: Callable[[int], bool],
                 commit: Callable[[List[Tuple[str, bytes, float]], str, int], None],
                 offsets: Callable[[], Dict[str, int]], forget: Callable[[str], None],
                 fold: Callable[[], Dict[str, int]], chunk_bytes: int = 1024 * 1024) -> None:
        self.directory = directory
        self._writer_alive = writer_alive
        self._commit = commit
        self._offsets = offsets
        self._forget = forget
        self._fold = fold
        self._chunk_bytes = self._max_chunk_bytes = chunk_bytes
        self._lock = threading.Lock()  # the flusher's loop and the shipper's close may both ingest
        self.counters: Dict[str, int] = {"journal_records": 0, "journal_damaged_bytes": 0}

    def ingest(self, max_bytes: int = 8 * 1024 * 1024) -> int:
        """One pass over the journals: spool what was appended since the last pass, up to about
        `max_bytes`, and delete segments that are finished and fully spooled. Returns records spooled."""
        with self._lock:
            return self._ingest(max_bytes)

    def _ingest(self, max_bytes: int) -> int:
        offsets = self._offsets()
        folded: Optional[Dict[str, int]] = None  # asked for once per pass, when a segment could go
        moved = 0
        budget = max_bytes
        listed = segments(self.directory)
        for name in set(offsets) - {os.path.basename(path) for _, _, path in listed}:
            self._forget(name)  # its writer deleted it once it was spooled (`retire_if_spooled`)
        newest = {slot: seq for slot, seq, _ in listed}
        for slot, seq, path in listed:
            name = os.path.basename(path)
            finished = seq < newest[slot] or not self._writer_alive(slot)
            offset = offsets.get(name, 0)
            while budget > 0:
                try:
                    chunk = read_frames(path, offset, min(self._chunk_bytes, budget), finished)
                except FileNotFoundError:
                    break
                if chunk.end != offset:
                    try:
                        self._commit(chunk.rows, name, chunk.end)  # damage is counted once skipped for good
                    except Exception:  # a full disk: a smaller commit may fit where this one did not
                        self._chunk_bytes = max(_MIN_CHUNK_BYTES, self._chunk_bytes // 4)
                        raise
                    self._chunk_bytes = min(self._max_chunk_bytes, self._chunk_bytes * 2)
                if chunk.damaged_bytes:
                    self.counters["journal_damaged_bytes"] += chunk.damaged_bytes
                    logger.error("moesiftornado_durable: skipped %d damaged byte(s) in journal %s at offset %d "
                                 "(a torn last write of a killed process, or disk damage)",
                                 chunk.damaged_bytes, path, offset)
                if chunk.end != offset:
                    moved += len(chunk.rows)
                    self.counters["journal_records"] += len(chunk.rows)
                    budget -= chunk.end - offset
                    offset = chunk.end
                if chunk.at_eof or not chunk.rows:
                    break
            if finished and offset >= _size(path):
                folded = self._fold() if folded is None else folded
                if folded.get(name, 0) >= _size(path):  # its records are in the spool's main file
                    _remove(path)
                    self._forget(name)
            if budget <= 0:
                break
        return moved

    def pending_bytes(self) -> int:
        """Bytes appended to the journals and not yet spooled."""
        offsets = self._offsets()
        return sum(max(0, _size(path) - offsets.get(os.path.basename(path), 0))
                   for _, _, path in segments(self.directory))


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return 0


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def first_record(directory: str) -> Optional[bytes]:
    """The stored bytes of the oldest intact record in the journals, if any (for the start-up key check)."""
    for _, _, path in segments(directory):
        with contextlib.suppress(FileNotFoundError):
            rows = read_frames(path, 0, 64 * 1024, finished=False).rows
            if rows:
                return rows[0][1]
    return None


def unspooled_records(directory: str, offsets: Dict[str, int]) -> int:
    """How many intact records the journals hold past the given offsets: what no shipper has spooled yet."""
    count = 0
    for _, _, path in segments(directory):
        with contextlib.suppress(FileNotFoundError):
            count += sum(1 for _ in _records_from(path, offsets.get(os.path.basename(path), 0), finished=False))
    return count


def iter_records(path: str) -> Iterator[Tuple[str, bytes, float]]:
    """Every intact record of one segment (for tools and tests)."""
    return _records_from(path, 0, finished=True)


def _records_from(path: str, offset: int, finished: bool) -> Iterator[Tuple[str, bytes, float]]:
    while True:
        chunk = read_frames(path, offset, 1024 * 1024, finished)
        yield from chunk.rows
        if chunk.at_eof or chunk.end == offset:
            return
        offset = chunk.end
