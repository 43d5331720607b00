"""Power cuts on LazyFS: what a response promised survives the machine losing power.

Marked `lazyfs` (skipped with the reason where LazyFS cannot run). Each test mounts LazyFS, puts SPOOL_DIR
on it, and cuts the power (tests/lazyfs.py): every unsynced byte is gone, as after a real outage.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import logging
import os
import threading
import time
from typing import Any, Callable, Iterator, List, Set

import pytest
from conftest import AppProcess, iter_records
from lazyfs import LazyFS

from moesiftornado_durable.journal import JournalWriter, segments
from moesiftornado_durable.testing import Collector

pytestmark = pytest.mark.lazyfs

WINDOW = 0.2  # the default mode's contract: a cut loses at most the events answered this long before it


@pytest.fixture
def lazyfs(tmp_path: Any) -> Iterator[LazyFS]:
    with LazyFS(str(tmp_path / "lazyfs")) as mounted:
        yield mounted


def records_in(directory: str) -> List[bytes]:
    return [payload for _, _, path in segments(directory) for _, payload, _ in iter_records(path)]


@pytest.mark.parametrize("sync", ["normal", "full"])
def test_the_syncer_makes_every_record_survive_a_cut_rotations_included(lazyfs: LazyFS, sync: str) -> None:
    directory = os.path.join(lazyfs.mount, "journal")
    os.makedirs(directory, mode=0o700)
    writer = JournalWriter(directory, 1, sync, segment_bytes=2000)  # a new segment every ~20 records
    try:
        payloads = [b'{"n": %d, "pad": "%s"}' % (n, b"x" * 64) for n in range(200)]
        sequences = [writer.append("event", payload, time.time()) for payload in payloads]
        assert sequences == list(range(1, len(payloads) + 1))
        done = threading.Event()
        synced: List[bool] = []
        # wait for the syncer's own rounds (not `on_synced`, which would ask for one): the appends are done
        deadline = time.monotonic() + 10
        while writer.syncs == 0 or writer._to_sync or writer._to_close:
            assert time.monotonic() < deadline, "the syncer did not sync"
            time.sleep(0.01)
        writer.on_synced(sequences[-1], lambda ok: (synced.append(ok), done.set()))
        assert done.wait(10) and synced == [True]
        lazyfs.clear_cache()  # the power cut (this process is the only writer, and it is idle)
        assert len(segments(directory)) >= 9
        assert records_in(directory) == payloads
    finally:
        writer.close()


def test_appends_sync_in_place_of_a_syncer_stuck_in_its_round(lazyfs: LazyFS) -> None:
    """The syncer thread took its round and was then not run (a loaded machine can deschedule one thread for
    seconds; here it waits on an event, the one way to hold a single thread of a process): the appends that
    find the records after it waiting past the rescue deadline sync the segment themselves, so a cut loses
    none of them. (Before, a round under way blocked every rescue until it ended.)"""
    directory = os.path.join(lazyfs.mount, "journal")
    os.makedirs(directory, mode=0o700)
    writer = JournalWriter(directory, 1, "normal")
    held = threading.Event()
    do_round = writer._do_round

    def round_held_on_the_syncer_thread(*args: Any) -> None:
        if threading.current_thread() is writer._syncer:
            held.wait(30)
        do_round(*args)

    writer._do_round = round_held_on_the_syncer_thread  # type: ignore[method-assign]
    try:
        payloads = [b'{"n": %d}' % n for n in range(40)]
        writer.append("event", payloads[0], time.time())
        deadline = time.monotonic() + 10
        while not writer._in_round:  # the syncer took the first record, and is held
            assert time.monotonic() < deadline, "the syncer did not start its round"
            time.sleep(0.01)
        for payload in payloads[1:-1]:
            writer.append("event", payload, time.time())
            time.sleep(0.01)
        time.sleep(0.2)  # the records after the held round wait past the rescue deadline
        writer.append("event", payloads[-1], time.time())  # ... and this append syncs them all
        assert writer.rescues >= 1 and writer.syncs >= 1 and writer._in_round
        lazyfs.clear_cache()  # the power cut, with the syncer's round still held
        assert records_in(directory) == payloads
    finally:
        held.set()
        writer.close()


def test_a_write_the_file_system_holds_is_reported_while_it_is_held(lazyfs: LazyFS, caplog: Any) -> None:
    """While a write() is held, nothing can make the records written before it durable (on FUSE not even
    another sync), so a power cut then may take more than the window. The stall is counted and logged while
    it lasts (a cut in the middle of it leaves that trace; the power-cut benchmark reads it), and again
    when it returns."""
    directory = os.path.join(lazyfs.mount, "journal")
    os.makedirs(directory, mode=0o700)
    writer = JournalWriter(directory, 1, "normal")
    try:
        synced = threading.Event()
        writer.on_synced(writer.append("event", b'{"n": 0}', time.time()), lambda ok: synced.set())
        assert synced.wait(10)  # the syncer is idle now: the only call the stall holds is the write below

        def stall_logs() -> List[str]:
            return [r.getMessage() for r in caplog.records if "journal write" in r.getMessage()]

        with caplog.at_level(logging.WARNING, logger="moesiftornado_durable"):
            calling = threading.Event()
            appending = threading.Thread(target=lambda: (calling.set(), writer.append("event", b'{"n": 1}', 0.0)))
            with lazyfs.stalled():
                appending.start()
                assert calling.wait(10)
                deadline = time.monotonic() + 10
                while not stall_logs():  # reported while the file system still holds it
                    assert time.monotonic() < deadline, "the held write was not reported"
                    time.sleep(0.02)
                assert appending.is_alive() and writer.stalls == 1
                assert f"pid {os.getpid()}" in stall_logs()[0] and "has held a journal write" in stall_logs()[0]
            appending.join(10)
            deadline = time.monotonic() + 10
            while len(stall_logs()) < 2:
                assert time.monotonic() < deadline, "the held write's return was not reported"
                time.sleep(0.02)
        assert not appending.is_alive() and writer.stalls == 1
        assert "the held journal write returned" in stall_logs()[1]
    finally:
        writer.close()


def _load(url_port: int, prefix: str, stop: threading.Event, answered: List[Any], lock: threading.Lock) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", url_port, timeout=10)
    n = 0
    try:
        while not stop.is_set():
            name = f"{prefix}-{n}"
            n += 1
            try:
                connection.request("GET", f"/hello?n={name}")
                response = connection.getresponse()
                response.read()
            except (OSError, http.client.HTTPException):
                return  # the power went
            if response.status == 200:
                with lock:
                    answered.append((name, time.monotonic()))
    finally:
        connection.close()


def _serve_and_cut(lazyfs: LazyFS, app_processes: Callable[..., AppProcess], collector: Collector,
                   spool_dir: str, pause_before_cut: float, **options: Any) -> Set[str]:
    """Load the app from 4 clients for a moment, stop the load, wait `pause_before_cut`, cut the power, restart
    with the collector up; returns the answered requests whose events did not arrive."""
    collector.go_down()
    app = app_processes(spool_dir, collector.base_uri, **options)
    stop, lock = threading.Event(), threading.Lock()
    answered: List[Any] = []
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for client in range(4):
            pool.submit(_load, app.port, f"c{client}", stop, answered, lock)
        deadline = time.monotonic() + 10
        while len(answered) < 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        if pause_before_cut:
            stop.set()
            time.sleep(pause_before_cut)
        killed = lazyfs.cut()
        stop.set()
    assert app.process.pid in killed
    app.kill()
    assert len(answered) >= 200
    collector.come_up()
    restarted = app_processes(spool_dir, collector.base_uri, **options)
    names = {name for name, _ in answered}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        delivered = {event["request"]["uri"].rsplit("=", 1)[-1] for event in collector.events}
        if names <= delivered:
            break
        time.sleep(0.1)
    restarted.terminate()
    delivered = {event["request"]["uri"].rsplit("=", 1)[-1] for event in collector.events}
    return names - delivered


def test_audit_mode_no_answered_request_loses_its_event_to_a_power_cut(
    lazyfs: LazyFS, app_processes: Callable[..., AppProcess], collector: Collector
) -> None:
    spool_dir = os.path.join(lazyfs.mount, "spool")
    lost = _serve_and_cut(lazyfs, app_processes, collector, spool_dir, 0.0, SPOOL_SYNC="audit")
    assert not lost, f"{len(lost)} answered request(s) lost their events, e.g. {sorted(lost)[:5]}"


def test_default_mode_a_cut_loses_nothing_answered_before_the_window(
    lazyfs: LazyFS, app_processes: Callable[..., AppProcess], collector: Collector
) -> None:
    spool_dir = os.path.join(lazyfs.mount, "spool")
    # every request was answered more than the window before the cut; a second lets the shipper spool them and
    # the writer delete its spooled segment, the step that must wait until the spool's commit is on disk
    lost = _serve_and_cut(lazyfs, app_processes, collector, spool_dir, WINDOW + 1.2)
    assert not lost, f"{len(lost)} answered request(s) lost their events, e.g. {sorted(lost)[:5]}"
