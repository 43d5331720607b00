"""Middlewares with the same delivery options in one process share one runtime (issue 12 item 6).

Moesif's own Tornado example builds a new `MoesifMiddleware` in `initialize()` of two handlers: one per
request. Each used to take a journal slot and its lock, a supervisor thread and two fetcher threads, and
never let them go. The app below does the same, in a real Tornado server sending to the real collector.
"""

from __future__ import annotations

import atexit
import gc
import os
import re
import threading
from collections import Counter
from typing import Any, Dict, Iterator, List, Set, Tuple

import pytest
import requests
import tornado.web
from conftest import serve, wait_logged, wait_until
from test_delivery import run_script

from moesiftornado_durable import MoesifMiddleware, locks, runtime
from moesiftornado_durable.journal import INTAKE
from moesiftornado_durable.shipper import shipper_running
from moesiftornado_durable.testing import Collector

REQUESTS = 330  # a third each: GET /, POST /users/<n>, POST /companies/<n>
MEASURED_FROM = 100


def example_config(collector: Collector, spool_dir: str, **options: Any) -> Dict[str, Any]:
    """The options of Moesif's example app (its callables, written anew), sending to the test collector."""
    config: Dict[str, Any] = {
        "APPLICATION_ID": "example-app-id",
        "SPOOL_DIR": spool_dir,
        "BASE_URI": collector.base_uri,
        "FLUSH_INTERVAL": 0.05,
        "DEBUG": False,
        "LOG_BODY": True,
        "IDENTIFY_USER": lambda handler: "my_user_id",
        "IDENTIFY_COMPANY": lambda handler: "my_company_id",
        "GET_SESSION_TOKEN": lambda handler: "session-token",
        "SKIP": lambda handler: "health/probe" in handler.request.full_url(),
        "GET_METADATA": lambda handler: {"datacenter": "westus"},
    }
    config.update(options)
    return config


def example_app(moesif_config: Dict[str, Any], main: MoesifMiddleware) -> tornado.web.Application:
    """Moesif's example: the users and companies handlers each build a middleware per request."""

    class MainHandler(tornado.web.RequestHandler):
        def get(self) -> None:
            self.write({"msg": "Hello, world"})

    class UsersHandler(tornado.web.RequestHandler):
        def initialize(self) -> None:
            self.middleware = MoesifMiddleware(moesif_config)

        def post(self, user_id: str) -> None:
            self.middleware.update_user({"user_id": user_id, "metadata": {"email": "john@acmeinc.com"}})
            self.set_status(201)
            self.write({"user_id": user_id, "update_users": "success"})

    class CompaniesHandler(tornado.web.RequestHandler):
        def initialize(self) -> None:
            self.middleware = MoesifMiddleware(moesif_config)

        def post(self, company_id: str) -> None:
            self.middleware.update_company({"company_id": company_id, "company_domain": "acmeinc.com"})
            self.set_status(201)
            self.write({"company_id": company_id, "update_companies": "success"})

    return tornado.web.Application([(r"/", MainHandler), (r"/users/(.*)", UsersHandler),
                                    (r"/companies/(.*)", CompaniesHandler)], log_function=main.log_event)


def footprint(spool_dir: str) -> Tuple[int, int, int, int]:
    """(threads, open file descriptors, files in SPOOL_DIR, exit hooks) of this process, after a collection."""
    gc.collect()
    return (len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd")), len(os.listdir(spool_dir)),
            atexit._ncallbacks())


@pytest.fixture
def closing() -> Iterator[List[MoesifMiddleware]]:
    made: List[MoesifMiddleware] = []
    yield made
    for made_one in made:
        made_one.close(5)


def test_a_middleware_per_request_as_in_moesifs_example_holds_nothing_per_request(
    collector: Collector, spool_dir: str, closing: List[MoesifMiddleware]
) -> None:
    config = example_config(collector, spool_dir)
    main = MoesifMiddleware(config)
    closing.append(main)
    measured: Dict[int, Tuple[int, int, int, int]] = {}
    with serve(example_app(config, main)) as url, requests.Session() as http:
        for n in range(REQUESTS):
            if n == MEASURED_FROM:
                wait_logged(main, MEASURED_FROM)  # the last request's event too (Tornado logs after answering)
                assert main.flush(30)  # the shipper is up and its files made: the steady state
                measured[n] = footprint(spool_dir)
            kind = n % 3
            if kind == 0:
                answer = http.get(f"{url}/?n={n}", timeout=10)
            else:
                answer = http.post(f"{url}/{'users' if kind == 1 else 'companies'}/{n}", data=b"{}", timeout=10)
            assert answer.status_code in (200, 201), answer.text
        measured[REQUESTS] = footprint(spool_dir)
        wait_logged(main, REQUESTS)  # the last answer can be read before its event is written
        assert main.flush(30)
    (threads, fds, files, exit_hooks), (threads_after, fds_after, files_after, exit_hooks_after) = (
        measured[MEASURED_FROM], measured[REQUESTS])
    # 230 more requests, 154 more middlewares: nothing more held (a small margin for the collector's
    # connection threads and a journal segment rolling over)
    assert threads_after - threads <= 3, measured
    assert fds_after - fds <= 6, measured
    assert files_after - files <= 2, (measured, sorted(os.listdir(spool_dir)))
    assert exit_hooks_after == exit_hooks, measured  # one exit (and fork) hook per process, not per middleware
    # and everything arrived, once
    events = Counter(collector.transaction_ids())
    assert len(events) == REQUESTS and max(events.values()) == 1
    users = Counter(user["user_id"] for user in collector.users)
    companies = Counter(company["company_id"] for company in collector.companies)
    assert sorted(users) == sorted(str(n) for n in range(REQUESTS) if n % 3 == 1) and max(users.values()) == 1
    assert sorted(companies) == sorted(str(n) for n in range(REQUESTS) if n % 3 == 2)
    assert max(companies.values()) == 1


def supervisors() -> Set[threading.Thread]:
    """The live shipper-supervisor threads of this process (one per pipeline in the default mode)."""
    return {thread for thread in threading.enumerate() if thread.name == "moesif-durable-supervisor"}


def intake_locks_held(spool_dir: str) -> List[int]:
    """The journal slots (``intake-N.lock``) a live process holds."""
    names = os.listdir(spool_dir) if os.path.isdir(spool_dir) else []
    slots = [int(name[len("intake-"):-len(".lock")]) for name in names if re.fullmatch(r"intake-\d+\.lock", name)]
    return [slot for slot in slots if locks.owner(spool_dir, slot, INTAKE)[1]]


def test_same_options_share_a_runtime_different_options_do_not(
    collector: Collector, tmp_path: Any, closing: List[MoesifMiddleware]
) -> None:
    first_dir, second_dir = str(tmp_path / "first"), str(tmp_path / "second")
    before = supervisors()
    first = MoesifMiddleware(example_config(collector, first_dir))
    again = MoesifMiddleware(example_config(collector, first_dir, LOG_BODY=False))  # capture options may differ
    other = MoesifMiddleware(example_config(collector, second_dir, APPLICATION_ID="other-app-id"))
    closing.extend([first, again, other])
    assert len(supervisors() - before) == 2
    assert len(intake_locks_held(first_dir)) == 1 and len(intake_locks_held(second_dir)) == 1
    for number, made in enumerate((first, again, other)):
        made.update_user({"user_id": f"u-{number}"})
    assert first.flush(30) and other.flush(30)
    sent_by: Dict[str, List[str]] = {}
    for request in collector.requests:
        if request.path == "/v1/users/batch":
            sent_by.setdefault(request.headers.get("X-Moesif-Application-Id", ""), []).append(request.path)
    assert set(sent_by) == {"example-app-id", "other-app-id"}
    assert sorted(user["user_id"] for user in collector.users) == ["u-0", "u-1", "u-2"]


def test_the_runtime_stays_while_one_user_is_left_and_closes_with_the_last(
    collector: Collector, spool_dir: str, monkeypatch: Any, closing: List[MoesifMiddleware]
) -> None:
    monkeypatch.setattr(runtime, "IDLE_CLOSE_AFTER", 0.2)
    before = supervisors()
    config = example_config(collector, spool_dir)
    kept, dropped, closed = MoesifMiddleware(config), MoesifMiddleware(config), MoesifMiddleware(config)
    closing.append(kept)
    [ours] = supervisors() - before
    assert len(intake_locks_held(spool_dir)) == 1
    closed.close(5)
    del dropped
    gc.collect()
    kept.update_user({"user_id": "after"})  # still open for the one left
    assert kept.flush(30)
    assert [user["user_id"] for user in collector.users] == ["after"]
    assert ours.is_alive() and supervisors() - before == {ours}
    del kept
    closing.clear()
    gc.collect()  # the last user collected: a moment later its runtime is closed, its slot and shipper released
    assert wait_until(lambda: not ours.is_alive() and not intake_locks_held(spool_dir), timeout=20)
    assert wait_until(lambda: not shipper_running(spool_dir), timeout=20)


def test_close_of_the_last_user_closes_the_runtime_at_once(
    collector: Collector, spool_dir: str, closing: List[MoesifMiddleware]
) -> None:
    before = supervisors()
    config = example_config(collector, spool_dir)
    one, two = MoesifMiddleware(config), MoesifMiddleware(config)
    [ours] = supervisors() - before
    one.close(5)
    assert len(intake_locks_held(spool_dir)) == 1 and ours.is_alive()
    two.update_company({"company_id": "c-1"})
    two.close(10)  # the last: delivers and closes
    assert [company["company_id"] for company in collector.companies] == ["c-1"]
    assert not ours.is_alive() and not intake_locks_held(spool_dir)
    two.update_company({"company_id": "c-2"})  # a later use starts it again
    closing.append(two)
    assert two.flush(30)
    assert [company["company_id"] for company in collector.companies] == ["c-1", "c-2"]


def test_an_outgoing_call_is_captured_once_however_many_middlewares_share_the_pipeline(
    collector: Collector, spool_dir: str, closing: List[MoesifMiddleware]
) -> None:
    class Backend(tornado.web.RequestHandler):
        def get(self) -> None:
            self.write({"ok": True})

    config = example_config(collector, spool_dir, CAPTURE_OUTGOING_REQUESTS=True)
    first = MoesifMiddleware(config)
    closing.append(first)
    per_request = [MoesifMiddleware(config) for _ in range(3)]  # not yet collected, as between collections
    with serve(tornado.web.Application([(r"/backend", Backend)])) as url:
        assert requests.get(f"{url}/backend?call=1", timeout=10).status_code == 200
        first.close(5)  # the one capturing goes: another takes over
        assert requests.get(f"{url}/backend?call=2", timeout=10).status_code == 200
        assert per_request[0].flush(30)
    outgoing_uris = sorted(event["request"]["uri"] for event in collector.events
                           if event.get("direction") == "Outgoing")
    assert outgoing_uris == [f"{url}/backend?call=1", f"{url}/backend?call=2"]
    for made in per_request:
        made.close(5)


def test_shared_pipelines_work_in_forked_children_one_runtime_each(collector: Collector, tmp_path: Any) -> None:
    """Two middlewares sharing a pipeline and a third with another application, built before a fork: each
    child opens one runtime per pipeline (two supervisors, not three) and delivers through all three."""
    first_dir, second_dir = str(tmp_path / "first"), str(tmp_path / "second")
    result = run_script(f"""
        import os, sys, threading
        from moesiftornado_durable import MoesifMiddleware
        def make(directory, app):
            return MoesifMiddleware({{"APPLICATION_ID": app, "SPOOL_DIR": directory,
                                     "BASE_URI": {collector.base_uri!r}, "FLUSH_INTERVAL": 0.05}})
        one, two, other = make({first_dir!r}, "app-a"), make({first_dir!r}, "app-a"), make({second_dir!r}, "app-b")
        pids = []
        for child in range(2):
            pid = os.fork()
            if pid == 0:
                supervisors = [t for t in threading.enumerate() if t.name == "moesif-durable-supervisor"]
                for number, made in enumerate((one, two, other)):
                    made.update_user({{"user_id": "child-%d-%d" % (child, number)}})
                ok = one.flush(20) and other.flush(20)
                os._exit(0 if ok and len(supervisors) == 2 else 3)
            pids.append(pid)
        codes = [os.waitpid(pid, 0)[1] for pid in pids]
        print(codes)
        sys.exit(0 if not any(codes) else 1)
    """, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(user["user_id"] for user in collector.users) == sorted(
        f"child-{child}-{number}" for child in range(2) for number in range(3))
