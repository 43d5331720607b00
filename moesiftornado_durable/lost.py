"""One way for a record to be lost: `LostRecords.record_lost` counts it, logs it and audits it.

Every place that gives up on a record (not spooled: capture error, spool unavailable, full or failing
disk, refused when full; deleted to make room when full) calls it, as sentry-python's transport calls
`record_lost_event`: the counter ``dropped_<reason>`` (what `stats()` and the metrics show), an ERROR at
most every few seconds with the total so far, and one audit record per id (audit.py) when the record
had reached, or was refused by, the spool.
"""

from __future__ import annotations

import collections
import logging
import sys
import time
from typing import Counter, Dict, List, Optional, Sequence

from . import audit

logger = logging.getLogger("moesiftornado_durable")

ERROR_LOG_INTERVAL = 10.0  # seconds between repeated logs of the same kind of failure
EVICTED = "dropped: spool full (WHEN_FULL='drop_oldest')"  # the audit reason of records deleted to make room
REFUSED = "refused: spool full (WHEN_FULL='drop_newest')"  # the audit reason of records refused when full


class ErrorLog:
    """Log an ERROR, with the current traceback, at most once every `interval` seconds per `key` (a kind
    of failure), so one failing often does not hide another."""

    def __init__(self, interval: float = ERROR_LOG_INTERVAL) -> None:
        self._interval = interval
        self._last: Dict[str, float] = {}

    def __call__(self, message: str, key: str = "") -> None:
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            return
        self._last[key] = now
        logger.error("moesiftornado_durable: %s", message, exc_info=sys.exc_info()[0] is not None)


class LostRecords:
    """The records one owner (a middleware, a pipeline, the shipper) lost, counted into `counters` and
    logged through `log` (an `ErrorLog` of its own unless the owner shares one with its other errors)."""

    def __init__(self, counters: Optional[Counter[str]] = None, log: Optional[ErrorLog] = None) -> None:
        self.counters: Counter[str] = counters if counters is not None else collections.Counter()
        self._log = log if log is not None else ErrorLog()

    def record_lost(self, reason: str, count: int, message: str, *, record_ids: Sequence[str] = (),
                    kind: str = "event", audit_reason: Optional[str] = None) -> None:
        """Count `count` records lost for `reason` (``dropped_<reason>``), log `message` with the total so
        far, and write one audit record per id of `record_ids` with `audit_reason`, when given."""
        key = f"dropped_{reason}"
        self.counters[key] += count
        if audit_reason is not None:
            audit.record_left(record_ids, audit_reason, kind)
        self._log(f"{message}; dropped so far: {self.counters[key]}", key)

    def evicted(self, record_ids: List[str]) -> None:
        """WHEN_FULL='drop_oldest' deleted these waiting records to make room (the spool's `on_evict`)."""
        shown = ", ".join(record_ids[:20]) + (" …" if len(record_ids) > 20 else "")
        self.record_lost("oldest", len(record_ids), f"the spool is full (SPOOL_MAX_BYTES); dropped the "
                         f"{len(record_ids)} oldest waiting record(s): {shown}", record_ids=record_ids,
                         audit_reason=EVICTED)
