"""The audit trail: one structured log record for every record that leaves the spool other than by
delivery (refused or dropped when full, expired, dead-lettered, purged, past its retention).

Logged on `moesiftornado_durable.audit` at INFO with the record's id (its transaction_id for events),
the reason and the time, as both message text and `extra` fields; never the payload.
"""

from __future__ import annotations

import logging
import time
from typing import Iterable

audit_logger = logging.getLogger("moesiftornado_durable.audit")


def record_left(record_ids: Iterable[str], reason: str, kind: str = "event") -> None:
    """Log one audit record per id."""
    if not audit_logger.isEnabledFor(logging.INFO):
        return
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for record_id in record_ids:
        audit_logger.info(
            "record left the spool without delivery: transaction_id=%s kind=%s reason=%s at=%s",
            record_id, kind, reason, at,
            extra={"transaction_id": record_id, "kind": kind, "reason": reason, "at": at},
        )
