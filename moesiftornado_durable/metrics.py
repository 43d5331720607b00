"""Tornado handlers that expose `middleware.stats()`: Prometheus metrics and a health check.

    app = tornado.web.Application([
        (r"/metrics", MetricsHandler, {"middleware": middleware}),
        (r"/healthz", HealthHandler, {"middleware": middleware, "max_backlog_age": 300}),
    ], log_function=middleware.log_event)

The Prometheus text format (version 0.0.4) is written here directly: a few counters and gauges do not
justify the `prometheus_client` dependency. Both handlers skip their own logging to Moesif.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Optional, Tuple

import tornado.web

from .middleware import LOGGED_ATTRIBUTE, MoesifMiddleware

_PREFIX = "moesif_durable"

# (stats key, metric name, type, help)
_METRICS: Tuple[Tuple[str, str, str, str], ...] = (
    ("spooled", "spooled_total", "counter", "Records written to the spool (its intake journal) by this process."),
    ("skipped", "skipped_total", "counter", "Requests not logged because SKIP said so."),
    ("sent", "sent_total", "counter", "Records delivered to Moesif and removed from the spool."),
    ("send_attempts", "send_attempts_total", "counter", "HTTP requests made to Moesif."),
    ("retries", "retries_total", "counter", "Send attempts that repeated a failed one."),
    ("dead_lettered", "dead_lettered_total", "counter", "Records moved to the dead-letter store."),
    ("ready", "ready", "gauge", "Records waiting in this process's spool."),
    ("in_flight", "in_flight", "gauge", "Records being sent."),
    ("dead_letter", "dead_letter", "gauge", "Records in the dead-letter store."),
    ("undecryptable", "undecryptable", "gauge", "Records no configured SPOOL_ENCRYPTION_KEY opens."),
    ("oldest_age", "oldest_event_age_seconds", "gauge", "Age of the oldest waiting record."),
    ("spool_bytes", "spool_bytes", "gauge", "Size of the spool files on disk."),
    ("last_error_at", "last_error_timestamp_seconds", "gauge", "When the last delivery error happened."),
    ("spool_failing", "spool_failing", "gauge", "1 if writing to or reading the spool failed recently."),
    ("lost_wal", "lost_wal_total", "counter",
     "Committed records SQLite discarded with a damaged WAL (spooled again from the journals)."),
)


def render_prometheus(stats: Dict[str, Any]) -> str:
    """The stats in Prometheus's text exposition format; absent values are left out."""
    lines: List[str] = []
    for key, name, kind, text in _METRICS:
        value = stats.get(key)
        if value is None:
            continue
        lines += [f"# HELP {_PREFIX}_{name} {text}", f"# TYPE {_PREFIX}_{name} {kind}",
                  f"{_PREFIX}_{name} {float(value):g}"]
    dropped = sorted((key[len("dropped_"):], value) for key, value in stats.items() if key.startswith("dropped_"))
    lines += [f"# HELP {_PREFIX}_dropped_total Records not spooled or removed undelivered, by reason.",
              f"# TYPE {_PREFIX}_dropped_total counter"]
    lines += [f'{_PREFIX}_dropped_total{{reason="{reason}"}} {value}' for reason, value in dropped]
    omitted = sorted((key[len("body_omitted_"):], value) for key, value in stats.items()
                     if key.startswith("body_omitted_"))
    if omitted:
        lines += [f"# HELP {_PREFIX}_bodies_omitted_total Bodies left out of logged events, by reason.",
                  f"# TYPE {_PREFIX}_bodies_omitted_total counter"]
        lines += [f'{_PREFIX}_bodies_omitted_total{{reason="{reason}"}} {value}' for reason, value in omitted]
    return "\n".join(lines) + "\n"


def health(stats: Dict[str, Any], max_backlog_age: float) -> Tuple[bool, List[str]]:
    """(healthy, problems): unhealthy when the spool is failing or the backlog is older than allowed."""
    problems = []
    if stats.get("spool_failing"):
        problems.append(f"the spool is failing: {stats.get('spool_error') or 'a write failed in the last minute'}")
    age: Optional[float] = stats.get("oldest_age")
    if age is not None and age > max_backlog_age:
        problems.append(f"the oldest waiting record is {age:.0f} s old (limit {max_backlog_age:g} s); "
                        f"last delivery error: {stats.get('last_error')}")
    return not problems, problems


class _StatsHandler(tornado.web.RequestHandler):
    def initialize(self, middleware: MoesifMiddleware) -> None:
        self.middleware = middleware

    def prepare(self) -> None:
        setattr(self, LOGGED_ATTRIBUTE, True)  # scrapes and probes are not API calls: not sent to Moesif


class MetricsHandler(_StatsHandler):
    """GET: the middleware's stats in the Prometheus text format."""

    def get(self) -> None:
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(render_prometheus(self.middleware.stats()))


class HealthHandler(_StatsHandler):
    """GET: 200 when healthy, 503 when the spool is failing or the backlog is older than `max_backlog_age`."""

    def initialize(self, middleware: MoesifMiddleware, max_backlog_age: float = 300.0) -> None:
        super().initialize(middleware)
        self.max_backlog_age = max_backlog_age

    def get(self) -> None:
        stats = self.middleware.stats()
        healthy, problems = health(stats, self.max_backlog_age)
        self.set_status(200 if healthy else 503)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"status": "ok" if healthy else "failing", "problems": problems,
                                "ready": stats.get("ready"), "oldest_age": stats.get("oldest_age")}))
