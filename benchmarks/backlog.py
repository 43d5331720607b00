"""Benchmark (d): memory and disk for a backlog logged while the collector is down, then drained.

    python benchmarks/backlog.py            # full run: 200,000 events of ~1.5 KB (10-12 minutes)
    python benchmarks/backlog.py --quick    # smoke mode for CI (5,000 events, a few seconds)
    python benchmarks/backlog.py --events 50000

Events are logged through the real middleware: a Tornado app served on this process's IOLoop with
``log_function=middleware.log_event``, under load from a client in another process (so the client's
memory and GIL are not this process's), while the local collector (`Collector`, in this process) is
down. Measured:

1. RSS growth of this process (VmRSS from /proc/self/status, sampled while serving) over a baseline read
   after a warm-up of the same requests;
2. the bytes of every file in SPOOL_DIR (database, WAL, shared memory, locks) at the end of the outage,
   against the sum of the spooled events' JSON bytes;
3. then the collector comes up, `middleware.flush` drains the backlog, and SPOOL_DIR's bytes are read
   again while the app keeps running (the flusher tidies the spool once it is idle: up to --settle s).

Targets (issue 3, target 5): RSS grows <= 20 MB; SPOOL_DIR <= 1.3 x the events' JSON bytes; under 1 MB
after the drain. The WAL (up to ~8 MB) is counted too, so in a --quick run it dominates the ratio. Nothing
is asserted about speed or the targets; the exit status is 1 if an event is lost (requests made, answered,
spooled and distinct transaction_ids at the collector must all agree).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import tornado.httpserver
import tornado.ioloop
import tornado.netutil
import tornado.web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moesiftornado_durable import MoesifMiddleware  # noqa: E402
from moesiftornado_durable.codec import to_json_bytes  # noqa: E402
from moesiftornado_durable.testing import Collector  # noqa: E402

BODY = {"order": {"id": 12345, "items": [{"sku": f"SKU-{n:04d}", "qty": n, "price": 9.99} for n in range(8)],
                  "customer": {"name": "Ada Lovelace", "email": "ada@example.com"}}}
MB = 1024 * 1024
RSS_TARGET = 20 * MB
RATIO_TARGET = 1.3
AFTER_DRAIN_TARGET = 1 * MB


class OrderHandler(tornado.web.RequestHandler):
    def post(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(self.request.body)


LOAD_CLIENT = """
import http.client, sys
port, first, count, body = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].encode()
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
answered = 0
for n in range(first, first + count):
    connection.request("POST", f"/orders?n={n}", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    answered += response.status == 200
print(answered)
"""


def rss() -> int:
    """This process's resident set size in bytes (VmRSS)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def directory_bytes(directory: str) -> int:
    """The size of every file in `directory` (the spool database, its WAL and shared memory, lock files)."""
    return sum(entry.stat().st_size for entry in os.scandir(directory) if entry.is_file())


async def _serve_load(app: tornado.web.Application, first: int, count: int, tick: Callable[[], None]) -> int:
    """Serve `app` while a client process makes `count` requests; call `tick` every 0.25 s. Returns how many
    requests were answered 200."""
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    sampler = tornado.ioloop.PeriodicCallback(tick, 250)
    sampler.start()
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOAD_CLIENT, str(sockets[0].getsockname()[1]), str(first), str(count),
        json.dumps(BODY), stdout=asyncio.subprocess.PIPE)
    out, _ = await client.communicate()
    sampler.stop()
    tick()
    server.stop()
    return int(out.decode().strip() or 0)


def settle(directory: str, target: int, seconds: float) -> Tuple[int, float]:
    """SPOOL_DIR's bytes once they are under `target` or have not changed for 2 s, at most `seconds`;
    returns (bytes, seconds waited)."""
    started = time.monotonic()
    last, unchanged_since = directory_bytes(directory), started
    while time.monotonic() - started < seconds:
        time.sleep(0.1)
        now = directory_bytes(directory)
        if now < target:
            return now, time.monotonic() - started
        if now != last:
            last, unchanged_since = now, time.monotonic()
        elif time.monotonic() - unchanged_since >= 2.0:
            break
    return last, time.monotonic() - started


def files_of(directory: str) -> str:
    return ", ".join(f"{entry.name} {entry.stat().st_size / MB:.1f} MB"
                     for entry in sorted(os.scandir(directory), key=lambda e: e.name) if entry.is_file())


def bench_backlog(collector: Collector, events: int, warm_up: int, settle_seconds: float) -> Dict[str, Any]:
    spool_dir = tempfile.mkdtemp(prefix="bench-backlog-")
    collector.go_down()
    middleware = MoesifMiddleware({"APPLICATION_ID": "bench", "SPOOL_DIR": spool_dir,
                                   "BASE_URI": collector.base_uri, "RETRY_MAX_WAIT": 1.0, "SEND_TIMEOUT": 5.0})
    app = middleware.attach(tornado.web.Application([(r"/orders", OrderHandler)], log_function=middleware.log_event))
    peak = {"rss": 0, "spool": 0}

    def sample() -> None:
        peak["rss"] = max(peak["rss"], rss())
        peak["spool"] = max(peak["spool"], directory_bytes(spool_dir))

    try:
        answered = asyncio.run(_serve_load(app, 0, warm_up, lambda: None))
        baseline = rss()
        started = time.perf_counter()
        answered += asyncio.run(_serve_load(app, warm_up, events - warm_up, sample))
        logging_seconds = time.perf_counter() - started
        sample()
        spooled_files = files_of(spool_dir)
        spooled = middleware.stats()

        collector.come_up()
        started = time.perf_counter()
        drained = middleware.flush(timeout=max(120.0, events / 200))
        drain_seconds = time.perf_counter() - started
        after_drain, settled_in = settle(spool_dir, AFTER_DRAIN_TARGET, settle_seconds)
        after_files = files_of(spool_dir)
        stats = middleware.stats()
    finally:
        middleware.close(5)
        shutil.rmtree(spool_dir, ignore_errors=True)

    received: Dict[str, Any] = {}
    for event in collector.events:
        received.setdefault(event["transaction_id"], event)
    json_bytes = sum(len(to_json_bytes(event)) for event in received.values())
    return {
        "answered": answered, "spooled": spooled["spooled"], "received": len(received),
        "duplicates": len(collector.transaction_ids()) - len(received), "drained": drained,
        "dropped": {k: v for k, v in stats.items() if k.startswith("dropped_")},
        "rss_baseline": baseline, "rss_growth": peak["rss"] - baseline, "spool_peak": peak["spool"],
        "json_bytes": json_bytes, "after_drain": after_drain, "settled_in": settled_in,
        "logging_seconds": logging_seconds, "drain_seconds": drain_seconds,
        "spooled_files": spooled_files, "after_files": after_files,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI): 5,000 events")
    parser.add_argument("--events", type=int, help="events to log during the outage (default 200,000)")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds to wait after the drain for the spool to shrink (default 15)")
    args = parser.parse_args(argv)
    events = args.events or (5_000 if args.quick else 200_000)
    warm_up = min(2_000, events // 10)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}, {events:,} events, {'quick' if args.quick else 'full'} run",
          flush=True)
    with Collector() as collector:
        result = bench_backlog(collector, events, warm_up, args.settle)

    ratio = result["spool_peak"] / result["json_bytes"] if result["json_bytes"] else float("inf")
    print()
    print(f"| {events:,} events, ~{result['json_bytes'] / max(1, result['received']):,.0f} B of JSON each, "
          f"logged while the collector is down | target | measured | met |")
    print("|---|---|---|---|")
    rows = [
        (f"RSS growth of the logging process (baseline {result['rss_baseline'] / MB:.0f} MB after "
         f"{warm_up:,} warm-up events)", f"≤ {RSS_TARGET / MB:.0f} MB", f"{result['rss_growth'] / MB:.1f} MB",
         result["rss_growth"] <= RSS_TARGET),
        (f"SPOOL_DIR bytes at the end of the outage / events' JSON bytes ({result['spool_peak'] / MB:.0f} MB / "
         f"{result['json_bytes'] / MB:.0f} MB)", f"≤ {RATIO_TARGET}", f"{ratio:.2f}", ratio <= RATIO_TARGET),
        (f"SPOOL_DIR bytes after the drain (read {result['settled_in']:.1f} s after flush returned)",
         f"< {AFTER_DRAIN_TARGET / MB:.0f} MB", f"{result['after_drain'] / MB:.2f} MB",
         result["after_drain"] < AFTER_DRAIN_TARGET),
    ]
    for label, target, measured, met in rows:
        print(f"| {label} | {target} | {measured} | {'yes' if met else 'NO'} |")
    print()
    print(f"logging: {events / result['logging_seconds']:,.0f} requests/s; drain: "
          f"{result['received'] / result['drain_seconds']:,.0f} events/s at BATCH_SIZE 25 "
          f"(flush returned {result['drained']})")
    print(f"spool files at the end of the outage: {result['spooled_files']}")
    print(f"spool files after the drain: {result['after_files']}")
    print(f"answered {result['answered']:,}, spooled {result['spooled']:,}, received {result['received']:,} "
          f"distinct ({result['duplicates']} duplicates before dedup), dropped {result['dropped'] or 0}")

    lost = result["answered"] - result["received"]
    if result["answered"] != events or result["spooled"] != events or lost:
        print(f"FAILED: {events:,} requests made, {result['answered']:,} answered, {result['spooled']:,} spooled, "
              f"{result['received']:,} received: {lost:,} lost", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
