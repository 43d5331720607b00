"""Sampling by the app config: the rules (checked against moesifapi's own code), the fetcher thread, and
the middleware end to end against the local collector serving configs."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import pytest
import requests
import tornado.web
from conftest import serve, wait_until
from moesifapi.app_config.app_config import AppConfig as MoesifApiAppConfig
from moesifapi.models import EventModel

from moesiftornado_durable import MoesifMiddleware
from moesiftornado_durable.sampling import AppConfig, ConfigFetcher, Sampler
from moesiftornado_durable.sender import Sender
from moesiftornado_durable.testing import Collector


def event(verb: str = "GET", uri: str = "http://api.example.com/v1/items?page=2", ip: str = "203.0.113.9",
          status: int = 200, user: Optional[str] = None, company: Optional[str] = None) -> Dict[str, Any]:
    return {"request": {"time": "2024-01-01T00:00:00.000000", "verb": verb, "uri": uri, "ip_address": ip,
                        "headers": {}},
            "response": {"time": "2024-01-01T00:00:00.100000", "status": status, "headers": {}},
            "user_id": user, "company_id": company, "direction": "Incoming"}


def rule(rate: int, *conditions: Tuple[str, str]) -> Dict[str, Any]:
    return {"conditions": [{"path": path, "value": value} for path, value in conditions], "sample_rate": rate}


CONFIGS: List[Dict[str, Any]] = [
    {},
    {"sample_rate": 40},
    {"sample_rate": 40, "user_sample_rate": {"u1": 70}, "company_sample_rate": {"c1": 10}},
    {"sample_rate": 80, "company_sample_rate": {"c1": 25, "c2": 0}},
    {"sample_rate": 90, "user_sample_rate": {"u1": 5},
     "regex_config": [rule(60, ("request.route", "^/v1/items$")), rule(30, ("request.verb", "POST"))]},
    {"regex_config": [rule(15, ("request.verb", "GET"), ("response.status", "^5"))], "sample_rate": 50},
    {"regex_config": [rule(20, ("request.ip_address", r"^203\.0\.113\.")), rule(75, ("request.route", "items"))]},
    {"regex_config": [rule(35, ("response.status", "404"), ("request.route", "^/$"))], "user_sample_rate": {"u2": 1}},
]
EVENTS = [
    event(), event(user="u1"), event(company="c1"), event(user="u1", company="c1"), event(company="c2"),
    event(verb="POST"), event(status=503), event(status=503, user="u1"), event(ip="198.51.100.1"),
    event(uri="http://api.example.com/"), event(uri="http://api.example.com", status=404),
    event(uri="http://api.example.com/?q=1", status=404, user="u2"), event(uri="https://h:8443/v1/items"),
]


@pytest.mark.parametrize("config_index", range(len(CONFIGS)))
def test_rates_agree_with_moesifapi_on_every_config_it_handles(config_index: int) -> None:
    body = CONFIGS[config_index]
    ours = AppConfig.parse(body)
    theirs = MoesifApiAppConfig()
    for sample in EVENTS:
        expected = theirs.get_sampling_percentage(EventModel.from_dictionary(sample), body, sample["user_id"],
                                                  sample["company_id"])
        assert ours.rate_for(sample) == expected, (body, sample)


def test_precedence_is_regex_then_user_then_company_then_global() -> None:
    config = AppConfig.parse({"sample_rate": 50, "user_sample_rate": {"u": 40}, "company_sample_rate": {"c": 30},
                              "regex_config": [rule(20, ("request.route", "^/hot"))]})
    assert config.rate_for(event(uri="http://h/hot/path", user="u", company="c")) == 20
    assert config.rate_for(event(uri="http://h/cold", user="u", company="c")) == 40
    assert config.rate_for(event(uri="http://h/cold", user="other", company="c")) == 30
    assert config.rate_for(event(uri="http://h/cold", user="other", company="other")) == 50
    assert AppConfig().rate_for(event()) == 100  # before any config: everything is kept


def test_route_is_the_path_without_the_query_string() -> None:
    config = AppConfig.parse({"sample_rate": 100, "regex_config": [rule(0, ("request.route", r"^/search$"))]})
    assert config.rate_for(event(uri="http://h/search?q=secret")) == 0
    assert config.rate_for(event(uri="http://h/search/more")) == 100
    assert config.rate_for(event(uri="http://h/x?route=/search")) == 100


def test_all_conditions_of_a_rule_must_match_and_the_first_matching_rule_wins() -> None:
    config = AppConfig.parse({"regex_config": [rule(10, ("request.verb", "^POST$"), ("response.status", "^2")),
                                               rule(20, ("request.verb", "^POST$")), rule(30, ("request.verb", "."))]})
    assert config.rate_for(event(verb="POST", status=201)) == 10
    assert config.rate_for(event(verb="POST", status=500)) == 20
    assert config.rate_for(event(verb="GET")) == 30


def test_broken_parts_of_a_config_are_skipped_not_fatal(caplog: Any) -> None:
    # moesifapi returns 100 for every event when any rule has an unknown path, a bad regex or no rate
    with caplog.at_level(logging.WARNING, logger="moesiftornado_durable"):
        config = AppConfig.parse({
            "sample_rate": "fifty",
            "user_sample_rate": {"u": "x", "v": 250, "w": -3},
            "company_sample_rate": ["not", "a", "dict"],
            "regex_config": [rule(5, ("request.body", "x")), rule(5, ("request.verb", "([")),
                             {"conditions": [{"path": "request.verb", "value": "GET"}]}, rule(5), "junk",
                             rule(45, ("request.verb", "GET"))],
        })
    assert config.sample_rate == 100
    assert config.user_sample_rate == {"v": 100, "w": 0}
    assert config.company_sample_rate == {}
    assert config.rate_for(event(verb="GET")) == 45
    assert config.rate_for(event(verb="PUT", user="w")) == 0
    assert "regex_config[0]" in caplog.text and "regex_config[1]" in caplog.text
    with pytest.raises(ValueError):
        AppConfig.parse(["not", "an", "object"])


def test_weight_is_floor_of_100_over_the_rate_and_draws_decide() -> None:
    draws = iter([0.49, 0.50, 0.0, 0.2])
    sampler = Sampler(draw=lambda: next(draws))
    sampler.update(AppConfig.parse({"sample_rate": 50}))
    assert sampler.weight_for(event()) == 2  # 49 < 50: kept, stands for 2
    assert sampler.weight_for(event()) is None  # 50 >= 50: dropped
    sampler.update(AppConfig.parse({"sample_rate": 0}))
    assert sampler.weight_for(event()) is None  # rate 0 drops even the lowest draw
    sampler.update(AppConfig.parse({"sample_rate": 100}))
    assert sampler.weight_for(event()) == 1  # no draw at 100: the 0.2 is still next
    sampler.update(AppConfig.parse({"sample_rate": 33}))
    assert sampler.weight_for(event()) == 3  # 20 < 33: kept, stands for floor(100 / 33)


def test_weights_for_common_rates() -> None:
    sampler = Sampler(draw=lambda: 0.0)
    for rate, weight in [(100, 1), (50, 2), (33, 3), (25, 4), (10, 10), (1, 100), (0.5, 200)]:
        sampler.update(AppConfig.parse({"sample_rate": rate}))
        assert sampler.weight_for(event()) == weight, rate


# ---- the fetcher thread ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def running_fetcher(collector_uri: str, refresh_interval: float = 300.0,
                    retry_wait: float = 0.1) -> Iterator[Tuple[ConfigFetcher, List[AppConfig]]]:
    sender = Sender(collector_uri, "test-app-id", timeout=2.0)
    received: List[AppConfig] = []
    fetcher = ConfigFetcher(sender.fetch_app_config, received.append, refresh_interval, retry_wait)
    fetcher.start()
    try:
        yield fetcher, received
    finally:
        fetcher.close(2.0)
        sender.close()


def test_the_fetcher_refreshes_periodically_without_any_etag(collector: Collector) -> None:
    collector.app_config = {"sample_rate": 10}
    with running_fetcher(collector.base_uri, refresh_interval=0.2) as (fetcher, received):
        assert wait_until(lambda: len(received) >= 1, 5)
        assert received[0].sample_rate == 10
        collector.app_config = {"sample_rate": 20}
        assert wait_until(lambda: received[-1].sample_rate == 20, 5)
        assert wait_until(lambda: fetcher.fetches >= 4, 5)


def test_the_fetcher_fetches_again_on_a_new_etag_only(collector: Collector) -> None:
    with running_fetcher(collector.base_uri) as (fetcher, received):
        assert wait_until(lambda: len(received) == 1, 5)
        first_etag = collector.config_etag
        assert received[0].etag == first_etag
        fetcher.notice_etag(first_etag)  # the one in use: nothing to do
        fetcher.notice_etag(None)
        time.sleep(0.3)
        assert fetcher.fetches == 1
        collector.app_config = {"sample_rate": 5}
        fetcher.notice_etag(collector.config_etag)
        assert wait_until(lambda: len(received) == 2, 5)
        assert received[1].sample_rate == 5 and received[1].etag == collector.config_etag
        fetcher.notice_etag("an-etag-the-config-never-comes-with")
        assert wait_until(lambda: fetcher.fetches == 3, 5)
        for _ in range(5):  # the same stray etag again: no fetch loop
            fetcher.notice_etag("an-etag-the-config-never-comes-with")
        time.sleep(0.3)
        assert fetcher.fetches == 3


def test_a_failed_fetch_keeps_the_last_good_config_and_retries(collector: Collector) -> None:
    collector.app_config = {"sample_rate": 10}
    with running_fetcher(collector.base_uri, refresh_interval=0.1, retry_wait=0.1) as (fetcher, received):
        assert wait_until(lambda: len(received) >= 1, 5)
        collector.go_down()
        failures_before = fetcher.fetches
        assert wait_until(lambda: fetcher.fetches >= failures_before + 3, 5)
        assert fetcher.last_error is not None
        assert all(config.sample_rate == 10 for config in received)  # nothing replaced the good one
        collector.app_config = {"sample_rate": 30}
        collector.come_up()
        assert wait_until(lambda: received[-1].sample_rate == 30, 5)


def test_the_fetcher_thread_belongs_to_the_process_that_started_it(collector: Collector) -> None:
    with running_fetcher(collector.base_uri) as (fetcher, _):
        assert fetcher.is_alive
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the parent's thread is not here
            os.write(write, b"alive" if fetcher.is_alive else b"dead")
            os._exit(0)
        os.waitpid(pid, 0)
        assert os.read(read, 10) == b"dead"
        os.close(read)
        os.close(write)


# ---- the middleware end to end ---------------------------------------------------------------------------------


class Hello(tornado.web.RequestHandler):
    def get(self, path: str) -> None:
        self.write("hello")


def serve_gets(middleware: MoesifMiddleware, paths: List[str], user_header: Optional[str] = None) -> None:
    app = tornado.web.Application([(r"/(.*)", Hello)], log_function=middleware.log_event)
    with serve(app) as url, requests.Session() as session:
        for path in paths:
            headers = {"X-User": user_header} if user_header else {}
            assert session.get(url + path, headers=headers, timeout=5).status_code == 200


def configured(make_middleware: Callable[..., MoesifMiddleware], collector: Collector, **options: Any) -> Any:
    middleware = make_middleware(IDENTIFY_USER=lambda handler: handler.request.headers.get("X-User"), **options)
    assert wait_until(lambda: middleware.stats()["app_config_etag"] == collector.config_etag, 5)
    return middleware


def test_events_are_sampled_by_user_and_route_and_counted(make_middleware: Callable[..., MoesifMiddleware],
                                                          collector: Collector) -> None:
    collector.app_config = {"sample_rate": 0, "user_sample_rate": {"vip": 100},
                            "regex_config": [rule(100, ("request.route", "^/always"))]}
    middleware = configured(make_middleware, collector)
    serve_gets(middleware, ["/a", "/b", "/always?x=1"])
    serve_gets(middleware, ["/c", "/d"], user_header="vip")
    serve_gets(middleware, ["/e"], user_header="nobody")
    assert middleware.flush(10)
    kept = sorted(e["request"]["uri"].rsplit("/", 1)[-1] for e in collector.events)
    assert kept == ["always?x=1", "c", "d"]
    assert {e["weight"] for e in collector.events} == {1}
    stats = middleware.stats()
    assert stats["sampled_out"] == 3 and stats["spooled"] == 3


def test_kept_events_carry_the_weight_of_their_rate(make_middleware: Callable[..., MoesifMiddleware],
                                                    collector: Collector) -> None:
    collector.app_config = {"sample_rate": 25}
    middleware = configured(make_middleware, collector)
    serve_gets(middleware, [f"/n{n}" for n in range(200)])
    assert middleware.flush(10)
    kept = len(collector.events)
    assert 20 <= kept <= 85  # 50 expected; binomial(200, 0.25) is outside this less than once in 10^5 runs
    assert {e["weight"] for e in collector.events} == {4}
    assert middleware.stats()["sampled_out"] == 200 - kept


def test_a_new_etag_on_a_batch_response_brings_the_new_config(make_middleware: Callable[..., MoesifMiddleware],
                                                              collector: Collector) -> None:
    middleware = configured(make_middleware, collector)  # the default config: everything kept
    collector.app_config = {"sample_rate": 0}  # changes the etag the next batch response carries
    serve_gets(middleware, ["/before"])
    assert middleware.flush(10)
    assert wait_until(lambda: middleware.stats()["app_config_etag"] == collector.config_etag, 5)
    serve_gets(middleware, ["/after-1", "/after-2"])
    assert middleware.flush(10)
    assert [e["request"]["uri"].rsplit("/", 1)[-1] for e in collector.events] == ["before"]
    assert middleware.stats()["sampled_out"] == 2
    config_fetches = [r for r in collector.requests if r.path == "/v1/config"]
    assert len(config_fetches) == 2  # at start, and once for the new etag


def test_with_no_config_yet_every_event_is_kept(make_middleware: Callable[..., MoesifMiddleware],
                                                collector: Collector) -> None:
    collector.app_config = {"sample_rate": 0}
    collector.go_down()  # the first fetch fails
    middleware = make_middleware()
    serve_gets(middleware, ["/1", "/2", "/3"])
    stats = middleware.stats()
    assert stats["spooled"] == 3 and "sampled_out" not in stats
    assert stats["app_config_etag"] is None and stats["app_config_error"]
    collector.come_up()
    assert middleware.flush(10)
    assert len(collector.events) == 3


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """A socket that accepts connections and never answers: a Moesif that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: List[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(2)
        for connection in itertools.chain(accepted, [listener]):
            connection.close()


def test_a_hanging_config_fetch_never_delays_construction_or_requests(
    make_middleware: Callable[..., MoesifMiddleware]
) -> None:
    with silent_server() as uri:
        started = time.monotonic()
        middleware = make_middleware(BASE_URI=uri, SEND_TIMEOUT=5.0)
        assert time.monotonic() - started < 1.0
        timings: List[float] = []

        def timed_log_event(handler: Any) -> None:
            before = time.perf_counter()
            middleware.log_event(handler)
            timings.append(time.perf_counter() - before)

        app = tornado.web.Application([(r"/(.*)", Hello)], log_function=timed_log_event)
        with serve(app) as url:
            for n in range(5):
                assert requests.get(f"{url}/{n}", timeout=2).status_code == 200
        stats = middleware.stats()
        assert stats["spooled"] == 5 and stats["app_config_etag"] is None
        assert max(timings) < 0.2  # the config GET hangs for 5 s meanwhile
        middleware.close(0.5)


class Keep(tornado.web.RequestHandler):
    seen: List[tornado.web.RequestHandler] = []

    def get(self) -> None:
        Keep.seen.append(self)
        self.write("kept")


def test_a_sampling_failure_keeps_the_event(tmp_path: Any, caplog: Any) -> None:
    from moesiftornado_durable.capture import capture_event
    from moesiftornado_durable.config import Config

    with serve(tornado.web.Application([(r"/", Keep)])) as url:
        assert requests.get(url + "/", timeout=5).status_code == 200
    config = Config.from_dict({"APPLICATION_ID": "a", "SPOOL_DIR": str(tmp_path)})

    def broken(event: Dict[str, Any]) -> Optional[int]:
        raise KeyError("a bug in the rules")

    with caplog.at_level(logging.ERROR, logger="moesiftornado_durable"):
        captured = capture_event(Keep.seen[-1], config, time.time(), weight_for=broken)
    assert captured is not None and captured["weight"] == 1
    assert "sampling failed" in caplog.text
    assert capture_event(Keep.seen[-1], config, time.time(), weight_for=lambda event: None) is None
    assert capture_event(Keep.seen[-1], config, time.time(), weight_for=lambda event: 4)["weight"] == 4
