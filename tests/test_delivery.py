"""The flusher and the middleware's lifecycle against a real collector and a real spool."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Counter, Dict, Iterator, List

import pytest
import requests
import tornado.web
from conftest import ingestion_requests, serve, shipper_spool, spool_with_events, wait_until
from moesifapi.models import CompanyModel, UserModel

from moesiftornado_durable import MoesifMiddleware
from moesiftornado_durable.flusher import Courier, Outcome
from moesiftornado_durable.locks import SHIPPER_SLOT, spool_path
from moesiftornado_durable.sender import Sender, delivery_policy
from moesiftornado_durable.spool import Spool, directory_stats
from moesiftornado_durable.testing import Collector


class Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("hello")


def serve_requests(middleware: MoesifMiddleware, count: int) -> None:
    app = tornado.web.Application([(r"/", Hello)], log_function=middleware.log_event)
    with serve(app) as url:
        with requests.Session() as session:
            for n in range(count):
                assert session.get(f"{url}/?n={n}", timeout=5).status_code == 200


def assert_each_once(collector: Collector, expected: int) -> None:
    ids = collector.transaction_ids()
    duplicates = [tid for tid, seen in Counter(ids).items() if seen > 1]
    assert len(set(ids)) == expected, f"{len(set(ids))} distinct of {expected}"
    assert duplicates == []


def test_503s_then_200_nothing_lost_nothing_twice(make_middleware: Callable[..., MoesifMiddleware],
                                                 collector: Collector) -> None:
    collector.respond_with(503, times=4)
    middleware = make_middleware(BATCH_SIZE=10)
    serve_requests(middleware, 35)
    assert middleware.flush(15)
    assert_each_once(collector, 35)
    statuses = [r.status for r in ingestion_requests(collector)]
    assert statuses[:4] == [503] * 4
    stats = middleware.stats()
    assert stats["sent"] == 35 and stats["ready"] == 0 and stats["in_flight"] == 0


def test_429_with_retry_after_is_waited_out(make_middleware: Callable[..., MoesifMiddleware],
                                            collector: Collector) -> None:
    collector.respond_with(429, headers={"Retry-After": "1"})
    middleware = make_middleware(RETRY_MAX_WAIT=5.0)
    serve_requests(middleware, 3)
    assert middleware.flush(10)
    first, second = ingestion_requests(collector)[:2]
    assert first.status == 429 and second.time - first.time >= 0.95
    assert_each_once(collector, 3)


def test_permanent_rejection_goes_to_the_dead_letter_store(make_middleware: Callable[..., MoesifMiddleware],
                                                           collector: Collector, spool_dir: str) -> None:
    collector.respond_with(400, times=None)  # every event rejected, also one by one (a 400 is narrowed down)
    middleware = make_middleware(BATCH_SIZE=5, FLUSH_INTERVAL=5.0)
    serve_requests(middleware, 5)  # one full batch: rejected
    assert middleware.flush(10)
    collector.reset()
    serve_requests(middleware, 2)  # the next ones are delivered
    assert middleware.flush(10)
    assert len(collector.transaction_ids()) == 2
    middleware.close(2)
    spool = Spool(shipper_spool(spool_dir))
    try:
        dead = spool.dead_letters()
    finally:
        spool.close()
    assert len(dead) == 5
    assert {d["http_status"] for d in dead} == {400}
    assert all("400" in d["reason"] and d["dead_at"] > 0 and d["body"]["transaction_id"] for d in dead)
    assert middleware.stats().get("dead_lettered", 0) in (0, 5)  # counters belong to the closed runtime


def test_backlog_from_an_earlier_run_is_sent_without_new_requests(make_middleware: Callable[..., MoesifMiddleware],
                                                                  collector: Collector) -> None:
    collector.go_down()
    first = make_middleware()
    serve_requests(first, 12)
    assert not first.flush(0.5)
    started = time.monotonic()
    first.close(timeout=2)
    assert time.monotonic() - started < 2.5
    collector.come_up()
    make_middleware()  # a new process would do exactly this at start; no request follows
    assert collector.wait_for_events(12, timeout=10)
    assert_each_once(collector, 12)


def test_flush_returns_false_within_its_timeout_while_down(make_middleware: Callable[..., MoesifMiddleware],
                                                           collector: Collector) -> None:
    collector.go_down()
    middleware = make_middleware()
    serve_requests(middleware, 2)
    started = time.monotonic()
    assert middleware.flush(0.5) is False
    assert 0.45 <= time.monotonic() - started < 1.5
    collector.come_up()
    assert middleware.flush(10) is True


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_close_returns_within_its_timeout_during_a_stalled_send(make_middleware: Callable[..., MoesifMiddleware],
                                                                collector: Collector, spool_dir: str,
                                                                shipper: str) -> None:
    collector.stall(60, times=None)
    # in one batch: the in-process shipper is up at once and would send the first event alone, the rest
    # then waiting behind the stalled send
    one_batch: Dict[str, Any] = {"BATCH_SIZE": 3, "FLUSH_INTERVAL": 30.0} if shipper == "thread" else {}
    middleware = make_middleware(SEND_TIMEOUT=30.0, SHIPPER=shipper, **one_batch)
    serve_requests(middleware, 3)
    assert wait_until(lambda: middleware.stats()["in_flight"] == 3, timeout=5)
    started = time.monotonic()
    middleware.close(timeout=1.0)
    assert time.monotonic() - started < 1.6
    stats = directory_stats(spool_dir)  # the in-flight events are still on disk, for the next start
    assert stats.ready + stats.in_flight == 3


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_close_returns_at_once_during_a_backoff(make_middleware: Callable[..., MoesifMiddleware],
                                                collector: Collector, shipper: str) -> None:
    # The collector asks for 30 s between attempts; close's own timeout is 20 s. Returning well before
    # either shows close cut the backoff short (a bound loose enough for a loaded machine: CI once took 1.9 s).
    collector.respond_with(503, times=None, headers={"Retry-After": "30"})
    middleware = make_middleware(RETRY_MAX_WAIT=30.0, SHIPPER=shipper)
    serve_requests(middleware, 2)
    assert wait_until(lambda: middleware.stats()["last_error"] is not None, timeout=10)  # now in the backoff
    started = time.monotonic()
    middleware.close(timeout=20.0)
    assert time.monotonic() - started < 8.0
    assert len(ingestion_requests(collector)) == 1  # and no attempt was made on the way out


def test_log_event_after_close_starts_again(make_middleware: Callable[..., MoesifMiddleware],
                                            collector: Collector) -> None:
    middleware = make_middleware()
    serve_requests(middleware, 1)
    middleware.close(2)
    serve_requests(middleware, 1)
    assert middleware.flush(5)
    assert_each_once(collector, 2)


def test_user_and_company_updates_are_spooled_and_delivered(make_middleware: Callable[..., MoesifMiddleware],
                                                            collector: Collector) -> None:
    collector.go_down()
    middleware = make_middleware()
    middleware.update_user({"user_id": "u-1", "metadata": {"plan": "gold"}})
    middleware.update_user(UserModel(user_id="u-2"))
    middleware.update_user('{"user_id": "u-3"}')
    middleware.update_users_batch([{"user_id": "u-4"}, UserModel(user_id="u-5")])
    middleware.update_company({"company_id": "c-1"})
    middleware.update_companies_batch([CompanyModel(company_id="c-2"), {"company_id": "c-3"}])
    # the shipper spools the journal within a moment; stats() counts what is in the spool
    assert wait_until(lambda: middleware.stats()["ready"] + middleware.stats()["in_flight"] == 8, timeout=5)
    collector.come_up()
    assert middleware.flush(10)
    assert sorted(u["user_id"] for u in collector.users) == ["u-1", "u-2", "u-3", "u-4", "u-5"]
    assert sorted(c["company_id"] for c in collector.companies) == ["c-1", "c-2", "c-3"]
    assert collector.users[0]["metadata"] == {"plan": "gold"}


@pytest.mark.parametrize(
    "call, argument, field",
    [
        ("update_user", {"email": "x@example.com"}, "user_id"),
        ("update_user", UserModel(), "user_id"),
        ("update_company", {"company_id": ""}, "company_id"),
        ("update_users_batch", [{"user_id": "ok"}, {"nope": 1}], "user_id"),
        ("update_companies_batch", [{}], "company_id"),
    ],
)
def test_updates_without_their_id_raise_naming_the_field(make_middleware: Callable[..., MoesifMiddleware],
                                                         call: str, argument: Any, field: str) -> None:
    middleware = make_middleware()
    with pytest.raises(ValueError, match=field):
        getattr(middleware, call)(argument)
    assert middleware.stats()["ready"] == 0  # a bad batch queues nothing


def test_updates_reject_wrong_types_and_bad_json(make_middleware: Callable[..., MoesifMiddleware]) -> None:
    middleware = make_middleware()
    for bad in (None, 42, "{not json", ["user_id"]):
        with pytest.raises(ValueError):
            middleware.update_user(bad)


def run_script(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=repo, capture_output=True,
                          text=True, timeout=timeout)


def test_pending_events_are_sent_at_interpreter_exit(collector: Collector, spool_dir: str) -> None:
    result = run_script(f"""
        from moesiftornado_durable import MoesifMiddleware
        mw = MoesifMiddleware({{"APPLICATION_ID": "x", "SPOOL_DIR": {spool_dir!r},
                               "BASE_URI": {collector.base_uri!r}, "FLUSH_INTERVAL": 30.0}})
        for n in range(3):
            mw.update_user({{"user_id": "exit-%d" % n}})
        # no flush, no close: the atexit hook must deliver within its timeout
    """)
    assert result.returncode == 0, result.stderr
    assert sorted(u["user_id"] for u in collector.users) == ["exit-0", "exit-1", "exit-2"]


def test_exit_does_not_hang_while_the_collector_is_down(collector: Collector, spool_dir: str) -> None:
    collector.go_down()
    started = time.monotonic()
    result = run_script(f"""
        from moesiftornado_durable import MoesifMiddleware
        mw = MoesifMiddleware({{"APPLICATION_ID": "x", "SPOOL_DIR": {spool_dir!r},
                               "BASE_URI": {collector.base_uri!r}, "FLUSH_INTERVAL": 0.01}})
        mw.update_user({{"user_id": "kept"}})
        import time; time.sleep(0.5)
    """)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 12  # close(timeout=10) at exit, never longer
    assert directory_stats(spool_dir).ready == 1  # kept on disk for the next start


def test_stdout_stays_clean_when_the_collector_is_unreachable(collector: Collector, spool_dir: str) -> None:
    collector.go_down()
    result = run_script(f"""
        from moesiftornado_durable import MoesifMiddleware
        mw = MoesifMiddleware({{"APPLICATION_ID": "x", "SPOOL_DIR": {spool_dir!r},
                               "BASE_URI": {collector.base_uri!r}, "FLUSH_INTERVAL": 0.01, "RETRY_MAX_WAIT": 0.1}})
        mw.update_user({{"user_id": "kept"}})
        import time
        deadline = time.monotonic() + 30  # until the shipper has tried (its start takes seconds on a busy machine)
        while mw.stats()["last_error"] is None and time.monotonic() < deadline:
            time.sleep(0.05)
        mw.close(0.5)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # moesifapi's client prints on connection errors; ours must not
    assert "delivery to Moesif failed" in result.stderr


def fork_and_log(spool_dir: str, base_uri: str, children: int, per_child: int, shipper: str = "process") -> List[str]:
    """Build the middleware, fork children that each log events through it, return their exit codes."""
    result = run_script(f"""
        import os, sys
        import tornado.web
        from moesiftornado_durable import MoesifMiddleware
        mw = MoesifMiddleware({{"APPLICATION_ID": "x", "SPOOL_DIR": {spool_dir!r},
                               "BASE_URI": {base_uri!r}, "FLUSH_INTERVAL": 0.05, "SHIPPER": {shipper!r}}})
        mw.update_user({{"user_id": "parent"}})
        pids = []
        for c in range({children}):
            pid = os.fork()
            if pid == 0:
                for n in range({per_child}):
                    mw.update_user({{"user_id": "child-%d-%d" % (c, n)}})
                ok = mw.flush(15)
                mw.close(5)
                os._exit(0 if ok else 3)
            pids.append(pid)
        codes = [os.waitpid(pid, 0)[1] for pid in pids]
        print(codes)
        ok = mw.flush(15)
        sys.exit(0 if ok and not any(codes) else 1)
    """, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.split()


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_a_middleware_built_before_fork_works_in_each_child(collector: Collector, spool_dir: str, shipper: str) -> None:
    """In thread mode the parent hosts the shipper; each child drops its copies of the parent's shipper
    lock and channel, and is served by the parent's shipper (its own host loses the election)."""
    fork_and_log(spool_dir, collector.base_uri, children=3, per_child=20, shipper=shipper)
    users = [u["user_id"] for u in collector.users]
    assert "parent" in users
    for c in range(3):
        assert {f"child-{c}-{n}" for n in range(20)} <= set(users)


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_a_journal_write_that_fails_is_counted_and_logged_and_the_next_one_starts_a_new_segment(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, caplog: Any, shipper: str
) -> None:
    import logging

    middleware = make_middleware(SHIPPER=shipper)
    serve_requests(middleware, 1)
    writer = middleware._runtime_here().writer  # type: ignore[union-attr]
    broken = writer.path
    os.close(writer._fd)
    writer._fd = os.open(os.devnull, os.O_RDONLY)  # a real descriptor that refuses writes (EBADF)
    with caplog.at_level(logging.ERROR, logger="moesiftornado_durable"):
        serve_requests(middleware, 1)  # still answered 200
    assert middleware.stats()["dropped_spool_error"] == 1
    assert any("could not write to the spool" in record.getMessage() for record in caplog.records)
    serve_requests(middleware, 2)  # a fresh segment takes the next records
    assert writer.path != broken
    assert middleware.flush(10)
    assert len(collector.transaction_ids()) == 3 and middleware.stats()["spooled"] == 3


def test_a_spool_that_cannot_be_opened_counts_each_lost_event_once(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str, caplog: Any
) -> None:
    import logging
    import shutil

    middleware = make_middleware()
    middleware.close(timeout=2)
    shutil.rmtree(spool_dir)
    open(spool_dir, "w").close()  # SPOOL_DIR is now a file: no spool slot can be opened
    with caplog.at_level(logging.ERROR, logger="moesiftornado_durable"):
        serve_requests(middleware, 3)  # every request still answered 200
        assert not middleware.flush(0.1)  # nothing to flush into: not a lost event
    assert middleware.stats()["dropped_spool_unavailable"] == 3
    assert any("cannot open the spool" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_a_partial_batch_waits_its_flush_interval_even_across_an_orphan_scan(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str, shipper: str
) -> None:
    spool = Spool(spool_path(spool_dir, SHIPPER_SLOT))  # one record waiting when the flusher starts and scans
    spool.put({"user_id": "waits"}, "user")
    spool.close()
    # the shipper's own spool, in either host (a spool-N.db would be adopted as an orphan: drained at once)
    middleware = make_middleware(BATCH_SIZE=5, FLUSH_INTERVAL=3.0, SHIPPER=shipper)
    time.sleep(1.0)
    assert collector.users == []  # a partial batch: not sent before FLUSH_INTERVAL
    assert middleware.flush(10)  # a flush sends it at once
    assert [u["user_id"] for u in collector.users] == ["waits"]


# -- Courier.drain: the replay's path, over one or several connections -----------------------------


@pytest.fixture
def courier_for() -> Iterator[Callable[[Collector], Courier]]:
    """Couriers that give a batch up after one failed attempt (so a failure ends the drain at once)."""
    senders: List[Sender] = []

    def make(collector: Collector) -> Courier:
        senders.append(Sender(collector.base_uri, "test-app-id", timeout=2.0))
        return Courier(senders[-1], delivery_policy(threading.Event(), max_wait=0.2, attempts=1))

    yield make
    for sender in senders:
        sender.close()


@pytest.mark.parametrize("connections", [1, 4])
def test_drain_delivers_each_event_once_and_empties_the_spool(
    collector: Collector, tmp_path: Any, connections: int, courier_for: Callable[[Collector], Courier]
) -> None:
    spool = spool_with_events(str(tmp_path / "spool-0.db"), 2_000)
    courier = courier_for(collector)
    reported: List[int] = []
    outcome = courier.drain(spool, 75, threading.Event(), on_batch=reported.append, connections=connections)
    assert outcome is Outcome.DELIVERED
    assert_each_once(collector, 2_000)
    assert sum(reported) == 2_000 and courier.counters["sent"] == 2_000
    assert spool.is_empty()
    spool.close()


def test_drain_over_several_connections_has_batches_in_flight_at_once(
    collector: Collector, tmp_path: Any, courier_for: Callable[[Collector], Courier]
) -> None:
    spool = spool_with_events(str(tmp_path / "spool-0.db"), 40)
    collector.stall(0.5, times=4)
    started = time.monotonic()
    assert courier_for(collector).drain(spool, 10, threading.Event(), connections=4) is Outcome.DELIVERED
    assert time.monotonic() - started < 1.5  # four stalled batches side by side, not 2 s one after the other
    assert_each_once(collector, 40)
    spool.close()


def test_drain_over_several_connections_stops_at_max_records(
    collector: Collector, tmp_path: Any, courier_for: Callable[[Collector], Courier]
) -> None:
    spool = spool_with_events(str(tmp_path / "spool-0.db"), 1_000)
    courier = courier_for(collector)
    assert courier.drain(spool, 50, threading.Event(), max_records=230, connections=3) is Outcome.DELIVERED
    assert len(collector.transaction_ids()) == 230 and courier.counters["sent"] == 230
    assert spool.stats().ready == 770
    spool.close()


def test_a_failed_batch_among_several_connections_stays_in_the_spool_and_nothing_is_lost(
    collector: Collector, tmp_path: Any, courier_for: Callable[[Collector], Courier]
) -> None:
    spool = spool_with_events(str(tmp_path / "spool-0.db"), 1_000)
    collector.stall(0.2, times=3)  # three batches in flight...
    collector.respond_with(503)  # ...when the fourth fails
    outcome = courier_for(collector).drain(spool, 50, threading.Event(), connections=4)
    assert outcome is Outcome.RETURNED
    delivered = set(collector.transaction_ids())
    stats = spool.stats()
    assert stats.in_flight == 0 and stats.ready == 1_000 - len(delivered)  # acked exactly what arrived
    assert 150 <= len(delivered) < 1_000  # the three stalled batches finished; the drain stopped early
    assert courier_for(collector).drain(spool, 50, threading.Event(), connections=4) is Outcome.DELIVERED
    assert_each_once(collector, 1_000)
    spool.close()


def test_an_error_in_a_drain_thread_is_raised_by_drain(
    collector: Collector, tmp_path: Any, courier_for: Callable[[Collector], Courier]
) -> None:
    spool = spool_with_events(str(tmp_path / "spool-0.db"), 500)

    def broken_progress(count: int) -> None:
        raise ValueError("progress display broke")

    with pytest.raises(ValueError, match="progress display broke"):
        courier_for(collector).drain(spool, 50, threading.Event(), on_batch=broken_progress, connections=3)
    assert spool.stats().ready == 500 - len(set(collector.transaction_ids()))  # delivered ones acked, rest kept
    spool.close()


def test_drain_refuses_zero_connections(
    collector: Collector, tmp_path: Any, courier_for: Callable[[Collector], Courier]
) -> None:
    spool = spool_with_events(str(tmp_path / "spool-0.db"), 1)
    with pytest.raises(ValueError, match="connections"):
        courier_for(collector).drain(spool, 50, threading.Event(), connections=0)
    spool.close()


def test_a_400_on_a_batch_is_narrowed_down_to_the_one_damaged_event(
    collector: Collector, tmp_path: Any, courier_for: Callable[[Collector], Courier]
) -> None:
    path = str(tmp_path / "spool-0.db")
    spool_with_events(path, 25).close()
    # fold the WAL in, so the record's bytes sit in the file's pages
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    with open(path, "r+b") as f:  # one byte of one record damaged inside its page: `:` becomes `;`
        data = f.read()
        at = data.index(b'"transaction_id":"d-13"')
        f.seek(at + len(b'"transaction_id"'))
        f.write(b";")
    spool = Spool(path)
    try:
        assert spool.check() is None  # the page is sound: SQLite's check cannot see it
        batch = spool.claim(25)
        assert len(batch) == 25
        assert courier_for(collector).deliver(spool, "event", batch) is Outcome.DELIVERED
        assert sorted(collector.transaction_ids()) == sorted(f"d-{n}" for n in range(25) if n != 13)
        [dead] = spool.dead_letters()
        assert dead["http_status"] == 400 and dead["body"] is None  # the damaged one, and only it
        assert spool.stats().ready == spool.stats().in_flight == 0
        # bounded: 1 request for the batch, then 2 per level of the bisection (ceil(log2(25)) = 5 levels)
        assert len(ingestion_requests(collector)) <= 1 + 2 * 5
    finally:
        spool.close()


def test_an_unfixable_400_dead_letters_every_event_of_the_batch_in_at_most_2n_minus_1_requests(
    collector: Collector, tmp_path: Any, courier_for: Callable[[Collector], Courier]
) -> None:
    spool = spool_with_events(str(tmp_path / "spool-0.db"), 6)
    collector.respond_with(422, times=None)
    try:
        assert courier_for(collector).deliver(spool, "event", spool.claim(6)) is Outcome.DEAD_LETTERED
        assert sorted(d["body"]["transaction_id"] for d in spool.dead_letters()) == [f"d-{n}" for n in range(6)]
        assert collector.transaction_ids() == [] and len(ingestion_requests(collector)) == 2 * 6 - 1
    finally:
        spool.close()


def test_events_that_pass_event_max_age_while_their_batch_is_retried_are_dead_lettered_not_sent(
    collector: Collector, tmp_path: Any
) -> None:
    max_age = 30.0
    now = time.time()
    spool = Spool(str(tmp_path / "spool-0.db"))
    spool.put_many([("event", {"transaction_id": f"old-{n}"}, now - max_age + 2.0) for n in range(5)])
    spool.put_many([("event", {"transaction_id": f"young-{n}"}, now) for n in range(5)])
    batch = spool.claim(10)  # all ten young enough when claimed
    stop = threading.Event()
    sender = Sender(collector.base_uri, "test-app-id", timeout=2.0)
    courier = Courier(sender, delivery_policy(stop, max_wait=0.2), event_max_age=max_age)
    outcome: List[Outcome] = []
    collector.go_down()
    delivering = threading.Thread(target=lambda: outcome.append(courier.deliver(spool, "event", batch)))
    delivering.start()
    try:
        # the outage outlasts the old events' remaining age, with the batch in its retries meanwhile
        assert wait_until(lambda: time.time() > now + 2.5 and courier.counters["send_attempts"] >= 2, timeout=20)
        collector.come_up()
        delivering.join(20)
        assert outcome == [Outcome.DELIVERED]
        assert sorted(collector.transaction_ids()) == [f"young-{n}" for n in range(5)]
        dead = spool.dead_letters()
        assert sorted(d["body"]["transaction_id"] for d in dead) == [f"old-{n}" for n in range(5)]
        assert all(d["reason"].startswith("expired") and d["http_status"] is None for d in dead)
    finally:
        stop.set()
        delivering.join(5)
        sender.close()
        spool.close()


def test_records_evicted_while_their_batch_waits_out_a_backoff_are_not_sent(collector: Collector,
                                                                          tmp_path: Any) -> None:
    """WHEN_FULL 'drop_oldest' may take records from a batch that failed and waits to be retried; the next
    attempt sends only the records still spooled, so none is both delivered and audited as dropped."""
    evicted: List[str] = []
    spool = Spool(str(tmp_path / "spool-0.db"), max_bytes=2_000, when_full="drop_oldest", on_evict=evicted.extend)
    spool.put_many([("event", {"transaction_id": f"e-{n}", "padding": "p" * 200}, time.time()) for n in range(6)])
    batch = spool.claim(6)

    def newer_records_arrive(seconds: float) -> None:  # the backoff: the spool fills up meanwhile
        for n in range(4):
            spool.put({"transaction_id": f"n-{seconds}-{n}", "padding": "p" * 200})

    sender = Sender(collector.base_uri, "test-app-id", timeout=2.0)
    courier = Courier(sender, delivery_policy(threading.Event(), max_wait=0.2, sleep=newer_records_arrive))
    collector.respond_with(503, times=1)
    try:
        assert courier.deliver(spool, "event", batch) is Outcome.DELIVERED
        assert evicted and set(evicted) < {f"e-{n}" for n in range(6)}  # the oldest: from the waiting batch
        sent = collector.transaction_ids()
        assert sorted(sent + evicted) == sorted(f"e-{n}" for n in range(6))  # each either sent or dropped
        assert courier.counters["send_attempts"] == 2
        assert spool.stats().in_flight == 0
    finally:
        sender.close()
        spool.close()


# ---- hostile collectors: redirects, trickles, huge answers (the whole pipeline, shipper process included) ----------


@pytest.mark.parametrize("status", [301, 307])
def test_a_redirecting_collector_loses_nothing_and_nothing_goes_elsewhere(
        make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str, status: int) -> None:
    with Collector() as elsewhere:
        collector.redirect(elsewhere.base_uri + "/v1/events/batch", status, times=None)
        middleware = make_middleware(BATCH_SIZE=10, AUTH_RETRY_INTERVAL=0.3)
        serve_requests(middleware, 30)

        def redirects() -> int:
            return sum(1 for request in ingestion_requests(collector) if request.status == status)

        assert wait_until(lambda: redirects() >= 2, 15)  # refused, then tried again later: not acked
        assert collector.transaction_ids() == []
        collector.reset()  # the redirect stops: everything goes out, to BASE_URI only
        assert middleware.flush(15)
        assert_each_once(collector, 30)
        assert elsewhere.requests == []  # no batch and no application id ever reached the other origin
        middleware.close(2)
    spool = Spool(shipper_spool(spool_dir))
    try:
        assert spool.dead_letters() == []
    finally:
        spool.close()


def test_a_trickling_collector_holds_a_send_no_longer_than_send_timeout(
        make_middleware: Callable[..., MoesifMiddleware], collector: Collector) -> None:
    collector.trickle(0.5, size=1)  # the first answer at 2 bytes/s: over a minute with per-read timeouts
    middleware = make_middleware(SEND_TIMEOUT=2.0)
    serve_requests(middleware, 5)
    assert middleware.flush(20)
    assert len(set(collector.transaction_ids())) == 5
    assert len(ingestion_requests(collector)) >= 2  # the trickled send was given up and the batch sent again


def test_a_huge_answer_is_not_an_ack(make_middleware: Callable[..., MoesifMiddleware],
                                     collector: Collector) -> None:
    collector.huge_body(64 << 20)  # a 200, with 64 MiB of body
    middleware = make_middleware()
    serve_requests(middleware, 5)
    assert middleware.flush(20)
    assert_each_once(collector, 5)  # the huge 200 recorded nothing: the events came with the next attempt
    assert collector.filler_bytes_written < 32 << 20  # the shipper stopped reading at the cap


def test_the_app_config_fetch_refuses_a_huge_answer(make_middleware: Callable[..., MoesifMiddleware],
                                                   collector: Collector) -> None:
    collector.huge_body(64 << 20, config=True, times=None)
    middleware = make_middleware()
    assert wait_until(lambda: middleware.stats().get("app_config_error") is not None, 15)
    assert "too large" in str(middleware.stats()["app_config_error"])
    assert collector.filler_bytes_written < 32 << 20
    serve_requests(middleware, 3)  # the application and delivery are unaffected
    assert middleware.flush(10)
    assert_each_once(collector, 3)
