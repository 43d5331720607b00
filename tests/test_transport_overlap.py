"""The send path overlaps the spool's ack of one batch with the collector's work on the next.

A real server on loopback (the local collector, or a socket server that answers only when told), a real spool.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Iterator, List

import pytest

from moesiftornado_durable.flusher import Courier, Outcome
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


def spooled(path: str, count: int) -> Spool:
    spool = Spool(path)
    spool.put_many(("event", {"transaction_id": f"o-{n}", "request": {"uri": f"http://x/{n}"}}, time.time())
                   for n in range(count))
    return spool


@pytest.fixture
def courier(collector: Collector) -> Iterator[Courier]:
    sender = Sender(collector.base_uri, "test-app-id", timeout=5.0)
    yield Courier(sender, delivery_policy(threading.Event(), max_wait=0.2, attempts=1))
    sender.close()


def in_flight_ids(spool: Spool) -> List[str]:
    return sorted(record["body"]["transaction_id"] for record in spool.records() if record["state"] == "in_flight")


def test_a_batch_delivered_with_ack_later_is_acked_during_the_next_send(
        collector: Collector, courier: Courier, tmp_path: Any) -> None:
    spool = spooled(str(tmp_path / "spool-0.db"), 50)
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
