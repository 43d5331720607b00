"""Tests for moesiftornado_durable.testing.Collector: a real server on 127.0.0.1, spoken to over real HTTP."""

from __future__ import annotations

import asyncio
import errno
import gzip
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import pytest
import requests
import tornado.httpclient

from moesiftornado_durable.testing import DEFAULT_APP_CONFIG, Collector, ReceivedRequest, main

APP_ID = "test-app-id"
HEADERS = {"X-Moesif-Application-Id": APP_ID, "Content-Type": "application/json"}
TIMEOUT = 5.0  # on every request, so a broken collector fails a test instead of hanging it
REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as c:
        yield c
    assert not c.is_up


@pytest.fixture
def session() -> Iterator[requests.Session]:
    with requests.Session() as s:
        yield s


def event(transaction_id: str) -> Dict[str, Any]:
    return {
        "request": {"time": "2024-01-01T00:00:00.000", "uri": "http://example.test/x", "verb": "GET"},
        "response": {"time": "2024-01-01T00:00:00.010", "status": 200},
        "transaction_id": transaction_id,
    }


def post(session: requests.Session, collector: Collector, path: str, payload: Any,
         headers: Optional[Dict[str, str]] = None) -> requests.Response:
    return session.post(collector.base_uri + path, data=json.dumps(payload), headers=headers or HEADERS,
                        timeout=TIMEOUT)


def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll ``condition`` for state the collector exposes no wait for (test-side only)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def collector_threads() -> List[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("moesif-collector")]


# ---- ingestion ----------------------------------------------------------------------------------------------


def test_gzip_batch_is_recorded_and_answered_with_config_etag(collector: Collector,
                                                             session: requests.Session) -> None:
    body = gzip.compress(json.dumps([event("t1"), event("t2"), event("t1")]).encode("utf-8"))
    response = session.post(collector.base_uri + "/v1/events/batch", data=body,
                            headers={**HEADERS, "Content-Encoding": "gzip"}, timeout=TIMEOUT)

    assert response.status_code == 201
    assert response.json() == {}
    assert response.headers["X-Moesif-Config-ETag"] == collector.config_etag
    assert [e["transaction_id"] for e in collector.events] == ["t1", "t2", "t1"]
    assert collector.transaction_ids() == ["t1", "t2", "t1"]  # duplicates kept
    [request] = collector.requests
    assert (request.method, request.path, request.status, request.items) == ("POST", "/v1/events/batch", 201, 3)
    assert request.headers["Content-Encoding"] == "gzip"
    assert collector.stats()["unique_transaction_ids"] == 2


def test_single_event_adds_one(collector: Collector, session: requests.Session) -> None:
    response = post(session, collector, "/v1/events", event("single"))

    assert response.status_code == 201
    assert "X-Moesif-Config-ETag" in response.headers
    assert collector.transaction_ids() == ["single"]
    assert collector.wait_for_events(1, timeout=0.1)


def test_users_companies_and_subscriptions(collector: Collector, session: requests.Session) -> None:
    assert post(session, collector, "/v1/users/batch", [{"user_id": "u1"}, {"user_id": "u2"}]).status_code == 201
    assert post(session, collector, "/v1/users", {"user_id": "u3"}).status_code == 201
    response = post(session, collector, "/v1/companies/batch", [{"company_id": "c1"}])
    assert response.status_code == 201
    assert "X-Moesif-Config-ETag" not in response.headers  # only the events paths carry it
    assert post(session, collector, "/v1/subscriptions", {"subscription_id": "s1"}).status_code == 201

    assert [u["user_id"] for u in collector.users] == ["u1", "u2", "u3"]
    assert collector.companies == [{"company_id": "c1"}]
    assert collector.subscriptions == [{"subscription_id": "s1"}]
    assert collector.events == []


def test_wait_for_events_blocks_until_they_arrive(collector: Collector) -> None:
    assert collector.wait_for_events(1, timeout=0.05) is False

    def send_later() -> None:
        with requests.Session() as s:
            time.sleep(0.1)
            post(s, collector, "/v1/events/batch", [event("late1"), event("late2")])

    sender = threading.Thread(target=send_later)
    sender.start()
    try:
        assert collector.wait_for_events(2, timeout=TIMEOUT)
    finally:
        sender.join(TIMEOUT)
    assert collector.transaction_ids() == ["late1", "late2"]


def test_recordings_are_copies_and_clear_forgets_them(collector: Collector, session: requests.Session) -> None:
    post(session, collector, "/v1/events", event("a"))
    collector.events.clear()
    collector.requests.clear()
    assert len(collector.events) == 1 and len(collector.requests) == 1

    collector.clear()
    assert collector.events == [] and collector.requests == []


def test_recorded_events_are_the_same_objects_every_time_and_counted_without_parsing(
        collector: Collector, session: requests.Session) -> None:
    post(session, collector, "/v1/events/batch", [event("a"), event("b")])
    post(session, collector, "/v1/events", event("c"))
    assert collector.wait_for_events(3, timeout=0.1) and "events=3" in repr(collector)
    first, again = collector.events, collector.events
    assert [e["transaction_id"] for e in first] == ["a", "b", "c"]
    assert all(a is b for a, b in zip(first, again))  # parsed once, then the recorded dicts themselves
    first[0]["seen"] = True
    assert collector.events[0]["seen"] is True


def test_moesifapi_client_batch_is_recorded(collector: Collector) -> None:
    from moesifapi.configuration import Configuration
    from moesifapi.controllers.api_controller import ApiController
    from moesifapi.http.requests_client import RequestsClient

    saved = (Configuration.BASE_URI, Configuration.application_id)
    client = RequestsClient()
    Configuration.BASE_URI, Configuration.application_id = collector.base_uri, APP_ID
    try:
        headers = ApiController(http_client=client).create_events_batch([event("m1"), event("m2")])
    finally:
        Configuration.BASE_URI, Configuration.application_id = saved
        client.session.close()

    assert collector.transaction_ids() == ["m1", "m2"]
    assert collector.requests[0].headers["Content-Encoding"] == "gzip"  # moesifapi gzips batches
    assert headers["x-moesif-config-etag"] == collector.config_etag


# ---- config and rejections ------------------------------------------------------------------------------------


def test_config_is_served_with_an_etag_that_follows_changes(collector: Collector,
                                                           session: requests.Session) -> None:
    first = session.get(collector.base_uri + "/v1/config", headers=HEADERS, timeout=TIMEOUT)
    assert first.status_code == 200
    assert first.json() == DEFAULT_APP_CONFIG
    assert first.headers["X-Moesif-Config-ETag"] == collector.config_etag

    collector.app_config = {**DEFAULT_APP_CONFIG, "sample_rate": 50}
    second = session.get(collector.base_uri + "/v1/config", headers=HEADERS, timeout=TIMEOUT)
    assert second.json()["sample_rate"] == 50
    assert second.headers["X-Moesif-Config-ETag"] != first.headers["X-Moesif-Config-ETag"]
    assert post(session, collector, "/v1/events", event("e")).headers["X-Moesif-Config-ETag"] == \
        second.headers["X-Moesif-Config-ETag"]

    collector.app_config["sample_rate"] = 1  # a copy: changing it changes nothing
    assert collector.app_config["sample_rate"] == 50


def test_governance_rules_are_an_empty_list(collector: Collector, session: requests.Session) -> None:
    response = session.get(collector.base_uri + "/v1/rules", headers=HEADERS, timeout=TIMEOUT)
    assert (response.status_code, response.json()) == (200, [])


def test_missing_application_id_is_401(collector: Collector, session: requests.Session) -> None:
    response = post(session, collector, "/v1/events", event("x"), headers={"Content-Type": "application/json"})

    assert response.status_code == 401
    assert "error" in response.json()
    assert collector.events == []
    assert collector.requests[0].status == 401


def test_wrong_application_id_is_401_when_one_is_required(session: requests.Session) -> None:
    with Collector(application_id="the-right-one") as c:
        wrong = post(session, c, "/v1/events/batch", [event("x")])
        right = post(session, c, "/v1/events/batch", [event("y")],
                     headers={**HEADERS, "X-Moesif-Application-Id": "the-right-one"})
        config = session.get(c.base_uri + "/v1/config", headers=HEADERS, timeout=TIMEOUT)

        assert (wrong.status_code, right.status_code, config.status_code) == (401, 201, 401)
        assert c.transaction_ids() == ["y"]


@pytest.mark.parametrize(
    "body, extra_headers",
    [
        (b"{not json", {}),
        (b"not gzip at all", {"Content-Encoding": "gzip"}),
        (json.dumps({"a": 1}).encode(), {}),  # a batch path needs a list
        (b"", {}),
    ],
)
def test_bad_bodies_are_400_and_not_recorded(collector: Collector, session: requests.Session, body: bytes,
                                             extra_headers: Dict[str, str]) -> None:
    response = session.post(collector.base_uri + "/v1/events/batch", data=body,
                            headers={**HEADERS, **extra_headers}, timeout=TIMEOUT)

    assert response.status_code == 400
    assert "error" in response.json()
    assert collector.events == []
    assert [r.status for r in collector.requests] == [400]


def test_the_collector_accepts_and_records_what_orjson_refuses_or_reads_differently(
        collector: Collector, session: requests.Session) -> None:
    # NaN and a lone surrogate: the standard parser takes them, orjson does not
    odd = b'[{"transaction_id": "a", "n": NaN, "s": "\\ud800 \\u00e9"}]'
    # an integer past 64 bits: orjson reads it as a float
    big = b'[{"transaction_id": "b", "big": 123456789012345678901234567890, "nested": {"l": [1, 2.5, null, true]}}]'
    for body in (odd, big):
        response = session.post(collector.base_uri + "/v1/events/batch", data=body, headers=HEADERS,
                                timeout=TIMEOUT)
        assert response.status_code == 201
    [first, second] = collector.events
    assert math.isnan(first.pop("n")) and first == {"transaction_id": "a", "s": "\ud800 \u00e9"}
    assert second == {"transaction_id": "b", "big": 123456789012345678901234567890,
                      "nested": {"l": [1, 2.5, None, True]}}
    assert type(second["big"]) is int
    for bad in (b"[{}, ]", b"[1, 2]", b'{"a": 1}', b"[{}] tail", b'[{"a": "\x01"}]'):
        answer = session.post(collector.base_uri + "/v1/events/batch", data=bad, headers=HEADERS, timeout=TIMEOUT)
        assert answer.status_code == 400, bad
    assert collector.stats()["events"] == 2


def test_unknown_path_is_404(collector: Collector, session: requests.Session) -> None:
    assert post(session, collector, "/v1/nothing", {}).status_code == 404
    assert session.get(collector.base_uri + "/v1/events", headers=HEADERS, timeout=TIMEOUT).status_code == 405


# ---- faults -----------------------------------------------------------------------------------------------------


def test_respond_with_503_twice_then_accepts(collector: Collector, session: requests.Session) -> None:
    collector.respond_with(503, times=2)

    statuses = [post(session, collector, "/v1/events/batch", [event(f"try{i}")]).status_code for i in range(3)]

    assert statuses == [503, 503, 201]
    assert collector.transaction_ids() == ["try2"]  # nothing recorded from the faulted ones
    assert [(r.status, r.items) for r in collector.requests] == [(503, 0), (503, 0), (201, 1)]
    assert collector.faults_pending == 0


def test_respond_with_429_sends_retry_after(collector: Collector, session: requests.Session) -> None:
    collector.respond_with(429, headers={"Retry-After": "2"}, body="slow down")

    response = post(session, collector, "/v1/events/batch", [event("x")])

    assert response.status_code == 429
    assert response.headers["Retry-After"] == "2"
    assert response.text == "slow down"
    assert collector.events == []


def test_faults_apply_in_order_and_until_reset(collector: Collector, session: requests.Session) -> None:
    collector.respond_with(500, times=1)
    collector.respond_with(502, times=None)
    collector.respond_with(504, times=1)  # queued behind an endless fault: never reached before reset

    statuses = [post(session, collector, "/v1/events", event("x")).status_code for _ in range(4)]
    assert statuses == [500, 502, 502, 502]
    assert collector.stats()["faults_pending"] == 2

    collector.reset()
    assert post(session, collector, "/v1/events", event("x")).status_code == 201
    # faults never touch the config endpoint
    collector.respond_with(503, times=None)
    assert session.get(collector.base_uri + "/v1/config", headers=HEADERS, timeout=TIMEOUT).status_code == 200


@pytest.mark.parametrize(
    "make_fault",
    [
        lambda c: c.respond_with(99),
        lambda c: c.respond_with(503, times=0),
        lambda c: c.respond_with(503, headers={"Content-Length": "3"}),
        lambda c: c.respond_with(503, headers={"X-Evil": "a\r\nSet-Cookie: b"}),
        lambda c: c.stall(-1),
        lambda c: c.drop_connections(times=-2),
        lambda c: c.redirect("http://127.0.0.1:1/", status=200),
        lambda c: c.redirect("http://127.0.0.1:1/\r\nSet-Cookie: b"),
        lambda c: c.trickle(0.1, size=0),
        lambda c: c.trickle(-1),
        lambda c: c.huge_body(-5),
    ],
)
def test_bad_faults_are_refused(collector: Collector, make_fault: Callable[[Collector], None]) -> None:
    with pytest.raises(ValueError):
        make_fault(collector)
    assert collector.faults_pending == 0


def test_stall_holds_the_request_then_answers_normally(collector: Collector, session: requests.Session) -> None:
    post(session, collector, "/v1/events", event("warm-up"))  # a kept-alive connection, as clients have
    collector.stall(0.4)

    started = time.monotonic()
    response = post(session, collector, "/v1/events", event("stalled"))
    elapsed = time.monotonic() - started

    assert response.status_code == 201
    assert elapsed >= 0.35
    assert collector.transaction_ids() == ["warm-up", "stalled"]


def test_stop_returns_promptly_during_a_long_stall() -> None:
    collector = Collector().start()
    outcome: List[BaseException] = []

    def send() -> None:
        try:
            with requests.Session() as s:
                post(s, collector, "/v1/events", event("never"))
        except requests.RequestException as exc:
            outcome.append(exc)

    client = threading.Thread(target=send)
    try:
        collector.stall(30.0)
        client.start()
        assert eventually(lambda: collector.faults_pending == 0)  # the request arrived and is being held

        started = time.monotonic()
        collector.stop()
        assert time.monotonic() - started < 2.0
    finally:
        collector.stop()
        client.join(TIMEOUT)

    assert not client.is_alive()
    assert isinstance(outcome[0], requests.ConnectionError)  # dropped unanswered
    assert collector.events == []
    assert collector_threads() == []
    collector.stop()  # idempotent


def test_one_thread_serves_every_connection_and_a_stall_holds_up_only_its_own(collector: Collector) -> None:
    sessions = [requests.Session() for _ in range(6)]
    outcome: List[BaseException] = []

    def stalled() -> None:
        try:
            post(sessions[0], collector, "/v1/events", event("stalled"))
        except requests.RequestException as exc:
            outcome.append(exc)

    client = threading.Thread(target=stalled)
    try:
        for n, s in enumerate(sessions):  # six kept-alive connections
            assert post(s, collector, "/v1/events", event(f"k{n}")).status_code == 201
        assert collector_threads() == ["moesif-collector"]  # no thread per connection

        collector.stall(30.0)
        client.start()
        assert eventually(lambda: collector.faults_pending == 0)  # the request arrived and is being held
        assert [post(s, collector, "/v1/events", event("meanwhile")).status_code for s in sessions[1:]] == [201] * 5
        assert collector.transaction_ids().count("meanwhile") == 5 and "stalled" not in collector.transaction_ids()
    finally:
        collector.stop()  # cuts the stall short
        client.join(TIMEOUT)
        for s in sessions:
            s.close()
    assert not client.is_alive() and isinstance(outcome[0], requests.ConnectionError)


def test_a_tornado_app_test_uses_it_from_its_own_ioloop() -> None:
    async def scenario() -> List[Any]:
        client = tornado.httpclient.AsyncHTTPClient()
        with Collector() as c:
            answer = await client.fetch(c.base_uri + "/v1/events/batch", method="POST", headers=HEADERS,
                                        body=json.dumps([event("from-a-loop")]))
            return [answer.code, c.transaction_ids()]

    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(scenario()) == [201, ["from-a-loop"]]
    finally:
        loop.close()
    assert collector_threads() == []


def test_drop_connections_closes_without_an_answer(collector: Collector, session: requests.Session) -> None:
    collector.drop_connections(times=1)

    with pytest.raises(requests.ConnectionError):
        post(session, collector, "/v1/events/batch", [event("dropped")])
    assert post(session, collector, "/v1/events/batch", [event("kept")]).status_code == 201

    assert collector.transaction_ids() == ["kept"]
    assert [r.status for r in collector.requests] == [0, 201]


def test_go_down_refuses_connections_and_come_up_reuses_the_port(collector: Collector,
                                                                 session: requests.Session) -> None:
    port = collector.port
    assert post(session, collector, "/v1/events", event("before")).status_code == 201  # pooled connection

    collector.go_down()
    assert not collector.is_up
    with pytest.raises(requests.ConnectionError):
        post(session, collector, "/v1/events", event("during"))

    collector.come_up()
    assert collector.is_up and collector.port == port
    assert post(session, collector, "/v1/events", event("after")).status_code == 201
    assert collector.transaction_ids() == ["before", "after"]


def test_while_down_no_other_program_can_take_the_port(collector: Collector, session: requests.Session) -> None:
    """A port freed while down could be taken by another test's listener or a client's ephemeral port, and
    come_up then failed with "Address already in use" (CI, Python 3.13): the collector keeps it while down."""
    collector.go_down()
    squatter = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with pytest.raises(OSError) as taken:
            squatter.bind(("127.0.0.1", collector.port))
        assert taken.value.errno == errno.EADDRINUSE
    finally:
        squatter.close()
    with pytest.raises(requests.ConnectionError):  # and it still refuses connections, as a server that is down
        post(session, collector, "/v1/events", event("during"))
    collector.come_up()
    assert post(session, collector, "/v1/events", event("after")).status_code == 201


# ---- control over HTTP ------------------------------------------------------------------------------------------


def control(session: requests.Session, collector: Collector, name: str, payload: Any = None) -> requests.Response:
    url = collector.base_uri + "/_control/" + name
    if payload is None:
        return session.get(url, timeout=TIMEOUT)
    return session.post(url, data=json.dumps(payload), timeout=TIMEOUT)


def test_control_endpoints_inject_faults_and_report(collector: Collector, session: requests.Session) -> None:
    reply = control(session, collector, "fault", {"status": 503, "times": 2, "headers": {"Retry-After": "1"}})
    assert reply.json() == {"ok": True, "faults_pending": 1}
    control(session, collector, "fault", {"drop": True, "times": 1})
    control(session, collector, "fault", {"stall": 0.01, "times": 1})

    first = post(session, collector, "/v1/events", event("a"))
    assert (first.status_code, first.headers["Retry-After"]) == (503, "1")
    assert post(session, collector, "/v1/events", event("a")).status_code == 503
    with pytest.raises(requests.ConnectionError):
        post(session, collector, "/v1/events", event("a"))
    assert post(session, collector, "/v1/events/batch", [event("b"), event("b")]).status_code == 201  # stalled

    stats = control(session, collector, "stats").json()
    assert stats == {"events": 2, "unique_transaction_ids": 1, "users": 0, "companies": 0, "subscriptions": 0,
                     "requests": 4, "faults_pending": 0, "filler_bytes_written": 0}
    assert [e["transaction_id"] for e in control(session, collector, "events").json()] == ["b", "b"]

    control(session, collector, "fault", {"status": 500, "times": None})
    assert control(session, collector, "fault", {"reset": True}).json()["faults_pending"] == 0
    assert control(session, collector, "fault", {"nonsense": 1}).status_code == 400
    assert control(session, collector, "fault", {"status": "five hundred"}).status_code == 400
    assert control(session, collector, "nothing").status_code == 404
    assert all(not r.path.startswith("/_control/") for r in collector.requests)


def test_redirect_answers_with_a_location_and_records_nothing(collector: Collector,
                                                              session: requests.Session) -> None:
    collector.redirect("http://127.0.0.1:1/v1/events/batch", status=307)
    response = session.post(collector.base_uri + "/v1/events/batch", data=json.dumps([event("a")]), headers=HEADERS,
                            timeout=TIMEOUT, allow_redirects=False)
    assert (response.status_code, response.headers["Location"]) == (307, "http://127.0.0.1:1/v1/events/batch")
    assert collector.events == [] and collector.requests[0].status == 307
    collector.redirect("http://127.0.0.1:1/v1/config", config=True)  # for the config GET, not for ingestion
    assert post(session, collector, "/v1/events", event("b")).status_code == 201
    config = session.get(collector.base_uri + "/v1/config", headers=HEADERS, timeout=TIMEOUT, allow_redirects=False)
    assert config.status_code == 301 and collector.faults_pending == 0


def test_control_queues_redirects_trickles_and_huge_bodies(collector: Collector, session: requests.Session) -> None:
    control(session, collector, "fault", {"redirect": "http://127.0.0.1:1/", "redirect_status": 308})
    control(session, collector, "fault", {"huge_body": 10, "config": True})
    reply = control(session, collector, "fault", {"trickle": 0.01, "size": 50, "config": True})
    assert reply.json() == {"ok": True, "faults_pending": 3}
    response = session.post(collector.base_uri + "/v1/events", data=json.dumps(event("a")), headers=HEADERS,
                            timeout=TIMEOUT, allow_redirects=False)
    assert (response.status_code, response.headers["Location"]) == (308, "http://127.0.0.1:1/")
    huge = session.get(collector.base_uri + "/v1/config", headers=HEADERS, timeout=TIMEOUT)
    assert (huge.status_code, huge.content) == (200, b"x" * 10)
    trickled = session.get(collector.base_uri + "/v1/config", headers=HEADERS, timeout=TIMEOUT)
    assert trickled.json() == collector.app_config
    assert control(session, collector, "fault", {"trickle": 0.1, "size": 0}).status_code == 400


def test_trickle_writes_the_whole_answer_a_few_bytes_at_a_time(collector: Collector) -> None:
    collector.trickle(0.02, size=5)
    body = json.dumps([event("slow")]).encode()
    pieces: List[bytes] = []
    with socket.create_connection(("127.0.0.1", collector.port), timeout=TIMEOUT) as client:
        client.sendall(b"POST /v1/events/batch HTTP/1.1\r\nHost: x\r\nX-Moesif-Application-Id: a\r\n"
                       b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        while True:
            piece = client.recv(4096)
            if not piece:
                break
            pieces.append(piece)
    answer = b"".join(pieces)
    assert answer.startswith(b"HTTP/1.1 201 ") and answer.endswith(b"\r\n\r\n{}")
    assert max(len(piece) for piece in pieces) <= 5 and len(pieces) >= len(answer) // 10
    assert collector.transaction_ids() == ["slow"]  # a slow answer, but a normal one: recorded


@pytest.mark.parametrize("size", [100_000, None])
def test_huge_body_streams_until_done_or_until_the_client_leaves(collector: Collector, size: Optional[int]) -> None:
    collector.huge_body(size)
    with socket.create_connection(("127.0.0.1", collector.port), timeout=TIMEOUT) as client:
        client.sendall(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        received = 0
        while received < 300_000:
            piece = client.recv(65536)
            if not piece:
                break
            received += len(piece)
    if size is None:  # endless: it stops writing soon after the client hangs up
        def settled() -> bool:
            before = collector.filler_bytes_written
            time.sleep(0.2)
            return collector.filler_bytes_written == before

        assert eventually(settled) and collector.filler_bytes_written < 64 << 20
    else:
        assert collector.filler_bytes_written == size and received > size  # headers and the whole body
    assert collector.events == []


def test_control_config_and_clear(collector: Collector, session: requests.Session) -> None:
    etag = collector.config_etag
    assert control(session, collector, "config", {"sample_rate": 10}).status_code == 200
    assert collector.app_config == {"sample_rate": 10}
    assert collector.config_etag != etag

    post(session, collector, "/v1/events", event("x"))
    control(session, collector, "clear", {})
    assert collector.stats()["events"] == 0


def test_control_down_for_answers_then_goes_down_then_comes_back(collector: Collector,
                                                                session: requests.Session) -> None:
    port = collector.port
    reply = control(session, collector, "fault", {"down_for": 0.5})
    assert reply.status_code == 200

    assert not collector.is_up
    with pytest.raises(requests.ConnectionError):
        post(session, collector, "/v1/events", event("down"))

    assert eventually(lambda: collector.is_up, timeout=3.0)
    assert collector.port == port
    assert post(session, collector, "/v1/events", event("up")).status_code == 201


# ---- construction and lifecycle ---------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com", "", "::"])
def test_non_loopback_hosts_are_refused(host: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        Collector(host=host)
    assert repr(host) in str(excinfo.value)


def test_localhost_is_accepted_and_base_uri_needs_start(session: requests.Session) -> None:
    collector = Collector(host="localhost")
    with pytest.raises(RuntimeError):
        _ = collector.base_uri
    with collector:
        assert collector.base_uri == f"http://127.0.0.1:{collector.port}"
        assert post(session, collector, "/v1/events", event("x")).status_code == 201
    with pytest.raises(RuntimeError):
        collector.start()  # a stopped collector is done


def test_stop_leaves_no_threads_behind(session: requests.Session) -> None:
    with Collector() as collector:
        post(session, collector, "/v1/events", event("x"))  # leaves a kept-alive connection open
        assert "moesif-collector" in collector_threads()
    assert collector_threads() == []


def test_received_request_is_frozen() -> None:
    request = ReceivedRequest("POST", "/v1/events", {}, 201, 1, 0.0)
    with pytest.raises(AttributeError):
        request.status = 500  # type: ignore[misc]


# ---- command line -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM and select on pipes are POSIX")
def test_main_prints_its_uri_serves_and_stops_on_sigterm() -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.Popen(
        [sys.executable, "-m", "moesiftornado_durable.testing", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(REPO_ROOT),
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        ready, _, _ = select.select([process.stdout], [], [], 10.0)
        assert ready, "the collector printed no URI within 10 s"
        base_uri = process.stdout.readline().decode().strip()
        assert base_uri.startswith("http://127.0.0.1:")

        with requests.Session() as s:
            response = s.post(base_uri + "/v1/events/batch", data=json.dumps([event("cli")]), headers=HEADERS,
                              timeout=TIMEOUT)
            assert response.status_code == 201
            assert s.get(base_uri + "/_control/stats", timeout=TIMEOUT).json()["events"] == 1

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5.0) == 0
        assert "/v1/events/batch" in process.stderr.read().decode()  # accepted requests are logged
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=5.0)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_main_refuses_a_non_loopback_host(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--host", "0.0.0.0"])
    assert excinfo.value.code == 2
    assert "loopback" in capsys.readouterr().err
