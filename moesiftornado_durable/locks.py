"""Who owns which file in SPOOL_DIR, claimed with an OS file lock held for the life of the owner.

Each app process takes an intake *slot* (``intake-N.lock``) for its journal segments, and one shipper per
directory (a process, or threads of an app process) holds ``shipper.lock`` for ``shipper.db``. Older builds'
SHIPPER 'thread' gave each process a spool ``spool-N.db`` locked through ``spool-N.lock``; the shipper adopts
such files once their owner is gone. The kernel drops a lock when its owner dies, however it dies, so a free
lock means an orphan whose backlog the shipper, a live process or the replay command may adopt. Holding the
lock is also what lets a process drain a file: two drainers never take from the same file at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from typing import Iterator, List, Optional

from . import spooldir

SPOOL_PATTERN = re.compile(r"^spool-(\d+)\.db$")
SHIPPER_SLOT = -1  # the shipper's spool (``shipper.db``, locked through ``shipper.lock``), one per SPOOL_DIR
_JOURNAL_PATTERN = re.compile(r"^intake-\d+-\d+\.jnl[23]?$")


def spool_path(directory: str, slot: int) -> str:
    """The SQLite file of `slot` in `directory`."""
    return os.path.join(directory, "shipper.db" if slot == SHIPPER_SLOT else f"spool-{slot}.db")


def lock_path(directory: str, slot: int, prefix: str = "spool") -> str:
    """The lock file of `slot` in `directory`; prefix 'intake' names an app process's journal slot."""
    return os.path.join(directory, "shipper.lock" if slot == SHIPPER_SLOT else f"{prefix}-{slot}.lock")


def slots(directory: str) -> List[int]:
    """The slots that have a spool file in `directory`, in order; the shipper's comes first, and counts
    as present as soon as a journal exists (whoever holds its lock spools the journals)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    found = sorted(int(m.group(1)) for m in map(SPOOL_PATTERN.match, names) if m)
    if "shipper.db" in names or any(_JOURNAL_PATTERN.match(name) for name in names):
        found.insert(0, SHIPPER_SLOT)
    return found


class SlotLock:
    """An exclusive lock on one slot, held until `release` (or the process's death)."""

    def __init__(self, directory: str, slot: int, fd: int, prefix: str = "spool") -> None:
        self.directory = directory
        self.slot = slot
        self.prefix = prefix
        self._fd: Optional[int] = fd
        self.pid = os.getpid()

    @property
    def spool_path(self) -> str:
        return spool_path(self.directory, self.slot)

    @property
    def held(self) -> bool:
        """True while this process holds the lock (a forked child does not)."""
        return self._fd is not None and self.pid == os.getpid()

    def intact(self) -> bool:
        """True while the lock file at our path is the file we lock; False once it (or SPOOL_DIR) was
        deleted or replaced: our `flock` then guards nothing, and another process may take the slot."""
        if not self.held:
            return False
        assert self._fd is not None
        try:
            there = os.stat(lock_path(self.directory, self.slot, self.prefix))
        except OSError:  # FileNotFoundError, NotADirectoryError: the directory is gone
            return False
        mine = os.fstat(self._fd)
        return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)

    def release(self) -> None:
        """Give the slot up; idempotent. In a forked child this only closes the child's copy of the fd."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self.pid == os.getpid():
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __repr__(self) -> str:
        return f"SlotLock({self.directory!r}, slot={self.slot}, held={self.held})"


def try_lock(directory: str, slot: int, prefix: str = "spool") -> Optional[SlotLock]:
    """Take `slot` if no live process holds it; None if one does. Records our pid in the lock file."""
    fd = spooldir.open_file(lock_path(directory, slot, prefix))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode("ascii"))
    return SlotLock(directory, slot, fd, prefix)


def lock_free_slot(directory: str, prefix: str = "spool") -> SlotLock:
    """Take the lowest slot no live process holds, creating a new one if all are taken. Journal slots
    (prefix 'intake') are a namespace of their own, so a journal never keeps a spool file from adoption."""
    taken = set(slots(directory))
    slot = 0
    while True:
        lock = try_lock(directory, slot, prefix)
        if lock is not None:
            return lock
        slot += 1
        if slot > max(taken, default=0) + 1024:  # a bound that no real deployment reaches
            raise RuntimeError(f"no free spool slot in {directory}")


def orphans(directory: str, exclude: int = -1) -> Iterator[SlotLock]:
    """Lock, one at a time, every slot whose owner is gone; the caller must `release` each one it gets."""
    for slot in slots(directory):
        if slot == exclude:
            continue
        lock = try_lock(directory, slot)
        if lock is not None:
            yield lock


def owner(directory: str, slot: int, prefix: str = "spool") -> tuple:
    """(pid recorded in the lock file or None, whether a live process holds the lock). Changes nothing."""
    try:
        fd = spooldir.open_file(lock_path(directory, slot, prefix), os.O_RDONLY, create=False)
    except FileNotFoundError:
        return None, False
    try:
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        pid = int(text) if text.isdigit() else None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return pid, True
    finally:
        os.close(fd)  # closing drops the shared lock we may have taken
    return pid, False
