"""The app `benchmarks/http_throughput.py` measures: one process per round, not a benchmark by itself.

It reads one JSON object on stdin (never argv: middleware options may hold secrets)::

    {"logger": null | "durable" | "moesiftornado", "options": {...}, "work_loops": 12345, "timings": "/path"}

and serves on 127.0.0.1, on a free port it prints as stdout's first line once listening:

    GET /hello   a ~650-byte JSON body (with the headers, a ~1.5 KB event)
    GET /work    the same body after `work_loops` turns of an empty loop (~1 ms of CPU, calibrated by the caller)

On SIGTERM it stops listening, closes the middleware (at most 1 s) and exits 0. Anything printed after the port
line goes to stderr, so a chatty logger cannot fill a pipe nobody reads.

With "timings", every call of the log_function is timed on the IOLoop (`time.perf_counter` before and after, ~0.2 µs
added to a call) and the durations, in µs in call order, are written there as a JSON list at exit.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tornado.httpserver  # noqa: E402
import tornado.netutil  # noqa: E402
import tornado.web  # noqa: E402

BODY = json.dumps({"items": [{"id": n, "sku": f"SKU-{n:05d}", "name": f"Item number {n}", "price": 9.99,
                              "in_stock": n % 2 == 0} for n in range(7)]}).encode()
WORK_LOOPS = 0  # set from stdin


class HelloHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(BODY)


class WorkHandler(HelloHandler):
    def get(self) -> None:
        for _ in range(WORK_LOOPS):  # CPU work holding the GIL, as a real handler's would; not a sleep
            pass
        super().get()


def install_logger(app: tornado.web.Application, logger: Optional[str], options: Dict[str, Any]) -> Callable[[], None]:
    """Make `logger` the app's log_function (none for None); returns how to close it."""
    if logger == "durable":
        from moesiftornado_durable import MoesifMiddleware

        middleware = MoesifMiddleware(options)
        app.settings["log_function"] = middleware.log_event
        middleware.attach(app)  # capture the first response body too
        return lambda: middleware.close(timeout=1.0)
    if logger == "moesiftornado":
        from moesifapi.configuration import Configuration
        from moesiftornado import MoesifMiddleware as OriginalMiddleware

        Configuration.BASE_URI = options["BASE_URI"]  # 0.1.4 honours BASE_URI only with DEBUG, which prints a lot
        original = OriginalMiddleware({key: value for key, value in options.items() if key != "SPOOL_DIR"})
        app.settings["log_function"] = original.log_event
        return lambda: None  # its own atexit hook stops its scheduler
    if logger is not None:
        raise ValueError(f"unknown logger {logger!r}")
    return lambda: None


def timed(log_function: Callable[[Any], None], samples: List[float]) -> Callable[[Any], None]:
    """`log_function`, appending each call's duration in seconds to `samples`."""
    clock = time.perf_counter

    def timed_log_function(handler: Any) -> None:
        started = clock()
        log_function(handler)
        samples.append(clock() - started)

    return timed_log_function


def write_timings(path: str, samples: List[float]) -> None:
    with open(path, "w", encoding="utf-8") as out:
        json.dump([round(seconds * 1e6, 2) for seconds in samples], out)


async def serve(app: tornado.web.Application, close: Callable[[], None]) -> None:
    sockets: List[Any] = tornado.netutil.bind_sockets(0, "127.0.0.1")
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print(sockets[0].getsockname()[1], flush=True)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    await stop.wait()
    server.stop()
    close()


def main() -> None:
    global WORK_LOOPS
    spec = json.loads(sys.stdin.read())
    WORK_LOOPS = int(spec.get("work_loops", 0))
    app = tornado.web.Application([(r"/hello", HelloHandler), (r"/work", WorkHandler)])
    close = install_logger(app, spec.get("logger"), spec.get("options") or {})
    samples: List[float] = []
    if spec.get("timings") and app.settings.get("log_function") is not None:
        app.settings["log_function"] = timed(app.settings["log_function"], samples)
    asyncio.run(serve(app, close))
    if spec.get("timings"):
        write_timings(spec["timings"], samples)


if __name__ == "__main__":
    main()
