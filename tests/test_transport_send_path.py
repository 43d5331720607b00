"""The send path: the transport's own HTTP/1.1 exchange, and the spool's ack of one batch overlapped with the
collector's work on the next.

Real servers on loopback (the local collector, or socket servers that answer as scripted), a real spool.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Iterator, List, Optional, Tuple

import pytest
from conftest import spool_with_events

from moesiftornado_durable.errors import RetryableError
from moesiftornado_durable.flusher import Courier, Outcome
from moesiftornado_durable.kinds import EVENT
from moesiftornado_durable.sender import Sender, delivery_policy
from moesiftornado_durable.spool import Spool
from moesiftornado_durable.testing import Collector
from moesiftornado_durable.transport import Transport


class HeldAnswerServer:
    """One connection on loopback: reads a whole request (Content-Length body), says so, and answers 200 only
    once `may_answer` is set."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.base_uri = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.request_read = threading.Event()
        self.may_answer = threading.Event()
        self.body = b""
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        connection, _ = self._listener.accept()
        with connection, connection.makefile("rb") as reader:
            length = 0
            while True:
                line = reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            self.body = reader.read(length)
            self.request_read.set()
            if self.may_answer.wait(10):
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    def close(self) -> None:
        self.may_answer.set()
        self._listener.close()
        self._thread.join(10)


@pytest.fixture
def held_answer_server() -> Iterator[HeldAnswerServer]:
    server = HeldAnswerServer()
    yield server
    server.close()


def test_while_waiting_runs_once_the_request_is_written_and_before_the_answer_is_read(
        held_answer_server: HeldAnswerServer) -> None:
    seen: List[str] = []

    def while_waiting() -> None:
        # the whole request is at the server already; the answer comes only after this returns
        seen.append("request read" if held_answer_server.request_read.wait(10) else "request not read")
        held_answer_server.may_answer.set()

    transport = Transport(held_answer_server.base_uri, timeout=20.0)
    try:
        response = transport.request("POST", "/v1/events/batch", b"[1,2,3]", {"Content-Type": "application/json"},
                                     while_waiting=while_waiting)
    finally:
        transport.close()
    assert seen == ["request read"]  # called once, after the request was written
    assert response.status == 200 and response.body == b"{}"  # read after it: the server held its answer till then
    assert held_answer_server.body == b"[1,2,3]"


def test_profile_updates_call_while_waiting_once_before_their_request(collector: Collector) -> None:
    calls: List[int] = []
    sender = Sender(collector.base_uri, "test-app-id", timeout=5.0)
    try:
        sender.send("user", [{"user_id": "u-1"}], while_waiting=lambda: calls.append(len(collector.users)))
    finally:
        sender.close()
    assert calls == [0] and [user["user_id"] for user in collector.users] == ["u-1"]


class ScriptedServer:
    """Serves on loopback: reads each request (Content-Length body) and writes the next scripted answer as raw
    bytes, closing the connection after it when the script says so. Records (request head, body) pairs."""

    def __init__(self, answers: List[Tuple[bytes, bool]]) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.base_uri = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self.answers = list(answers)
        self.requests: List[Tuple[bytes, bytes]] = []
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self.answers:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            with connection, connection.makefile("rb") as reader:
                while self.answers:
                    request = self._read_request(reader)
                    if request is None:
                        break
                    self.requests.append(request)
                    answer, close = self.answers.pop(0)
                    connection.sendall(answer)
                    if close:
                        break

    @staticmethod
    def _read_request(reader: Any) -> Optional[Tuple[bytes, bytes]]:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = reader.readline()
            if not line:
                return None
            head += line
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return head, reader.read(length)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(10)


@pytest.fixture
def scripted() -> Iterator[Any]:
    servers: List[ScriptedServer] = []

    def make(*answers: Tuple[bytes, bool]) -> ScriptedServer:
        servers.append(ScriptedServer(list(answers)))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


OK = (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}", False)


def test_a_post_is_one_request_with_host_length_and_headers_then_the_connection_is_kept(scripted: Any) -> None:
    server = scripted(OK, (b"HTTP/1.1 201 Created\r\nX-Moesif-Config-ETag: e1\r\nContent-Length: 3\r\n\r\nabc",
                           False))
    transport = Transport(server.base_uri + "/base", timeout=5.0)
    try:
        first = transport.request("POST", "/v1/events/batch", b"[1]", {"Content-Type": "application/json"})
        second = transport.request("GET", "/v1/config", None, {"X-Moesif-Application-Id": "app"})
    finally:
        transport.close()
    assert (first.status, first.body) == (200, b"{}")
    assert (second.status, second.body, second.headers["x-moesif-config-etag"]) == (201, b"abc", "e1")
    assert server.connections == 1  # kept alive
    (post_head, post_body), (get_head, get_body) = server.requests
    host = server.base_uri.split("//")[1].encode()
    assert post_head.startswith(b"POST /base/v1/events/batch HTTP/1.1\r\n") and b"\r\nHost: " + host in post_head
    assert b"\r\nContent-Length: 3\r\n" in post_head and b"\r\nContent-Type: application/json\r\n" in post_head
    assert post_body == b"[1]"
    assert get_head.startswith(b"GET /base/v1/config HTTP/1.1\r\n") and b"Content-Length" not in get_head
    assert b"\r\nX-Moesif-Application-Id: app\r\n" in get_head and get_body == b""


def test_chunked_answers_a_100_continue_and_an_answer_to_the_close_are_read_whole(scripted: Any) -> None:
    server = scripted(
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nT: x\r\n\r\n", False),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 202 Accepted\r\nContent-Length: 1\r\n\r\nz", False),
        (b"HTTP/1.0 200 OK\r\n\r\nto the end", True),
        OK)
    transport = Transport(server.base_uri, timeout=5.0)
    try:
        answers = [transport.request("POST", "/x", b"1") for _ in range(4)]
    finally:
        transport.close()
    assert [(a.status, a.body) for a in answers] == [(200, b"abcde"), (202, b"z"), (200, b"to the end"), (200, b"{}")]
    assert server.connections == 2  # a new connection after the answer that ran to the close


def test_connection_close_is_honoured_and_the_next_request_reconnects(scripted: Any) -> None:
    server = scripted((b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", True), OK)
    transport = Transport(server.base_uri, timeout=5.0)
    try:
        assert transport.request("POST", "/x", b"1").status == 200
        assert transport.request("POST", "/x", b"2").body == b"{}"
    finally:
        transport.close()
    assert server.connections == 2


@pytest.mark.parametrize("answer", [
    b"garbage\r\n\r\n",  # not a status line
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # cut short
    b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",  # not a length
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # not a chunk size
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 101 + b"\r\n",  # too many headers
    b"",  # closed without an answer
])
def test_a_malformed_or_cut_answer_is_retryable_never_an_ack(scripted: Any, answer: bytes) -> None:
    server = scripted((answer, True), OK)
    sender = Sender(server.base_uri, "test-app-id", timeout=5.0)
    try:
        with pytest.raises(RetryableError):
            sender.send(EVENT, [{"transaction_id": "t-1"}])
        sender.send(EVENT, [{"transaction_id": "t-1"}])  # and the next attempt, on a new connection, goes through
    finally:
        sender.close()
    assert len(server.requests) == 2


def test_a_line_break_in_a_header_is_refused_before_anything_is_sent(scripted: Any) -> None:
    server = scripted(OK)
    transport = Transport(server.base_uri, timeout=5.0)
    try:
        with pytest.raises(ValueError):
            transport.request("POST", "/x", b"1", {"X-Moesif-Application-Id": "app\r\nX-Injected: 1"})
    finally:
        transport.close()
    assert server.requests == []


@pytest.fixture
def courier(collector: Collector) -> Iterator[Courier]:
    sender = Sender(collector.base_uri, "test-app-id", timeout=5.0)
    yield Courier(sender, delivery_policy(threading.Event(), max_wait=0.2, attempts=1))
    sender.close()


def in_flight_ids(spool: Spool) -> List[str]:
    return sorted(record["body"]["transaction_id"] for record in spool.records() if record["state"] == "in_flight")


def test_a_batch_delivered_with_ack_later_is_acked_during_the_next_send(
        collector: Collector, courier: Courier, tmp_path: Any) -> None:
    spool = spool_with_events(str(tmp_path / "spool-0.db"), 50, "o")
    try:
        first = spool.claim(25)
        assert courier.deliver(spool, "event", first, ack_later=True) is Outcome.DELIVERED
        assert in_flight_ids(spool) == sorted(f"o-{n}" for n in range(25))  # delivered, not acked yet
        assert courier.deliver(spool, "event", spool.claim(25), ack_later=True) is Outcome.DELIVERED
        # the first batch was acked while the second was at the collector; the second waits for its turn
        assert in_flight_ids(spool) == sorted(f"o-{n}" for n in range(25, 50))
        courier.record_acks()
        assert spool.is_empty()
        assert sorted(collector.transaction_ids()) == sorted(f"o-{n}" for n in range(50))  # each once
        assert courier.counters["sent"] == 50
    finally:
        spool.close()


def test_a_failed_send_still_acks_the_batch_delivered_before_it(collector: Collector, courier: Courier,
                                                                 tmp_path: Any) -> None:
    spool = spool_with_events(str(tmp_path / "spool-0.db"), 50, "o")
    try:
        assert courier.deliver(spool, "event", spool.claim(25), ack_later=True) is Outcome.DELIVERED
        collector.go_down()  # the next request is refused before it is written: no request to overlap the ack with
        assert courier.deliver(spool, "event", spool.claim(25), ack_later=True) is Outcome.RETURNED
        # the delivered batch is acked at once, not kept in flight through the backoff; the other is ready again
        assert in_flight_ids(spool) == [] and spool.ready_count() == 25
        assert sorted(collector.transaction_ids()) == sorted(f"o-{n}" for n in range(25))
    finally:
        spool.close()

