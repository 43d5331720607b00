"""User callables that are coroutines (or return awaitables), as moesifasgi allows: awaited on the IOLoop,
each called once, never blocking the loop, never raising into Tornado."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Dict, List

import requests
import tornado.gen
import tornado.web
from conftest import serve, wait_until
from moesifapi.models import EventModel

from moesiftornado_durable import MoesifMiddleware, capture_driver
from moesiftornado_durable.testing import Collector


class Hello(tornado.web.RequestHandler):
    handlers: List[tornado.web.RequestHandler] = []

    def get(self, path: str) -> None:
        Hello.handlers.append(self)
        self.write({"hello": path})

    def post(self, path: str) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(self.request.body)


def serve_calls(middleware: MoesifMiddleware, calls: List[Callable[[str], Any]]) -> None:
    """Make the calls, then wait until every request was logged (Tornado logs after answering) and every
    capture waiting for a coroutine has finished, before the loop stops."""
    logged: List[Any] = []

    def log_function(handler: Any) -> None:
        middleware.log_event(handler)
        logged.append(handler)

    app = middleware.attach(tornado.web.Application([(r"/(.*)", Hello)], log_function=log_function))
    with serve(app) as url:
        for call in calls:
            call(url)
        assert wait_until(lambda: len(logged) == len(calls) and middleware.stats()["capture_pending"] == 0, 10)


def get(path: str) -> Callable[[str], Any]:
    return lambda url: requests.get(url + path, timeout=5)


def test_async_callables_are_awaited_and_each_called_once(make_middleware: Callable[..., MoesifMiddleware],
                                                          collector: Collector) -> None:
    calls: Dict[str, int] = {}

    def count(name: str, handler: Any) -> None:
        assert isinstance(handler, tornado.web.RequestHandler)
        calls[name] = calls.get(name, 0) + 1

    async def identify_user(handler: Any) -> str:
        count("user", handler)
        await asyncio.sleep(0.01)
        return "async-user"

    async def identify_company(handler: Any) -> str:
        count("company", handler)
        return "async-company"

    async def get_session_token(handler: Any) -> str:
        count("token", handler)
        return "async-token"

    @tornado.gen.coroutine
    def get_metadata(handler: Any) -> Any:  # a Tornado-style coroutine returns a Future
        count("metadata", handler)
        yield tornado.gen.sleep(0.01)
        return {"source": "gen.coroutine"}

    async def skip(handler: Any) -> bool:
        count("skip", handler)
        return handler.request.path == "/skip-me"

    async def api_version(handler: Any) -> str:
        count("api_version", handler)
        return "async-v1"

    async def mask(event: EventModel) -> EventModel:
        calls["mask"] = calls.get("mask", 0) + 1
        await asyncio.sleep(0.01)
        event.metadata = {**event.metadata, "masked": True}
        return event

    middleware = make_middleware(IDENTIFY_USER=identify_user, IDENTIFY_COMPANY=identify_company,
                                 GET_SESSION_TOKEN=get_session_token, GET_METADATA=get_metadata, SKIP=skip,
                                 API_VERSION=api_version, MASK_EVENT_MODEL=mask)
    serve_calls(middleware, [get("/one"), get("/skip-me")])
    assert middleware.flush(10)
    [event] = collector.events
    assert event["user_id"] == "async-user" and event["company_id"] == "async-company"
    assert event["session_token"] == "async-token"
    assert event["metadata"] == {"source": "gen.coroutine", "masked": True}
    assert event["request"]["api_version"] == "async-v1"
    assert calls == {"skip": 2, "user": 1, "company": 1, "token": 1, "metadata": 1, "api_version": 1, "mask": 1}
    assert middleware.stats()["skipped"] == 1


def test_sync_and_async_callables_mix(make_middleware: Callable[..., MoesifMiddleware],
                                      collector: Collector) -> None:
    async def identify_user(handler: Any) -> str:
        return "from-coroutine"

    middleware = make_middleware(IDENTIFY_USER=identify_user, IDENTIFY_COMPANY=lambda handler: "from-function")
    serve_calls(middleware, [get("/x")])
    assert middleware.flush(10)
    [event] = collector.events
    assert (event["user_id"], event["company_id"]) == ("from-coroutine", "from-function")


def test_async_callables_that_raise_leave_fields_empty_and_the_event_logged(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, caplog: Any
) -> None:
    async def boom(handler: Any) -> Any:
        await asyncio.sleep(0)
        raise RuntimeError("async user code failed")

    async def bad_mask(event: EventModel) -> EventModel:
        raise ValueError("async mask bug")

    middleware = make_middleware(IDENTIFY_USER=boom, GET_METADATA=boom, SKIP=boom, MASK_EVENT_MODEL=bad_mask)
    with caplog.at_level(logging.ERROR, logger="moesiftornado_durable"):
        statuses: List[int] = []
        serve_calls(middleware, [lambda url: statuses.append(
            requests.post(url + "/x", json={"password": "hunter2"}, timeout=5).status_code)])
    assert statuses == [200]
    assert middleware.flush(10)
    assert len(collector.events) == 1, (middleware.stats(), caplog.text)
    [event] = collector.events
    assert event.get("user_id") is None and event.get("metadata") is None
    assert "hunter2" not in str(event) and "headers" not in event["request"]  # the mask failed closed
    for option in ("IDENTIFY_USER", "GET_METADATA", "SKIP", "MASK_EVENT_MODEL"):
        assert option in caplog.text


def test_an_async_mask_returning_none_drops_the_event(make_middleware: Callable[..., MoesifMiddleware],
                                                      collector: Collector) -> None:
    async def drop_all(event: EventModel) -> None:
        return None

    middleware = make_middleware(MASK_EVENT_MODEL=drop_all)
    serve_calls(middleware, [get("/a"), get("/b")])
    assert middleware.flush(10)
    assert collector.events == []
    assert middleware.stats()["masked_out"] == 2


def test_a_slow_coroutine_never_blocks_the_loop_and_the_event_is_spooled_when_it_finishes(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector
) -> None:
    state: Dict[str, Any] = {}

    async def identify_user(handler: Any) -> str:
        if handler.request.path != "/slow":
            return "fast-user"
        state["loop"], state["release"] = asyncio.get_running_loop(), asyncio.Event()
        await state["release"].wait()
        return "slow-user"

    timings: List[float] = []
    middleware = make_middleware(IDENTIFY_USER=identify_user)

    def timed_log_event(handler: Any) -> None:
        before = time.perf_counter()
        middleware.log_event(handler)
        timings.append(time.perf_counter() - before)

    app = tornado.web.Application([(r"/(.*)", Hello)], log_function=timed_log_event)
    with serve(app) as url:
        assert requests.get(url + "/slow", timeout=5).status_code == 200
        assert wait_until(lambda: "release" in state, 5)
        assert middleware.stats()["capture_pending"] == 1  # answered; its event waits for the coroutine
        started = time.monotonic()
        assert requests.get(url + "/fast", timeout=5).status_code == 200  # the loop is free meanwhile
        assert time.monotonic() - started < 0.5
        # the fast one is spooled (its task then ends); the slow one still waits
        assert wait_until(lambda: middleware.stats().get("spooled") == 1 and
                          middleware.stats()["capture_pending"] == 1, 5)
        state["loop"].call_soon_threadsafe(state["release"].set)
        assert wait_until(lambda: middleware.stats()["capture_pending"] == 0, 5)
        assert middleware.stats()["spooled"] == 2
    assert max(timings) < 0.1
    assert middleware.flush(10)
    assert sorted(e["user_id"] for e in collector.events) == ["fast-user", "slow-user"]


def test_a_coroutine_that_never_finishes_times_out_and_the_event_is_still_logged(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, monkeypatch: Any, caplog: Any
) -> None:
    monkeypatch.setattr(capture_driver, "ASYNC_CALLABLE_TIMEOUT", 0.2)

    async def hangs(handler: Any) -> str:
        await asyncio.sleep(60)
        return "never"

    middleware = make_middleware(IDENTIFY_COMPANY=hangs, IDENTIFY_USER=lambda handler: "still-identified")
    with caplog.at_level(logging.ERROR, logger="moesiftornado_durable"):
        serve_calls(middleware, [get("/x")])
    assert middleware.flush(10)
    [event] = collector.events
    assert event["user_id"] == "still-identified" and event.get("company_id") is None
    assert "IDENTIFY_COMPANY did not finish" in caplog.text


def test_log_event_outside_an_event_loop_logs_the_event_without_the_coroutine_result(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, caplog: Any
) -> None:
    async def identify_user(handler: Any) -> str:
        return "needs-a-loop"

    middleware = make_middleware(IDENTIFY_USER=identify_user, IDENTIFY_COMPANY=lambda handler: "sync-company")
    Hello.handlers = []
    serve_calls(middleware, [get("/x")])
    assert middleware.flush(10)
    collector.clear()
    with caplog.at_level(logging.ERROR, logger="moesiftornado_durable"):
        middleware.log_event(Hello.handlers[-1])  # from this thread, where no loop runs
    assert middleware.flush(10)
    [event] = collector.events
    assert event.get("user_id") is None and event["company_id"] == "sync-company"
    assert "no event loop is running" in caplog.text
