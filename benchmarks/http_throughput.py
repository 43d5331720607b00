"""HTTP throughput of a hello-world Tornado app, without a logger and with each middleware setup, in alternating rounds.

    python benchmarks/http_throughput.py                       # full run (~5 minutes)
    python benchmarks/http_throughput.py --quick               # smoke mode for CI (~15 s); asserts nothing about speed
    python benchmarks/http_throughput.py --generator python    # the bundled load generator even when wrk is installed

The rows are the table `ROWS` below: no log_function (the baseline), this middleware with its default options and
with other options, moesiftornado 0.1.4 (the original middleware, measured only if it imports: `pip install
moesiftornado==0.1.4`), and an endpoint whose handler spends ~1 ms of CPU, without and with the middleware. Each
request is a GET with a few headers answered with a ~650-byte JSON body: a ~1.5 KB event.

Every round starts the app in its own process (`benchmarks/_http_app.py`, options as JSON on stdin, 127.0.0.1, a
free port), with a fresh SPOOL_DIR and BASE_URI pointing at the local collector in this process; warms it up,
loads it with `wrk -t1 -c32` if installed, else with `benchmarks/_http_load.py` (the same shape in Python), then
stops it with SIGTERM. Rounds alternate rows (A, B, C, A, B, C, ...); each row's figure is the median of its
rounds, and its ratio is to the row without a logger on the same endpoint, from the same run. The machine is shared
and noisy: the min-max column shows how much, and the ratio is what to compare across machines.

After the table, the rows of issue 15's table this script measures, each with its target and whether this run met
it (`--quick` prints them too and asserts nothing about speed):

- hello-world throughput, default options, ratio to no log_function: target >= 0.88;
- ~1 ms handler, default options, ratio to no log_function: target >= 0.96;
- `log_event` p50 on the IOLoop as a share of a hello-world request's cost: target <= 0.12. The app times every
  log_function call on its IOLoop (`_http_app.py`, "timings"; warm-up calls left out); the share is the p50 of
  those calls in the default-options hello-world rounds (all rounds pooled) divided by a hello-world request's cost
  without a logger, 1 / (the no-logger row's median req/s), both from this run. E.g. 60 µs at 2,000 req/s (500 µs
  a request) is 0.12.

The drain and replay rows of that table are `benchmarks/pipeline.py`'s.

Exits non-zero if any round served no request, answered errors, or the app died or did not stop when asked.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import importlib
import json
import logging
import os
import platform
import re
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import tornado

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moesiftornado_durable import Config, ConfigError  # noqa: E402
from moesiftornado_durable.testing import Collector  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured setup. `options` are added to the common ones (APPLICATION_ID, SPOOL_DIR, BASE_URI)."""

    label: str
    path: str = "/hello"  # "/hello" or "/work" (~1 ms of CPU in the handler)
    logger: Optional[str] = "durable"  # None (no log_function), "durable" (this middleware) or "moesiftornado"
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)


# The table. A new option to compare is one more line; a row whose options this version's Config refuses or ignores
# is skipped with the reason.
ROWS: List[Row] = [
    Row("no log_function", logger=None),
    Row("moesiftornado_durable, default options"),
    Row('moesiftornado_durable, SPOOL_SYNC "audit" (each response waits for its event\'s group commit)',
        options={"SPOOL_SYNC": "audit"}),
    Row('moesiftornado_durable, SPOOL_SYNC "full"', options={"SPOOL_SYNC": "full"}),
    Row('moesiftornado_durable, SHIPPER "thread"', options={"SHIPPER": "thread"}),
    Row("moesiftornado 0.1.4 (in memory, not durable)", logger="moesiftornado"),
    Row("~1 ms handler, no log_function", path="/work", logger=None),
    Row("~1 ms handler, moesiftornado_durable, default options", path="/work"),
]

# Request headers, the same for wrk and the Python generator; with the ~650-byte response body, a ~1.5 KB event.
HEADERS = ["User-Agent: moesiftornado-durable-bench/1.0", "Accept: application/json",
           "X-Request-Id: 6f1c2d9e-4b7a-4c1e-9a55-3e8f0d2b7c41", "X-Api-Version: 2024-01-01"]
CONNECTIONS = 32
HERE = os.path.dirname(os.path.abspath(__file__))
APP = os.path.join(HERE, "_http_app.py")
LOAD = os.path.join(HERE, "_http_load.py")
READY_TIMEOUT = 30.0  # for the app to print its port
STOP_TIMEOUT = 10.0  # for the app to exit after SIGTERM (it closes the middleware within 1 s)
WARM_UP_REQUESTS = 50
WARM_UP_MARK = "warm-up"


@dataclasses.dataclass
class Round:
    rps: float
    requests: int
    delivered: int  # events of the load's requests at the collector when the load ended
    client_cpu: float  # the load generator's CPU seconds per second of load
    log_function_us: List[float]  # each log_function call of the load on the IOLoop, µs (none without a logger)


class RoundFailed(Exception):
    """A round whose figure cannot be trusted: the app died, served nothing, or answered errors."""


# --------------------------------------------------------------------------------------------------------------
# Which rows can run
# --------------------------------------------------------------------------------------------------------------


def why_skipped(row: Row) -> Optional[str]:
    """Why `row` cannot be measured here, or None."""
    if row.logger == "moesiftornado":
        try:
            importlib.import_module("moesiftornado")
        except Exception:
            return "not installed (pip install moesiftornado==0.1.4)"
    if row.logger == "durable" and row.options:
        return refused(row.options)
    return None


class _Warnings(logging.Handler):
    """Keeps the warnings logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: List[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def refused(options: Dict[str, Any]) -> Optional[str]:
    """Why this version's Config rejects (ConfigError) or ignores (a warning naming it) one of `options`."""
    handler = _Warnings()
    library_logger = logging.getLogger("moesiftornado_durable")
    library_logger.addHandler(handler)
    spool_dir = tempfile.mkdtemp(prefix="bench-http-check-")
    try:
        Config.from_dict({"APPLICATION_ID": "bench", "SPOOL_DIR": spool_dir, **options})
    except ConfigError as exc:
        return f"skipped: {exc}"
    finally:
        library_logger.removeHandler(handler)
        shutil.rmtree(spool_dir, ignore_errors=True)
    for record in handler.records:
        message = record.getMessage()
        if any(repr(key) in message for key in options):
            return f"skipped: {message.replace('moesiftornado_durable: ', '')}"
    return None


# --------------------------------------------------------------------------------------------------------------
# One round
# --------------------------------------------------------------------------------------------------------------


def calibrate_work(target: float = 0.001) -> int:
    """How many turns of an empty loop take `target` seconds of CPU here (best of 5)."""
    loops = 200_000
    best = float("inf")
    for _ in range(5):
        started = time.process_time()
        for _ in range(loops):
            pass
        best = min(best, time.process_time() - started)
    return max(1, int(loops * target / max(best, 1e-6)))


def start_app(spec: Dict[str, Any], log: Any) -> Tuple[subprocess.Popen, int]:
    """Start the app in its own process group with `spec` on stdin; returns it once it listens, with its port."""
    app = subprocess.Popen([sys.executable, APP], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                           start_new_session=True)
    assert app.stdin is not None and app.stdout is not None
    app.stdin.write(json.dumps(spec).encode())
    app.stdin.close()
    ready, _, _ = select.select([app.stdout], [], [], READY_TIMEOUT)
    line = app.stdout.readline() if ready else b""
    app.stdout.close()
    if not line.strip().isdigit():
        stop_app(app)
        raise RoundFailed(f"the app did not start (exit code {app.returncode}): {tail(log)}")
    return app, int(line)


def stop_app(app: subprocess.Popen) -> Optional[str]:
    """SIGTERM the app, SIGKILL its process group after STOP_TIMEOUT; what went wrong, if anything."""
    problem = None
    if app.poll() is None:
        app.send_signal(signal.SIGTERM)
        try:
            app.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            problem = f"did not exit within {STOP_TIMEOUT:.0f} s of SIGTERM"
    try:
        os.killpg(app.pid, signal.SIGKILL)  # the app, if still there, and anything it started and left behind
    except (ProcessLookupError, PermissionError):
        pass
    app.wait()
    if problem is None and app.returncode != 0:
        problem = f"exited with code {app.returncode} after SIGTERM"
    return problem


def tail(log: Any, size: int = 2000) -> str:
    log.seek(0)
    return log.read().decode("utf-8", "replace")[-size:].strip() or "(no output)"


def warm_up(port: int, path: str) -> None:
    """A few requests before the load, marked so that their events are not counted as delivered during it."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for _ in range(WARM_UP_REQUESTS):
            connection.request("GET", f"{path}?{WARM_UP_MARK}")
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise RoundFailed(f"warm-up request answered {response.status}")
    finally:
        connection.close()


def run_load(generator: str, port: int, path: str, seconds: float) -> Tuple[float, int, int, float]:
    """Load the app for `seconds`; (req/s, requests, errors, the generator's CPU s per s)."""
    if generator == "wrk":
        command = ["wrk", "-t1", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s"]
        for header in HEADERS:
            command += ["-H", header]
        command.append(f"http://127.0.0.1:{port}{path}")
    else:
        command = [sys.executable, LOAD, str(port), path, "--connections", str(CONNECTIONS), "--seconds", str(seconds)]
        for header in HEADERS:
            command += ["--header", header]
    children_before = os.times()
    client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = client.communicate(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        client.kill()
        client.wait()
        raise RoundFailed(f"the load generator did not finish within {seconds + 30:.0f} s") from None
    children_after = os.times()
    text = output.decode("utf-8", "replace")
    if client.returncode != 0:
        raise RoundFailed(f"the load generator failed (exit code {client.returncode}): {text[-2000:]}")
    cpu = (children_after.children_user - children_before.children_user
           + children_after.children_system - children_before.children_system)
    if generator == "wrk":
        return parse_wrk(text) + (cpu / max(1, round(seconds)),)
    result = json.loads(text.strip().splitlines()[-1])
    return float(result["rps"]), int(result["requests"]), int(result["errors"]), float(result["cpu"])


def parse_wrk(text: str) -> Tuple[float, int, int]:
    """(req/s, requests, errors) from wrk's report; errors are non-2xx/3xx answers and socket errors."""
    rps = re.search(r"Requests/sec:\s*([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None:
        raise RoundFailed(f"cannot read wrk's report: {text[-2000:]}")
    errors = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses:\s*(\d+)", text))
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    return float(rps.group(1)), int(total.group(1)), errors


def run_round(row: Row, collector: Collector, generator: str, seconds: float, work_loops: int) -> Round:
    spool_dir = tempfile.mkdtemp(prefix="bench-http-")
    options = {"APPLICATION_ID": "bench", "SPOOL_DIR": spool_dir, "BASE_URI": collector.base_uri, **row.options}
    timings = os.path.join(spool_dir, "log-function-timings.json")  # written by the app at exit
    spec = {"logger": row.logger, "options": options, "work_loops": work_loops, "timings": timings}
    log_function_us: List[float] = []
    with tempfile.TemporaryFile() as log:
        try:
            app, port = start_app(spec, log)
            try:
                warm_up(port, row.path)
                collector.clear()
                rps, requests, errors, client_cpu = run_load(generator, port, row.path, seconds)
                delivered = sum(WARM_UP_MARK not in event["request"]["uri"] for event in collector.events)
                died = app.poll() is not None
            finally:
                problem = stop_app(app)
            if row.logger is not None and os.path.exists(timings):
                with open(timings, encoding="utf-8") as f:
                    log_function_us = json.load(f)[WARM_UP_REQUESTS:]  # the warm-up's calls come first
        finally:
            collector.clear()
            shutil.rmtree(spool_dir, ignore_errors=True)
        if died:
            raise RoundFailed(f"the app died during the load (exit code {app.returncode}): {tail(log)}")
        if problem:
            raise RoundFailed(f"the app {problem}: {tail(log)}")
    if requests == 0:
        raise RoundFailed("no request was served")
    if errors:
        raise RoundFailed(f"{errors} errors out of {requests + errors} requests")
    return Round(rps, requests, delivered, client_cpu, log_function_us)


def sample_event_size(collector: Collector) -> int:
    """Bytes of one event as the collector received it, from a short durable run."""
    spool_dir = tempfile.mkdtemp(prefix="bench-http-sample-")
    spec = {"logger": "durable", "work_loops": 0,
            "options": {"APPLICATION_ID": "bench", "SPOOL_DIR": spool_dir, "BASE_URI": collector.base_uri}}
    try:
        with tempfile.TemporaryFile() as log:
            app, port = start_app(spec, log)
            try:
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
                connection.request("GET", "/hello", headers=dict(header.split(": ", 1) for header in HEADERS))
                connection.getresponse().read()
                connection.close()
                collector.wait_for_events(1, timeout=10)
            finally:
                stop_app(app)
        events = collector.events
        return len(json.dumps(events[-1])) if events else 0
    finally:
        collector.clear()
        shutil.rmtree(spool_dir, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------------------


def load_average() -> str:
    try:
        return "/".join(f"{value:.1f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def percentile(values: List[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


DEFAULT_HELLO = "moesiftornado_durable, default options"
DEFAULT_WORK = "~1 ms handler, moesiftornado_durable, default options"
TARGETS = {"hello": 0.88, "work": 0.96, "share": 0.12}  # issue 15


def target_row(measure: str, target: str, measured: Optional[float], detail: str, met: Optional[bool]) -> str:
    figure = "not run" if measured is None else f"{measured:.2f}{detail}"
    verdict = "–" if met is None else ("met" if met else "missed")
    return f"| {measure} | {target} | {figure} | {verdict} |"


def print_targets(medians: Dict[str, float], results: Dict[str, List[Round]]) -> None:
    """Issue 15's rows this script measures, with their targets and whether this run met them."""
    hello, work = medians.get(ROWS[0].label), medians.get("~1 ms handler, no log_function")
    print("\nIssue 15's targets (rows 1-3 of its table; the drain and replay rows are benchmarks/pipeline.py's):")
    print("| measure | target | measured | met |")
    print("|---|---|---|---|")
    ratio = medians[DEFAULT_HELLO] / hello if hello and DEFAULT_HELLO in medians else None
    print(target_row("hello-world throughput, default options, ratio to no log_function", f"≥ {TARGETS['hello']}",
                     ratio, "", None if ratio is None else ratio >= TARGETS["hello"]))
    ratio = medians[DEFAULT_WORK] / work if work and DEFAULT_WORK in medians else None
    print(target_row("~1 ms handler, default options, ratio to no log_function", f"≥ {TARGETS['work']}",
                     ratio, "", None if ratio is None else ratio >= TARGETS["work"]))
    calls = [us for r in results.get(DEFAULT_HELLO, []) for us in r.log_function_us]
    share, detail = None, ""
    if calls and hello:
        request_us = 1e6 / hello
        share = percentile(calls, 0.5) / request_us
        detail = f" ({percentile(calls, 0.5):.0f} µs of a {request_us:.0f} µs request)"
    print(target_row("`log_event` p50 on the IOLoop as a share of a hello-world request's cost (p50 of the "
                     "default-options rounds' calls ÷ 1 / no-logger req/s)", f"≤ {TARGETS['share']}", share, detail,
                     None if share is None else share <= TARGETS["share"]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI): 1 round of 1 s per row")
    parser.add_argument("--rounds", type=int, help="rounds per row (default 5; 1 with --quick)")
    parser.add_argument("--seconds", type=float, help="load per round (default 5; 1 with --quick)")
    parser.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                        help="auto: wrk when installed, else the bundled Python generator")
    parser.add_argument("--only", action="append", metavar="TEXT",
                        help="run only the rows whose label contains TEXT (repeatable); the no-logger rows always run")
    parser.add_argument("--endpoint", choices=("all", "hello", "work"), default="all",
                        help="run only the rows of this endpoint (hello-world or ~1 ms CPU; default all)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    seconds = args.seconds or (1.0 if args.quick else 5.0)
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    if generator == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed")
    if generator == "wrk":
        version = subprocess.run(["wrk", "-v"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT).stdout.decode()
        generator_label = " ".join(version.split()[:2]) + f" -t1 -c{CONNECTIONS}"
    else:
        generator_label = f"benchmarks/_http_load.py (Python, {CONNECTIONS} connections)"

    rows = [row for row in ROWS if row.logger is None or not args.only or any(text in row.label for text in args.only)]
    rows = [row for row in rows if args.endpoint == "all" or row.path == f"/{args.endpoint}"]
    skipped = {row.label: why_skipped(row) for row in rows}
    runnable = [row for row in rows if skipped[row.label] is None]
    work_loops = calibrate_work()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"Tornado {tornado.version}; load: {generator_label}, {rounds} alternating rounds of {seconds:g} s per "
          f"row, {'quick' if args.quick else 'full'} run; load average at the start {load_average()}", flush=True)

    results: Dict[str, List[Round]] = {row.label: [] for row in runnable}
    failures: List[str] = []
    with Collector() as collector:
        event_bytes = sample_event_size(collector)
        print(f"event size at the collector: {event_bytes:,} bytes; /work handler: {work_loops:,} empty loop turns "
              f"(~1 ms of CPU)", flush=True)
        for number in range(1, rounds + 1):
            for row in runnable:
                try:
                    result = run_round(row, collector, generator, seconds, work_loops)
                except RoundFailed as exc:
                    failures.append(f"round {number}, {row.label}: {exc}")
                    print(f"  round {number}: {row.label}: FAILED: {exc}", file=sys.stderr, flush=True)
                    continue
                results[row.label].append(result)
                print(f"  round {number}: {row.label}: {result.rps:,.0f} req/s", file=sys.stderr, flush=True)

    print(f"\nload average at the end {load_average()} (other work on this machine shares its cores)")
    print("| setup | endpoint | req/s (median) | min-max | ratio to no logger | delivered during load | client CPU | "
          "log_function p50 / p99 µs |")
    print("|---|---|---|---|---|---|---|---|")
    medians = {label: statistics.median(r.rps for r in rounds_) for label, rounds_ in results.items() if rounds_}
    baselines = {row.path: medians.get(row.label) for row in runnable if row.logger is None}
    for row in rows:
        endpoint = "hello-world" if row.path == "/hello" else "~1 ms CPU"
        if skipped[row.label] or row.label not in medians:
            print(f"| {row.label} | {endpoint} | {skipped[row.label] or 'failed'} | | | | | |")
            continue
        measured = results[row.label]
        median = medians[row.label]
        baseline = baselines.get(row.path)
        ratio = f"{median / baseline:.2f}" if baseline else "n/a"
        delivered = "–" if row.logger is None else \
            f"{100 * sum(r.delivered for r in measured) / sum(r.requests for r in measured):.0f} %"
        cpu = statistics.median(r.client_cpu for r in measured)
        calls = [us for r in measured for us in r.log_function_us]
        timing = f"{percentile(calls, 0.5):.0f} / {percentile(calls, 0.99):.0f}" if calls else "–"
        print(f"| {row.label} | {endpoint} | {median:,.0f} | {min(r.rps for r in measured):,.0f}-"
              f"{max(r.rps for r in measured):,.0f} | {ratio} | {delivered} | {100 * cpu:.0f} % | {timing} |")
    print_targets(medians, results)
    if failures:
        print(f"\n{len(failures)} failed rounds:", file=sys.stderr)
        for failure in failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
