"""Power cuts on LazyFS, for the tests (test_powercut.py) and benchmarks/powercut.py.

LazyFS (github.com/dsrhaslab/lazyfs) is a FUSE file system that keeps written bytes in its own cache until
the file is fsynced, and drops every unsynced byte when ``lazyfs::clear-cache`` is written to its fault
FIFO. A power cut is then: freeze (SIGSTOP) every process with a file open under the mount, clear the
cache, SIGKILL them. What survives is exactly what was synced. LazyFS caches file data only: names
(create, rename, unlink) reach the disk underneath at once, so it cannot show a missing directory fsync.

`unavailable()` says why LazyFS cannot run here (no binary, not root, no /dev/fuse); the binary is
``$LAZYFS``, else ``/tmp/lazyfs-bin/lazyfs`` (where ``../shared/tools/lazyfs/build.sh`` puts it), else
``lazyfs`` on PATH.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Iterable, Iterator, List, Optional

DEFAULT_BINARY = "/tmp/lazyfs-bin/lazyfs"
MOUNT_TIMEOUT = 15.0
CLEAR_TIMEOUT = 30.0


def binary() -> Optional[str]:
    for candidate in (os.environ.get("LAZYFS"), DEFAULT_BINARY, shutil.which("lazyfs")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def unavailable() -> Optional[str]:
    """Why a LazyFS power cut cannot run on this machine, or None if it can."""
    if binary() is None:
        return f"LazyFS is not built (set $LAZYFS, or run ../shared/tools/lazyfs/build.sh to make {DEFAULT_BINARY})"
    if os.geteuid() != 0:
        return "LazyFS needs root here (FUSE with allow_other)"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if shutil.which("fusermount3") is None:
        return "no fusermount3 (apt install fuse3)"
    return None


class LazyFS:
    """A LazyFS mount at `<workdir>/mnt` over `<workdir>/root`, for one `with` block; `cut` is a power cut."""

    def __init__(self, workdir: str, log: Optional[IO[Any]] = None) -> None:
        found = binary()
        if found is None:
            raise RuntimeError(unavailable() or "no LazyFS")
        self.binary = found
        self.root = os.path.join(workdir, "root")
        self.mount = os.path.join(workdir, "mnt")
        self.fifo = os.path.join(workdir, "faults.fifo")
        self.done_fifo = os.path.join(workdir, "faults-done.fifo")
        # not under `workdir`: LazyFS ignores a --config-path that contains "-o" (as "pytest-of-root" does)
        fd, self.config = tempfile.mkstemp(prefix="lazyfs", suffix=".toml")
        os.close(fd)
        self._log = log
        self._process: Optional[subprocess.Popen[bytes]] = None
        self._done: Optional[int] = None
        self.cuts = 0

    def __enter__(self) -> LazyFS:
        os.makedirs(self.root, exist_ok=True)
        os.makedirs(self.mount, exist_ok=True)
        with open(self.config, "w") as f:
            f.write(f'[faults]\nfifo_path="{self.fifo}"\nfifo_path_completed="{self.done_fifo}"\n'
                    '[cache]\napply_eviction=false\n[cache.simple]\ncustom_size="1gb"\nblocks_per_page=1\n'
                    '[filesystem]\nlog_all_operations=false\nlogfile=""\n')
        self._process = subprocess.Popen(
            [self.binary, self.mount, "--config-path", self.config, "-o", "allow_other", "-o", "modules=subdir",
             "-o", f"subdir={self.root}", "-f"],
            stdout=self._log or subprocess.DEVNULL, stderr=self._log or subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while not (os.path.ismount(self.mount) and os.path.exists(self.done_fifo)):
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"LazyFS did not mount {self.mount} (exit status {self._process.poll()})")
                time.sleep(0.05)
            # its fault thread opens this FIFO to write and blocks until a reader has it open: we keep one
            self._done = os.open(self.done_fifo, os.O_RDONLY | os.O_NONBLOCK)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @contextlib.contextmanager
    def stalled(self) -> Iterator[None]:
        """Hold every operation on the mount for the block (LazyFS itself SIGSTOPped): a file system that
        stalls, as a busy FUSE daemon or a congested disk does. Nothing under the mount may be touched
        from the thread that runs the block."""
        assert self._process is not None
        pid = self._process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while not _all_threads_stopped(pid):  # a thread still running may answer one more request
                if time.monotonic() > deadline:
                    raise RuntimeError("LazyFS did not stop")
                time.sleep(0.005)
            yield
        finally:
            os.kill(self._process.pid, signal.SIGCONT)

    def __exit__(self, *exc: Any) -> None:
        if self._process is not None and self._process.poll() is not None:
            print(f"LazyFS exited on its own (status {self._process.returncode})", file=sys.stderr)
        subprocess.run(["fusermount3", "-u", "-z", self.mount], check=False, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30)
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()  # by its PID
                try:
                    self._process.wait(10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait(10)
            self._process = None
        if self._done is not None:
            os.close(self._done)
            self._done = None
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.config)

    def users(self) -> List[int]:
        """PIDs of the processes (other than this one and LazyFS) with a file or directory open under the mount."""
        mine = {os.getpid(), self._process.pid if self._process else -1}
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in mine:
                continue
            with contextlib.suppress(OSError):
                for fd in os.listdir(f"/proc/{entry}/fd"):
                    with contextlib.suppress(OSError):
                        if os.readlink(f"/proc/{entry}/fd/{fd}").startswith(self.mount + os.sep):
                            found.append(int(entry))
                            break
        return sorted(found)

    def cut(self, also: Iterable[int] = ()) -> List[int]:
        """A power cut: SIGSTOP every process using the mount (and the PIDs in `also`), drop LazyFS's unsynced
        data, SIGKILL them. Returns the PIDs killed; their parents must reap them."""
        victims = sorted(set(self.users()) | set(also))
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        victims = sorted(set(victims) | set(self.users()))  # one that opened a file meanwhile (stopped now)
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        self.clear_cache()
        for pid in victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.cuts += 1
        return victims

    def clear_cache(self) -> None:
        """Drop every unsynced byte, and wait until LazyFS says it has."""
        assert self._done is not None
        with open(self.fifo, "w") as fifo:
            fifo.write("lazyfs::clear-cache\n")
        deadline = time.monotonic() + CLEAR_TIMEOUT
        answer = b""
        while b"finished::clear-cache" not in answer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError("LazyFS did not confirm lazyfs::clear-cache")
            readable, _, _ = select.select([self._done], [], [], left)
            if readable:
                with contextlib.suppress(BlockingIOError):
                    got = os.read(self._done, 4096)
                    if not got:  # no writer has the FIFO open right now
                        time.sleep(0.01)
                    answer += got


def _all_threads_stopped(pid: int) -> bool:
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/task/{task}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                return False
    return True
