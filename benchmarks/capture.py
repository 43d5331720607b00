"""Capture + serialize on the IOLoop thread: µs per call for a ~1.5 KB event with JSON bodies, no disk.

    python benchmarks/capture.py           # full run (~20 s)
    python benchmarks/capture.py --quick   # smoke mode (a few seconds); asserts nothing about speed

One real request (POST /orders, a 469-byte JSON body echoed back) is served once; its finished handler
is then captured again and again in this process, which is what `log_event` does before the spool write:

- naive: ``json.dumps(capture_event(...))``: every value plain, the json module writes the whole event
  (the baseline pipeline.py uses);
- full: ``Codec().encode(capture_steps(...) outcome)``: the app's full capture (with masks, MASK_EVENT_MODEL,
  SHIPPER 'thread'; bodies parsed and written once by orjson, the event written by orjson);
- split: ``Codec().encode(rawcapture.capture_steps(...) outcome)``: the middleware's default path on the
  IOLoop (the request's raw parts packed; rawrecord.py);
- build (shipper): what the shipper then does with that record at ingest (``eventbuild.build_rows``: the
  event built and encoded), off the IOLoop.

Then the steps of the current path, each alone. p50 and p99 are the medians over rounds of each round's
percentile of single calls (wall clock, perf_counter); "CPU" is this thread's CPU time per call, the
lowest round (thread_time: time spent preempted by other processes does not count, so it is the
steadiest figure on a shared machine). Modes alternate within a round. Compare ratios, not absolute
figures, across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

import orjson
import requests
import tornado.web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from conftest import serve  # noqa: E402
from pipeline import BODY, OrderHandler  # noqa: E402  # the same 1.5 KB event as pipeline.py's log_event rows

from moesiftornado_durable import capture, rawcapture  # noqa: E402
from moesiftornado_durable.capture import (  # noqa: E402
    body_capture_transform,
    capture_event,
    capture_steps,
    install_body_capture,
    run_sync,
)
from moesiftornado_durable.codec import Codec, to_json_bytes  # noqa: E402
from moesiftornado_durable.config import Config  # noqa: E402
from moesiftornado_durable.eventbuild import build_rows  # noqa: E402
from moesiftornado_durable.kinds import CAPTURE  # noqa: E402
from moesiftornado_durable.sampling import Sampler  # noqa: E402


def finished_handler(config: Config) -> Any:
    """The handler of one real POST /orders, as Tornado hands it to log_function (response body captured)."""
    seen: List[Any] = []
    app = tornado.web.Application([(r"/orders", OrderHandler)], log_function=seen.append)
    install_body_capture(app, body_capture_transform(config.max_body_bytes))
    with serve(app) as url:
        requests.post(url + "/orders", json=BODY, timeout=5)
    return seen[-1]


def percentiles(function: Callable[[], Any], calls: int) -> Dict[str, float]:
    samples = []
    clock = time.perf_counter_ns
    cpu_started = time.thread_time_ns()
    for _ in range(calls):
        started = clock()
        function()
        samples.append(clock() - started)
    cpu = (time.thread_time_ns() - cpu_started) / calls / 1e3
    samples.sort()
    figures = {q: samples[min(len(samples) - 1, int(share * len(samples)))] / 1e3
               for q, share in (("p50", 0.5), ("p99", 0.99))}
    figures["cpu"] = cpu
    return figures


def run(modes: Dict[str, Callable[[], Any]], calls: int, rounds: int) -> Dict[str, Dict[str, float]]:
    """Alternate the modes in each round; per mode, the median over rounds of each round's p50 and p99."""
    results: Dict[str, List[Dict[str, float]]] = {name: [] for name in modes}
    for _ in range(rounds):
        for name, function in modes.items():
            for _ in range(min(200, calls)):  # warm-up
                function()
            results[name].append(percentiles(function, calls))
    return {name: {"p50": statistics.median(r["p50"] for r in rounds_of),
                   "p99": statistics.median(r["p99"] for r in rounds_of),
                   "cpu": min(r["cpu"] for r in rounds_of)}
            for name, rounds_of in results.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    args = parser.parse_args()
    calls, rounds = (300, 1) if args.quick else (3000, 7)

    spool_dir = tempfile.mkdtemp(prefix="bench-capture-")
    try:
        config = Config.from_dict({"APPLICATION_ID": "bench", "SPOOL_DIR": spool_dir})
        handler = finished_handler(config)
    finally:
        shutil.rmtree(spool_dir, ignore_errors=True)
    encode = Codec().encode
    now = time.time()

    def naive() -> bytes:
        return json.dumps(capture_event(handler, config, now)).encode()

    def current() -> bytes:
        return encode(run_sync(capture_steps(handler, config, now)).event)

    sampler = Sampler()

    def split() -> bytes:
        return encode(run_sync(rawcapture.capture_steps(handler, config, now, sampler)).packed)

    elapsed = handler.request.request_time()  # Tornado's clock still runs after finish: one start time for all
    handler.request.request_time = lambda: elapsed
    record = split()

    def build() -> bytes:
        return build_rows([(CAPTURE, record, now)], Codec())[0][1]

    assert build() == current()[:-38] + build()[-38:], "the shipper builds what the app would (transaction id aside)"
    event_bytes = len(current())
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"orjson {orjson.__version__}, event {event_bytes} bytes, "
          f"{'quick' if args.quick else 'full'} run ({rounds} rounds of {calls} calls)", flush=True)

    modes: Dict[str, Callable[[], Any]] = {"naive": naive, "current": current, "split": split, "build": build}
    totals = run(modes, calls, rounds)

    raw = handler.request.body
    prepared = run_sync(capture_steps(handler, config, now)).event
    plain = capture_event(handler, config, now)
    steps: Dict[str, Callable[[], Any]] = {
        "timestamps (2)": lambda: (capture.format_time(now - 0.002), capture.format_time(now)),
        "headers joined (2)": lambda: (capture.join_headers(handler.request.headers),
                                       capture.join_headers(handler._headers)),
        "client ip": lambda: capture.client_ip(handler.request),
        "transaction id": capture.new_transaction_id,
        "bodies read, json module (2)": lambda: (capture.encode_body(raw), capture.encode_body(raw)),
        "event written, json module (plain values)": lambda: to_json_bytes(plain),
        "bodies read + written, orjson (2)": lambda: (capture._json_by_orjson(raw, frozenset()),
                                                      capture._json_by_orjson(raw, frozenset())),
        "event written, orjson (bodies already written)": lambda: to_json_bytes(prepared),
    }
    parts = run(steps, calls, rounds)

    print()
    base = totals["naive"]
    print("| capture + serialize, µs per call | p50 | p99 | CPU | ratio to naive (p50, CPU) |")
    print("|---|---|---|---|---|")
    labels = {"naive": "naive: json.dumps(capture_event(...))", "current": "full: capture_steps + Codec.encode",
              "split": "split, on the IOLoop: rawcapture.capture_steps + Codec.encode (the default)",
              "build": "split, in the shipper: build_rows (event built + encoded)"}
    for name, figures in totals.items():
        print(f"| {labels[name]} | {figures['p50']:.1f} | {figures['p99']:.1f} | {figures['cpu']:.1f} | "
              f"{figures['p50'] / base['p50']:.2f}, {figures['cpu'] / base['cpu']:.2f} |")
    print()
    print("| step (full capture), µs per call | p50 | p99 | CPU |")
    print("|---|---|---|---|")
    for name, figures in parts.items():
        print(f"| {name} | {figures['p50']:.1f} | {figures['p99']:.1f} | {figures['cpu']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
