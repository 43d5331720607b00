"""For regulated environments: encryption at rest, no residue, retention, the audit trail, metrics, health."""

from __future__ import annotations

import json
import logging
import os
import stat
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List

import pytest
import requests
import tornado.web
from conftest import serve, shipper_spool, wait_logged, wait_until, waiting
from cryptography.fernet import Fernet

from moesiftornado_durable import ConfigError, HealthHandler, MetricsHandler, MoesifMiddleware
from moesiftornado_durable.codec import Codec
from moesiftornado_durable.journal import segments
from moesiftornado_durable.locks import spool_path
from moesiftornado_durable.spool import Spool, directory_stats
from moesiftornado_durable.testing import Collector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "MARKER-7f3a9c-do-not-keep"


class Echo(tornado.web.RequestHandler):
    def post(self) -> None:
        self.set_header("Content-Type", "application/json")
        self.write(self.request.body)


def post_marker(middleware: MoesifMiddleware, count: int = 3) -> None:
    app = middleware.attach(tornado.web.Application([(r"/echo", Echo)], log_function=middleware.log_event))
    with serve(app) as url:
        for n in range(count):
            assert requests.post(url + "/echo", json={"secret": MARKER, "n": n}, timeout=5).status_code == 200


def files_containing(directory: str, needle: bytes) -> List[str]:
    found = []
    for name in os.listdir(directory):
        try:
            if stat.S_ISSOCK(os.lstat(os.path.join(directory, name)).st_mode):
                continue  # shipper.sock, the channel: it holds no bytes at rest
            with open(os.path.join(directory, name), "rb") as f:
                if needle in f.read():
                    found.append(name)
        except FileNotFoundError:
            pass  # deleted since the listing (a journal segment folded away): it holds nothing any more
    return found


# -- encryption ------------------------------------------------------------------------------------


def test_an_encrypted_spool_never_holds_the_plaintext_and_still_delivers(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    collector.go_down()
    middleware = make_middleware(SPOOL_ENCRYPTION_KEY=Fernet.generate_key())
    post_marker(middleware)
    assert waiting(spool_dir) == 3
    assert files_containing(spool_dir, MARKER.encode()) == []  # not in the db, the WAL, anywhere
    collector.come_up()
    assert middleware.flush(10)
    assert [e["request"]["body"]["secret"] for e in collector.events] == [MARKER] * 3


def test_key_rotation_reads_old_records_and_writes_with_the_new_key(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    old, new = Fernet.generate_key(), Fernet.generate_key()
    collector.go_down()
    first = make_middleware(SPOOL_ENCRYPTION_KEY=old)
    post_marker(first, 2)
    first.close(1)
    second = make_middleware(SPOOL_ENCRYPTION_KEY=[new, old])  # new key first, old kept readable
    post_marker(second, 1)
    assert wait_until(lambda: waiting(spool_dir) == 3 and not segments(spool_dir), timeout=10)  # all spooled
    raw = Spool(shipper_spool(spool_dir), codec=Codec([new]), resume=False)  # beside the live shipper
    try:
        readable_with_new_only = [r for r in raw.records() if r["body"] is not None]
    finally:
        raw.close()
    assert len(readable_with_new_only) == 1  # only the record written after the rotation
    collector.come_up()
    assert second.flush(10)
    assert len(collector.events) == 3


def test_a_wrong_or_missing_key_at_start_is_a_clear_error(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    collector.go_down()
    first = make_middleware(SPOOL_ENCRYPTION_KEY=Fernet.generate_key())
    post_marker(first, 1)
    first.close(1)
    with pytest.raises(ConfigError, match="SPOOL_ENCRYPTION_KEY"):
        make_middleware(SPOOL_ENCRYPTION_KEY=Fernet.generate_key())
    with pytest.raises(ConfigError, match="SPOOL_ENCRYPTION_KEY"):
        make_middleware()
    with pytest.raises(ConfigError, match="SPOOL_ENCRYPTION_KEY"):
        make_middleware(SPOOL_ENCRYPTION_KEY="not-a-fernet-key")
    assert waiting(spool_dir) == 1  # untouched


def test_records_no_key_opens_stay_untouched_and_status_reports_them(
    collector: Collector, spool_dir: str, tmp_path: Any
) -> None:
    os.makedirs(spool_dir)
    stranger, ours = Codec([Fernet.generate_key()]), Fernet.generate_key()
    spool = Spool(spool_path(spool_dir, 0), codec=Codec([ours]))
    spool.put({"transaction_id": "mine"})
    spool.put_raw_many([("event", stranger.encode({"transaction_id": "theirs"}), time.time())])
    claimed = spool.claim(10)
    assert [item.body["transaction_id"] for item in claimed] == ["mine"]
    assert spool.stats().undecryptable == 1
    spool.close()
    env = dict(os.environ, MOESIF_SPOOL_ENCRYPTION_KEY=ours.decode())
    status = subprocess.run([sys.executable, "-m", "moesiftornado_durable", "status", "--spool-dir", spool_dir],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=30)
    assert "1 record(s) cannot be decrypted" in status.stdout
    as_json = subprocess.run([sys.executable, "-m", "moesiftornado_durable", "status", "--spool-dir", spool_dir,
                              "--json"], cwd=REPO, capture_output=True, text=True, env=env, timeout=30)
    assert json.loads(as_json.stdout)["total"]["undecryptable"] == 1


def test_replay_reading_sets_records_no_key_opens_aside_and_reads_on(tmp_path: Any) -> None:
    stranger, ours = Codec([Fernet.generate_key()]), Codec([Fernet.generate_key()])
    spool = Spool(str(tmp_path / "spool" / "spool-0.db"), codec=ours)
    try:
        spool.put_raw_many([("event", stranger.encode({"transaction_id": f"theirs-{n}"}), time.time())
                            for n in range(3)])
        spool.put({"transaction_id": "mine"})
        read = spool.read_ready(3)  # a whole batch set aside: it looks further instead of stopping
        assert [item.body["transaction_id"] for item in read] == ["mine"]
        assert spool.stats().undecryptable == 3
    finally:
        spool.close()


# -- no residue ------------------------------------------------------------------------------------


def test_after_delivery_no_spool_file_holds_the_event_bytes(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    collector.go_down()
    middleware = make_middleware()
    post_marker(middleware, 20)
    assert files_containing(spool_dir, MARKER.encode())  # the test can see a marker that is there
    collector.come_up()
    assert middleware.flush(10)
    assert wait_until(lambda: not files_containing(spool_dir, MARKER.encode()), timeout=10), \
        files_containing(spool_dir, MARKER.encode())
    assert len(collector.events) == 20


def test_masked_values_never_reach_disk_even_with_a_backlog(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    collector.go_down()

    def mask(event: Any) -> Any:
        event.request.body = {"masked": True}
        event.response.body = {"masked": True}
        return event

    middleware = make_middleware(MASK_EVENT_MODEL=mask)
    post_marker(middleware, 5)
    assert waiting(spool_dir) == 5
    assert files_containing(spool_dir, MARKER.encode()) == []


# -- retention and the audit trail -----------------------------------------------------------------


def audit_records(caplog: Any) -> List[Dict[str, Any]]:
    return [{"transaction_id": r.transaction_id, "reason": r.reason, "at": r.at, "message": r.getMessage()}
            for r in caplog.records if r.name == "moesiftornado_durable.audit"]


def test_dead_letter_retention_removes_old_entries_and_audits_each(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str, caplog: Any
) -> None:
    os.makedirs(spool_dir)
    spool = Spool(spool_path(spool_dir, 0))
    for n in range(3):
        spool.put({"transaction_id": f"r-{n}"})
    spool.dead_letter([item.id for item in spool.claim(3)], 400, "HTTP 400")
    spool.close()
    time.sleep(0.3)
    with caplog.at_level(logging.INFO, logger="moesiftornado_durable.audit"):
        make_middleware(DEAD_LETTER_RETENTION=0.2)
        assert wait_until(lambda: directory_stats(spool_dir).dead_letter == 0, timeout=10)
    removed = [r for r in audit_records(caplog) if "retention" in r["reason"]]
    assert sorted(r["transaction_id"] for r in removed) == ["r-0", "r-1", "r-2"]


def test_every_way_out_of_the_spool_but_delivery_is_audited_without_the_payload(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str, caplog: Any
) -> None:
    os.makedirs(spool_dir)
    spool = Spool(spool_path(spool_dir, 0))
    spool.put_many([("event", {"transaction_id": "expired-1", "secret": MARKER}, time.time() - 40 * 86400)])
    spool.close()
    collector.respond_with(400)
    with caplog.at_level(logging.INFO, logger="moesiftornado_durable.audit"):
        middleware = make_middleware(SPOOL_MAX_BYTES=3000, FLUSH_INTERVAL=0.01)
        assert middleware.flush(10)  # expired-1 dead-lettered as expired
        middleware._spool_record({"transaction_id": "rejected-1", "secret": MARKER}, "event")
        assert middleware.flush(10)  # rejected with 400: dead-lettered
        collector.go_down()
        for n in range(10):
            middleware._spool_record({"transaction_id": f"full-{n}", "padding": "x" * 500}, "event")
        middleware.close(1)
    records = audit_records(caplog)
    reasons = {r["transaction_id"]: r["reason"] for r in records}
    assert reasons["expired-1"].startswith("dead-lettered: expired")
    assert reasons["rejected-1"].startswith("dead-lettered: HTTP 400")
    assert any(tid.startswith("full-") and "refused" in reason for tid, reason in reasons.items())
    assert all(r["at"].endswith("Z") for r in records)
    assert MARKER not in " ".join(r["message"] for r in records)  # never the payload

    from moesiftornado_durable.cli import main

    with caplog.at_level(logging.INFO, logger="moesiftornado_durable.audit"):
        assert main(["dead-letter", "purge", "--spool-dir", spool_dir, "--yes"]) == 0
    purged = [r for r in audit_records(caplog) if r["reason"] == "purged by an operator"]
    assert sorted(r["transaction_id"] for r in purged) == ["expired-1", "rejected-1"]


# -- metrics and health ----------------------------------------------------------------------------


def test_stats_has_every_documented_key(make_middleware: Callable[..., MoesifMiddleware], collector: Collector) -> None:
    collector.respond_with(503, times=2)
    middleware = make_middleware()
    post_marker(middleware, 2)
    assert middleware.flush(10)
    stats = middleware.stats()
    for key in ("spooled", "sent", "send_attempts", "retries", "dead_lettered", "ready", "in_flight",
                "oldest_age", "spool_bytes", "last_error", "last_error_at", "spool_failing"):
        assert key in stats, key
    assert stats["spooled"] == 2 and stats["sent"] == 2 and stats["retries"] == 2 and stats["send_attempts"] == 3
    assert "503" in stats["last_error"] and stats["last_error_at"] <= time.time()


def test_metrics_handler_serves_prometheus_text(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector
) -> None:
    middleware = make_middleware(SPOOL_MAX_BYTES=3000)
    middleware._spool_record({"transaction_id": "too-big", "padding": "x" * 5000}, "event")
    app = tornado.web.Application([(r"/metrics", MetricsHandler, {"middleware": middleware}), (r"/echo", Echo)],
                                  log_function=middleware.log_event)
    with serve(app) as url:
        requests.post(url + "/echo", json={"a": 1}, timeout=5)
        wait_logged(middleware, 1)
        assert middleware.flush(10)
        answer = requests.get(url + "/metrics", timeout=5)
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = answer.text
    assert "# TYPE moesif_durable_sent_total counter" in text
    assert "moesif_durable_sent_total 1" in text
    assert 'moesif_durable_dropped_total{reason="spool_full"} 1' in text
    assert "moesif_durable_ready 0" in text
    assert len(collector.events) == 1  # the scrape itself is not an API call sent to Moesif


def test_health_handler_200_then_503_when_the_backlog_is_old(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector
) -> None:
    middleware = make_middleware()
    app = tornado.web.Application([(r"/healthz", HealthHandler, {"middleware": middleware, "max_backlog_age": 0.5}),
                                   (r"/echo", Echo)], log_function=middleware.log_event)
    with serve(app) as url:
        healthy = requests.get(url + "/healthz", timeout=5)
        assert healthy.status_code == 200 and healthy.json()["status"] == "ok"
        collector.go_down()
        requests.post(url + "/echo", json={"a": 1}, timeout=5)
        assert wait_until(lambda: requests.get(url + "/healthz", timeout=5).status_code == 503, timeout=10)
        failing = requests.get(url + "/healthz", timeout=5).json()
        assert failing["status"] == "failing" and "oldest waiting record" in failing["problems"][0]
        collector.come_up()
        assert middleware.flush(10)
        assert requests.get(url + "/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_health_is_503_when_the_spool_is_failing(make_middleware: Callable[..., MoesifMiddleware],
                                                 shipper: str) -> None:
    middleware = make_middleware(SHIPPER=shipper)
    runtime: Any = middleware._runtime_here()
    middleware._spool_record({"transaction_id": "opens-a-segment"}, "event")
    os.close(runtime.writer._fd)
    runtime.writer._fd = os.open(os.devnull, os.O_RDONLY)  # the real journal descriptor refuses writes
    middleware._spool_record({"transaction_id": "x"}, "event")
    app = tornado.web.Application([(r"/healthz", HealthHandler, {"middleware": middleware})])
    with serve(app) as url:
        answer = requests.get(url + "/healthz", timeout=5)
    assert answer.status_code == 503 and "spool is failing" in answer.json()["problems"][0]
