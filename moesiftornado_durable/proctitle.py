"""Name this process for `ps` and `top`: the shipper shows as ``moesiftornado-durable shipper <SPOOL_DIR>``.

With the optional `setproctitle` package (``pip install moesiftornado-durable[proctitle]``) the whole
command line is replaced; without it, on Linux, only the short name (``/proc/<pid>/comm``, what
``ps -o comm``, ``top`` and ``pkill`` read) is set, through ``prctl(PR_SET_NAME)``. A title never holds
the application id or a key: anyone on the host can read it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger("moesiftornado_durable")

SHORT_NAME = "moesif-shipper"  # the kernel keeps 15 bytes of a process's short name
_PR_SET_NAME = 15


def set_title(title: str, short_name: str = SHORT_NAME) -> bool:
    """Show `title` as this process's command line (with setproctitle) or `short_name` as its name
    (Linux, without); True if either was set. Never raises: a nameless process still works."""
    try:
        import setproctitle
    except ImportError:
        return _set_short_name(short_name)
    try:
        setproctitle.setproctitle(title)
        return True
    except Exception:  # a platform it does not support
        logger.debug("setproctitle failed; setting the short name only", exc_info=True)
        return _set_short_name(short_name)


def _set_short_name(name: str) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode("ascii")[:15]), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def shipper_title(spool_dir: str) -> str:
    """The shipper's title: what it is and which directory it serves (no secret)."""
    return f"moesiftornado-durable shipper {spool_dir}"
