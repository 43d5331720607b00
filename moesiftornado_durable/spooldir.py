"""SPOOL_DIR as a whole: whether it is safe to write in, how its files are opened, and whose it is.

Safety: the directory must be this user's and writable by no one else, or whoever can write it could
plant a symbolic link where a spool file belongs and have the app write through it. Every file in it
is opened through `open_file` (never following a link, created 0600, a single hard link).

Identity: a directory serves one application. ``directory.json`` records a keyed fingerprint of the
APPLICATION_ID (never the id: it is a secret) and the BASE_URI of the first application to use it; an
application with other settings is refused at start, because the shipper would send the waiting
records of one under the account of the other.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import json
import os
import secrets
import stat
import tempfile
from typing import Any, Dict, Optional

from .errors import ConfigError

IDENTITY_FILE = "directory.json"
_IDENTITY_VERSION = 1
_MAX_IDENTITY_BYTES = 4096
# Names of the files this library creates in SPOOL_DIR: a symbolic link at one of them was planted.
_OUR_SUFFIXES = (".lock", ".db", ".db-wal", ".db-shm", ".db-journal", ".db-mark", ".db-reserve", ".jnl", ".jnl2",
                 ".jnl3", ".damaged", ".json", ".tmp")
_OUR_NAMES = ("flush-request", "shipper.sock")  # flush-request: what older builds touched


def open_file(path: str, flags: int = os.O_RDWR, *, create: bool = True, new: bool = False) -> int:
    """Open a file in SPOOL_DIR: never through a symbolic link, created 0600 (exclusively when `new`),
    and refused unless it is a regular file; to write, also unless it has one name (a hard link planted to
    another file is not ours to write; a reader may see two while `claim` links a new file into place).
    Returns the fd; raises OSError (ELOOP for a link)."""
    flags |= os.O_NOFOLLOW | os.O_CLOEXEC
    if create:
        flags |= os.O_CREAT
    if new:
        flags |= os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "a symbolic link where a spool file belongs; refusing to follow it "
                                       "(remove it: SPOOL_DIR must hold only the library's own files)", path) from exc
        raise
    writing = bool(flags & (os.O_WRONLY | os.O_RDWR))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EPERM, "refusing a spool file that is not a regular file (remove it)", path)
        if writing and info.st_nlink != 1:
            raise OSError(errno.EPERM, f"refusing to write a spool file with {info.st_nlink} hard links: it may "
                                       f"be another file's second name (remove it)", path)
        if writing and stat.S_IMODE(info.st_mode) & 0o077:
            os.fchmod(fd, 0o600)  # a file an older version or another tool made readable by others
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str, limit: int = -1) -> bytes:
    """The contents of a file in SPOOL_DIR (at most `limit` bytes), read without following a link."""
    with os.fdopen(open_file(path, os.O_RDONLY, create=False), "rb") as f:
        return f.read(limit)


def refuse_link(path: str) -> None:
    """Raise OSError if `path` is a symbolic link: for files SQLite opens itself (it follows a link at the
    database's own name, though never at its -wal and -shm files)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(path).st_mode):
            raise OSError(errno.ELOOP, "a symbolic link where a spool file belongs; refusing to follow it "
                                       "(remove it: SPOOL_DIR must hold only the library's own files)", path)


def prepare(path: str) -> str:
    """Create SPOOL_DIR (0700) if needed, check it (`check`) and prove it writable; return its real path.
    Raises `ConfigError` naming SPOOL_DIR and the reason."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError("SPOOL_DIR", f"cannot create {path!r}: {exc.strerror or exc}") from exc
    real = check(path)
    try:
        with tempfile.NamedTemporaryFile(dir=real, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ConfigError("SPOOL_DIR", f"cannot write {path!r}: {exc.strerror or exc}") from exc
    return real


def check(path: str) -> str:
    """Refuse a SPOOL_DIR others could plant files in; return its real path (a symlink to the directory,
    say onto another disk, is fine: the directory it resolves to is what is checked and used).

    Refused: a directory owned by another user, one writable by group or others, and one holding a
    symbolic link at the name of a spool file."""
    real = os.path.realpath(path)
    try:
        info = os.lstat(real)
    except OSError as exc:
        raise ConfigError("SPOOL_DIR", f"cannot use {path!r}: {exc.strerror or exc}") from exc
    shown = repr(path) if real == path else f"{path!r} (which is {real!r})"
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError("SPOOL_DIR", f"{shown} is not a directory")
    if info.st_uid != os.geteuid():
        raise ConfigError("SPOOL_DIR", f"{shown} is owned by uid {info.st_uid}, not by this process's user "
                                       f"(uid {os.geteuid()}); it holds your API traffic: use a directory of "
                                       f"your own, or `chown` this one to the app's user")
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ConfigError("SPOOL_DIR", f"{shown} is writable by {_who_writes(info.st_mode)} (mode "
                                       f"{stat.S_IMODE(info.st_mode):04o}): anyone who can write it could plant "
                                       f"a link the app would write through; run `chmod 700 {real}`")
    for name in sorted(os.listdir(real)):
        if (name.endswith(_OUR_SUFFIXES) or name in _OUR_NAMES) and os.path.islink(os.path.join(real, name)):
            raise ConfigError("SPOOL_DIR", f"{shown} holds a symbolic link at {name!r}, where a spool file "
                                           f"belongs; remove it (SPOOL_DIR must hold only the library's own files)")
    return real


def _who_writes(mode: int) -> str:
    return " and ".join(who for who, bit in (("its group", stat.S_IWGRP), ("others", stat.S_IWOTH)) if mode & bit)


# -- identity --------------------------------------------------------------------------------------


def claim(directory: str, application_id: str, base_uri: str) -> None:
    """Bind `directory` to this application (its first user writes ``directory.json``), or raise
    `ConfigError` if it belongs to another: records there would be sent under the wrong account."""
    path = os.path.join(directory, IDENTITY_FILE)
    recorded = _read_identity(path)
    if recorded is None:
        recorded = _write_identity(directory, path, application_id, base_uri)
    same_id = hmac.compare_digest(str(recorded.get("application_id_hmac", "")),
                                  _fingerprint(str(recorded.get("salt", "")), application_id))
    same_uri = recorded.get("base_uri") == base_uri
    if same_id and same_uri:
        return
    differs = "its APPLICATION_ID and BASE_URI differ" if not (same_id or same_uri) else \
        f"its {'BASE_URI' if same_id else 'APPLICATION_ID'} differs"
    raise ConfigError("SPOOL_DIR", f"{directory!r} belongs to another application: {differs} "
                                   f"(the directory's BASE_URI is {recorded.get('base_uri')!r}, this one's "
                                   f"{base_uri!r}). Its waiting records would be sent to the wrong account. Give "
                                   f"each application its own SPOOL_DIR; to move this directory's records to the "
                                   f"new settings on purpose, delete {path!r} first (see SECURITY.md)")


def _fingerprint(salt: str, application_id: str) -> str:
    return hmac.new(salt.encode("ascii"), application_id.encode("utf-8"), hashlib.sha256).hexdigest()


def _read_identity(path: str) -> Optional[Dict[str, Any]]:
    try:
        data = read_bytes(path, _MAX_IDENTITY_BYTES + 1)
    except FileNotFoundError:
        return None  # OSError otherwise: the spool cannot be opened, like any file of SPOOL_DIR
    try:
        recorded = json.loads(data)
        if not isinstance(recorded, dict) or recorded.get("version") != _IDENTITY_VERSION:
            raise ValueError("not a SPOOL_DIR identity")
    except ValueError as exc:
        raise ConfigError("SPOOL_DIR", f"{path!r} is damaged ({exc}); it says which application owns the "
                                       f"directory: restore it, or delete it if only one application uses "
                                       f"the directory") from exc
    return recorded


def _write_identity(directory: str, path: str, application_id: str, base_uri: str) -> Dict[str, Any]:
    """Create ``directory.json`` whole or not at all: written to a private temporary file, synced, then
    linked into place, which fails if another process was first (its file is then the one that counts)."""
    salt = secrets.token_hex(16)
    identity = {"version": _IDENTITY_VERSION, "salt": salt, "application_id_hmac": _fingerprint(salt, application_id),
                "base_uri": base_uri}
    fd, temporary = tempfile.mkstemp(dir=directory, prefix=".directory-", suffix=".tmp")  # 0600, O_EXCL
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(identity, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            found = _read_identity(path)
            if found is not None:
                return found
            raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
    fsync_directory(directory)
    return identity


def _statvfs(directory: str) -> Optional[os.statvfs_result]:
    try:
        return os.statvfs(directory)
    except OSError:
        return None


def free_bytes(directory: str, default: int) -> int:
    """Bytes an unprivileged writer may still use on the file system of `directory` (`default` if unknown)."""
    found = _statvfs(directory)
    return default if found is None else found.f_bavail * found.f_frsize


def reported_free_bytes(directory: str) -> Optional[int]:
    """Like `free_bytes`, but None where the file system does not say: statvfs fails, or reports no size at
    all (some FUSE file systems, LazyFS among them, answer zeros)."""
    found = _statvfs(directory)
    return found.f_bavail * found.f_frsize if found is not None and found.f_blocks else None


def fsync_directory(directory: str) -> None:
    """fsync `directory`, so the names created, renamed or removed in it survive a power cut."""
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
