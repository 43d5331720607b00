"""The intake journal: how `log_event` makes a record durable with one `write()`, off the SQLite path.

Each app process appends its records to its own segment files, ``intake-<slot>-<seq>.jnl3`` in SPOOL_DIR
(the slot is the one `locks` gave the process, so the slot lock also says whether the writer lives).
A record is one frame, written with a single ``os.write``: once it returns, the bytes are in the page
cache and survive a crash of the process. A power cut is bounded by the writer's syncer thread, never
by the IOLoop: it ``fdatasync``s the open segment (and fsyncs SPOOL_DIR after a new segment's name
appeared) `SYNC_INTERVAL` after the oldest record not yet synced was written (SPOOL_SYNC 'normal'), as
soon as records wait ('full'), or as soon as someone waits for them (`JournalWriter.on_synced`: the audit
mode's held responses, once per IOLoop iteration). One sync covers every record appended before it
started (a group commit), and the next one starts the moment it ends if records wait for it.

The shipper (`JournalReader`) reads the frames into the spool in group commits. How far it got in a
segment is stored in the spool, in the same transaction as the records, so a crash at any point neither
loses nor duplicates a record. A frame's header and its payload each carry a CRC-32: a torn last write
(the process died in the middle of ``write``) or damaged bytes are detected, counted and skipped, never
spooled, and the reader resynchronises on the next intact frame. A segment with damage before intact
frames is kept aside as ``<segment>.damaged`` (a hard link, so nothing is copied) instead of deleted.

Frame (format 2): magic ``MJ``, format byte 2, kind byte, payload length (u32), spooled_at (f64),
CRC-32 of the payload (u32), CRC-32 of these 20 header bytes (u32), then the payload (the record as the
spool stores it: JSON, or a Fernet token). Format 1 (what earlier builds wrote: magic, format 1, kind, length,
CRC-32 of spooled_at + payload, spooled_at; no header check), in ``.jnl`` segments, is still read, so
segments left on disk by an older build are spooled after an upgrade; the new name keeps format-2
segments away from an older build's shipper (during a rolling upgrade), which would take them for damage.
Segments are named ``.jnl3`` since they may hold `kinds.CAPTURE` records (a request's raw parts, which the
shipper builds into events): a shipper of a build that wrote ``.jnl2`` would take that kind for damage, so it
leaves them to a shipper of this build; ``.jnl2`` segments (no such records) are still read.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import errno
import logging
import os
import re
import shutil
import struct
import threading
import time
import zlib
from typing import Callable, Deque, Dict, List, Optional, Tuple

from . import spooldir
from .errors import SpoolUnavailableError
from .kinds import CAPTURE, COMPANY, EVENT, SUBSCRIPTION, USER

logger = logging.getLogger("moesiftornado_durable")

INTAKE = "intake"  # the lock-file prefix of journal slots: intake-<slot>.lock
SEGMENT_PATTERN = re.compile(r"^intake-(\d+)-(\d+)\.jnl[23]?$")  # .jnl: format 1, .jnl2: no capture records
SYNC_INTERVAL = 0.05  # seconds: a round starts this long after the oldest unsynced record was written, at the latest
SYNC_WINDOW = 0.2  # seconds: what SPOOL_SYNC 'normal' promises; a round that ends later than this is counted late
RESCUE_LATE = 0.07  # seconds: an append finding the syncer this late (past SYNC_INTERVAL) syncs in its place
STALL = 0.1  # seconds: a journal write() or fdatasync held longer is a stall of the file system, counted and logged
_STALL_TICK = 0.05  # seconds between two looks of the stall watch
_STALL_LOG_INTERVAL = 1.0  # seconds: a stall is logged once it passes STALL, or past this if one was just logged
SYNC_MODES = ("normal", "full", "audit")  # 'full' syncs as soon as records wait; 'audit' when a response waits
_LATE_LOG_INTERVAL = 60.0  # seconds between two warnings about late rounds
SEGMENT_BYTES = 4 * 1024 * 1024  # a writer starts a new segment past this; the reader deletes ingested ones
DAMAGED_SUFFIX = ".damaged"  # a segment with damage before intact frames is kept as <segment>.damaged
_ROTATE_SHARE = 16  # ... or once 1/16 of it is in the spool: a record is not kept twice for long (a tight disk)
_MIN_CHUNK_BYTES = 16 * 1024  # the reader's smallest commit, after commits failed (a full disk)
_CHUNK_SHARE_OF_FREE_SPACE = 16  # ... and at most 1/16 of the free space: the spool must keep room to fold its WAL
FREE_FLOOR = 1024 * 1024  # bytes of the disk the journals leave to the spool (`JournalWriter._check_room`)
_ROOM_CHECK_BYTES = 64 * 1024  # with room to spare, a writer looks at the free space once per this many bytes
_MAGIC = b"MJ"
_FORMAT = 2
_HEADER = struct.Struct("<2sBBIdI")  # magic, format 2, kind, payload length, spooled_at, crc32(payload)
_HEADER_CRC = struct.Struct("<I")  # crc32 of the header above: a damaged length is caught before it is used
_FRAME_START = _HEADER.size + _HEADER_CRC.size
_HEADER_V1 = struct.Struct("<2sBBIId")  # format 1: magic, 1, kind, length, crc32(spooled_at + payload), spooled_at
_CHECKED_V1 = struct.Struct("<d")
_PREFIXES = (_MAGIC + b"\x01", _MAGIC + b"\x02")  # what a frame of a known format starts with
MAX_PAYLOAD = 64 * 1024 * 1024  # a length beyond this is damage, not a record
KIND_CODES = {EVENT: 1, USER: 2, COMPANY: 3, SUBSCRIPTION: 4, CAPTURE: 5}  # the kind byte of a frame
KIND_NAMES = {code: name for name, code in KIND_CODES.items()}


def segment_name(slot: int, seq: int) -> str:
    return f"intake-{slot}-{seq:08d}.jnl3"


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
    """One record as the journal stores it (format 2)."""
    header = _HEADER.pack(_MAGIC, _FORMAT, KIND_CODES[kind], len(payload), spooled_at, zlib.crc32(payload))
    return header + _HEADER_CRC.pack(zlib.crc32(header)) + payload


def frame_v1(kind: str, payload: bytes, spooled_at: float) -> bytes:
    """One record in format 1, as earlier builds wrote it (no header check); for tests and tools."""
    checked = _CHECKED_V1.pack(spooled_at) + payload
    return _HEADER_V1.pack(_MAGIC, 1, KIND_CODES[kind], len(payload), zlib.crc32(checked), spooled_at) + payload


class JournalWriter:
    """Appends records to this process's segments of one slot. `append` runs on one thread (the IOLoop's;
    user updates may come from others, hence the lock) and raises OSError on a failed write (disk full),
    losing nothing already written.

    The syncer thread (started with the first append) makes the records durable against a power cut,
    off the request path: each round takes every descriptor written since the last round, fsyncs the
    directory if a segment was created, then ``fdatasync``s them; a descriptor the writer is done with
    (a full segment, a deleted one, `close`) is closed only after that sync, so a rotation never leaves
    unsynced bytes behind. A round is due `sync_interval` after the oldest record it will cover was
    written (a deadline from the record's time, not from when the syncer woke), at once in 'full' mode
    or when `on_synced` waits. A machine too busy to run the syncer thread in time (it needs a core and
    the GIL) does not stretch the window: an append that finds the oldest waiting record `RESCUE_LATE`
    past its deadline runs the round itself (`rescues`), an ``fdatasync`` on the caller's thread that
    only such a machine pays; if the syncer's own round is under way but stuck before its sync (the
    thread descheduled after it took its records), the append syncs the open segment through a duplicate
    descriptor without taking the round, so the records it covers are durable while the syncer's
    bookkeeping waits for its own round (not while the round is inside its ``fdatasync``: a second sync
    waits for the same disk, and would only hold the IOLoop). A failed sync is counted (`sync_failures`), logged,
    and reported to `on_synced` callbacks as False; a round that ends more than `SYNC_WINDOW` after its
    oldest record (a machine too busy, or a slow disk) is counted (`late_syncs`) and logged (once a
    minute, and whenever it is the latest so far). A file system that holds a ``write()`` or an
    ``fdatasync`` (a FUSE daemon busy with another file's fsync, a congested disk) holds the records
    written before it: nothing can make them durable until it returns (on FUSE, not even another sync),
    so a power cut during such a stall may take more than the window. A watch thread reports each stall
    past `STALL` while it lasts (`stalls`, a WARNING with its start, and one when it returns), so a cut
    in the middle of one leaves a trace.

    A segment deleted under the writer (SPOOL_DIR removed while the app runs) would swallow every later
    write unseen, so each append checks the open file's link count (one ``fstat``); on a deleted segment
    the writer recreates SPOOL_DIR, takes a slot again through `reclaim_slot` (the lock went with the
    directory; without one the shipper would take the new segment for a dead writer's), starts a fresh
    segment and writes the record again there. `append` raises `SpoolUnavailableError` if it cannot.
    """

    def __init__(self, directory: str, slot: int, sync: str = "normal", segment_bytes: int = SEGMENT_BYTES,
                 reclaim_slot: Optional[Callable[[], int]] = None, sync_interval: float = SYNC_INTERVAL) -> None:
        if sync not in SYNC_MODES:
            raise ValueError(f"sync must be one of {SYNC_MODES}, not {sync!r}")
        self.directory = directory
        self.slot = slot
        self._eager = sync == "full"  # a round as soon as records wait, nobody waiting for them
        self._sync_interval = sync_interval
        self._rescue_after = sync_interval + RESCUE_LATE
        self._segment_bytes = segment_bytes
        self._reclaim_slot = reclaim_slot
        self._fd: Optional[int] = None
        self._lock = threading.Lock()  # uncontended on the IOLoop; user updates may come from other threads
        self._changed = threading.Condition(self._lock)  # wakes the syncer
        self._appended = 0  # records appended so far
        self._synced = 0  # records known to be on stable storage (or whose sync failed)
        self._to_sync: List[int] = []  # descriptors written since the last sync round, the open one included
        self._oldest = 0.0  # monotonic time of the first record written since the last round began
        self._to_close: List[int] = []  # descriptors the writer is done with: closed after their sync
        self._directory_dirty = False  # a segment was created since the last directory fsync
        self._waiters: List[Tuple[int, Callable[[bool], None]]] = []
        self._failed: Deque[Tuple[int, int]] = collections.deque(maxlen=64)  # (after, through) of failed rounds
        self._syncer: Optional[threading.Thread] = None
        self._closing = False
        self.path = ""
        self.size = 0
        self.recoveries = 0  # how many times the segment or SPOOL_DIR was found deleted and made again
        self.syncs = 0  # sync rounds done
        self.sync_failures = 0  # sync rounds whose fsync failed: their records may not survive a power cut
        self.late_syncs = 0  # rounds that ended more than SYNC_WINDOW after their oldest record was written
        self.rescues = 0  # syncs `append` ran itself because the syncer thread was RESCUE_LATE late
        self.stalls = 0  # write() or fdatasync calls the file system held longer than STALL
        self._writing_since = self._syncing_since = 0.0  # monotonic start of the call under way; 0.0: none
        self._watch_stop = threading.Event()
        self._in_round = False  # a round (the syncer's or a rescue) is between taking its records and finishing
        self._rescued_at = 0.0  # monotonic start of the last sync of a stuck round's successor records
        self._late_logged = -_LATE_LOG_INTERVAL
        self._worst_late = 0.0  # the latest round logged so far
        self._room_check_bytes = 0  # bytes to append before the free space is looked at again
        self.pid = os.getpid()

    def append(self, kind: str, payload: bytes, spooled_at: float) -> int:
        """Write one record with one ``write()``; it survives a process crash once this returns, and a
        power cut once the syncer's next round is done. Returns its sequence number (for `on_synced`)."""
        data = frame(kind, payload, spooled_at)
        with self._lock:
            self._check_room(len(data))
            if self._fd is None or self.size >= self._segment_bytes:
                self._start_segment()
            self._write(data)
            assert self._fd is not None
            if os.fstat(self._fd).st_nlink == 0:  # the segment was deleted: this record went nowhere
                self._recover(f"journal segment {self.path} was deleted")
                self._write(data)
            self._appended += 1
            sequence = self._appended
            first = not self._to_sync  # the first record since the last sync round
            if first:
                self._oldest = time.monotonic()
            if first or self._to_sync[-1] != self._fd:
                self._to_sync.append(self._fd)
            rescue = stuck = None
            if self._syncer is None:
                self._start_syncer()
            elif first or self._eager:
                self._changed.notify()
            if not first and time.monotonic() - max(self._oldest, self._rescued_at) > self._rescue_after:
                self.rescues += 1  # the syncer has not run for too long: this thread syncs instead
                if not self._in_round:
                    rescue = self._take_round()
                elif not self._syncing_since:  # its round is stuck before its sync: sync what came after it
                    self._rescued_at = time.monotonic()
                    stuck = os.dup(self._fd)
        if rescue is not None:
            self._do_round(*rescue, [])
        elif stuck is not None:
            try:
                self._sync([stuck], directory_dirty=True)  # the round may have taken a new segment's name
            finally:
                _close(stuck)
        return sequence

    def on_synced(self, sequence: int, callback: Callable[[bool], None]) -> None:
        """Call `callback(ok)` once record `sequence` (from `append`; 0: none) and those before it went
        through a sync: ok if the sync that covered it succeeded, False if it failed (or the writer closed
        first). It runs on the syncer thread, or at once on this thread when that sync is already done."""
        with self._lock:
            if sequence <= self._synced:
                ok = not any(start < sequence <= end for start, end in self._failed)
            elif self._closing or self.pid != os.getpid():
                ok = False
            else:
                self._waiters.append((sequence, callback))
                self._changed.notify()
                return
        callback(ok)

    def _check_room(self, size: int) -> None:
        """Refuse a record that would eat into the FREE_FLOOR left to the spool, as a full disk would
        (ENOSPC: counted and logged by the caller). Journal records past it could not be spooled: ingesting,
        folding the WAL and deleting delivered records all need room, and a spool without it stops for good.
        The free space is looked at once per `_ROOM_CHECK_BYTES` appended, and at each record near the floor."""
        self._room_check_bytes -= size
        if self._room_check_bytes > 0:
            return
        free = spooldir.reported_free_bytes(self.directory)
        if free is None:  # the file system does not say: no floor, look again later
            self._room_check_bytes = _ROOM_CHECK_BYTES
            return
        spare = free - FREE_FLOOR - size
        if spare < 0:
            raise OSError(errno.ENOSPC, f"the journals leave the last {FREE_FLOOR} bytes of the disk of "
                          f"{self.directory} to the spool")
        self._room_check_bytes = min(_ROOM_CHECK_BYTES, spare // 4)

    def _write(self, data: bytes) -> None:
        fd = self._fd
        assert fd is not None
        self._writing_since = time.monotonic()
        try:
            written = os.write(fd, data)
            while written < len(data):  # a short write: only on a nearly full disk or a signal
                written += os.write(fd, data[written:])
        except OSError:
            self._abandon_segment()  # its tail may be torn: the next record starts a clean segment
            raise
        finally:
            self._writing_since = 0.0
        self.size += len(data)

    def _start_segment(self) -> None:
        try:
            self._next_segment()
        except OSError:
            if os.path.isdir(self.directory):
                raise  # a full disk, say: the caller counts it
            self._recover(f"SPOOL_DIR {self.directory} was deleted")

    def _recover(self, what: str) -> None:
        """Make SPOOL_DIR (0700), a slot lock and a segment again after `what` happened under the app."""
        self._abandon_segment()
        try:
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            if self._reclaim_slot is not None:
                self.slot = self._reclaim_slot()
            self._next_segment()
        except OSError as exc:
            raise SpoolUnavailableError(f"{what} while the app ran, and could not be made again: {exc}") from exc
        self.recoveries += 1
        logger.error("moesiftornado_durable: %s while the app ran; recreated it and continue in %s. Records "
                     "not yet delivered before the deletion were deleted with it; none written since is lost",
                     what, self.path)

    def _next_segment(self) -> int:
        self._abandon_segment()
        taken = [seq for slot, seq, _ in segments(self.directory) if slot == self.slot]
        # from the clock, so a name is never used twice (the spool may still hold a deleted segment's offset)
        seq = max(max(taken, default=0) + 1, time.time_ns() // 1000)
        self.path = os.path.join(self.directory, segment_name(self.slot, seq))
        self._fd = spooldir.open_file(self.path, os.O_WRONLY | os.O_APPEND, new=True)
        self.size = 0
        self._directory_dirty = True  # the syncer fsyncs SPOOL_DIR before it counts the new records synced
        return self._fd

    def _abandon_segment(self) -> None:
        """Stop writing to the open segment. Its descriptor is closed by the syncer once synced (or here,
        without a syncer: nothing of it waits for one)."""
        fd, self._fd = self._fd, None
        if fd is None or self.pid != os.getpid():
            return
        if self._syncer is not None:  # it may be syncing this descriptor right now
            self._to_close.append(fd)
            self._changed.notify()
        else:
            _close(fd)

    def _start_syncer(self) -> None:
        self._syncer = threading.Thread(target=self._sync_loop, daemon=True, name="moesif-durable-journal-sync")
        self._syncer.start()
        threading.Thread(target=self._watch_stalls, daemon=True, name="moesif-durable-journal-watch").start()

    def _watch_stalls(self) -> None:
        """The watch thread: count and report a write() or fdatasync the file system holds past `STALL`, while it
        is held (neither the syncer nor the IOLoop can: each may be the one held), and when it returns. It reads
        two timestamps the callers set around those calls, without a lock. A stall within `_STALL_LOG_INTERVAL`
        of the last one logged is logged only if it lasts that long (a file system stalling over and over)."""
        counted = {"write": 0.0, "fdatasync": 0.0}  # per kind, the start of the held call counted; 0.0: none
        logged = {"write": False, "fdatasync": False}
        logged_at = -_STALL_LOG_INTERVAL
        while not self._watch_stop.wait(_STALL_TICK):
            now = time.monotonic()
            for call, since in (("write", self._writing_since), ("fdatasync", self._syncing_since)):
                if counted[call] and since != counted[call]:  # the held call returned
                    if logged[call]:
                        logger.warning("moesiftornado_durable: the held journal %s returned after %.0f ms or more "
                                       "(pid %d)", call, (now - counted[call]) * 1000, os.getpid())
                    counted[call], logged[call] = 0.0, False
                held = now - since if since else 0.0
                if held <= STALL:
                    continue
                if since != counted[call]:
                    counted[call] = since
                    self.stalls += 1
                if logged[call] or (held < _STALL_LOG_INTERVAL and now - logged_at < _STALL_LOG_INTERVAL):
                    continue
                logged[call], logged_at = True, now
                logger.warning("moesiftornado_durable: the file system has held a journal %s for %.0f ms (pid %d, "
                               "since %s): the records written before it are not durable until it returns, so a "
                               "power cut now may take more than the %.0f ms window; stalls so far: %d", call,
                               held * 1000, os.getpid(), _wall_clock(time.time() - held), SYNC_WINDOW * 1000,
                               self.stalls)

    def _sync_loop(self) -> None:
        """The syncer thread: a round whenever one is due (`_wait_for_round`); exits on `close` once
        nothing is left to sync."""
        while True:
            with self._lock:
                self._wait_for_round()
                if self._closing and not (self._to_sync or self._to_close):
                    return
                taken = self._take_round()
                to_close, self._to_close = self._to_close, []
            self._do_round(*taken, to_close)

    def _take_round(self) -> Tuple[int, float, List[int], bool]:
        """Under the lock, with no round under way: take the records waiting for a round (through which
        sequence, the oldest one's time, their descriptors, whether SPOOL_DIR needs an fsync). `append`
        lists the open descriptor again when it writes again."""
        taken = (self._appended, self._oldest, self._to_sync, self._directory_dirty)
        self._to_sync, self._directory_dirty, self._in_round = [], False, True
        return taken

    def _do_round(self, target: int, oldest: float, to_sync: List[int], directory_dirty: bool,
                  to_close: List[int]) -> None:
        """Sync what `_take_round` took, close `to_close` (never in a rescue: a descriptor is closed only
        by the syncer, after its sync), and tell the waiters it covered."""
        started = time.monotonic()
        ok = self._sync(to_sync, directory_dirty)
        for fd in to_close:
            _close(fd)
        if to_sync:
            self._check_late(started - oldest, time.monotonic() - started)
        with self._lock:
            self._in_round = False
            self._changed.notify()  # the syncer waits while a rescue's round is under way
            if not ok:
                self._failed.append((self._synced, target))
            self._synced = max(self._synced, target)
            if len(self._waiters) == 1 and self._waiters[0][0] <= target:  # the usual case: one group waits
                done, self._waiters = [self._waiters[0][1]], []
            else:
                done = [callback for wanted, callback in self._waiters if wanted <= target]
                self._waiters = [(wanted, callback) for wanted, callback in self._waiters if wanted > target]
        for callback in done:
            _call(callback, ok)

    def _wait_for_round(self) -> None:
        """Under the lock: return once a round is due: records wait and someone waits for them (`on_synced`),
        or the mode is 'full', or `sync_interval` has passed since the oldest of them was written; or
        only descriptors wait to be closed; or the writer closes. Never while a rescue's round is under way."""
        while self._in_round or not self._closing:
            if self._in_round:
                self._changed.wait()
            elif self._to_sync:
                if self._eager or self._waiters:
                    return
                remaining = self._oldest + self._sync_interval - time.monotonic()
                if remaining <= 0:
                    return
                self._changed.wait(remaining)
            elif self._to_close:
                return
            else:
                self._changed.wait()

    def _check_late(self, waited: float, took: float) -> None:
        """Count (and log, at most once a minute or when it is the latest yet) a round that made its oldest
        record durable later than SPOOL_SYNC 'normal' promises: it started `waited` seconds after the record
        was written (the interval, and a busy machine's delay in running this thread) and its syncs took
        `took` seconds (the disk)."""
        age = waited + took
        if age <= SYNC_WINDOW:
            return
        self.late_syncs += 1
        now = time.monotonic()
        if now - self._late_logged >= _LATE_LOG_INTERVAL or age > self._worst_late:
            self._late_logged, self._worst_late = now, max(age, self._worst_late)
            logger.warning("moesiftornado_durable: a journal sync made records durable %.0f ms after they were "
                           "written, later than the %.0f ms a power cut may take: it started after %.0f ms (the "
                           "interval is %.0f ms; more means a machine too busy to run the syncer thread) and the "
                           "fdatasync took %.0f ms (the disk); late syncs so far: %d", age * 1000, SYNC_WINDOW * 1000,
                           waited * 1000, self._sync_interval * 1000, took * 1000, self.late_syncs)

    def _sync(self, descriptors: List[int], directory_dirty: bool) -> bool:
        self._syncing_since = time.monotonic()
        try:
            if directory_dirty:
                spooldir.fsync_directory(self.directory)  # a new segment's name, before the records in it count
            for fd in descriptors:
                os.fdatasync(fd)
        except OSError as exc:
            self.sync_failures += 1
            logger.error("moesiftornado_durable: could not sync journal %s (%s): the records written since the "
                         "last sync may not survive a power cut; sync failures so far: %d", self.path, exc,
                         self.sync_failures)
            return False
        finally:
            self._syncing_since = 0.0
        self.syncs += 1
        return True

    def retire_if_spooled(self, spooled_offset: Callable[[str], Optional[int]]) -> bool:
        """Delete the open segment if the shipper has spooled all of it into its main file, not only its WAL
        (`spooled_offset(name)`: the folded offset), so the journal keeps no copy of a record once the spool
        holds it for good; the next record starts a new segment. A segment already closed (after a failed
        write, or closed early below) and still the newest is deleted here too: the reader waits for a newer one.
        `spooled_offset` runs without the writer's lock: appends and syncs go on meanwhile."""
        with self._lock:
            if not self.path or self.pid != os.getpid() or (self._fd is None and not os.path.exists(self.path)):
                return False
            path = self.path
        # a read of the spool, slow on a busy machine: never under the lock the IOLoop's appends and the syncer take
        offset = spooled_offset(os.path.basename(path))
        with self._lock:
            if self.path != path:
                return False  # the writer moved on to a new segment meanwhile
            if offset is None or offset < self.size:
                if self._fd is not None and offset is not None and offset >= self._segment_bytes // _ROTATE_SHARE:
                    self._abandon_segment()  # the next record starts a new segment; the reader deletes this one
                return False
            self._abandon_segment()
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Sync and close the open segment, waiting up to `timeout` for the syncer (in a forked child:
        forget the parent's segment and syncer without touching them)."""
        if self.pid != os.getpid():
            self._fd = None
            self._syncer = None
            return
        with self._lock:
            self._abandon_segment()
            self._closing = True
            self._changed.notify()
            syncer = self._syncer
        if syncer is not None:
            syncer.join(timeout)
        self._watch_stop.set()
        with self._lock:
            waiters, self._waiters = self._waiters, []
        for _, callback in waiters:
            _call(callback, False)


def _wall_clock(at: float) -> str:
    """`at` (seconds since the epoch) as UTC with milliseconds, as the stall warnings give it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z"


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):  # closing after a failed write may fail the same way
        os.close(fd)


def _call(callback: Callable[[bool], None], ok: bool) -> None:
    try:
        callback(ok)
    except Exception:
        logger.exception("moesiftornado_durable: a journal sync callback failed")


@dataclasses.dataclass
class Chunk:
    """What one read of a segment found: its intact records, where the next read starts, the damaged
    bytes it skipped (`torn_bytes` of them a torn last write at the end of a finished segment, the rest
    damage with intact frames after it), and whether it reached the end of the file."""

    rows: List[Tuple[str, bytes, float]]
    end: int
    damaged_bytes: int = 0
    at_eof: bool = False
    torn_bytes: int = 0


_OK, _SHORT, _BAD = "ok", "short", "bad"


def read_frames(path: str, offset: int, limit_bytes: int, finished: bool) -> Chunk:
    """Parse the frames of segment `path` from `offset`, about `limit_bytes` of them.

    An incomplete frame at the end of a segment still being written is a write in progress: the read
    stops before it. In a `finished` segment (its writer is gone or moved on) it is damage. Bad bytes are
    skipped up to the next intact frame (resynchronisation) and reported; damage that reaches the end of
    a finished segment, with no intact frame after it, is its torn last write (`Chunk.torn_bytes`).
    """
    with os.fdopen(spooldir.open_file(path, os.O_RDONLY, create=False), "rb") as f:
        file_size = os.fstat(f.fileno()).st_size
        f.seek(offset)
        data = f.read(limit_bytes)
        rows: List[Tuple[str, bytes, float]] = []
        position = damaged = 0
        damage_start: Optional[int] = None  # where the damage since the last intact frame began
        while position < len(data):
            status, end, row = _frame_at(data, position)
            if status is _OK:
                assert row is not None
                rows.append(row)
                position, damage_start = end, None
                continue
            if status is _SHORT:  # the frame at `position` is incomplete in what was read
                if offset + len(data) < file_size:  # the file goes on: read further
                    if rows or damaged:
                        break  # return what we have; the next read starts at this frame
                    more = f.read(end - (len(data) - position))
                    if not more:  # the file was truncated since: what was read is all there is
                        file_size = offset + len(data)
                    data += more
                    continue
                if not finished:
                    return Chunk(rows, offset + position, damaged, at_eof=True)  # being written right now
                # in a finished segment a frame cut by the end of the file is damage, like a bad one
            if damage_start is None:
                damage_start = position
            after = _resync(data, position + 1)
            damaged += after - position
            position = after
    at_eof = offset + position >= file_size
    torn = len(data) - damage_start if finished and at_eof and damage_start is not None else 0
    return Chunk(rows, offset + position, damaged, at_eof, torn)


def count_records(path: str, offset: int, chunk_bytes: int = 1024 * 1024) -> int:
    """How many intact records segment `path` holds from `offset` on; reads only (`replay --dry-run`)."""
    count = 0
    while True:
        try:
            chunk = read_frames(path, offset, chunk_bytes, finished=False)
        except FileNotFoundError:  # spooled and deleted while we looked
            return count
        count += len(chunk.rows)
        if chunk.at_eof or chunk.end == offset:
            return count
        offset = chunk.end


def _frame_at(data: bytes, position: int) -> Tuple[str, int, Optional[Tuple[str, bytes, float]]]:
    """The frame at `position`: (_OK, its end, the record), (_SHORT, bytes it needs from `position`, None)
    when `data` ends inside it, or (_BAD, 0, None) when no intact frame starts there."""
    prefix = data[position:position + 3]
    if not any(known.startswith(prefix) for known in _PREFIXES):
        return _BAD, 0, None
    if len(prefix) < 3:
        return _SHORT, _FRAME_START, None
    if prefix[2] == 1:
        return _frame_v1_at(data, position)
    header_end = position + _FRAME_START
    if header_end > len(data):
        return _SHORT, _FRAME_START, None
    _, _, kind, length, spooled_at, payload_crc = _HEADER.unpack_from(data, position)
    (header_crc,) = _HEADER_CRC.unpack_from(data, position + _HEADER.size)
    if zlib.crc32(data[position:position + _HEADER.size]) != header_crc or kind not in KIND_NAMES \
            or length > MAX_PAYLOAD:
        return _BAD, 0, None
    if header_end + length > len(data):
        return _SHORT, _FRAME_START + length, None
    payload = data[header_end:header_end + length]
    if zlib.crc32(payload) != payload_crc:
        return _BAD, 0, None
    return _OK, header_end + length, (KIND_NAMES[kind], payload, spooled_at)


def _frame_v1_at(data: bytes, position: int) -> Tuple[str, int, Optional[Tuple[str, bytes, float]]]:
    """`_frame_at` for a format-1 frame, whose length is unchecked until the payload's CRC is."""
    header_end = position + _HEADER_V1.size
    if header_end > len(data):
        return _SHORT, _HEADER_V1.size, None
    _, _, kind, length, crc, spooled_at = _HEADER_V1.unpack_from(data, position)
    if kind not in KIND_NAMES or length > MAX_PAYLOAD:
        return _BAD, 0, None
    if header_end + length > len(data):
        return _SHORT, _HEADER_V1.size + length, None
    payload = data[header_end:header_end + length]
    if zlib.crc32(_CHECKED_V1.pack(spooled_at) + payload) != crc:
        return _BAD, 0, None
    return _OK, header_end + length, (KIND_NAMES[kind], payload, spooled_at)


def _resync(data: bytes, start: int) -> int:
    """The first position from `start` where an intact frame starts, or one that `data` cuts short (the
    next read completes it); len(data) if there is none."""
    position = start
    while True:
        found = data.find(_MAGIC, position)
        if found < 0:  # a magic's first byte at the very end may start a frame the next read completes
            return len(data) - 1 if len(data) - 1 >= start and data.endswith(_MAGIC[:1]) else len(data)
        if _frame_at(data, found)[0] is not _BAD:
            return found
        position = found + 1


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
        self.counters: Dict[str, int] = {"journal_records": 0, "journal_damaged_bytes": 0,
                                         "journal_damaged_segments": 0}

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
                    chunk = read_frames(path, offset, min(self._chunk_bytes, budget, self._room()), finished)
                except FileNotFoundError:
                    break
                progressed = chunk.end != offset  # past records, or past damage only
                if chunk.damaged_bytes > chunk.torn_bytes:
                    self._keep_damaged_aside(path)  # before the offset moves past the damage
                if progressed:
                    try:
                        self._commit(chunk.rows, name, chunk.end)
                    except Exception:  # a full disk: a smaller commit may fit where this one did not
                        self._chunk_bytes = max(_MIN_CHUNK_BYTES, self._chunk_bytes // 4)
                        raise
                    self._chunk_bytes = min(self._max_chunk_bytes, self._chunk_bytes * 2)
                if progressed:
                    if chunk.damaged_bytes:
                        self._report_damage(path, offset, chunk)  # once, after the commit that skips it for good
                    moved += len(chunk.rows)
                    self.counters["journal_records"] += len(chunk.rows)
                    budget -= chunk.end - offset
                    offset = chunk.end
                if chunk.at_eof or not progressed:
                    break
            if finished and offset >= file_size(path):
                folded = self._fold() if folded is None else folded
                if folded.get(name, 0) >= file_size(path):  # its records are in the spool's main file
                    _remove(path)
                    self._forget(name)
            if budget <= 0:
                break
        return moved

    def _room(self) -> int:
        """The most one commit may take: a commit needs about twice its bytes (the WAL, then the database
        file), and the spool must keep room to fold its WAL, or it could never write again."""
        free = spooldir.reported_free_bytes(self.directory)
        if free is None:  # the file system does not say
            return self._max_chunk_bytes
        return max(_MIN_CHUNK_BYTES, free // _CHUNK_SHARE_OF_FREE_SPACE)

    def _keep_damaged_aside(self, path: str) -> None:
        """Damage before intact frames is not a torn last write: keep the segment aside (`keep_aside`)
        before the offset moves past the damage, so a crash cannot lose it."""
        if keep_aside(path):
            self.counters["journal_damaged_segments"] += 1

    def _report_damage(self, path: str, offset: int, chunk: Chunk) -> None:
        """Count and log skipped bytes, once they are skipped for good."""
        self.counters["journal_damaged_bytes"] += chunk.damaged_bytes
        inner = chunk.damaged_bytes - chunk.torn_bytes
        if not inner:
            logger.error("moesiftornado_durable: skipped a torn last write of %d byte(s) at the end of journal %s "
                         "(its process was killed in the middle of a write)", chunk.torn_bytes, path)
            return
        logger.error("moesiftornado_durable: skipped %d damaged byte(s) in journal %s after offset %d and read on "
                     "from the next intact record (disk damage?); the segment is kept as %s%s", inner, path, offset,
                     path, DAMAGED_SUFFIX)

def keep_aside(path: str) -> bool:
    """Keep damaged segment `path` as ``<path>.damaged``: a hard link (the same 0600 inode, nothing
    copied), or a 0600 copy where the file system has no hard links. Deleting the segment once it is
    spooled then leaves the damaged bytes for inspection. False if it was kept already (before a restart)."""
    aside = path + DAMAGED_SUFFIX
    try:
        try:
            os.link(path, aside, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError:  # no hard links here (EPERM, ENOTSUP): copy, never following a link
            with os.fdopen(spooldir.open_file(aside, os.O_WRONLY, new=True), "wb") as target:
                try:
                    with os.fdopen(spooldir.open_file(path, os.O_RDONLY, create=False), "rb") as source:
                        shutil.copyfileobj(source, target)
                except BaseException:  # a copy cut short (a full disk) must not pass for one kept
                    os.remove(aside)
                    raise
    except FileExistsError:
        return False
    spooldir.fsync_directory(os.path.dirname(path))  # the name aside is durable before the segment can be deleted
    return True


def damaged_segments(directory: str) -> List[str]:
    """Names of the damaged segments kept aside in `directory` (see `keep_aside`)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(name for name in names if name.endswith(DAMAGED_SUFFIX) and
                  SEGMENT_PATTERN.match(name[:-len(DAMAGED_SUFFIX)]))


def file_size(path: str) -> int:
    """Size of `path`; 0 when it is gone."""
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
