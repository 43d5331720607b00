"""Chaos suite: an app under load, a collector cycling through faults, SIGKILLs; no answered request may be lost.

    python benchmarks/chaos.py            # full run: 20 kills per mode, a few minutes
    python benchmarks/chaos.py --quick    # the CI smoke run (well under a minute)
    python benchmarks/chaos.py --kills 50 --seed 7 --rate 300

Each invocation runs twice, in the default mode and in strict mode (examples/app.py --strict, where
`SpoolBeforeSendMixin` commits the event before the response's last bytes are sent). In each run:

- examples/app.py serves on a fresh SPOOL_DIR in a subprocess, under continuous load from a client in
  another process, which records every request that got a complete, correct response (`/hello?n=<run>-<seq>`,
  each n unique) with the times it was sent and answered;
- the local collector (`Collector`, in this process) cycles through healthy, 503, 429 with Retry-After,
  stalls (5 s; 1 s with --quick), dropped connections and down, each phase of a random length;
- the app is SIGKILLed at random moments (seeded) and restarted on the same SPOOL_DIR, K times;
- at the end the faults stop, the last app instance drains its spool (bounded wait) and is stopped with
  SIGTERM.

Then every request answered more than 100 ms before a kill (or by the last instance) must have exactly one
event at the collector after dedup by transaction_id, matched by the n in the event's request URI. Requests
answered within 100 ms before a kill are counted apart ("inside the gap"): Tornado calls log_function after the
response is written, so a kill there can lose an event. In strict mode that count must be 0 too.

The exit status is 1 if an event is lost where it must not be (or a request was logged twice, or answered
wrongly), else 0. Nothing about speed is asserted; the latencies are printed to be read.
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import dataclasses
import http.client
import itertools
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from typing import Any, DefaultDict, Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from conftest import AppProcess  # noqa: E402

from moesiftornado_durable.locks import slots, spool_path  # noqa: E402
from moesiftornado_durable.spool import TABLE, directory_stats  # noqa: E402
from moesiftornado_durable.testing import Collector  # noqa: E402

GAP = 0.100  # seconds before a kill in which an answered request may lose its event (default mode only)
FAULTS = ("503", "429", "stall", "drop", "down")
CLIENT_WORKERS = 4


@dataclasses.dataclass(frozen=True)
class Profile:
    """How hard one run shakes the app."""

    kills: int
    uptime: Tuple[float, float]  # seconds an app instance serves before its SIGKILL, uniform in this range
    phase: Tuple[float, float]  # seconds each collector phase (healthy or a fault) lasts, uniform
    stall: float  # seconds the collector holds each request during a stall phase
    rate: float  # requests/s the load client offers
    drain_timeout: float  # the longest wait for the last instance to empty its spool


FULL = Profile(kills=20, uptime=(2.0, 6.0), phase=(1.5, 4.0), stall=5.0, rate=150.0, drain_timeout=90.0)
QUICK = Profile(kills=4, uptime=(0.8, 2.0), phase=(0.4, 1.0), stall=1.0, rate=100.0, drain_timeout=30.0)


# ---------------------------------------------------------------------------------------------------------------
# The load client (a separate process: `chaos.py --client`)
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Answered:
    """One request that got a complete response: its n, the app's port, when it was sent and answered."""

    n: str
    port: int
    sent: float  # time.monotonic(), which is system-wide on Linux: comparable with this process's kill times
    received: float
    status: int
    correct: bool  # 200 with the body the handler writes for this n
    wrong_body: str = ""  # the start of a wrong answer, to say what went wrong

    @property
    def latency(self) -> float:
        return self.received - self.sent


def client_main(run: str, rate: float, deadline: float, out: str) -> int:
    """Send `/hello?n=<run>-<seq>` at about `rate` requests/s to the port last read on stdin, until stdin closes
    or `deadline` seconds pass; then write one line per answered request to `out`."""
    port: List[Optional[int]] = [None]
    stop = threading.Event()
    sequence = itertools.count()
    answered: List[Answered] = []
    failures = Counter[str]()
    lock = threading.Lock()
    ends_at = time.monotonic() + deadline

    def worker() -> None:
        connection: Optional[http.client.HTTPConnection] = None
        connected_to: Optional[int] = None
        interval = CLIENT_WORKERS / rate
        next_at = time.monotonic()
        while not stop.is_set() and time.monotonic() < ends_at:
            target = port[0]
            if target is None:  # the app is being restarted
                if connection is not None:
                    connection.close()
                    connection = None
                stop.wait(0.005)
                continue
            if connection is None or connected_to != target:
                if connection is not None:
                    connection.close()
                connection, connected_to = http.client.HTTPConnection("127.0.0.1", target, timeout=10), target
            n = f"{run}-{next(sequence)}"
            sent = time.monotonic()
            try:
                connection.request("GET", f"/hello?n={n}")
                response = connection.getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                connection = None
                with lock:
                    failures[type(exc).__name__] += 1
                stop.wait(0.01)  # the app is being killed or restarted
                continue
            received = time.monotonic()
            try:
                correct = response.status == 200 and json.loads(body) == {"hello": n}
            except ValueError:
                correct = False
            with lock:
                answered.append(Answered(n, target, sent, received, response.status, correct,
                                         "" if correct else repr(body[:200])))
            next_at += interval
            delay = next_at - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            elif delay < -1.0:
                next_at = time.monotonic()  # fell far behind (a restart): no burst to catch up
        if connection is not None:
            connection.close()

    threads = [threading.Thread(target=worker, name=f"chaos-client-{i}", daemon=True) for i in range(CLIENT_WORKERS)]
    for thread in threads:
        thread.start()
    reader = threading.Thread(target=_read_ports, args=(port, stop), name="chaos-client-stdin", daemon=True)
    reader.start()
    while not stop.is_set() and time.monotonic() < ends_at:
        stop.wait(0.05)
    stop.set()
    for thread in threads:
        thread.join(15)
    with open(out + ".tmp", "w") as f:
        json.dump({"answered": [dataclasses.astuple(a) for a in answered], "failures": dict(failures)}, f)
    os.replace(out + ".tmp", out)
    return 0


def _read_ports(port: List[Optional[int]], stop: threading.Event) -> None:
    """Each line on stdin is the port to send to from now on (0: pause); end of input means stop."""
    for line in sys.stdin:
        port[0] = int(line) or None
    stop.set()


class LoadClient:
    """The parent's handle on the client process: tell it where the app listens, stop it, read its record."""

    def __init__(self, run: str, rate: float, deadline: float, out: str) -> None:
        self._out = out
        self._process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--client", run, "--rate", str(rate),
             "--deadline", str(deadline), "--out", out],
            stdin=subprocess.PIPE, text=True,
        )

    def target(self, port: Optional[int]) -> None:
        """Send to `port` from now on; None pauses the client (so it never knocks on a dead app's port, which
        another process on the machine may have taken by then)."""
        assert self._process.stdin is not None
        self._process.stdin.write(f"{port or 0}\n")
        self._process.stdin.flush()

    def stop(self, timeout: float = 30.0) -> Tuple[List[Answered], Dict[str, int]]:
        assert self._process.stdin is not None
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        try:
            self._process.wait(timeout)
        except Exception:
            self.kill()
            raise
        with open(self._out) as f:
            record = json.load(f)
        return [Answered(*row) for row in record["answered"]], record["failures"]

    def kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()  # by its PID
            self._process.wait(10)


# ---------------------------------------------------------------------------------------------------------------
# Collector faults on a schedule
# ---------------------------------------------------------------------------------------------------------------


class FaultCycler:
    """Cycles the collector through healthy and faulty phases (healthy between every two faults) until stopped."""

    def __init__(self, collector: Collector, rng: random.Random, profile: Profile) -> None:
        self._collector = collector
        self._rng = rng
        self._profile = profile
        self._stop = threading.Event()
        self.phases: List[Tuple[str, float]] = []  # (kind, start), in order; each ends where the next starts
        self._thread = threading.Thread(target=self._run, name="chaos-faults", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._apply("healthy")
        self.phases.append(("healthy", time.monotonic()))

    def _run(self) -> None:
        for index in itertools.count():
            kind = "healthy" if index % 2 == 0 else FAULTS[(index // 2) % len(FAULTS)]
            self._apply(kind)
            self.phases.append((kind, time.monotonic()))
            if self._stop.wait(self._rng.uniform(*self._profile.phase)):
                return

    def _apply(self, kind: str) -> None:
        collector = self._collector
        collector.reset()
        collector.come_up()
        if kind == "503":
            collector.respond_with(503, times=None)
        elif kind == "429":
            collector.respond_with(429, times=None, headers={"Retry-After": "1"})
        elif kind == "stall":
            collector.stall(self._profile.stall, times=None)
        elif kind == "drop":
            collector.drop_connections(times=None)
        elif kind == "down":
            collector.go_down()

    def kind_at(self, moment: float) -> str:
        starts = [start for _, start in self.phases]
        index = bisect.bisect_right(starts, moment) - 1
        return self.phases[index][0] if index >= 0 else "healthy"

    def counts(self) -> Counter[str]:
        return Counter(kind for kind, _ in self.phases[:-1] if kind != "healthy")


# ---------------------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Instance:
    """One app process: its port, when it started serving and when it was SIGKILLed (None: stopped cleanly)."""

    port: int
    started: float
    killed: Optional[float] = None


@dataclasses.dataclass
class Result:
    mode: str
    answered: int = 0
    wrong: int = 0
    wrong_examples: List[str] = dataclasses.field(default_factory=list)
    client_failures: int = 0
    events: int = 0
    distinct: int = 0
    duplicates: int = 0
    outside: int = 0
    inside: int = 0
    lost_outside: List[str] = dataclasses.field(default_factory=list)
    lost_inside: List[str] = dataclasses.field(default_factory=list)
    logged_twice: List[str] = dataclasses.field(default_factory=list)
    unanswered_delivered: int = 0
    dead_lettered: int = 0
    left_in_spool: int = 0
    drained: bool = False
    exit_code: Optional[int] = None
    kills: int = 0
    fault_phases: Counter[str] = dataclasses.field(default_factory=Counter)
    faulted_requests: int = 0
    wall: float = 0.0
    latency_healthy: List[float] = dataclasses.field(default_factory=list)
    latency_faults: List[float] = dataclasses.field(default_factory=list)

    @property
    def failed(self) -> List[str]:
        reasons = []
        if self.lost_outside:
            reasons.append(f"{len(self.lost_outside)} event(s) lost outside the gap, e.g. n={self.lost_outside[:5]}")
        if self.mode == "strict" and self.lost_inside:
            reasons.append(f"{len(self.lost_inside)} event(s) lost inside the gap in strict mode, "
                           f"e.g. n={self.lost_inside[:5]}")
        if self.logged_twice:
            reasons.append(f"{len(self.logged_twice)} request(s) logged twice, e.g. n={self.logged_twice[:5]}")
        if self.wrong:
            reasons.append(f"{self.wrong} wrong response(s), e.g. {self.wrong_examples}")
        return reasons


def run_mode(mode: str, profile: Profile, seed: int, workdir: str, processes: int,
             options: Dict[str, str]) -> Result:
    """One chaos run of the app in `mode` ("default" or "strict"); see the module docstring."""
    result = Result(mode)
    started = time.monotonic()
    spool_dir = os.path.join(workdir, f"spool-{mode}")
    kill_rng = random.Random(f"{seed}:kills")
    fault_rng = random.Random(f"{seed}:faults")
    log_path = os.path.join(workdir, f"app-{mode}.log")
    instances: List[Instance] = []
    app: Optional[AppProcess] = None
    client: Optional[LoadClient] = None
    # The client stops by itself if this process dies: a bound of every expected phase, plus margin.
    client_deadline = (profile.kills + 1) * (profile.uptime[1] + 20) + 60
    with Collector() as collector, open(log_path, "w") as log:
        cycler = FaultCycler(collector, fault_rng, profile)

        def start_app() -> AppProcess:
            process = AppProcess(spool_dir, collector.base_uri, workdir, processes, strict=(mode == "strict"),
                                 output=log, **options)
            instances.append(Instance(process.port, time.monotonic()))
            assert client is not None
            client.target(process.port)
            return process

        try:
            client = LoadClient(mode, profile.rate, client_deadline, os.path.join(workdir, f"client-{mode}.json"))
            cycler.start()
            app = start_app()
            for kill in range(profile.kills):
                time.sleep(kill_rng.uniform(*profile.uptime))
                instances[-1].killed = time.monotonic()
                app.kill()
                client.target(None)
                result.kills += 1
                print(f"  {mode}: kill {kill + 1}/{profile.kills} at {time.monotonic() - started:.1f} s",
                      file=sys.stderr, flush=True)
                app = start_app()
            time.sleep(kill_rng.uniform(*profile.uptime))
            answered, failures = client.stop()
            client = None
            cycler.stop()
            result.drained = _wait_for_drain(spool_dir, profile.drain_timeout)
            result.exit_code = app.terminate()
        finally:
            if client is not None:
                client.kill()
            if app is not None:
                app.kill()
        events = collector.events
        result.faulted_requests = sum(1 for r in collector.requests if r.status in (0, 429, 503))
    result.fault_phases = cycler.counts()
    _analyse(result, answered, failures, events, instances, cycler)
    stats = directory_stats(spool_dir)
    result.dead_lettered = stats.dead_letter
    result.left_in_spool = stats.ready + stats.in_flight
    if result.failed:
        _explain_losses(result, spool_dir, log_path)
    else:
        shutil.rmtree(spool_dir, ignore_errors=True)
    result.wall = time.monotonic() - started
    return result


def _wait_for_drain(spool_dir: str, timeout: float) -> bool:
    """Wait until no record is ready or in flight in any spool file of `spool_dir` (read-only looks)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            stats = directory_stats(spool_dir)
        except (OSError, sqlite3.Error):
            stats = None  # a file being created or removed right now
        if stats is not None and stats.ready + stats.in_flight == 0:
            return True
        time.sleep(0.1)
    return False


def _n_of(event: Dict[str, Any]) -> Optional[str]:
    uri = (event.get("request") or {}).get("uri") or ""
    values = parse_qs(urlsplit(uri).query).get("n")
    return values[0] if values else None


def _analyse(result: Result, answered: List[Answered], failures: Dict[str, int], events: List[Dict[str, Any]],
             instances: List[Instance], cycler: FaultCycler) -> None:
    result.client_failures = sum(failures.values())
    result.wrong = sum(1 for a in answered if not a.correct)
    result.wrong_examples = [f"n={a.n} status {a.status}: {a.wrong_body}" for a in answered if not a.correct][:3]
    good = [a for a in answered if a.correct]
    result.answered = len(good)

    transaction_ids: DefaultDict[str, Set[str]] = defaultdict(set)
    all_ids: List[str] = []
    for event in events:
        n = _n_of(event)
        transaction_id = str(event.get("transaction_id"))
        all_ids.append(transaction_id)
        if n is not None:
            transaction_ids[n].add(transaction_id)
    result.events = len(all_ids)
    result.distinct = len(set(all_ids))
    result.duplicates = result.events - result.distinct
    result.logged_twice = sorted(n for n, ids in transaction_ids.items() if len(ids) > 1)
    answered_ns = {a.n for a in good}
    result.unanswered_delivered = sum(1 for n in transaction_ids if n not in answered_ns)

    by_port: DefaultDict[int, List[Instance]] = defaultdict(list)
    for instance in instances:
        by_port[instance.port].append(instance)
    for a in good:
        instance = [i for i in by_port[a.port] if i.started <= a.sent][-1]  # the newest instance on that port
        inside = instance.killed is not None and a.received >= instance.killed - GAP
        if inside:
            result.inside += 1
            if a.n not in transaction_ids:
                result.lost_inside.append(a.n)
        else:
            result.outside += 1
            if a.n not in transaction_ids:
                result.lost_outside.append(a.n)
        (result.latency_healthy if cycler.kind_at(a.sent) == "healthy" else result.latency_faults).append(a.latency)


def _explain_losses(result: Result, spool_dir: str, log_path: str) -> None:
    """Say where the lost events are, if anywhere: still spooled, dead-lettered, or gone."""
    lost = set(result.lost_outside) | set(result.lost_inside)
    found: Counter[str] = Counter()
    for slot in slots(spool_dir):
        conn = sqlite3.connect(f"file:{spool_path(spool_dir, slot)}?mode=ro", uri=True)
        try:
            for table, label in ((TABLE, "still in the spool"), ("dead_letter", "dead-lettered")):
                with contextlib.suppress(sqlite3.Error):
                    for (data,) in conn.execute(f"SELECT data FROM {table}"):
                        if _n_of(json.loads(data)) in lost:
                            found[label] += 1
        finally:
            conn.close()
    print(f"  {result.mode}: of {len(lost)} lost: {dict(found) or 'none found in the spool'}; "
          f"spool kept in {spool_dir}, app log in {log_path}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------------------------------


def _percentile(values: List[float], q: float) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000:.1f}"


def print_table(results: List[Result]) -> None:
    def faults(r: Result) -> str:
        kinds = " ".join(f"{kind}×{r.fault_phases[kind]}" for kind in FAULTS if r.fault_phases[kind])
        return f"{sum(r.fault_phases.values())} phases ({kinds}); {r.faulted_requests} requests failed"

    rows: List[Tuple[str, Any]] = [
        ("requests answered (complete, correct responses)", lambda r: f"{r.answered:,}"),
        ("events delivered (distinct transaction_id)", lambda r: f"{r.distinct:,}"),
        ("lost, answered > 100 ms before a kill (must be 0)", lambda r: f"{len(r.lost_outside)} of {r.outside:,}"),
        ("lost, answered ≤ 100 ms before a kill (strict: must be 0)",
         lambda r: f"{len(r.lost_inside)} of {r.inside:,}"),
        ("duplicates before dedup", lambda r: f"{r.duplicates:,}"),
        ("dead-lettered", lambda r: f"{r.dead_lettered:,}"),
        ("kills (SIGKILL, restarted on the same SPOOL_DIR)", lambda r: f"{r.kills}"),
        ("collector faults injected", faults),
        ("events of requests cut off by a kill (delivered, no response)", lambda r: f"{r.unanswered_delivered:,}"),
        ("client attempts without a complete response (cut off by a kill)", lambda r: f"{r.client_failures:,}"),
        ("left in the spool after the drain", lambda r: f"{r.left_in_spool:,}"),
        ("wall time, s", lambda r: f"{r.wall:.1f}"),
        ("app p50 latency, ms: healthy / during faults",
         lambda r: f"{_percentile(r.latency_healthy, 0.5)} / {_percentile(r.latency_faults, 0.5)}"),
        ("app p99 latency, ms: healthy / during faults",
         lambda r: f"{_percentile(r.latency_healthy, 0.99)} / {_percentile(r.latency_faults, 0.99)}"),
    ]
    print()
    print("| measure | " + " | ".join(f"{r.mode} mode" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    parser.add_argument("--kills", type=int, help="SIGKILLs per mode (default 20; 3 with --quick)")
    parser.add_argument("--seed", type=int, default=4, help="seed of the kill and fault schedules (default 4)")
    parser.add_argument("--rate", type=float, help="requests/s offered by the load client")
    parser.add_argument("--processes", type=int, default=1, help="app processes (forked by Tornado)")
    parser.add_argument("--mode", choices=("default", "strict", "both"), default="both")
    parser.add_argument("--option", action="append", default=[], help="an extra middleware option, KEY=JSON")
    parser.add_argument("--client", metavar="RUN", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, default=600.0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        return client_main(args.client, args.rate, args.deadline, args.out)

    profile = QUICK if args.quick else FULL
    profile = dataclasses.replace(profile, kills=profile.kills if args.kills is None else args.kills,
                                  rate=args.rate or profile.rate)
    options = dict(pair.split("=", 1) for pair in args.option)
    modes = ("default", "strict") if args.mode == "both" else (args.mode,)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{'quick' if args.quick else 'full'} run, seed {args.seed}, {profile.kills} kills per mode, "
          f"{profile.rate:.0f} req/s offered", flush=True)
    workdir = tempfile.mkdtemp(prefix="chaos-")
    results = []
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on SIGTERM as on Ctrl-C
    try:
        for mode in modes:
            results.append(run_mode(mode, profile, args.seed, workdir, args.processes, options))
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_table(results)
    failures = [f"{r.mode}: {reason}" for r in results for reason in r.failed]
    for failure in failures:
        print(f"FAIL {failure}")
    if not failures:
        shutil.rmtree(workdir, ignore_errors=True)
        print("\nOK: every request answered outside the gap has exactly one event"
              + (" (strict mode: inside the gap too)" if "strict" in modes else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
