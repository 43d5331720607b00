"""The sender maps every answer of a real loopback collector to one error class; the policy retries right."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, List

import pytest
import tenacity

from moesiftornado_durable.errors import AuthError, PermanentError, RetryableError
from moesiftornado_durable.sender import Sender, ShutdownRequested, delivery_policy, parse_retry_after
from moesiftornado_durable.spool import COMPANY, EVENT, SUBSCRIPTION, USER
from moesiftornado_durable.testing import Collector

EVENT_BODY = {"transaction_id": "t-1", "request": {"uri": "http://x/", "verb": "GET", "time": "2026-01-01T00:00:00.0"},
              "response": {"status": 200, "time": "2026-01-01T00:00:00.1"}}


@pytest.fixture
def sender(collector: Collector) -> Any:
    made = Sender(collector.base_uri, "test-app-id", timeout=1.0)
    yield made
    made.close()


def test_events_users_companies_and_subscriptions_reach_their_endpoints(sender: Sender,
                                                                        collector: Collector) -> None:
    headers = sender.send(EVENT, [EVENT_BODY])
    sender.send(USER, [{"user_id": "u-1"}])
    sender.send(COMPANY, [{"company_id": "c-1"}])
    subscription = {"subscription_id": "s-1", "company_id": "c-1", "status": "active"}
    sender.send(SUBSCRIPTION, [subscription])
    assert collector.transaction_ids() == ["t-1"]
    assert collector.users == [{"user_id": "u-1"}]
    assert collector.companies == [{"company_id": "c-1"}]
    assert collector.subscriptions == [subscription]
    assert "X-Moesif-Config-ETag" in headers
    paths = [r.path for r in collector.requests]
    assert paths == ["/v1/events/batch", "/v1/users/batch", "/v1/companies/batch", "/v1/subscriptions/batch"]
    assert collector.requests[0].headers.get("X-Moesif-Application-Id") == "test-app-id"


def test_two_senders_in_one_process_keep_their_own_base_uri(collector: Collector) -> None:
    with Collector() as other:
        a, b = Sender(collector.base_uri, "app-a", 1.0), Sender(other.base_uri, "app-b", 1.0)
        a.send(EVENT, [EVENT_BODY])
        b.send(EVENT, [dict(EVENT_BODY, transaction_id="t-2")])
        assert collector.transaction_ids() == ["t-1"] and other.transaction_ids() == ["t-2"]
        assert other.requests[0].headers.get("X-Moesif-Application-Id") == "app-b"
        a.close()
        b.close()


def test_a_clone_sends_to_the_same_collector_on_a_connection_of_its_own(sender: Sender,
                                                                        collector: Collector) -> None:
    clone = sender.clone()
    collector.stall(0.5, times=2)
    sends = [threading.Thread(target=one.send, args=(EVENT, [dict(EVENT_BODY, transaction_id=tid)]))
             for one, tid in ((sender, "t-1"), (clone, "t-2"))]
    started = time.monotonic()
    for send in sends:
        send.start()
    for send in sends:
        send.join(5)
    assert time.monotonic() - started < 0.9  # both stalls at once: two connections, not one after the other
    assert sorted(collector.transaction_ids()) == ["t-1", "t-2"]
    assert {r.headers.get("X-Moesif-Application-Id") for r in collector.requests} == {"test-app-id"}
    sender.close()
    clone.send(EVENT, [dict(EVENT_BODY, transaction_id="t-3")])  # closing one leaves the other working
    assert collector.transaction_ids()[-1] == "t-3"
    clone.close()


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_transient_statuses_are_retryable(sender: Sender, collector: Collector, status: int) -> None:
    collector.respond_with(status)
    with pytest.raises(RetryableError) as raised:
        sender.send(EVENT, [EVENT_BODY])
    assert raised.value.status == status and not isinstance(raised.value, AuthError)


@pytest.mark.parametrize("status", [401, 402, 403])
def test_auth_statuses_are_auth_errors(sender: Sender, collector: Collector, status: int) -> None:
    collector.respond_with(status)
    with pytest.raises(AuthError):
        sender.send(EVENT, [EVENT_BODY])


@pytest.mark.parametrize("status", [400, 404, 405, 406, 410, 422])
def test_rejections_are_permanent(sender: Sender, collector: Collector, status: int) -> None:
    collector.respond_with(status)
    with pytest.raises(PermanentError) as raised:
        sender.send(EVENT, [EVENT_BODY])
    assert raised.value.status == status


def test_retry_after_is_read(sender: Sender, collector: Collector) -> None:
    collector.respond_with(429, headers={"Retry-After": "7"})
    with pytest.raises(RetryableError) as raised:
        sender.send(EVENT, [EVENT_BODY])
    assert raised.value.retry_after == 7.0


def test_retry_after_as_http_date() -> None:
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == pytest.approx(10.0)
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None


def test_refused_connection_is_retryable_and_fast(collector: Collector) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sender = Sender(f"http://127.0.0.1:{port}", "x", timeout=1.0)
    started = time.monotonic()
    with pytest.raises(RetryableError):
        sender.send(EVENT, [EVENT_BODY])
    assert time.monotonic() - started < 1.0  # moesifapi's own client spends ~12 s retrying here
    sender.close()


def test_dropped_connection_is_retryable(sender: Sender, collector: Collector) -> None:
    collector.drop_connections()
    with pytest.raises(RetryableError):
        sender.send(EVENT, [EVENT_BODY])


def test_a_stalled_collector_times_out(sender: Sender, collector: Collector) -> None:
    collector.stall(30)
    started = time.monotonic()
    with pytest.raises(RetryableError, match="timeout"):
        sender.send(EVENT, [EVENT_BODY])
    assert 0.9 <= time.monotonic() - started < 5


def test_policy_retries_transient_errors_then_succeeds_with_a_recording_sleep(
    sender: Sender, collector: Collector
) -> None:
    collector.respond_with(503, times=3)
    slept: List[float] = []
    policy = delivery_policy(threading.Event(), max_wait=30.0, sleep=slept.append)
    policy(sender.send, EVENT, [EVENT_BODY])
    assert len(slept) == 3
    assert slept[0] < slept[2]  # exponential
    assert collector.transaction_ids() == ["t-1"]


def test_policy_honours_retry_after_capped(sender: Sender, collector: Collector) -> None:
    collector.respond_with(503, headers={"Retry-After": "5"})
    collector.respond_with(429, headers={"Retry-After": "3600"})
    slept: List[float] = []
    delivery_policy(threading.Event(), max_wait=60.0, sleep=slept.append)(sender.send, EVENT, [EVENT_BODY])
    assert slept == [5.0, 60.0]


def test_policy_waits_long_on_auth_errors(sender: Sender, collector: Collector) -> None:
    collector.respond_with(401)
    slept: List[float] = []
    delivery_policy(threading.Event(), max_wait=45.0, sleep=slept.append)(sender.send, EVENT, [EVENT_BODY])
    assert slept == [45.0]


def test_policy_does_not_retry_permanent_errors(sender: Sender, collector: Collector) -> None:
    collector.respond_with(400)
    slept: List[float] = []
    with pytest.raises(PermanentError):
        delivery_policy(threading.Event(), max_wait=1.0, sleep=slept.append)(sender.send, EVENT, [EVENT_BODY])
    assert slept == []


def test_policy_stops_at_once_when_shutdown_is_requested(sender: Sender, collector: Collector) -> None:
    collector.respond_with(503, times=None)
    stop = threading.Event()
    policy = delivery_policy(stop, max_wait=30.0)
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises((ShutdownRequested, RetryableError)):
        policy(sender.send, EVENT, [EVENT_BODY])
    assert time.monotonic() - started < 3.0
    assert isinstance(policy.wait, tenacity.wait.wait_base)


def test_fetch_app_config_returns_the_config_and_its_etag_and_maps_errors() -> None:
    with Collector(application_id="right-app") as strict:
        strict.app_config = {"sample_rate": 42}
        right, wrong = Sender(strict.base_uri, "right-app", 1.0), Sender(strict.base_uri, "wrong-app", 1.0)
        try:
            assert right.fetch_app_config() == ({"sample_rate": 42}, strict.config_etag)
            with pytest.raises(AuthError):
                wrong.fetch_app_config()
            strict.go_down()
            with pytest.raises(RetryableError):
                right.fetch_app_config()
        finally:
            right.close()
            wrong.close()
