"""What capturing outgoing calls costs the caller: µs per loopback call, with and without CAPTURE_OUTGOING_REQUESTS.

    python benchmarks/outgoing.py           # full run (~45 s)
    python benchmarks/outgoing.py --quick   # smoke mode (a few seconds); asserts nothing about speed

A Tornado backend on 127.0.0.1 answers POST /charges with a small JSON body (its own thread and IOLoop).
The caller makes calls to it with a keep-alive `requests.Session` and with `AsyncHTTPClient.fetch` (on an
IOLoop of its own), in rounds that alternate "off" (no middleware capturing) and "on" (a middleware with
CAPTURE_OUTGOING_REQUESTS in the default SHIPPER mode: capture + one journal write per call, on the
caller's thread). Printed: the median over rounds of each round's p50 per call (wall clock), and the
caller's CPU time per call (thread_time, the lowest round). The collector is local; the shipper sends in
its own process. Compare ratios, not absolute figures, across machines. It fails if a call made with
capture on did not reach the collector as an event, or one made with capture off did.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Tuple

import requests
import tornado.httpclient
import tornado.web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from conftest import serve  # noqa: E402

from moesiftornado_durable import MoesifMiddleware  # noqa: E402
from moesiftornado_durable.testing import Collector  # noqa: E402

WARM_UP = 10  # calls before each measured round, not measured
BODY = json.dumps({"amount": 1200, "currency": "eur", "customer": "cus_123", "description": "x" * 200})


class Charges(tornado.web.RequestHandler):
    def post(self) -> None:
        self.write({"id": "ch_1", "status": "succeeded", "echo": json.loads(self.request.body)})


def round_of(call: Callable[[], Any], count: int) -> Tuple[float, float]:
    """(p50 wall µs, CPU µs per call) of `count` calls."""
    times: List[float] = []
    cpu = time.thread_time()
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6, (time.thread_time() - cpu) / count * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    args = parser.parse_args()
    rounds, count = (2, 50) if args.quick else (7, 400)
    loop = asyncio.new_event_loop()
    results: Dict[Tuple[str, str], List[Tuple[float, float]]] = {}
    with Collector() as collector, serve(tornado.web.Application([(r"/charges", Charges)])) as backend, \
            tempfile.TemporaryDirectory() as spool, requests.Session() as session:
        url = backend + "/charges"
        client = loop.run_until_complete(_client())

        def with_requests() -> Any:
            return session.post(url, data=BODY, headers={"Content-Type": "application/json"}, timeout=10)

        async def fetch() -> Any:
            return await client.fetch(url, method="POST", body=BODY, headers={"Content-Type": "application/json"})

        def with_fetch() -> Any:
            return loop.run_until_complete(fetch())

        options = {"APPLICATION_ID": "bench", "SPOOL_DIR": spool, "BASE_URI": collector.base_uri}
        plain = MoesifMiddleware(options)  # keeps the shipper process up through the run: no start in a round
        for _ in range(rounds):
            for mode in ("off", "on"):
                middleware = MoesifMiddleware(dict(options, CAPTURE_OUTGOING_REQUESTS=mode == "on"))
                try:
                    for name, call in (("requests", with_requests), ("AsyncHTTPClient", with_fetch)):
                        round_of(call, WARM_UP)
                        results.setdefault((name, mode), []).append(round_of(call, count))
                finally:
                    middleware.flush(30)
                    middleware.close()
        plain.close()
        client.close()
        expected = rounds * (WARM_UP + count) * 2
        outgoing = [event for event in collector.events if event.get("direction") == "Outgoing"]
        print(f"outgoing events received by the collector: {len(outgoing)} (one per call made with capture on: "
              f"{expected})")
    loop.close()
    if len(outgoing) != expected or len(collector.events) != len(outgoing):
        sys.exit("FAIL: an outgoing call was not captured, or one was captured without being asked for")
    print(f"{'client':<16} {'mode':<4} {'p50 µs':>8} {'CPU µs':>8}")
    for (name, mode), figures in results.items():
        print(f"{name:<16} {mode:<4} {statistics.median(f[0] for f in figures):8.0f} "
              f"{min(f[1] for f in figures):8.0f}")
    for name in ("requests", "AsyncHTTPClient"):
        off = statistics.median(f[0] for f in results[(name, "off")])
        on = statistics.median(f[0] for f in results[(name, "on")])
        print(f"{name}: on/off p50 = {on / off:.2f}")


async def _client() -> tornado.httpclient.AsyncHTTPClient:
    return tornado.httpclient.AsyncHTTPClient(force_instance=True)


if __name__ == "__main__":
    main()
