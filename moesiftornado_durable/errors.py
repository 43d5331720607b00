"""The exceptions this library raises or maps third-party failures to.

    MoesifDurableError
    ├── ConfigError            an option is missing or invalid (also a ValueError); names the key
    ├── SpoolFullError         the spool holds SPOOL_MAX_BYTES and WHEN_FULL is 'drop_newest'
    ├── SpoolUnavailableError  SPOOL_DIR was deleted under the app and could not be made again
    └── DeliveryError          a batch did not reach Moesif
        ├── RetryableError     worth trying again later: connection refused, timeout, 408, 429, 5xx
        │   ├── AuthError      401/402/403: wrong application id or lapsed plan; data is kept, retried slowly
        │   └── RedirectError  3xx: never followed (BASE_URI is wrong); data is kept, retried slowly
        └── PermanentError     the collector rejected the batch for good (400, 404, 422, ...): dead-lettered
            │                  (a 400 or 422 on several events is first narrowed down by splitting the batch)
            └── PayloadTooLargeError  413: the batch is split and retried; a lone event too large is dead-lettered

moesifapi's `APIException` and the transport's exceptions are mapped here, in `sender.py`, and nowhere else.
"""

from __future__ import annotations

import errno
import sqlite3
from typing import Optional


class MoesifDurableError(Exception):
    """Base of every exception this library raises."""


class ConfigError(MoesifDurableError, ValueError):
    """A configuration option is missing or invalid; the message and `key` name the option."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"moesiftornado_durable: {key}: {problem}")
        self.key = key


class SpoolFullError(MoesifDurableError):
    """The spool already holds SPOOL_MAX_BYTES of records and WHEN_FULL is 'drop_newest': this one is refused."""


class SpoolUnavailableError(MoesifDurableError):
    """The journal's segment or SPOOL_DIR was deleted while the app ran, and neither could be created again."""


class DeliveryError(MoesifDurableError):
    """A batch was not accepted by the collector; `status` is the HTTP status, None without a response."""

    def __init__(self, message: str, status: Optional[int] = None) -> None:
        super().__init__(message)
        self.status = status


class RetryableError(DeliveryError):
    """A transient failure; `retry_after` holds the server's Retry-After in seconds, if it sent one."""

    def __init__(self, message: str, status: Optional[int] = None, retry_after: Optional[float] = None) -> None:
        super().__init__(message, status)
        self.retry_after = retry_after


class AuthError(RetryableError):
    """The collector refused the application id (401/402/403). Never fatal to data: retried at a long interval."""


class RedirectError(RetryableError):
    """A 3xx answer. Never followed (the batch and the application id stay with BASE_URI's origin) and never an
    ack: the records stay spooled and are retried at the auth interval until BASE_URI is fixed."""

    def __init__(self, message: str, status: Optional[int] = None, location: Optional[str] = None) -> None:
        super().__init__(message, status)
        self.location = location


class PermanentError(DeliveryError):
    """The collector rejected the batch and would reject it again: its records go to the dead-letter store."""


class PayloadTooLargeError(PermanentError):
    """413: the batch was too large. Halves are retried; only a single record still too large is dead-lettered."""


def is_disk_full(exc: BaseException) -> bool:
    """True for a write the disk refused for lack of space: OSError ENOSPC/EDQUOT, or SQLite's "database or
    disk is full" (which carries no errno)."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower()
