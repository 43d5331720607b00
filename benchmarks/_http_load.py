"""A lean HTTP/1.1 load generator for `benchmarks/http_throughput.py` when wrk is not installed.

    python benchmarks/_http_load.py PORT PATH --connections 32 --seconds 5 [--max-requests N] [--header "K: V" ...]

Like ``wrk -t1 -c32``: one thread, `--connections` keep-alive connections to 127.0.0.1:PORT, each with one GET in
flight, for `--seconds` or until `--max-requests` responses, whichever comes first. Prints one JSON line:
``{"requests": ok, "errors": non-200 or broken, "seconds": elapsed, "rps": ok / elapsed, "cpu": CPU s / elapsed}``;
a `cpu` near 1.0 means this client, not the server, was the limit.

Kept to the stdlib and a single `selectors` loop with no per-request objects beyond the bytes, because on a
2-core machine every microsecond it spends is taken from the server it measures.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import time
from typing import List, Tuple


def content_length(head: bytes) -> int:
    """The Content-Length of a response head (status line and headers, lower-cased); -1 when absent."""
    start = head.find(b"\r\ncontent-length:")
    if start < 0:
        return -1
    start += 17
    end = head.find(b"\r\n", start)
    return int(head[start:end if end >= 0 else len(head)])


def run(port: int, path: str, headers: List[str], connections: int, seconds: float,
        max_requests: int) -> Tuple[int, int, float]:
    """Drive the load; returns (200 responses, errors, elapsed seconds)."""
    request = "".join([f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"]
                      + [f"{header}\r\n" for header in headers] + ["\r\n"]).encode("latin-1")
    selector = selectors.DefaultSelector()
    for _ in range(connections):
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, (sock, bytearray()))
    ok = errors = 0
    open_connections = connections
    started = time.monotonic()
    deadline = started + seconds
    for key in list(selector.get_map().values()):
        key.data[0].send(request)  # a few hundred bytes into an empty buffer: never partial
    now = started
    while open_connections and ok + errors < max_requests and now < deadline:
        for key, _ in selector.select(deadline - now):
            sock, buffer = key.data
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if chunk:
                buffer += chunk
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    continue
                length = content_length(bytes(buffer[:end]).lower())
                if length >= 0 and len(buffer) < end + 4 + length:
                    continue  # the body is still coming
                if length >= 0 and len(buffer) == end + 4 + length:
                    if buffer[9:12] == b"200":
                        ok += 1
                    else:
                        errors += 1
                    del buffer[:]
                    sock.send(request)
                    continue
            # closed by the server, no Content-Length, or more bytes than one response: a broken connection
            errors += 1
            open_connections -= 1
            selector.unregister(sock)
            sock.close()
        now = time.monotonic()
    elapsed = time.monotonic() - started
    for key in list(selector.get_map().values()):
        key.data[0].close()
    selector.close()
    return ok, errors, elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("path")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--max-requests", type=int, default=10_000_000)
    parser.add_argument("--header", action="append", default=[], help='an extra request header, "Name: value"')
    args = parser.parse_args()
    cpu_started = time.process_time()
    ok, errors, elapsed = run(args.port, args.path, args.header, args.connections, args.seconds, args.max_requests)
    cpu = time.process_time() - cpu_started
    print(json.dumps({"requests": ok, "errors": errors, "seconds": round(elapsed, 3),
                      "rps": round(ok / elapsed, 1) if elapsed > 0 else 0.0, "cpu": round(cpu / elapsed, 2)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
