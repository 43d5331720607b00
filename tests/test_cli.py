"""The operations CLI against real spools left by real (killed) processes and the real collector."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import requests
from conftest import AppProcess, children_of, spool_with_events, wait_until
from cryptography.fernet import Fernet

from moesiftornado_durable import locks
from moesiftornado_durable.cli import main
from moesiftornado_durable.codec import Codec, is_encrypted
from moesiftornado_durable.journal import JournalWriter
from moesiftornado_durable.kinds import EVENT
from moesiftornado_durable.locks import spool_path
from moesiftornado_durable.shipper import journal_reader, shipper_running
from moesiftornado_durable.spool import PAGE_SIZE, Spool, directory_stats
from moesiftornado_durable.testing import Collector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The example app's own id (examples/app.py): a directory's records are replayed or shipped under the id they
# were captured for, so the commands here use the id of the app that wrote them.
APP_ID = "example-application-id"


def dead_process_spool(spool_dir: str, count: int, prefix: str = "t") -> None:
    """A real process takes a spool slot, commits `count` events and dies by SIGKILL with its lock held."""
    code = textwrap.dedent(f"""
        import os, signal, time
        from moesiftornado_durable import locks
        from moesiftornado_durable.spool import Spool
        os.makedirs({spool_dir!r}, exist_ok=True)
        lock = locks.lock_free_slot({spool_dir!r})
        spool = Spool(lock.spool_path)
        records = [("event", {{"transaction_id": "{prefix}-%d" % n, "request": {{"uri": "http://x/%d" % n,
                    "verb": "GET", "time": "2026-01-01T00:00:00.000000"}}, "response": {{"status": 200,
                    "time": "2026-01-01T00:00:00.100000"}}, "direction": "Incoming"}}, time.time())
                   for n in range({count})]
        spool.put_many(records)
        spool.claim(3)  # a batch in flight when it dies
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr


def cli(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 120) -> subprocess.CompletedProcess:
    environment = dict(os.environ, MOESIF_APPLICATION_ID=APP_ID)
    environment.update(env or {})
    return subprocess.run([sys.executable, "-m", "moesiftornado_durable", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=environment)


def connections_to(collector: Collector) -> List[str]:
    """The client connections open to the collector: established TCP connections on its port, server side
    (from /proc/net/tcp: local address, remote address, state; 01 is ESTABLISHED)."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return [row[2] for row in rows if row[1].endswith(f":{collector.port:04X}") and row[3] == "01"]


def assert_once(collector: Collector, expected: int) -> None:
    counts = Counter(collector.transaction_ids())
    assert len(counts) == expected, f"{len(counts)} distinct of {expected}"
    assert max(counts.values()) == 1, [tid for tid, n in counts.items() if n > 1][:5]


# -- replay ----------------------------------------------------------------------------------------


def test_replay_of_a_dead_process_spool_arrives_complete_and_once(collector: Collector, spool_dir: str) -> None:
    dead_process_spool(spool_dir, 10_000)
    started = time.monotonic()
    result = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    assert "sent 10000 record(s)" in result.stdout
    assert "10000/10000 events" in result.stderr  # plain progress lines when not on a terminal
    assert_once(collector, 10_000)
    assert locks.slots(spool_dir) == []  # the drained file is removed
    print(f"replay: 10000 events in {elapsed:.2f} s ({10_000 / elapsed:,.0f} ev/s incl. start-up)")


def test_replay_over_several_connections_arrives_complete_and_once(collector: Collector, spool_dir: str) -> None:
    dead_process_spool(spool_dir, 3_000)
    result = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri, "--connections", "4",
                 "--batch-size", "100")
    assert result.returncode == 0, result.stderr
    assert "sent 3000 record(s)" in result.stdout
    assert_once(collector, 3_000)
    assert len(collector.requests) == 30
    zero = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri, "--connections", "0")
    assert zero.returncode == 2 and "--connections must be at least 1" in zero.stderr


def test_sigint_mid_replay_loses_nothing_and_a_second_replay_finishes(collector: Collector, spool_dir: str) -> None:
    dead_process_spool(spool_dir, 3_000)
    collector.stall(0.2, times=None)  # a slow collector, so there is time to interrupt
    process = subprocess.Popen(
        [sys.executable, "-m", "moesiftornado_durable", "replay", "--spool-dir", spool_dir, "--base-uri",
         collector.base_uri, "--batch-size", "100"],
        cwd=REPO, env=dict(os.environ, MOESIF_APPLICATION_ID=APP_ID), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert wait_until(lambda: len(collector.transaction_ids()) >= 300, timeout=30)
        os.kill(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    delivered = set(collector.transaction_ids())
    left = directory_stats(spool_dir)
    assert 300 <= len(delivered) < 3_000
    assert left.in_flight == 0  # the batch in hand went back to the ready queue
    assert len(delivered) + left.ready >= 3_000  # nothing lost (a resend of the last batch is allowed)

    collector.reset()
    second = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri)
    assert second.returncode == 0, second.stderr
    assert set(collector.transaction_ids()) == {f"t-{n}" for n in range(3_000)}


def test_a_second_sigint_aborts_at_once_with_batches_in_flight_on_several_connections(
    collector: Collector, spool_dir: str
) -> None:
    dead_process_spool(spool_dir, 1_000)
    collector.stall(5, times=None)  # every batch hangs: three of them in flight when the operator gives up
    process = subprocess.Popen(
        [sys.executable, "-m", "moesiftornado_durable", "replay", "--spool-dir", spool_dir, "--base-uri",
         collector.base_uri, "--batch-size", "100", "--connections", "3"],
        cwd=REPO, env=dict(os.environ, MOESIF_APPLICATION_ID=APP_ID), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        assert wait_until(lambda: len(connections_to(collector)) >= 3, timeout=30)
        time.sleep(0.3)  # their requests arrive and stall (a request is listed only once it is answered)
        os.kill(process.pid, signal.SIGINT)
        time.sleep(0.3)
        os.kill(process.pid, signal.SIGINT)
        started = time.monotonic()
        out, err = process.communicate(timeout=30)
        assert time.monotonic() - started < 2.0  # not waiting out the stalls
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, err
    assert "interrupted; nothing was lost" in err and "Traceback" not in err
    left = directory_stats(spool_dir)
    assert (left.ready, left.in_flight) == (1_000, 0)  # no batch was acked; every one is ready again

    collector.reset()
    second = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri)
    assert second.returncode == 0, second.stderr
    assert set(collector.transaction_ids()) == {f"t-{n}" for n in range(1_000)}


def test_two_replays_at_once_never_send_the_same_event_twice(collector: Collector, spool_dir: str) -> None:
    for part in range(4):
        dead_process_spool(spool_dir, 1_500, prefix=f"p{part}")
    command = [sys.executable, "-m", "moesiftornado_durable", "replay", "--spool-dir", spool_dir,
               "--base-uri", collector.base_uri, "--batch-size", "50"]
    environment = dict(os.environ, MOESIF_APPLICATION_ID=APP_ID)
    first = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    second = subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    codes = [first.wait(120), second.wait(120)]
    for process in (first, second):
        process.stdout.close()  # type: ignore[union-attr]
        process.stderr.close()  # type: ignore[union-attr]
    assert set(codes) <= {0, 3}  # 3: the files it wanted were being replayed by the other one
    if directory_stats(spool_dir).ready:
        assert cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri).returncode == 0
    assert_once(collector, 6_000)


def test_replay_error_paths_keep_every_event(collector: Collector, spool_dir: str) -> None:
    dead_process_spool(spool_dir, 50)

    missing_id = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri,
                     env={"MOESIF_APPLICATION_ID": ""})
    assert missing_id.returncode == 2 and "MOESIF_APPLICATION_ID" in missing_id.stderr

    collector.go_down()
    unreachable = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri)
    assert unreachable.returncode == 1
    assert unreachable.stderr.strip().splitlines()[-1].startswith("moesiftornado-durable: delivery failed")
    assert "connection failed" in unreachable.stderr
    collector.come_up()

    collector.respond_with(401, times=None)
    refused = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri)
    assert refused.returncode == 1 and "401" in refused.stderr
    assert len([r for r in collector.requests if r.status == 401]) == 1  # no retrying a refused id
    collector.reset()

    assert directory_stats(spool_dir).ready == 50  # every failure left the events where they were
    dry = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri, "--dry-run")
    assert dry.returncode == 0 and "would send 50 record(s)" in dry.stdout
    assert collector.transaction_ids() == []

    partial = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri, "--max-events", "20",
                  "--batch-size", "7")
    assert partial.returncode == 0 and len(collector.transaction_ids()) == 20
    assert directory_stats(spool_dir).ready == 30


def files_as_they_are(directory: str) -> Dict[str, Any]:
    """Every file in `directory`: its bytes, mode and modification time. Not SQLite's shared-memory index
    (-shm, a cache any reader updates), nor an empty WAL (what a read-only connection creates)."""
    found = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith("-shm") or (name.endswith("-wal") and os.path.getsize(path) == 0):
            continue
        with open(path, "rb") as f:
            found[name] = (f.read(), os.stat(path).st_mode, os.stat(path).st_mtime_ns)
    return found


def test_replay_dry_run_counts_spools_and_journals_and_changes_nothing(collector: Collector, spool_dir: str) -> None:
    dead_process_spool(spool_dir, 50)  # spool-0.db: 47 ready, 3 in flight
    event = ('{{"transaction_id":"j-{n}","request":{{"uri":"http://x/{n}","verb":"GET",'
             '"time":"2026-01-01T00:00:00.000000"}},"response":{{"status":200,'
             '"time":"2026-01-01T00:00:00.100000"}},"direction":"Incoming"}}')
    first = JournalWriter(spool_dir, 0)
    for n in range(30):
        first.append(EVENT, event.format(n=n).encode(), time.time())
    first.close()
    shipper_spool = Spool(spool_path(spool_dir, locks.SHIPPER_SLOT))
    assert journal_reader(shipper_spool).ingest() == 30  # spooled into shipper.db; the segment is then deleted
    shipper_spool.close()
    second = JournalWriter(spool_dir, 1)
    for n in range(30, 50):
        second.append(EVENT, event.format(n=n).encode(), time.time())
    second.close()  # 20 records only in a journal
    before = files_as_they_are(spool_dir)

    dry = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri, "--dry-run")

    assert dry.returncode == 0 and "would send 100 record(s)" in dry.stdout, dry.stdout + dry.stderr
    assert files_as_they_are(spool_dir) == before  # nothing spooled, claimed back, locked, created or deleted
    assert collector.requests == []
    assert cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri).returncode == 0
    assert_once(collector, 100)  # the count was what a replay sends


@pytest.mark.parametrize("shipper, live_file", [("process", "shipper.db"), ("thread", "shipper.db")])
def test_replay_refuses_a_spool_locked_by_a_live_process(
    app_processes: Callable[..., AppProcess], collector: Collector, spool_dir: str, shipper: str, live_file: str
) -> None:
    collector.go_down()
    app = app_processes(spool_dir, collector.base_uri, SHIPPER=shipper)
    assert requests.get(app.url + "/hello", timeout=5).status_code == 200
    # the app starts its shipper (a process, or its own threads) in the background: wait until it holds the spool
    assert wait_until(lambda: shipper_running(spool_dir), 30)
    collector.come_up()
    collector.stall(30, times=None)  # the app's own flusher must not deliver during the test
    result = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri)
    assert result.returncode == 3
    assert "locked by a live process" in result.stderr and live_file in result.stderr


# -- status ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shipper, live_file", [("process", "shipper.db"), ("thread", "shipper.db")])
def test_status_next_to_a_live_app_shows_owner_and_does_not_disturb_it(
    app_processes: Callable[..., AppProcess], collector: Collector, spool_dir: str, shipper: str, live_file: str
) -> None:
    """The live file is the shipper's spool, held by the app itself ('thread') or by its shipper process."""
    collector.stall(60, times=None)  # the app's batch stays in flight
    # full batches only: a partial one sent early would leave fewer than 5 in flight
    app = app_processes(spool_dir, collector.base_uri, BATCH_SIZE=5, FLUSH_INTERVAL=30, SHIPPER=shipper)
    for n in range(7):
        assert requests.get(f"{app.url}/hello?n={n}", timeout=5).status_code == 200

    def ready_and_in_flight() -> Tuple[int, int]:
        stats = directory_stats(spool_dir)
        return stats.ready, stats.in_flight

    # the last two spooled too: Tornado logs a request just after answering it, the shipper spools it after that
    assert wait_until(lambda: ready_and_in_flight() == (2, 5), timeout=10), ready_and_in_flight()
    dead_process_spool(spool_dir, 10)

    result = cli("status", "--spool-dir", spool_dir, "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    files = {f["file"]: f for f in status["files"]}
    owner = app.process.pid if shipper == "thread" else children_of(app.process.pid, shippers=True)[0]
    assert files[live_file]["owner_pid"] == owner and files[live_file]["owner_alive"] is True
    assert status["shipper"]["pid"] == owner and status["shipper"]["counters"]["send_attempts"] >= 1  # over its channel
    assert (files[live_file]["ready"], files[live_file]["in_flight"]) == (2, 5)
    dead = "spool-0.db"
    assert files[dead]["owner_alive"] is False and files[dead]["in_flight"] == 3
    assert status["total"]["ready"] == 2 + 7 and status["total"]["in_flight"] == 8
    assert status["total"]["oldest_age_seconds"] >= 0 and status["total"]["bytes_on_disk"] > 0
    assert directory_stats(spool_dir).in_flight == 8  # status changed nothing

    text = cli("status", "--spool-dir", spool_dir)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].split()[:4] == ["file", "owner", "alive", "ready"]
    [own] = [line.split() for line in lines if line.startswith(live_file)]
    assert own[:6] == [live_file, str(owner), "yes", "2", "5", "0"]
    assert lines[-1].split()[:4] == ["total", "-", "9", "8"]


def test_status_errors_are_one_line(tmp_path: Any, capsys: Any) -> None:
    assert main(["status", "--spool-dir", str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "spool-0.db").write_bytes(b"this is not a database" * 100)
    assert main(["status", "--spool-dir", str(tmp_path / "corrupt")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err


# -- dead letters, export, import, salvage ---------------------------------------------------------


@pytest.fixture
def with_dead_letters(spool_dir: str) -> str:
    """A spool with 6 events: 2 dead-lettered for HTTP 400, 1 for 422, 3 ready."""
    os.makedirs(spool_dir, exist_ok=True)
    spool = Spool(locks.spool_path(spool_dir, 0))
    for n in range(6):
        spool.put({"transaction_id": f"d-{n}"})
    claimed = spool.claim(3)
    spool.dead_letter([claimed[0].id, claimed[1].id], 400, "HTTP 400: rejected by the collector")
    spool.dead_letter([claimed[2].id], 422, "HTTP 422: rejected by the collector")
    spool.close()
    return spool_dir


def test_dead_letter_list_human_and_json(with_dead_letters: str, capsys: Any) -> None:
    assert main(["dead-letter", "list", "--spool-dir", with_dead_letters]) == 0
    out = capsys.readouterr().out
    assert "3 dead-lettered record(s)" in out and "d-0" in out and "HTTP 422" in out
    assert main(["dead-letter", "list", "--spool-dir", with_dead_letters, "--json", "--reason", "422"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["http_status"] == 422 and record["body"]["transaction_id"] == "d-2"
    assert record["file"] == "spool-0.db"
    assert main(["dead-letter", "list", "--spool-dir", with_dead_letters, "--older-than", "1h"]) == 0
    assert "0 dead-lettered record(s)" in capsys.readouterr().out


def test_dead_letter_requeue_keeps_the_transaction_id_and_delivers(
    with_dead_letters: str, collector: Collector, capsys: Any
) -> None:
    assert main(["dead-letter", "requeue", "--spool-dir", with_dead_letters, "--reason", "HTTP 400"]) == 0
    assert "requeued 2 record(s)" in capsys.readouterr().out
    assert directory_stats(with_dead_letters).dead_letter == 1
    result = cli("replay", "--spool-dir", with_dead_letters, "--base-uri", collector.base_uri)
    assert result.returncode == 0, result.stderr
    assert sorted(collector.transaction_ids()) == ["d-0", "d-1", "d-3", "d-4", "d-5"]


def test_dead_letter_purge_asks_unless_yes(with_dead_letters: str) -> None:
    refused = cli("dead-letter", "purge", "--spool-dir", with_dead_letters)
    assert refused.returncode == 1 and "--yes" in refused.stderr
    assert directory_stats(with_dead_letters).dead_letter == 3
    done = cli("dead-letter", "purge", "--spool-dir", with_dead_letters, "--reason", "422", "--yes")
    assert done.returncode == 0 and "purged 1 record(s)" in done.stdout
    assert directory_stats(with_dead_letters).dead_letter == 2


def test_dead_letter_export_writes_jsonl(with_dead_letters: str, tmp_path: Any) -> None:
    out = tmp_path / "dead.jsonl"
    assert main(["dead-letter", "export", "--spool-dir", with_dead_letters, "--out", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["body"]["transaction_id"] for r in records] == ["d-0", "d-1", "d-2"]
    assert oct(os.stat(out).st_mode & 0o777) == "0o600"


def test_export_then_import_round_trip(with_dead_letters: str, tmp_path: Any, collector: Collector) -> None:
    exported = tmp_path / "audit.jsonl"
    assert main(["export", "--spool-dir", with_dead_letters, "--out", str(exported)]) == 0
    records = [json.loads(line) for line in exported.read_text().splitlines()]
    assert Counter(r["state"] for r in records) == {"ready": 3, "dead_letter": 3}
    elsewhere = str(tmp_path / "other-spool")
    assert main(["import", str(exported), "--spool-dir", elsewhere]) == 0
    assert directory_stats(elsewhere).ready == 6
    assert cli("replay", "--spool-dir", elsewhere, "--base-uri", collector.base_uri).returncode == 0
    assert sorted(collector.transaction_ids()) == [f"d-{n}" for n in range(6)]


def test_import_rejects_a_bad_file_with_one_line(tmp_path: Any, capsys: Any) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": {}}\nnot json\n')
    assert main(["import", str(bad), "--spool-dir", str(tmp_path / "s")]) == 1
    assert capsys.readouterr().err.count("\n") == 1
    assert directory_stats(str(tmp_path / "s")).ready == 0  # nothing half-imported


def test_salvage_copies_the_readable_rows_of_a_damaged_file(tmp_path: Any, capsys: Any) -> None:
    damaged = tmp_path / "damaged.db"
    spool = Spool(str(damaged))
    for n in range(400):
        spool.put({"transaction_id": f"s-{n}", "padding": "x" * 400})
    spool.close()
    # fold the WAL into the file, then tear a page in the middle
    with contextlib.closing(sqlite3.connect(damaged)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    size = os.path.getsize(damaged)
    with open(damaged, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(4096))
    before = damaged.read_bytes()
    assert main(["salvage", str(damaged), "--spool-dir", str(tmp_path / "rescued")]) == 0
    out = capsys.readouterr().out
    rescued = directory_stats(str(tmp_path / "rescued")).ready
    assert 300 <= rescued < 400, out  # most rows back; those on the torn page lost
    assert f"salvaged {rescued} record(s)" in out
    assert damaged.read_bytes() == before  # the source is never changed


@pytest.mark.parametrize("encrypted", [False, True])
def test_salvage_of_a_spool_cut_in_half_copies_every_row_on_the_pages_left(
    tmp_path: Any, capsys: Any, monkeypatch: Any, encrypted: bool
) -> None:
    key = Fernet.generate_key().decode() if encrypted else None
    codec = Codec([key] if key else [])
    damaged = tmp_path / "shipper.db"
    spool = Spool(str(damaged), codec=codec)
    put = {f"h-{n}": {"transaction_id": f"h-{n}", "padding": "x" * 1000} for n in range(1_000)}
    spool.put_many(("event", body, time.time()) for body in put.values())
    spool.dead_letter([3, 4, 5], 400, "rejected")
    spool.close()
    with contextlib.closing(sqlite3.connect(damaged)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        leaves = conn.execute("SELECT pageno, ncell FROM dbstat WHERE name IN ('ack_queue_default', 'dead_letter') "
                              "AND pagetype = 'leaf'").fetchall()
    conn.close()
    size = os.path.getsize(damaged)
    with open(damaged, "r+b") as f:  # the second half of the file is gone
        f.truncate(size // 2)
    pages_left = size // 2 // page_size
    expected = sum(cells for page, cells in leaves if page <= pages_left)  # the rows physically still there
    assert 0 < expected < 1_000
    before = damaged.read_bytes()
    if key:
        monkeypatch.setenv("MOESIF_SPOOL_ENCRYPTION_KEY", key)

    assert main(["salvage", str(damaged), "--spool-dir", str(tmp_path / "rescued")]) == 0
    out = capsys.readouterr().out
    assert f"salvaged {expected} record(s)" in out, out
    assert f"{size // page_size - pages_left} of {size // page_size} pages missing, the file cut short" in out
    assert damaged.read_bytes() == before  # the source is never changed
    rescued = Spool(spool_path(str(tmp_path / "rescued"), 0), codec=codec)
    try:
        records = list(rescued.records())
        stored = [row[0] for row in rescued._conn().execute("SELECT data FROM ack_queue_default")]
    finally:
        rescued.close()
    ids = [record["body"]["transaction_id"] for record in records]
    assert len(ids) == len(set(ids)) == expected  # each once
    assert all(record["body"] == put[record["body"]["transaction_id"]] for record in records)  # intact
    assert all(is_encrypted(data) == encrypted for data in stored)  # still encrypted at rest


def test_salvage_puts_large_records_back_together_from_their_overflow_pages(tmp_path: Any, capsys: Any) -> None:
    damaged = tmp_path / "shipper.db"
    spool = Spool(str(damaged))
    put = {f"big-{n}": {"transaction_id": f"big-{n}", "body": f"{n}-" * 10_000} for n in range(60)}  # ~20 KB each
    spool.put_many(("event", body, time.time()) for body in put.values())
    spool.close()
    with contextlib.closing(sqlite3.connect(damaged)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        [[overflow_pages]] = conn.execute("SELECT COUNT(*) FROM dbstat WHERE pagetype = 'overflow'").fetchall()
    conn.close()
    assert overflow_pages > 60  # every record spans pages
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)

    assert main(["salvage", str(damaged), "--spool-dir", str(tmp_path / "rescued")]) == 0
    out = capsys.readouterr().out
    rescued = Spool(spool_path(str(tmp_path / "rescued"), 0))
    try:
        records = list(rescued.records())
    finally:
        rescued.close()
    assert 20 <= len(records) < 60, out  # the first half of the file: about half of them
    assert all(record["body"] == put[record["body"]["transaction_id"]] for record in records)  # whole again
    assert f"salvaged {len(records)} record(s)" in out


@pytest.mark.parametrize("page_size", [PAGE_SIZE, 512, 1024, 2048, 4096, 16384, 32768, 65536])
def test_salvage_of_a_spool_whose_header_is_zeroed_finds_its_page_size_and_copies_every_record(
    tmp_path: Any, capsys: Any, page_size: int
) -> None:
    damaged = tmp_path / "shipper.db"
    if page_size != PAGE_SIZE:  # a file made before the spool opened it keeps its page size (older releases: 4096)
        with contextlib.closing(sqlite3.connect(str(damaged))) as older:
            older.execute(f"PRAGMA page_size={page_size}")
            older.execute("PRAGMA journal_mode=WAL")
    spool = spool_with_events(str(damaged), 1_500, prefix="z")
    spool.dead_letter([7, 8, 9], 400, "rejected")  # rows of the other table come back too
    spool.close()
    with contextlib.closing(sqlite3.connect(damaged)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        assert conn.execute("PRAGMA page_size").fetchone()[0] == page_size
    conn.close()
    with open(damaged, "r+b") as f:  # as the power-cut run found it: the header zeroed, every page intact
        f.write(b"\0" * 100)
    wal = str(damaged) + "-wal"
    assert not os.path.exists(wal) or os.path.getsize(wal) == 0  # no WAL to take the page size from
    before = damaged.read_bytes()

    assert main(["salvage", str(damaged), "--spool-dir", str(tmp_path / "rescued")]) == 0
    out = capsys.readouterr().out
    assert f"page size {page_size} found from its pages" in out, out
    assert "salvaged 1500 record(s) (3 of them dead letters, now ready again)" in out, out
    assert "unreadable" in out and "damaged record" not in out and "page(s) unreadable" not in out, out
    assert damaged.read_bytes() == before  # the source is never changed
    rescued = Spool(spool_path(str(tmp_path / "rescued"), 0))
    try:
        ids = [record["body"]["transaction_id"] for record in rescued.records()]
    finally:
        rescued.close()
    assert sorted(ids) == sorted(f"z-{n}" for n in range(1_500))  # every record, each once


# -- the collector command ------------------------------------------------------------------------


def test_collector_command_runs_the_local_collector() -> None:
    process = subprocess.Popen([sys.executable, "-m", "moesiftornado_durable", "collector", "--port", "0"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout is not None
        base_uri = process.stdout.readline().strip()
        assert base_uri.startswith("http://127.0.0.1:")
        answer = requests.get(base_uri + "/v1/config", headers={"X-Moesif-Application-Id": "x"}, timeout=5)
        assert answer.status_code == 200
    finally:
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(10) == 0
        process.stdout.close()  # type: ignore[union-attr]


def test_starting_the_cli_does_not_import_the_collector() -> None:
    code = "import sys, moesiftornado_durable.cli; print('moesiftornado_durable.testing' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout.strip()) == (0, "False"), result.stderr


def test_every_command_has_help() -> None:
    for command in (["--help"], ["status", "--help"], ["replay", "--help"], ["dead-letter", "--help"],
                    ["export", "--help"], ["import", "--help"], ["salvage", "--help"]):
        result = cli(*command)
        assert result.returncode == 0 and "usage:" in result.stdout, command
    assert cli("no-such-command").returncode == 2




# -- ship ------------------------------------------------------------------------------------------


def test_ship_runs_the_shipper_as_a_service_and_app_processes_start_none(
    app_processes: Callable[..., AppProcess], collector: Collector, spool_dir: str
) -> None:
    os.makedirs(spool_dir, exist_ok=True)
    service = subprocess.Popen([sys.executable, "-m", "moesiftornado_durable", "ship", "--spool-dir", spool_dir,
                                "--base-uri", collector.base_uri, "--batch-size", "5"], cwd=REPO,
                               env=dict(os.environ, MOESIF_APPLICATION_ID=APP_ID),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: locks.owner(spool_dir, locks.SHIPPER_SLOT) == (service.pid, True), timeout=20)
        app = app_processes(spool_dir, collector.base_uri)
        for n in range(12):
            assert requests.get(f"{app.url}/hello?n={n}", timeout=5).status_code == 200
        assert wait_until(lambda: len(set(collector.transaction_ids())) == 12, timeout=20), collector.stats()
        assert children_of(app.process.pid, shippers=True) == []  # the service is the shipper
        second = cli("ship", "--spool-dir", spool_dir, "--base-uri", collector.base_uri)
        assert second.returncode == 3 and "another shipper" in second.stderr
        app.kill()
    finally:
        service.terminate()
        assert service.wait(20) == 0
        assert service.stderr is not None
        service.stderr.close()
