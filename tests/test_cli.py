"""The command line: `status` on a real spool, `collector` as a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from typing import Any

import requests

from moesiftornado_durable.cli import main
from moesiftornado_durable.spool import Spool

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_backlog(directory: str) -> Spool:
    """7 events: 5 ready, 1 in flight, 1 dead-lettered; the spool stays open like a live app's."""
    spool = Spool(directory)
    for n in range(7):
        spool.put({"transaction_id": f"t-{n}"})
    claimed = spool.claim(2)
    spool.dead_letter([claimed[0].id], 400, "HTTP 400")
    return spool


def test_status_text(tmp_path: Any, capsys: Any) -> None:
    live = make_backlog(str(tmp_path))
    assert main(["status", "--spool-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "ready:        5" in out and "in flight:    1" in out and "dead letter:  1" in out
    live.close()


def test_status_json_and_read_only_next_to_a_live_spool(tmp_path: Any, capsys: Any) -> None:
    live = make_backlog(str(tmp_path))
    assert main(["status", "--spool-dir", str(tmp_path), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert (status["ready"], status["in_flight"], status["dead_letter"]) == (5, 1, 1)
    assert status["oldest_age_seconds"] >= 0 and status["bytes_on_disk"] > 0
    # status did not disturb the live spool: its in-flight row is still in flight
    assert live.stats().in_flight == 1
    live.close()


def test_status_errors_are_one_line_and_exit_1(tmp_path: Any, capsys: Any) -> None:
    assert main(["status", "--spool-dir", str(tmp_path / "missing")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no spool file" in err
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "spool.db").write_bytes(b"this is not a database" * 100)
    assert main(["status", "--spool-dir", str(tmp_path / "corrupt")]) == 1
    assert "cannot read the spool" in capsys.readouterr().err


def test_collector_command_runs_the_local_collector(tmp_path: Any) -> None:
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
