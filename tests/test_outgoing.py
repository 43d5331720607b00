"""Outgoing calls (CAPTURE_OUTGOING_REQUESTS): real AsyncHTTPClient and requests calls to a real loopback
server, captured as Outgoing events that reach the real collector through the spool."""

from __future__ import annotations

import json
import pathlib
import urllib.request
from typing import Any, Callable, Dict, Iterator, List

import pytest
import requests
import tornado.httpclient
import tornado.web
from conftest import serve, wait_until

from moesiftornado_durable import ConfigError, MoesifMiddleware
from moesiftornado_durable.config import Config
from moesiftornado_durable.testing import Collector

ORIGINAL_FETCH = tornado.httpclient.AsyncHTTPClient.fetch
ORIGINAL_SEND = requests.Session.send

MASKS: Dict[str, Any] = {
    "REQUEST_HEADER_MASKS": ["x-api-key"],
    "RESPONSE_HEADER_MASKS": ["x-backend-secret"],
    "REQUEST_BODY_MASKS": ["password"],
    "RESPONSE_BODY_MASKS": ["token", "password"],
}
SECRETS = ("KEY-SECRET-1", "PW-SECRET-2", "HDR-SECRET-3", "TOKEN-SECRET-4")


class EchoHandler(tornado.web.RequestHandler):
    """The third party the app calls: echoes the JSON it got, with a secret in a header and in the body."""

    def post(self) -> None:
        self.set_header("X-Backend-Secret", "HDR-SECRET-3")
        self.write({"token": "TOKEN-SECRET-4", "received": json.loads(self.request.body)})

    def get(self) -> None:
        self.write({"query": self.get_argument("q", ""), "token": "TOKEN-SECRET-4"})


class TeapotHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.set_status(418)
        self.write({"error": "short and stout"})


class HopHandler(tornado.web.RequestHandler):
    def get(self) -> None:
        self.redirect("/echo?q=hopped")


BACKEND_ROUTES = [(r"/echo", EchoHandler), (r"/teapot", TeapotHandler), (r"/hop", HopHandler)]


class CallOutHandler(tornado.web.RequestHandler):
    """The app under test: answers its client with what it got from the backend."""

    async def get(self) -> None:
        backend = self.settings["backend"]
        response = await tornado.httpclient.AsyncHTTPClient().fetch(
            backend + "/echo", method="POST", headers={"X-Api-Key": "KEY-SECRET-1", "X-User": "user-7",
                                                       "Content-Type": "application/json"},
            body=json.dumps({"password": "PW-SECRET-2", "amount": 12}))
        self.write(response.body)


class CallTeapotHandler(tornado.web.RequestHandler):
    async def get(self) -> None:
        try:
            await tornado.httpclient.AsyncHTTPClient().fetch(self.settings["backend"] + "/teapot")
        except tornado.httpclient.HTTPClientError as error:  # raise_error=True, as by default: unchanged
            self.write(f"backend said {error.code}")


class CallNowhereHandler(tornado.web.RequestHandler):
    async def get(self) -> None:
        try:
            await tornado.httpclient.AsyncHTTPClient().fetch(self.settings["nowhere"])
        except ConnectionRefusedError:
            self.write("refused")


FRONT_ROUTES = [(r"/call-out", CallOutHandler), (r"/call-teapot", CallTeapotHandler),
                (r"/call-nowhere", CallNowhereHandler)]


@pytest.fixture
def backend() -> Iterator[str]:
    with serve(tornado.web.Application(BACKEND_ROUTES)) as url:
        yield url


@pytest.fixture(autouse=True)
def originals_restored() -> Iterator[None]:
    """Every test here ends with the client methods as they were (each middleware is closed by then)."""
    yield
    assert tornado.httpclient.AsyncHTTPClient.fetch is ORIGINAL_FETCH
    assert requests.Session.send is ORIGINAL_SEND


def outgoing_events(collector: Collector, middleware: MoesifMiddleware, count: int) -> List[Dict[str, Any]]:
    """Flush, then the Outgoing events the collector got once `count` of them arrived."""
    assert middleware.flush(10), middleware.stats()

    def found() -> List[Dict[str, Any]]:
        return [event for event in collector.events if event.get("direction") == "Outgoing"]

    assert wait_until(lambda: len(found()) >= count, timeout=5), collector.events
    return found()


def through_front(middleware: MoesifMiddleware, backend: str, path: str, **settings: Any) -> str:
    app = middleware.attach(tornado.web.Application(FRONT_ROUTES, log_function=middleware.log_event,
                                                    backend=backend, **settings))
    with serve(app) as url:  # urllib, which is not captured: only the app's own calls are to be seen
        with urllib.request.urlopen(url + path, timeout=10) as answer:
            return str(answer.read().decode())


def test_an_async_http_client_call_arrives_as_an_outgoing_event_masked_identified(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str, spool_dir: str
) -> None:
    middleware = make_middleware(
        CAPTURE_OUTGOING_REQUESTS=True, **MASKS,
        IDENTIFY_USER_OUTGOING=lambda request, response: request.headers["X-User"],
        IDENTIFY_COMPANY_OUTGOING=lambda request, response: "company-" + str(response.code),
        GET_SESSION_TOKEN_OUTGOING=lambda request, response: "session-1",
        GET_METADATA_OUTGOING=lambda request, response: {"took": "fetch", "status": response.code},
    )
    answer = through_front(middleware, backend, "/call-out")
    assert json.loads(answer)["received"] == {"password": "PW-SECRET-2", "amount": 12}  # the call itself unchanged
    [event] = outgoing_events(collector, middleware, 1)
    request, response = event["request"], event["response"]
    assert (request["uri"], request["verb"], response["status"]) == (backend + "/echo", "POST", 200)
    assert request["body"] == {"amount": 12} and request["transfer_encoding"] == "json"
    assert response["body"] == {"received": {"amount": 12}} and response["transfer_encoding"] == "json"
    assert "X-Api-Key" not in request["headers"] and request["headers"]["X-User"] == "user-7"
    assert "X-Backend-Secret" not in response["headers"]
    assert (event["user_id"], event["company_id"], event["session_token"]) == ("user-7", "company-200", "session-1")
    assert event["metadata"] == {"took": "fetch", "status": 200}
    assert request["time"] <= response["time"] and event["transaction_id"]
    incoming = [e for e in collector.events if e.get("direction") == "Incoming"]
    assert [e["request"]["uri"].rsplit("/", 1)[1] for e in incoming] == ["call-out"]
    written = [path for path in pathlib.Path(spool_dir).rglob("*") if path.is_file()]
    assert "shipper.db" in {path.name for path in written}
    for path in written:  # masked before anything reached the disk: journal, spool, WAL
        data = path.read_bytes()
        assert not any(secret.encode() in data for secret in SECRETS), path


def test_an_error_status_is_captured_and_the_callers_http_error_is_unchanged(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str
) -> None:
    middleware = make_middleware(CAPTURE_OUTGOING_REQUESTS=True)
    assert through_front(middleware, backend, "/call-teapot") == "backend said 418"
    [event] = outgoing_events(collector, middleware, 1)
    assert (event["request"]["uri"], event["request"]["verb"]) == (backend + "/teapot", "GET")
    assert event["response"]["status"] == 418
    assert event["response"]["body"] == {"error": "short and stout"}


def test_the_blocking_tornado_http_client_is_captured_too(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str
) -> None:
    middleware = make_middleware(CAPTURE_OUTGOING_REQUESTS=True)
    client = tornado.httpclient.HTTPClient()  # its own IOLoop, stopped as soon as each fetch is done
    try:
        assert json.loads(client.fetch(backend + "/echo?q=blocking").body)["query"] == "blocking"
    finally:
        client.close()
    [event] = outgoing_events(collector, middleware, 1)
    assert event["request"]["uri"] == backend + "/echo?q=blocking"
    assert event["response"]["body"] == {"query": "blocking", "token": "TOKEN-SECRET-4"}


def test_a_call_without_a_response_raises_as_before_and_makes_no_event(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str
) -> None:
    middleware = make_middleware(CAPTURE_OUTGOING_REQUESTS=True)
    with Collector() as stopped:
        nowhere = stopped.base_uri + "/gone"
    assert through_front(middleware, backend, "/call-nowhere", nowhere=nowhere) == "refused"
    with pytest.raises(requests.ConnectionError):
        requests.get(nowhere, timeout=5)
    requests.get(backend + "/echo?q=after", timeout=5)
    [event] = outgoing_events(collector, middleware, 1)
    assert event["request"]["uri"] == backend + "/echo?q=after"


def test_a_requests_call_arrives_as_an_outgoing_event(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str
) -> None:
    middleware = make_middleware(CAPTURE_OUTGOING_REQUESTS=True, **MASKS,
                                 IDENTIFY_USER_OUTGOING=lambda request, response: request.headers["X-User"],
                                 GET_METADATA_OUTGOING=lambda request, response: {"elapsed": response.ok})
    response = requests.post(backend + "/echo", json={"password": "PW-SECRET-2", "amount": 3},
                             headers={"X-Api-Key": "KEY-SECRET-1", "X-User": "user-9"}, timeout=5)
    assert response.json()["received"]["password"] == "PW-SECRET-2"
    assert requests.get(backend + "/teapot", params={"q": "x y"}, timeout=5).status_code == 418
    first, second = outgoing_events(collector, middleware, 2)
    assert (first["request"]["uri"], first["request"]["verb"], first["response"]["status"]) == (
        backend + "/echo", "POST", 200)
    assert first["request"]["body"] == {"amount": 3} and first["request"]["transfer_encoding"] == "json"
    assert first["response"]["body"] == {"received": {"amount": 3}}
    assert "X-Api-Key" not in first["request"]["headers"] and "X-Backend-Secret" not in first["response"]["headers"]
    assert (first["user_id"], first["metadata"]) == ("user-9", {"elapsed": True})
    assert (second["request"]["uri"], second["request"]["verb"]) == (backend + "/teapot?q=x+y", "GET")
    assert second["response"]["status"] == 418 and second["response"]["body"] == {"error": "short and stout"}
    assert second["user_id"] is None  # X-User absent: the callable raised, the event is still logged
    assert middleware.stats()["callable_errors"] == 1


def test_each_redirect_hop_of_requests_is_one_event(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str
) -> None:
    middleware = make_middleware(CAPTURE_OUTGOING_REQUESTS=True)
    assert requests.get(backend + "/hop", timeout=5).json()["query"] == "hopped"
    # the landing call returns (and is spooled) inside the first one: ordered by when each started
    hop, landing = sorted(outgoing_events(collector, middleware, 2), key=lambda event: event["request"]["time"])
    assert (hop["request"]["uri"], hop["response"]["status"]) == (backend + "/hop", 302)
    assert (landing["request"]["uri"], landing["response"]["status"]) == (backend + "/echo?q=hopped", 200)
    assert middleware.flush(5) and len([e for e in collector.events if e.get("direction") == "Outgoing"]) == 2


def test_skip_outgoing_and_log_body_outgoing_false(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str
) -> None:
    middleware = make_middleware(CAPTURE_OUTGOING_REQUESTS=True, LOG_BODY_OUTGOING=False,
                                 SKIP_OUTGOING=lambda request, response: response.status_code == 418)
    requests.get(backend + "/teapot", timeout=5)
    requests.post(backend + "/echo", json={"amount": 1}, timeout=5)
    [event] = outgoing_events(collector, middleware, 1)
    assert event["request"]["uri"] == backend + "/echo"
    assert "body" not in event["request"] and "body" not in event["response"]
    assert middleware.stats()["skipped"] == 1


def test_failing_callables_never_break_the_call(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str
) -> None:
    def broken(request: Any, response: Any) -> Any:
        raise RuntimeError("user bug")

    middleware = make_middleware(CAPTURE_OUTGOING_REQUESTS=True, SKIP_OUTGOING=broken, IDENTIFY_USER_OUTGOING=broken,
                                 GET_METADATA_OUTGOING=broken)
    assert requests.get(backend + "/echo", params={"q": "still"}, timeout=5).json()["query"] == "still"
    assert json.loads(through_front(middleware, backend, "/call-out"))["received"]["amount"] == 12
    events = outgoing_events(collector, middleware, 2)
    assert sorted(event["request"]["verb"] for event in events) == ["GET", "POST"]
    assert all(event["user_id"] is None and event["metadata"] is None for event in events)
    assert middleware.stats()["callable_errors"] == 6


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_the_librarys_own_calls_to_moesif_are_never_captured(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str, shipper: str
) -> None:
    middleware = make_middleware(CAPTURE_OUTGOING_REQUESTS=True, SHIPPER=shipper)
    # the app process fetches /v1/config with requests at start; SHIPPER 'thread' also posts its batches from here
    assert wait_until(lambda: any(r.path.startswith("/v1/config") for r in collector.requests), timeout=10)
    requests.get(backend + "/echo", params={"q": "mine"}, timeout=5)
    requests.get(collector.base_uri + "/v1/config", timeout=5)  # the user calling BASE_URI: not captured either
    [event] = outgoing_events(collector, middleware, 1)
    assert event["request"]["uri"] == backend + "/echo?q=mine"
    assert middleware.flush(5)
    assert [e["request"]["uri"] for e in collector.events if e.get("direction") == "Outgoing"] == [
        backend + "/echo?q=mine"]


def test_the_application_id_header_marks_a_call_as_moesifs(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str
) -> None:
    middleware = make_middleware(CAPTURE_OUTGOING_REQUESTS=True)
    requests.get(backend + "/echo", params={"q": "sdk"}, headers={"X-Moesif-Application-Id": "x"}, timeout=5)
    requests.get(backend + "/echo", params={"q": "user"}, timeout=5)
    [event] = outgoing_events(collector, middleware, 1)
    assert event["request"]["uri"] == backend + "/echo?q=user"


def test_nothing_is_patched_unless_asked_and_the_last_close_restores_the_originals(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str
) -> None:
    plain = make_middleware()
    assert tornado.httpclient.AsyncHTTPClient.fetch is ORIGINAL_FETCH and requests.Session.send is ORIGINAL_SEND
    requests.get(backend + "/echo", timeout=5)
    assert plain.flush(5) and collector.events == []
    first = make_middleware(CAPTURE_OUTGOING_REQUESTS=True)
    second = make_middleware(CAPTURE_OUTGOING_REQUESTS=True)
    assert requests.Session.send is not ORIGINAL_SEND
    assert tornado.httpclient.AsyncHTTPClient.fetch is not ORIGINAL_FETCH
    first.close()
    assert requests.Session.send is not ORIGINAL_SEND  # the second still captures
    second.close()
    assert tornado.httpclient.AsyncHTTPClient.fetch is ORIGINAL_FETCH and requests.Session.send is ORIGINAL_SEND


async def async_skip(request: Any, response: Any) -> bool:
    return False


def test_a_wrapper_put_over_ours_is_left_in_place_and_no_call_is_captured_twice(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, backend: str
) -> None:
    first = make_middleware(CAPTURE_OUTGOING_REQUESTS=True)
    ours = requests.Session.send

    def theirs(self: requests.Session, request: Any, **kwargs: Any) -> requests.Response:  # another library's
        return ours(self, request, **kwargs)

    requests.Session.send = theirs  # type: ignore[method-assign]
    try:
        first.close()
        assert requests.Session.send is theirs  # not taken away from under them
        second = make_middleware(CAPTURE_OUTGOING_REQUESTS=True)
        requests.get(backend + "/echo", params={"q": "once"}, timeout=5)
        [event] = outgoing_events(collector, second, 1)
        assert event["request"]["uri"] == backend + "/echo?q=once"
        second.close()
    finally:
        requests.Session.send = ours  # type: ignore[method-assign]
        make_middleware(CAPTURE_OUTGOING_REQUESTS=True).close()  # the last close now restores the original
    assert [e["request"]["uri"] for e in collector.events if e.get("direction") == "Outgoing"] == [
        backend + "/echo?q=once"]


@pytest.mark.parametrize("key", ["SKIP_OUTGOING", "IDENTIFY_USER_OUTGOING", "IDENTIFY_COMPANY_OUTGOING",
                                 "GET_SESSION_TOKEN_OUTGOING", "GET_METADATA_OUTGOING"])
@pytest.mark.parametrize("value", ["not a function", lambda handler: None, async_skip])
def test_a_bad_outgoing_callable_fails_naming_the_key(tmp_path: Any, key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_dict({"APPLICATION_ID": "a", "SPOOL_DIR": str(tmp_path), "CAPTURE_OUTGOING_REQUESTS": True,
                          key: value})
    assert raised.value.key == key


@pytest.mark.parametrize("key", ["CAPTURE_OUTGOING_REQUESTS", "LOG_BODY_OUTGOING"])
def test_outgoing_switches_must_be_booleans(tmp_path: Any, key: str) -> None:
    with pytest.raises(ConfigError) as raised:
        Config.from_dict({"APPLICATION_ID": "a", "SPOOL_DIR": str(tmp_path), key: "yes"})
    assert raised.value.key == key


def test_outgoing_options_are_read(tmp_path: Any) -> None:
    def skip(request: Any, response: Any, *extra: Any) -> bool:
        return False

    config = Config.from_dict({"APPLICATION_ID": "a", "SPOOL_DIR": str(tmp_path), "CAPTURE_OUTGOING_REQUESTS": True,
                               "SKIP_OUTGOING": skip, "LOG_BODY_OUTGOING": False})
    assert (config.capture_outgoing_requests, config.skip_outgoing, config.log_body_outgoing) == (True, skip, False)
    assert Config.from_dict({"APPLICATION_ID": "a", "SPOOL_DIR": str(tmp_path)}).capture_outgoing_requests is False
