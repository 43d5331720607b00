"""The durability demo: an outage and a SIGKILL, and not one API call lost.

    python examples/demo.py

No Moesif account and no internet: a local Moesif-compatible collector runs on 127.0.0.1, and the
example app (examples/app.py) runs as a real process sending to it. The demo serves requests, takes
the collector down, serves more (they wait in the on-disk spool), kills the app with SIGKILL,
restarts it, brings the collector back, and counts what arrived.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from typing import Callable, Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from moesiftornado_durable.spool import directory_stats  # noqa: E402
from moesiftornado_durable.testing import Collector  # noqa: E402


def waiting(spool_dir: str) -> int:
    """Records in the spool on disk, not yet delivered (what `moesiftornado-durable status` shows)."""
    stats = directory_stats(spool_dir)
    return stats.ready + stats.in_flight


def say(step: str, detail: str = "") -> None:
    print(f"{step:<58} {detail}", flush=True)


@contextlib.contextmanager
def app_process(spool_dir: str, base_uri: str) -> Iterator[tuple]:
    """Start examples/app.py; yields (process, url); SIGKILLs it by PID on the way out if still running."""
    port_file = os.path.join(spool_dir, "..", f"port-{time.monotonic_ns()}")
    process = subprocess.Popen([sys.executable, os.path.join(HERE, "app.py"), "--spool-dir", spool_dir,
                                "--base-uri", base_uri, "--port-file", port_file])
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(port_file):
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the example app did not start")
            time.sleep(0.05)
        with open(port_file) as f:
            yield process, f"http://127.0.0.1:{f.read()}"
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait(10)


def serve(url: str, first: int, count: int) -> int:
    """Make `count` requests; returns how many got a 200."""
    ok = 0
    for n in range(first, first + count):
        with urllib.request.urlopen(f"{url}/hello?n={n}", timeout=10) as response:
            ok += response.status == 200
    return ok


def wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


def main() -> int:
    work = tempfile.mkdtemp(prefix="moesif-durable-demo-")
    spool_dir = os.path.join(work, "spool")
    try:
        with Collector() as collector:
            say("local collector listening", collector.base_uri)
            with app_process(spool_dir, collector.base_uri) as (app, url):
                say(f"example app started (pid {app.pid})", url)
                say("1. collector up: 20 requests answered", str(serve(url, 0, 20)))
                # delivered and acked: nothing of step 1 is left to count as waiting in step 2
                wait_for(lambda: len(collector.events) >= 20 and waiting(spool_dir) == 0, 10)
                say("   events at the collector", str(len(collector.events)))

                collector.go_down()
                say("2. collector DOWN: 30 requests answered", str(serve(url, 20, 30)))
                wait_for(lambda: waiting(spool_dir) >= 30, 10)
                say("   waiting in the spool on disk", f"{waiting(spool_dir)} events")

                os.kill(app.pid, signal.SIGKILL)
                app.wait(10)
                say(f"3. app killed with SIGKILL (pid {app.pid})", "no flush, no atexit")

            with app_process(spool_dir, collector.base_uri) as (app, url):
                say(f"4. app restarted (pid {app.pid}), collector still down", "")
                time.sleep(1.0)
                collector.come_up()
                say("5. collector back up; no new requests needed", "")
                delivered = wait_for(lambda: len(set(collector.transaction_ids())) >= 50, 30)
                ids = collector.transaction_ids()
                duplicates = sum(seen - 1 for seen in Counter(ids).values())
                say("   distinct events at the collector", f"{len(set(ids))} of 50")
                say("   sent twice (harmless: Moesif dedups on transaction_id)", str(duplicates))
                say("   left in the spool", str(waiting(spool_dir)))
                app.send_signal(signal.SIGTERM)
                app.wait(15)
        print("\nNothing lost." if delivered and len(set(ids)) == 50 else "\nEVENTS MISSING", flush=True)
        return 0 if delivered else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
