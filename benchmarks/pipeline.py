"""Benchmarks of the durable pipeline, each against a baseline measured in the same run.

    python benchmarks/pipeline.py                # full run (a few minutes)
    python benchmarks/pipeline.py --quick        # smoke mode for CI (a few seconds); asserts nothing about speed
    python benchmarks/pipeline.py --only drain   # only some parts: log_event, drain, replay (repeatable)

1. log_event on the IOLoop thread: µs per call (p50, p99) for a ~1.5 KB event with bodies, committed
   to the spool before return, against building the same event and json.dumps only (no disk).
2. Drain: events/s from a spool backlog to the local collector through the flusher, against a plain
   moesifapi `create_events_batch` loop over the same events from memory, at the same batch size; with the
   collector in the benchmark's process (as issue 15 measured it) and in a process of its own.
3. Replay: events/s of `moesiftornado-durable replay` (its defaults: batches of 500 over 2 connections)
   draining a dead process's spool, against the same moesifapi loop at batch 500 and the 25k ev/s target,
   with the collector in a process of its own (on this 2-core machine, one core each), and again with the
   collector in the benchmark's process. The command runs as its own process, as an operator runs it.

The machine is shared and noisy: each figure is the median of several rounds, and the ratio is what
to compare across machines. After the table come the rows of issue 15's table this script measures (the
drain ratio, target >= 1.0; replay events/s, target >= 25,000), each with its target and whether this run
met it; `--quick` prints them too and asserts nothing about speed. The other rows of that table are
`benchmarks/http_throughput.py`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

import requests
import tornado.httpserver
import tornado.netutil
import tornado.web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from conftest import serve  # noqa: E402
from moesifapi.configuration import Configuration  # noqa: E402
from moesifapi.controllers.api_controller import ApiController  # noqa: E402

from moesiftornado_durable import (  # noqa: E402
    MoesifMiddleware,
    SpoolBeforeSendMixin,
    channel,  # noqa: E402
    locks,
)
from moesiftornado_durable.capture import capture_event  # noqa: E402
from moesiftornado_durable.cli import DEFAULT_REPLAY_BATCH_SIZE, DEFAULT_REPLAY_CONNECTIONS  # noqa: E402
from moesiftornado_durable.spool import Spool  # noqa: E402
from moesiftornado_durable.testing import Collector  # noqa: E402

BODY = {"order": {"id": 12345, "items": [{"sku": f"SKU-{n:04d}", "qty": n, "price": 9.99} for n in range(8)],
                  "customer": {"name": "Ada Lovelace", "email": "ada@example.com"}}}


class OrderHandler(tornado.web.RequestHandler):
    def post(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(self.request.body)


class StrictOrderHandler(SpoolBeforeSendMixin, OrderHandler):
    pass


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(function: Callable[[Any], None], samples: List[float]) -> Callable[[Any], None]:
    def wrapper(handler: Any) -> None:
        started = time.perf_counter()
        function(handler)
        samples.append((time.perf_counter() - started) * 1e6)

    return wrapper


LOAD_CLIENT = """
import http.client, sys
port, count, body = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].encode()
connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
for _ in range(count):
    connection.request("POST", "/orders", body=body, headers={"Content-Type": "application/json"})
    connection.getresponse().read()
"""


async def _serve_load(app: tornado.web.Application, count: int) -> None:
    """Serve `app` on this thread's IOLoop while a separate client process makes `count` requests.

    The client must be another process: in this one it would compete for the GIL with the IOLoop and
    its waits would be counted as log_event's.
    """
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LOAD_CLIENT, str(sockets[0].getsockname()[1]), str(count), json.dumps(BODY))
    await client.wait()
    server.stop()


MODES = ("baseline", "durable", "sync_full", "thread", "strict")


def bench_log_event(collector: Collector, requests_per_round: int, rounds: int) -> Dict[str, Dict[str, float]]:
    """Alternate rounds of each mode inside a served app; µs percentiles of the logging call per mode.

    baseline: capture + json.dumps, no disk. durable: log_event, default options (a journal write; the
    shipper process spools and sends). sync_full: the same with SPOOL_SYNC 'full' (an fdatasync per
    write). thread: SHIPPER 'thread' (the same journal write; the shipper runs on threads of this
    process, sharing its GIL). strict:
    `SpoolBeforeSendMixin`, timing the spooling it does before the response is sent (the latency strict
    mode adds to each response).
    """
    results: Dict[str, List[float]] = {mode: [] for mode in MODES}
    collector.go_down()  # measure the request path only; the flusher just backs off
    for _ in range(rounds):
        for mode in MODES:
            spool_dir = tempfile.mkdtemp(prefix="bench-spool-")
            middleware = MoesifMiddleware({"APPLICATION_ID": "bench", "SPOOL_DIR": spool_dir,
                                           "BASE_URI": collector.base_uri, "RETRY_MAX_WAIT": 5.0,
                                           "SPOOL_SYNC": "full" if mode == "sync_full" else "normal",
                                           "SHIPPER": "thread" if mode == "thread" else "process"})
            samples: List[float] = []
            handler: Any = OrderHandler
            log_function: Callable[[Any], None] = timed(middleware.log_event, samples)
            if mode == "baseline":
                def capture_only(handler: Any, config: Any = middleware.config) -> None:
                    json.dumps(capture_event(handler, config, time.time())).encode()

                log_function = timed(capture_only, samples)
            elif mode == "strict":
                handler = StrictOrderHandler
                log_function = middleware.log_event  # returns at once: the mixin spooled it already
                middleware.log_event_before_send = timed(  # type: ignore[method-assign]
                    middleware.log_event_before_send, samples)
            app = tornado.web.Application([(r"/orders", handler)], log_function=log_function)
            middleware.attach(app)
            asyncio.run(_serve_load(app, requests_per_round))
            middleware.close(0.5)
            shutil.rmtree(spool_dir, ignore_errors=True)
            results[mode].extend(samples[10:])  # skip warm-up
    collector.come_up()
    return {mode: {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99)}
            for mode, values in results.items()}


def sample_event(collector: Collector) -> Dict[str, Any]:
    """One real captured event (~1.5 KB), taken from the collector after a real request."""
    spool_dir = tempfile.mkdtemp(prefix="bench-sample-")
    middleware = MoesifMiddleware({"APPLICATION_ID": "bench", "SPOOL_DIR": spool_dir,
                                   "BASE_URI": collector.base_uri, "FLUSH_INTERVAL": 0.01})
    app = middleware.attach(tornado.web.Application([(r"/orders", OrderHandler)], log_function=middleware.log_event))
    with serve(app) as url:
        requests.post(url + "/orders", json=BODY, timeout=5)
    middleware.flush(5)
    middleware.close(1)
    shutil.rmtree(spool_dir, ignore_errors=True)
    event = collector.events[-1]
    collector.clear()
    return event


def moesifapi_loop(base_uri: str, bodies: List[Dict[str, Any]], batch_size: int) -> float:
    """Events/s of moesifapi's own client sending `bodies` from memory (no spool, no retries)."""
    Configuration.BASE_URI = base_uri
    Configuration.application_id = "bench"
    api = ApiController()
    started = time.perf_counter()
    for first in range(0, len(bodies), batch_size):
        api.create_events_batch(bodies[first:first + batch_size])
    return len(bodies) / (time.perf_counter() - started)


class CollectorHandle:
    """The local collector as a drain sees it, in this process (a `Collector`) or in its own (a base URI).

    In its own process the collector is not asked how many events it has while a drain runs: its stats
    endpoint parses every event recorded so far, which would slow the very collector being measured. The
    wait reads the shipper's published figures instead (the events it had answered with a 2xx, a few
    hundred bytes of JSON, published every 50 ms) and asks the collector once at the end.
    """

    def __init__(self, collector: Optional[Collector] = None, base_uri: Optional[str] = None) -> None:
        self._collector = collector
        self.base_uri = collector.base_uri if collector is not None else str(base_uri)

    @property
    def in_process(self) -> bool:
        return self._collector is not None

    def wait_for_events(self, count: int, timeout: float, spool_dir: Optional[str] = None) -> bool:
        if self._collector is not None:
            return self._collector.wait_for_events(count, timeout)
        deadline = time.monotonic() + timeout
        while spool_dir is not None and time.monotonic() < deadline:
            figures = channel.read_figures(spool_dir, timeout=1.0) or {}
            if int((figures.get("counters") or {}).get("sent", 0)) >= count:
                break
            time.sleep(0.02)
        while time.monotonic() < deadline:
            if int(self.stats()["events"]) >= count:
                return True
            time.sleep(0.1)
        return False

    def clear(self) -> None:
        if self._collector is not None:
            self._collector.clear()
        else:
            requests.post(self.base_uri + "/_control/clear", timeout=60)

    def stats(self) -> Any:
        if self._collector is not None:
            return self._collector.stats()
        return requests.get(self.base_uri + "/_control/stats", timeout=60).json()


def bench_drain(collector: CollectorHandle, template: Dict[str, Any], events: int, batch_size: int,
                rounds: int) -> Dict[str, float]:
    """Events/s: a backlog drained by the default pipeline (journaled as log_event does, then spooled and sent
    by the shipper process) and by SHIPPER 'thread''s in-process shipper (from its spool file), vs a plain
    moesifapi loop over the same events from memory."""
    bodies = [dict(template, transaction_id=f"bench-{n}") for n in range(events)]
    rates: Dict[str, List[float]] = {"baseline": [], "durable": [], "thread": []}
    options = {"APPLICATION_ID": "bench", "BASE_URI": collector.base_uri, "BATCH_SIZE": batch_size}
    for _ in range(rounds):
        rates["baseline"].append(moesifapi_loop(collector.base_uri, bodies, batch_size))
        collector.clear()

        spool_dir = tempfile.mkdtemp(prefix="bench-drain-")
        middleware = MoesifMiddleware(dict(options, SPOOL_DIR=spool_dir))
        middleware.update_user({"user_id": "warm-up"})
        assert middleware.flush(30)  # the shipper is up
        started = time.perf_counter()
        for body in bodies:
            middleware._spool_record(body, "event")  # what log_event does after capture
        assert collector.wait_for_events(events, 600, spool_dir), collector.stats()
        rates["durable"].append(events / (time.perf_counter() - started))
        middleware.close(2)
        collector.clear()
        shutil.rmtree(spool_dir, ignore_errors=True)
        if not collector.in_process:
            continue  # no cheap way to see the thread mode's progress without slowing it or the collector

        spool_dir = tempfile.mkdtemp(prefix="bench-drain-")
        spool = Spool(os.path.join(spool_dir, "shipper.db"))  # the in-process shipper's own spool
        for body in bodies:
            spool.put(body)
        spool.close()
        started = time.perf_counter()
        middleware = MoesifMiddleware(dict(options, SPOOL_DIR=spool_dir, SHIPPER="thread"))
        assert collector.wait_for_events(events, timeout=600), collector.stats()
        rates["thread"].append(events / (time.perf_counter() - started))
        middleware.close(2)
        collector.clear()
        shutil.rmtree(spool_dir, ignore_errors=True)
    return {key: statistics.median(values) for key, values in rates.items() if values}


REPLAY_TARGET = 25_000  # events/s, issues 3 and 15


@contextlib.contextmanager
def collector_process() -> Iterator[str]:
    """The local collector in a process of its own (as `moesiftornado-durable collector` runs it); its base URI."""
    process = subprocess.Popen([sys.executable, "-m", "moesiftornado_durable", "collector", "--quiet"],
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip()
    finally:
        process.terminate()
        process.wait(10)


def replay(base_uri: str, bodies: List[Dict[str, Any]], *options: str) -> Dict[str, float]:
    """Events/s of `moesiftornado-durable replay` (a process of its own, as an operator runs it) over a spool
    of `bodies` left by a dead process: "drain" as its progress line reports it, "command" from starting
    the process to its exit (Python's start-up, opening the file, removing it once empty)."""
    spool_dir = tempfile.mkdtemp(prefix="bench-replay-")
    lock = locks.lock_free_slot(spool_dir)
    spool = Spool(lock.spool_path)
    spool.put_many(("event", body, time.time()) for body in bodies)
    spool.close()
    lock.release()  # as if its process had died
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "moesiftornado_durable", "replay", "--spool-dir", spool_dir,
                             "--base-uri", base_uri, *options], capture_output=True, text=True, timeout=600,
                            env=dict(os.environ, MOESIF_APPLICATION_ID="bench"))
    elapsed = time.perf_counter() - started
    assert result.returncode == 0 and f"sent {len(bodies)} record(s)" in result.stdout, result
    shutil.rmtree(spool_dir, ignore_errors=True)
    *_, drain = re.findall(r"([\d,]+) ev/s", result.stderr)
    return {"drain": float(drain.replace(",", "")), "command": len(bodies) / elapsed}


def received(base_uri: str) -> int:
    count = int(requests.get(base_uri + "/_control/stats", timeout=60).json()["events"])
    requests.post(base_uri + "/_control/clear", timeout=60)
    return count


def bench_replay(template: Dict[str, Any], events: int, rounds: int) -> Dict[str, float]:
    """Events/s: the replay command vs the moesifapi loop at the replay's batch size, alternating rounds,
    to a collector in its own process and to one in this process."""
    bodies = [dict(template, transaction_id=f"replay-{n}") for n in range(events)]
    rates: Dict[str, List[float]] = collections.defaultdict(list)

    def record(name: str, figures: Dict[str, float]) -> None:
        for kind, value in figures.items():
            rates[f"{name}_{kind}"].append(value)

    with collector_process() as base_uri:
        for _ in range(rounds):
            rates["baseline"].append(moesifapi_loop(base_uri, bodies, DEFAULT_REPLAY_BATCH_SIZE))
            assert received(base_uri) == events
            record("replay", replay(base_uri, bodies))
            assert received(base_uri) == events
            record("one_connection", replay(base_uri, bodies, "--connections", "1"))
            assert received(base_uri) == events
    with Collector() as collector:
        for _ in range(rounds):
            rates["baseline_in_process"].append(moesifapi_loop(collector.base_uri, bodies, DEFAULT_REPLAY_BATCH_SIZE))
            collector.clear()
            record("in_process", replay(collector.base_uri, bodies))
            assert len(collector.transaction_ids()) == events
            collector.clear()
    return {name: statistics.median(values) for name, values in rates.items()}


PARTS = ("log_event", "drain", "replay")
DRAIN_TARGET = 1.0  # drain at BATCH_SIZE 25 over a moesifapi loop, issue 15


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part (repeatable)")
    args = parser.parse_args()
    parts = set(args.only or PARTS)
    requests_per_round, rounds, events = (200, 1, 1000) if args.quick else (2000, 3, 10000)
    drain_rounds = 1 if args.quick else 5
    replay_events = 2_000 if args.quick else 20_000

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{'quick' if args.quick else 'full'} run; load average at the start {load_average()}", flush=True)
    latency: Dict[str, Dict[str, float]] = {}
    drain: Dict[str, float] = {}
    drain_apart: Dict[str, float] = {}
    replayed: Dict[str, float] = {}
    with Collector() as collector:
        if "log_event" in parts:
            latency = bench_log_event(collector, requests_per_round, rounds)
        template = sample_event(collector)
        if "drain" in parts:
            drain = bench_drain(CollectorHandle(collector), template, events, batch_size=25, rounds=drain_rounds)
    if "drain" in parts:
        with collector_process() as base_uri:
            drain_apart = bench_drain(CollectorHandle(base_uri=base_uri), template, events, batch_size=25,
                                      rounds=drain_rounds)
    if "replay" in parts:
        replayed = bench_replay(template, replay_events, rounds)

    print(f"\nload average at the end {load_average()} (other work on this machine shares its cores)")
    print("| measure | baseline | moesiftornado_durable | ratio |")
    print("|---|---|---|---|")
    if latency:
        base = latency["baseline"]
        for mode, label in (("durable", "log_event, default (journal write; target p50 ≤ 25, p99 ≤ 120)"),
                            ("sync_full", "log_event, SPOOL_SYNC full (synced by the journal's syncer thread)"),
                            ("thread", 'log_event, SHIPPER "thread" (journal write, shipper on threads here)'),
                            ("strict", "strict mode: spooling before the response is sent")):
            for q in ("p50", "p99"):
                value = latency[mode][q]
                print(f"| {label}, {q} µs (baseline: capture + json only) | {base[q]:.0f} | {value:.0f} | "
                      f"{value / base[q]:.2f} |")
    for figures, where in ((drain, "collector in this process"), (drain_apart, "collector in its own process")):
        for key, label in (("durable", "journal → shipper → collector"),
                           ("thread", 'SHIPPER "thread", from its spool')):
            if key in figures:
                base, value = figures["baseline"], figures[key]
                print(f"| drain at BATCH_SIZE 25, {label}, {where}, events/s (baseline: moesifapi loop from memory)"
                      f" | {base:,.0f} | {value:,.0f} | {value / base:.2f} |")
    if replayed:
        size, connections = DEFAULT_REPLAY_BATCH_SIZE, DEFAULT_REPLAY_CONNECTIONS
        rows = [("replay", "baseline", f"replay ({connections} connections), collector in its own process"),
                ("one_connection", "baseline", "replay --connections 1, collector in its own process"),
                ("in_process", "baseline_in_process",
                 f"replay ({connections} connections), collector in this process")]
        for key, base_key, label in rows:
            for kind, what in (("drain", "as its progress line reports it"), ("command", "whole command")):
                value, baseline = replayed[f"{key}_{kind}"], replayed[base_key]
                print(f"| {label}, events/s {what} (batches of {size}; baseline: moesifapi loop at batch {size}) | "
                      f"{baseline:,.0f} | {value:,.0f} | {value / baseline:.2f} |")
    print("\nThe collector checks batches with orjson (the standard parser for what orjson refuses).")

    print("\nIssue 15's targets (rows 4-5 of its table; rows 1-3 are benchmarks/http_throughput.py's):")
    print("| measure | target | measured | met |")
    print("|---|---|---|---|")
    ratio = drain["durable"] / drain["baseline"] if drain else None
    print(target_row("drain at BATCH_SIZE 25 (journal → shipper → collector in this process), ratio to a plain "
                     "moesifapi `create_events_batch` loop resending the same events", f"≥ {DRAIN_TARGET}",
                     None if ratio is None else f"{ratio:.2f}", None if ratio is None else ratio >= DRAIN_TARGET))
    ratio = drain_apart["durable"] / drain_apart["baseline"] if drain_apart else None
    print(target_row("the same, collector in its own process", f"≥ {DRAIN_TARGET}",
                     None if ratio is None else f"{ratio:.2f}", None if ratio is None else ratio >= DRAIN_TARGET))
    value = replayed.get("replay_drain")
    print(target_row("replay, events/s (progress line), collector in its own process", f"≥ {REPLAY_TARGET:,}",
                     None if value is None else f"{value:,.0f}", None if value is None else value >= REPLAY_TARGET))
    return 0


def target_row(measure: str, target: str, measured: Optional[str], met: Optional[bool]) -> str:
    verdict = "–" if met is None else ("met" if met else "missed")
    return f"| {measure} | {target} | {measured or 'not run'} | {verdict} |"


def load_average() -> str:
    try:
        return "/".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
