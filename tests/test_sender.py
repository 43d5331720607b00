"""The sender maps every answer of a real loopback collector to one error class; the policy retries right."""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Any, List

import pytest
import tenacity

from moesiftornado_durable.errors import AuthError, PermanentError, RedirectError, RetryableError
from moesiftornado_durable.kinds import COMPANY, EVENT, SUBSCRIPTION, USER
from moesiftornado_durable.sender import Sender, ShutdownRequested, delivery_policy, parse_retry_after
from moesiftornado_durable.testing import Collector
from moesiftornado_durable.transport import MAX_RESPONSE_BYTES

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


# ---- hostile collectors: redirects, trickles, huge answers --------------------------------------------------------


def ends_within(seconds: float, call: Any, *args: Any) -> List[BaseException]:
    """Run `call(*args)` in a thread; assert it ended within `seconds` (a generous bound); return what it raised."""
    raised: List[BaseException] = []

    def run() -> None:
        try:
            call(*args)
        except BaseException as exc:  # noqa: BLE001 -- handed to the test
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still sending after {seconds} s"
    return raised


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_never_followed_and_never_an_ack(sender: Sender, collector: Collector, status: int) -> None:
    with Collector() as elsewhere:
        target = elsewhere.base_uri + "/v1/events/batch"
        collector.redirect(target, status)
        with pytest.raises(RedirectError) as raised:
            sender.send(EVENT, [EVENT_BODY])
        assert raised.value.status == status and raised.value.location == target
        assert isinstance(raised.value, RetryableError) and not isinstance(raised.value, AuthError)
        collector.redirect(elsewhere.base_uri + "/v1/users/batch", status)
        with pytest.raises(RedirectError):  # moesifapi's calls go through the same transport
            sender.send(USER, [{"user_id": "u-1"}])
        assert elsewhere.requests == []  # no batch, no application id at the other origin
    sender.send(EVENT, [EVENT_BODY])  # and the connection is fine afterwards
    assert collector.transaction_ids() == ["t-1"]


def test_the_config_fetch_does_not_follow_a_redirect() -> None:
    with Collector() as collector, Collector() as elsewhere:
        sender = Sender(collector.base_uri, "test-app-id", 1.0)
        collector.redirect(elsewhere.base_uri + "/v1/config", 307, config=True)
        with pytest.raises(RedirectError):
            sender.fetch_app_config()
        assert elsewhere.requests == []
        assert sender.fetch_app_config()[0] == collector.app_config
        sender.close()


def test_policy_retries_a_redirect_at_the_auth_interval(sender: Sender, collector: Collector,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    collector.redirect("http://127.0.0.1:9/v1/events/batch")
    waits: List[float] = []
    policy = delivery_policy(threading.Event(), max_wait=2.0, auth_wait=77.0, sleep=waits.append)
    with caplog.at_level(logging.WARNING, logger="moesiftornado_durable"):
        policy(sender.send, EVENT, [EVENT_BODY])
    assert waits == [77.0] and collector.transaction_ids() == ["t-1"]
    [record] = [r for r in caplog.records if "HTTP 301" in r.getMessage()]
    assert record.levelno == logging.ERROR and "http://127.0.0.1:9/v1/events/batch" in record.getMessage()
    replay = delivery_policy(threading.Event(), max_wait=2.0, sleep=waits.append, retry_auth=False)
    collector.redirect("http://127.0.0.1:9/v1/events/batch")
    with pytest.raises(RedirectError):  # the replay command gives up at once, as on an auth error
        replay(sender.send, EVENT, [EVENT_BODY])


def test_a_trickled_answer_ends_at_the_send_timeout(collector: Collector) -> None:
    sender = Sender(collector.base_uri, "test-app-id", timeout=2.0)
    collector.trickle(0.5, size=1)  # ~150 bytes of answer, status line included: over a minute
    raised = ends_within(15.0, sender.send, EVENT, [EVENT_BODY])  # per-read timeouts alone: never over
    assert len(raised) == 1 and isinstance(raised[0], RetryableError) and "timeout" in str(raised[0])
    sender.send(EVENT, [dict(EVENT_BODY, transaction_id="t-2")])  # a fresh connection works
    assert collector.transaction_ids()[-1] == "t-2"
    collector.trickle(0.5, size=1, config=True)
    raised = ends_within(15.0, sender.fetch_app_config)
    assert len(raised) == 1 and isinstance(raised[0], RetryableError)
    sender.close()


@pytest.mark.parametrize("size", [64 << 20, None])
def test_a_huge_answer_is_not_read_and_not_an_ack(collector: Collector, size: Any) -> None:
    sender = Sender(collector.base_uri, "test-app-id", timeout=10.0)
    collector.huge_body(size)
    raised = ends_within(15.0, sender.send, EVENT, [EVENT_BODY])
    assert len(raised) == 1 and isinstance(raised[0], RetryableError) and "too large" in str(raised[0])
    assert collector.transaction_ids() == []  # answered 200, but the sender did not take it as an ack
    # The sender stopped reading at the cap: what the collector could write is the cap plus socket buffers.
    time.sleep(0.2)
    assert collector.filler_bytes_written < 32 << 20
    collector.huge_body(size, config=True)
    raised = ends_within(15.0, sender.fetch_app_config)
    assert len(raised) == 1 and isinstance(raised[0], RetryableError)
    assert collector.filler_bytes_written < 64 << 20
    sender.send(EVENT, [EVENT_BODY])
    assert collector.transaction_ids() == ["t-1"]
    sender.close()


def test_an_answer_at_the_cap_is_read(collector: Collector) -> None:
    collector.app_config = {"padding": "x" * (MAX_RESPONSE_BYTES - 100)}
    sender = Sender(collector.base_uri, "test-app-id", timeout=5.0)
    assert sender.fetch_app_config()[0] == collector.app_config
    sender.close()


def test_a_plain_http_proxy_from_the_environment_is_used(collector: Collector,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", collector.base_uri)  # the collector reads an absolute request target too
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    sender = Sender("http://collector.invalid", "test-app-id", timeout=2.0)
    sender.send(EVENT, [EVENT_BODY])
    assert collector.transaction_ids() == ["t-1"]
    sender.close()


def test_close_ends_a_request_in_flight_on_another_thread_at_once(collector: Collector) -> None:
    collector.stall(30)
    slow = Sender(collector.base_uri, "test-app-id", timeout=30.0)
    raised: List[BaseException] = []
    worker = threading.Thread(target=lambda: raised.extend(ends_within(10.0, slow.send, EVENT, [EVENT_BODY])))
    worker.start()
    assert wait_until_served(collector)
    slow.close()  # returns without waiting for the stalled answer...
    worker.join(10)
    assert not worker.is_alive() and len(raised) == 1 and isinstance(raised[0], RetryableError)  # ...which fails
    slow.send(EVENT, [EVENT_BODY])  # and the sender works again, on a new connection
    assert collector.transaction_ids() == ["t-1"]
    slow.close()


def wait_until_served(collector: Collector) -> bool:
    """Until the collector has taken the stalled request off the fault queue (it is being served)."""
    deadline = time.monotonic() + 5
    while collector.faults_pending and time.monotonic() < deadline:
        time.sleep(0.01)
    return collector.faults_pending == 0
