"""A small Tornado app with the durable middleware, run as a real subprocess by the crash tests.

    python tests/app_process.py --spool-dir DIR --base-uri URL --port-file FILE [--option KEY=JSON ...]

It listens on 127.0.0.1 (a free port, written to FILE once it is serving) until SIGTERM or SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any, Dict

import tornado.httpserver
import tornado.ioloop
import tornado.netutil
import tornado.process
import tornado.web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moesiftornado_durable import MoesifMiddleware  # noqa: E402


class HelloHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"hello": self.get_argument("n", "world")})


class EchoHandler(tornado.web.RequestHandler):
    def post(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(self.request.body)


def parse_options(pairs: list) -> Dict[str, Any]:
    options: Dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spool-dir", required=True)
    parser.add_argument("--base-uri", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--option", action="append", default=[])
    parser.add_argument("--processes", type=int, default=1, help="fork this many children with Tornado")
    args = parser.parse_args()

    config = {"APPLICATION_ID": "crash-test-app", "SPOOL_DIR": args.spool_dir, "BASE_URI": args.base_uri,
              "FLUSH_INTERVAL": 0.05, "SEND_TIMEOUT": 2.0, "RETRY_MAX_WAIT": 0.5,
              "GET_METADATA": lambda handler: {"pid": os.getpid()}}
    config.update(parse_options(args.option))
    middleware = MoesifMiddleware(config)
    app = tornado.web.Application([(r"/hello", HelloHandler), (r"/echo", EchoHandler)],
                                  log_function=middleware.log_event)
    middleware.attach(app)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    tmp = args.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(sockets[0].getsockname()[1]))
    os.replace(tmp, args.port_file)
    if args.processes > 1:
        # The middleware exists before the fork, as in a real pre-fork deployment.
        tornado.process.fork_processes(args.processes, max_restarts=100)
    asyncio.run(serve(app, sockets, middleware))


async def serve(app: tornado.web.Application, sockets: list, middleware: MoesifMiddleware) -> None:
    server = tornado.httpserver.HTTPServer(app)
    server.add_sockets(sockets)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    server.stop()
    middleware.close(timeout=5.0)


if __name__ == "__main__":
    main()
