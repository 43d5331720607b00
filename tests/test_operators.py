"""What operators see: the shipper named in `ps`, and CLI commands that find the default SPOOL_DIR."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any, Callable, Dict

from conftest import shipper_pid, wait_until
from test_cli import APP_ID, REPO, assert_once, cli, dead_process_spool

from moesiftornado_durable import MoesifMiddleware, locks
from moesiftornado_durable.config import default_spool_dir
from moesiftornado_durable.spool import Spool
from moesiftornado_durable.testing import Collector


def _proc(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


# -- the shipper's name ----------------------------------------------------------------------------------


def test_the_shipper_a_middleware_starts_shows_its_spool_dir_in_ps(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    middleware = make_middleware(APPLICATION_ID="a-secret-application-id")
    middleware.update_user({"user_id": "u-1"})
    assert middleware.flush(20)
    assert [user["user_id"] for user in collector.users] == ["u-1"]
    pid = shipper_pid(spool_dir)
    assert wait_until(lambda: _proc(pid, "cmdline") == f"moesiftornado-durable shipper {spool_dir}", timeout=10), \
        _proc(pid, "cmdline")
    assert "a-secret-application-id" not in _proc(pid, "cmdline")
    assert _proc(pid, "comm").startswith("moesif")


def test_without_setproctitle_the_shipper_gets_a_short_name(collector: Collector, spool_dir: str) -> None:
    """A real shipper started as the middleware starts one, in an interpreter where setproctitle cannot be
    imported: `prctl(PR_SET_NAME)` names it for `ps -o comm`, `top` and `pkill`."""
    code = ("import sys; sys.modules['setproctitle'] = None; "
            "from moesiftornado_durable.shipper import main; sys.exit(main())")
    options = {"APPLICATION_ID": APP_ID, "SPOOL_DIR": spool_dir, "BASE_URI": collector.base_uri}
    shipper = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, text=True)
    try:
        assert shipper.stdin is not None
        shipper.stdin.write(json.dumps({"options": options, "parent": os.getpid()}))
        shipper.stdin.close()
        assert shipper_pid(spool_dir) == shipper.pid
        assert wait_until(lambda: _proc(shipper.pid, "comm") == "moesif-shipper", timeout=10), \
            _proc(shipper.pid, "comm")
    finally:
        shipper.terminate()
        assert shipper.wait(20) == 0


def test_the_ship_command_is_named_and_hides_an_application_id_given_in_argv(
    collector: Collector, spool_dir: str
) -> None:
    os.makedirs(spool_dir, exist_ok=True)
    service = subprocess.Popen([sys.executable, "-m", "moesiftornado_durable", "ship", "--spool-dir", spool_dir,
                                "--application-id", APP_ID, "--base-uri", collector.base_uri], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert shipper_pid(spool_dir) == service.pid
        cmdline = _proc(service.pid, "cmdline")
        assert cmdline == f"moesiftornado-durable shipper {os.path.realpath(spool_dir)}"
        assert APP_ID not in cmdline
    finally:
        service.terminate()
        assert service.wait(20) == 0


# -- the CLI finds the default SPOOL_DIR -------------------------------------------------------------------


def test_commands_without_spool_dir_use_the_middlewares_default_directory(
    collector: Collector, tmp_path: Any, monkeypatch: Any
) -> None:
    """An app that set no SPOOL_DIR spools under $XDG_STATE_HOME; status, dead-letter and replay find it
    from MOESIF_APPLICATION_ID alone, say which directory they used, and replay delivers its backlog."""
    state: Dict[str, str] = {"XDG_STATE_HOME": str(tmp_path / "state")}
    monkeypatch.setenv("XDG_STATE_HOME", state["XDG_STATE_HOME"])
    directory = default_spool_dir(APP_ID)
    middleware = MoesifMiddleware({"APPLICATION_ID": APP_ID, "BASE_URI": collector.base_uri})  # no SPOOL_DIR
    assert middleware.config.spool_dir == directory
    middleware.close(5)
    dead_process_spool(directory, 40)  # a killed process left 40 events behind
    spool = Spool(locks.spool_path(directory, 7))
    spool.put({"transaction_id": "dead-1"})
    spool.dead_letter([spool.claim(1)[0].id], 400, "HTTP 400: rejected by the collector")
    spool.close()
    used = f"using SPOOL_DIR {directory}"

    status = cli("status", "--json", env=state)
    assert status.returncode == 0, status.stderr
    assert used in status.stderr
    assert json.loads(status.stdout)["total"]["ready"] == 40 - 3 and json.loads(status.stdout)["spool_dir"] == directory

    dead = cli("dead-letter", "list", env=state)
    assert dead.returncode == 0, dead.stderr
    assert used in dead.stderr and "1 dead-lettered record(s)" in dead.stdout and "dead-1" in dead.stdout

    replay = cli("replay", "--base-uri", collector.base_uri, env=state)
    assert replay.returncode == 0, replay.stderr
    assert used in replay.stderr and "sent 40 record(s)" in replay.stdout
    assert_once(collector, 40)


def test_without_spool_dir_or_application_id_the_command_says_what_to_set(tmp_path: Any) -> None:
    environment = {key: value for key, value in os.environ.items() if key != "MOESIF_APPLICATION_ID"}
    result = subprocess.run([sys.executable, "-m", "moesiftornado_durable", "status"], cwd=REPO, env=environment,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == textwrap.dedent("""\
        moesiftornado-durable: no --spool-dir: pass one, or set MOESIF_APPLICATION_ID to use the default directory \
of that application""")
