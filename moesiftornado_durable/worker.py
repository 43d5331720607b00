"""A background thread that belongs to one process: the flusher and the app-config fetcher run on one.

A thread does not survive a fork, and a forked child must not join or trust its parent's: `is_alive`
and `join` answer only in the process that started the thread.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional


class ProcessThread:
    """A named daemon thread, started at most once per process."""

    def __init__(self, name: str, target: Callable[[], None]) -> None:
        self._name = name
        self._target = target
        self._thread: Optional[threading.Thread] = None
        self._pid = 0

    def start(self) -> None:
        """Start the thread unless it already runs in this process."""
        if self.is_alive:
            return
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._target, name=self._name, daemon=True)
        self._thread.start()

    @property
    def is_alive(self) -> bool:
        """True if the thread runs in this process (a thread does not survive a fork)."""
        return self._pid == os.getpid() and self._thread is not None and self._thread.is_alive()

    def join(self, timeout: float) -> None:
        """Wait at most `timeout` seconds for the thread to end; nothing to wait for in a forked child."""
        if self._thread is not None and self._pid == os.getpid():
            self._thread.join(max(0.0, timeout))
