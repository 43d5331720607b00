"""Strict mode: the event is committed to the spool before the response's last bytes are sent."""

from __future__ import annotations

import base64
from typing import Any, Callable

import requests
import tornado.web
from conftest import serve, waiting

from moesiftornado_durable import MoesifMiddleware, SpoolBeforeSendMixin
from moesiftornado_durable.testing import Collector


class Strict(SpoolBeforeSendMixin, tornado.web.RequestHandler):
    async def get(self) -> None:
        self.write("first-")
        await self.flush()  # part of the body already sent before finish
        self.write("last")


class Loose(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("loose")


def test_strict_handler_spools_before_sending_without_relying_on_log_function(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    collector.go_down()
    middleware = make_middleware()
    # log_function does nothing here: only the mixin can have spooled the event
    app = middleware.attach(tornado.web.Application([(r"/strict", Strict), (r"/loose", Loose)],
                                                    log_function=lambda handler: None))
    with serve(app) as url:
        assert requests.get(url + "/strict", timeout=5).text == "first-last"
        assert waiting(spool_dir) == 1  # already on disk
        assert requests.get(url + "/loose", timeout=5).status_code == 200
    assert waiting(spool_dir) == 1
    collector.come_up()
    assert middleware.flush(10)
    [event] = collector.events
    assert event["request"]["uri"].endswith("/strict")
    assert base64.b64decode(event["response"]["body"]) == b"first-last"  # flushed and unsent parts together
    assert event["response"]["status"] == 200


def test_strict_and_log_function_together_log_once(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector
) -> None:
    middleware = make_middleware()
    app = tornado.web.Application([(r"/strict", Strict), (r"/loose", Loose)], log_function=middleware.log_event)
    with serve(app) as url:
        for path in ("/strict", "/loose", "/strict", "/nowhere"):
            requests.get(url + path, timeout=5)
    assert middleware.flush(10)
    uris = sorted(e["request"]["uri"].rsplit("/", 1)[-1] for e in collector.events)
    assert uris == ["loose", "nowhere", "strict", "strict"]
    statuses = sorted(e["response"]["status"] for e in collector.events)
    assert statuses == [200, 200, 200, 404]


def test_strict_error_responses_are_spooled_too(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    class Failing(SpoolBeforeSendMixin, tornado.web.RequestHandler):
        def get(self) -> Any:
            raise tornado.web.HTTPError(418)

    middleware = make_middleware()
    app = tornado.web.Application([(r"/fail", Failing)], log_function=lambda handler: None)
    middleware.attach(app)
    with serve(app) as url:
        assert requests.get(url + "/fail", timeout=5).status_code == 418
    assert middleware.flush(10)
    assert [e["response"]["status"] for e in collector.events] == [418]
