"""The audit trail: one structured log record for every record that leaves the spool other than by
delivery (refused or dropped when full, expired, dead-lettered, purged, past its retention).

Logged on `moesiftornado_durable.audit` at INFO with the record's id (its transaction_id for events),
the reason and the time, as both message text and `extra` fields; never the payload.
"""

from __future__ import annotations

import json
import logging
import time
from typing import IO, Any, Dict, Iterable, Optional

from .kinds import EVENT

audit_logger = logging.getLogger("moesiftornado_durable.audit")


def record_left(record_ids: Iterable[str], reason: str, kind: str = EVENT, at: Optional[str] = None) -> None:
    """Log one audit record per id (`at`: when it happened, if not now)."""
    if not audit_logger.isEnabledFor(logging.INFO):
        return
    at = at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for record_id in record_ids:
        audit_logger.info(
            "record left the spool without delivery: transaction_id=%s kind=%s reason=%s at=%s",
            record_id, kind, reason, at,
            extra={"transaction_id": record_id, "kind": kind, "reason": reason, "at": at},
        )


class RelayHandler(logging.Handler):
    """In the shipper process: write each audit record as one JSON line to `stream` (a pipe to the app
    process that started it, which logs it again on its own audit logger: the user's handlers see it)."""

    def __init__(self, stream: IO[str]) -> None:
        super().__init__(logging.INFO)
        self._stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        fields = {name: getattr(record, name, None) for name in ("transaction_id", "kind", "reason", "at")}
        try:
            self._stream.write(json.dumps(fields) + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # the app is gone: keep the record on stderr rather than lose it
            logging.getLogger("moesiftornado_durable").warning(record.getMessage())


def relay(line: str) -> None:
    """In the app process: log one audit record that the shipper relayed (see `RelayHandler`)."""
    try:
        fields: Dict[str, Any] = json.loads(line)
    except ValueError:
        return
    record_left([str(fields.get("transaction_id"))], str(fields.get("reason")), str(fields.get("kind") or EVENT),
                at=fields.get("at"))
