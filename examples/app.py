"""An example Tornado app that logs every API call to Moesif through the durable spool.

    python examples/app.py --spool-dir DIR --base-uri URL [--port-file FILE] [--processes N] [--strict]
                           [--option KEY=JSON ...]

It listens on 127.0.0.1 (a free port, printed and written to FILE once it serves) until SIGTERM,
when it closes the middleware (delivering what it can) and exits. The demo and the crash tests run it
as a real process and SIGKILL it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any, Dict, List

import tornado.httpserver
import tornado.netutil
import tornado.process
import tornado.web

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from moesiftornado_durable import MoesifMiddleware, SpoolBeforeSendMixin  # noqa: E402


class HelloHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write({"hello": self.get_argument("n", "world")})


class EchoHandler(tornado.web.RequestHandler):
    def post(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(self.request.body)


class StrictHelloHandler(SpoolBeforeSendMixin, HelloHandler):
    """Strict mode: the event is in the spool before the client gets the response."""


class StrictEchoHandler(SpoolBeforeSendMixin, EchoHandler):
    pass


def moesif_options(spool_dir: str, base_uri: str, extra: Dict[str, Any]) -> Dict[str, Any]:
    """The middleware's configuration: the original moesiftornado options plus the durable ones."""
    options: Dict[str, Any] = {
        "APPLICATION_ID": os.environ.get("MOESIF_APPLICATION_ID", "example-application-id"),
        "SPOOL_DIR": spool_dir,
        "BASE_URI": base_uri,
        "IDENTIFY_USER": lambda handler: handler.request.headers.get("X-User-Id"),
        "GET_METADATA": lambda handler: {"pid": os.getpid()},
        "FLUSH_INTERVAL": 0.05,
        "SEND_TIMEOUT": 2.0,
        "RETRY_MAX_WAIT": 0.5,
    }
    options.update(extra)
    return options


def parse_pairs(pairs: List[str]) -> Dict[str, Any]:
    """KEY=VALUE pairs; values are JSON when they parse as JSON, else strings."""
    options: Dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spool-dir", required=True)
    parser.add_argument("--base-uri", required=True)
    parser.add_argument("--port-file", help="write the port here once serving")
    parser.add_argument("--option", action="append", default=[], help="an extra middleware option, KEY=JSON")
    parser.add_argument("--processes", type=int, default=1, help="fork this many children with Tornado")
    parser.add_argument("--strict", action="store_true", help="spool each event before its response is sent")
    args = parser.parse_args()

    middleware = MoesifMiddleware(moesif_options(args.spool_dir, args.base_uri, parse_pairs(args.option)))
    routes = [(r"/hello", StrictHelloHandler if args.strict else HelloHandler),
              (r"/echo", StrictEchoHandler if args.strict else EchoHandler)]
    app = tornado.web.Application(routes, log_function=middleware.log_event)
    middleware.attach(app)  # optional: the first request attaches it too (log_function is log_event)
    sockets = tornado.netutil.bind_sockets(0, "127.0.0.1")
    port = sockets[0].getsockname()[1]
    if args.port_file:
        with open(args.port_file + ".tmp", "w") as f:
            f.write(str(port))
        os.replace(args.port_file + ".tmp", args.port_file)
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
