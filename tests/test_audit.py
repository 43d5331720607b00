"""SPOOL_SYNC 'audit' (no response leaves before its event is on stable storage) and the journal's syncer.

Without LazyFS, "on stable storage" is observed through the sync itself: while the test holds the journal's
`fdatasync`, the response must not arrive; when the sync fails, the response is refused. The power-cut
versions of these tests are in test_powercut.py.
"""

from __future__ import annotations

import concurrent.futures
import errno
import gc
import http.client
import os
import select
import socket
import threading
from typing import Any, Callable, Dict, List

import pytest
import requests
import tornado.web
from conftest import iter_records, serve, wait_until

from moesiftornado_durable import MoesifMiddleware, SpoolBeforeSendMixin
from moesiftornado_durable.journal import JournalWriter, segments
from moesiftornado_durable.testing import Collector


class Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write(f"hello {self.get_argument('n', '')}")


class Streamed(tornado.web.RequestHandler):
    async def get(self) -> None:
        self.write("first-")
        await self.flush()  # these bytes leave at once: only the end of the response waits
        self.write("last")


class StrictHello(SpoolBeforeSendMixin, Hello):
    pass


class Probe(tornado.web.RequestHandler):
    """Says that the IOLoop ran a handler."""

    def get(self) -> None:
        self.settings["probe_ran"].set()
        self.write("probe")


def journaled(spool_dir: str) -> int:
    return sum(sum(1 for _ in iter_records(path)) for _, _, path in segments(spool_dir))


@pytest.fixture
def held_sync(monkeypatch: Any) -> threading.Event:
    """The journal's fdatasync waits (bounded) until the returned event is set; then it syncs for real."""
    release = threading.Event()
    real = os.fdatasync

    def gated(fd: int) -> None:
        release.wait(30)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", gated)
    yield release
    release.set()


def app_for(middleware: MoesifMiddleware) -> tornado.web.Application:
    return tornado.web.Application([(r"/hello", Hello), (r"/streamed", Streamed), (r"/strict", StrictHello),
                                    (r"/probe", Probe)], log_function=middleware.log_event,
                                   probe_ran=threading.Event())


def test_audit_mode_is_one_option_for_the_whole_application(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector
) -> None:
    middleware = make_middleware(SPOOL_SYNC="audit")
    with serve(app_for(middleware)) as url, concurrent.futures.ThreadPoolExecutor(8) as pool:
        session_texts = list(pool.map(lambda n: requests.get(f"{url}/hello?n={n}", timeout=10).text, range(40)))
        assert requests.get(url + "/streamed", timeout=10).text == "first-last"
    assert session_texts == [f"hello {n}" for n in range(40)]
    assert middleware.flush(15)
    uris = [event["request"]["uri"] for event in collector.events]
    assert sorted(uri.rsplit("=", 1)[-1] for uri in uris if "hello" in uri) == sorted(str(n) for n in range(40))
    assert sum(uri.endswith("/streamed") for uri in uris) == 1
    writer = middleware._runtime_here().writer  # type: ignore[union-attr]
    assert 1 <= writer.syncs and writer.sync_failures == 0
    assert middleware.stats().get("audit_refused", 0) == 0


@pytest.mark.parametrize("mode, path", [("audit", "/hello"), ("full", "/strict")])
def test_the_response_waits_for_the_sync_of_its_event_and_the_ioloop_does_not(
    make_middleware: Callable[..., MoesifMiddleware], spool_dir: str, held_sync: threading.Event, mode: str,
    path: str
) -> None:
    middleware = make_middleware(SPOOL_SYNC=mode)
    app = app_for(middleware)
    with serve(app) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as client:
            client.sendall(f"GET {path}?n=1 HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert wait_until(lambda: journaled(spool_dir) == 1, 10)  # the event is written, not yet synced
            readable, _, _ = select.select([client], [], [], 0.3)
            assert not readable, "the response left before its event was synced"
            with concurrent.futures.ThreadPoolExecutor(1) as pool:  # the IOLoop is not blocked meanwhile
                probe = pool.submit(requests.get, url + "/probe", timeout=30)
                assert app.settings["probe_ran"].wait(10), "the IOLoop was blocked while the sync was held"
                held_sync.set()
                assert probe.result().text == "probe"
            answer = b""
            while b"hello 1" not in answer:
                chunk = client.recv(4096)
                assert chunk, answer
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_a_failed_sync_refuses_the_response_and_is_counted(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, monkeypatch: Any
) -> None:
    def failing(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    middleware = make_middleware(SPOOL_SYNC="audit")
    with serve(app_for(middleware)) as url:
        with monkeypatch.context() as patch:
            patch.setattr(os, "fdatasync", failing)
            refused = requests.get(url + "/hello?n=1", timeout=10)
            cut = requests.get(url + "/streamed", timeout=10, stream=True)  # its headers left before the sync
            with pytest.raises(requests.exceptions.ChunkedEncodingError):
                b"".join(cut.iter_content(1024))
        served = requests.get(url + "/hello?n=2", timeout=10)
    assert refused.status_code == 503 and refused.text == "" and refused.headers["Retry-After"] == "1"
    assert served.status_code == 200 and served.text == "hello 2"
    stats = middleware.stats()
    assert stats["audit_refused"] == 2
    assert stats["journal_sync_failures"] >= 1


def test_audit_mode_with_an_async_user_callable(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector
) -> None:
    async def identify_user(handler: Any) -> str:
        return "user-" + handler.get_argument("n")

    middleware = make_middleware(SPOOL_SYNC="audit", IDENTIFY_USER=identify_user)
    with serve(app_for(middleware)) as url:
        assert [requests.get(f"{url}/hello?n={n}", timeout=10).text for n in range(3)] == \
            ["hello 0", "hello 1", "hello 2"]
    assert middleware.flush(15)
    assert sorted(event["user_id"] for event in collector.events) == ["user-0", "user-1", "user-2"]


def test_the_default_mode_syncs_the_journal_off_the_request_path(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector
) -> None:
    collector.go_down()
    middleware = make_middleware()
    with serve(app_for(middleware)) as url:
        assert requests.get(url + "/hello", timeout=10).status_code == 200
    writer = middleware._runtime_here().writer  # type: ignore[union-attr]
    assert wait_until(lambda: writer.syncs >= 1, 10)


def test_audit_mode_works_on_the_in_process_shipper_too(make_middleware: Callable[..., MoesifMiddleware],
                                                        collector: Collector) -> None:
    """SHIPPER 'thread' journals as the default does: the same syncer holds the responses back (older builds
    refused 'audit' there, their thread mode committing to SQLite instead)."""
    middleware = make_middleware(SPOOL_SYNC="audit", SHIPPER="thread")
    with serve(app_for(middleware)) as url:
        assert requests.get(url + "/hello", timeout=10).status_code == 200
    assert middleware._runtime_here().writer.syncs >= 1  # type: ignore[union-attr]  # answered after its sync
    assert middleware.flush(10) and len(collector.transaction_ids()) == 1


def test_audit_status_of_every_request(make_middleware: Callable[..., MoesifMiddleware],
                                       collector: Collector) -> None:
    """Error pages and 404s are held and logged like any response."""
    middleware = make_middleware(SPOOL_SYNC="audit")
    with serve(app_for(middleware)) as url:
        statuses: List[int] = [requests.get(url + path, timeout=10).status_code for path in ("/nowhere", "/hello")]
    assert statuses == [404, 200]
    assert middleware.flush(15)
    seen: Dict[int, int] = {}
    for event in collector.events:
        seen[event["response"]["status"]] = seen.get(event["response"]["status"], 0) + 1
    assert seen == {404: 1, 200: 1}


def test_a_record_whose_sync_failed_stays_failed_when_asked_after_its_round(tmp_path: Any, monkeypatch: Any) -> None:
    """The response is held by its own record's sync: asked after that round failed, the answer is still no,
    while a record synced later is fine."""
    failing = threading.Event()
    failing.set()
    real = os.fdatasync

    def flaky(fd: int) -> None:
        if failing.is_set():
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", flaky)
    writer = JournalWriter(str(tmp_path), 1, "full")
    try:
        first = writer.append("event", b'{"n": 1}', 0.0)
        assert wait_until(lambda: writer._synced >= first, 10)  # its round is over, and it failed
        failing.clear()
        second = writer.append("event", b'{"n": 2}', 0.0)
        answers: Dict[str, bool] = {}
        done = threading.Event()
        writer.on_synced(first, lambda ok: answers.__setitem__("first", ok))
        writer.on_synced(second, lambda ok: (answers.__setitem__("second", ok), done.set()))
        assert done.wait(10)
        assert answers == {"first": False, "second": True}
        assert writer.sync_failures == 1
    finally:
        writer.close()


class Block(tornado.web.RequestHandler):
    """Holds the IOLoop until told (bounded): the requests sent meanwhile are all read once it is free."""

    def get(self) -> None:
        self.settings["blocked"].set()
        self.settings["unblock"].wait(10)
        self.write("unblocked")


def test_responses_held_in_one_ioloop_iteration_wait_for_their_sync_as_one_group(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector
) -> None:
    middleware = make_middleware(SPOOL_SYNC="audit")
    app = tornado.web.Application([(r"/hello", Hello), (r"/block", Block)], log_function=middleware.log_event,
                                  blocked=threading.Event(), unblock=threading.Event())
    asked: List[int] = []  # what the holdback asked the journal's syncer for
    with serve(app) as url:
        port = int(url.rsplit(":", 1)[1])
        connections = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(10)]
        try:
            for n, connection in enumerate(connections):  # each keep-alive connection open and used once
                connection.request("GET", f"/hello?n=warm-{n}")
                connection.getresponse().read()
            writer = middleware._runtime_here().writer  # type: ignore[union-attr]
            on_synced = writer.on_synced

            def counted(sequence: int, callback: Callable[[bool], None]) -> None:
                asked.append(sequence)
                on_synced(sequence, callback)

            writer.on_synced = counted  # type: ignore[method-assign]
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                blocked = pool.submit(requests.get, url + "/block", timeout=30)
                assert app.settings["blocked"].wait(10)
                for n, connection in enumerate(connections):
                    connection.request("GET", f"/hello?n={n}")  # waits in its socket until the IOLoop is free
                app.settings["unblock"].set()
                texts = [connection.getresponse().read().decode() for connection in connections]
                assert blocked.result().text == "unblocked"
        finally:
            for connection in connections:
                connection.close()
    assert texts == [f"hello {n}" for n in range(10)]
    assert 1 <= len(asked) <= 3, f"the syncer was asked {len(asked)} times for 11 responses held together"
    assert middleware.flush(15)
    assert sum("/hello?n=" in event["request"]["uri"] for event in collector.events) == 20


class GoneClient(tornado.web.RequestHandler):
    """Its client is gone (the connection closed) before its held response is released."""

    def get(self) -> None:
        self.request.connection.stream.close()
        self.write("never sent")


def test_a_held_response_whose_client_went_away_leaves_no_unretrieved_exception(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, caplog: Any
) -> None:
    middleware = make_middleware(SPOOL_SYNC="audit")
    app = tornado.web.Application([(r"/gone", GoneClient), (r"/hello", Hello)], log_function=middleware.log_event)
    with serve(app) as url:
        with pytest.raises(requests.exceptions.ConnectionError):
            requests.get(url + "/gone", timeout=10)
        assert requests.get(url + "/hello?n=1", timeout=10).text == "hello 1"  # released after /gone's
        assert middleware.flush(15)
    gc.collect()
    assert "exception was never retrieved" not in caplog.text
    assert sorted(event["request"]["uri"].rsplit("/", 1)[-1] for event in collector.events) == ["gone", "hello?n=1"]
