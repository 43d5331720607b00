"""SPOOL_DIR as a whole: one application per directory, a directory no one else can write, and files
opened without following planted links, created 0600."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from typing import Any, Dict, Iterator, List

import pytest
import requests
import tornado.web
from conftest import serve, wait_until

from moesiftornado_durable import ConfigError, MoesifMiddleware, locks
from moesiftornado_durable import shipper as shipper_module
from moesiftornado_durable.channel import SOCKET, ChannelClient
from moesiftornado_durable.config import Config
from moesiftornado_durable.shipper import Shipper
from moesiftornado_durable.spool import Spool
from moesiftornado_durable.spooldir import IDENTITY_FILE, claim
from moesiftornado_durable.testing import Collector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ID_A, ID_B = "application-id-of-A-1111", "application-id-of-B-2222"
NOBODY = 65534


class Hello(tornado.web.RequestHandler):
    def get(self) -> None:
        self.write("hello")


def options(spool_dir: str, application_id: str, collector: Collector, **more: Any) -> Dict[str, Any]:
    config: Dict[str, Any] = {"APPLICATION_ID": application_id, "SPOOL_DIR": spool_dir, "BASE_URI": collector.base_uri,
                              "FLUSH_INTERVAL": 0.05, "SEND_TIMEOUT": 2.0, "RETRY_MAX_WAIT": 0.2}
    config.update(more)
    return config


def get(middleware: MoesifMiddleware, path: str, count: int) -> None:
    app = middleware.attach(tornado.web.Application([(r"/.*", Hello)], log_function=middleware.log_event))
    with serve(app) as url:
        for n in range(count):
            assert requests.get(f"{url}{path}-{n}", timeout=5).status_code == 200


def uris(collector: Collector) -> List[str]:
    return sorted(event["request"]["uri"].rsplit("/", 1)[1] for event in collector.events)


@pytest.fixture
def two_collectors() -> Iterator[Any]:
    with Collector(application_id=ID_A) as a, Collector(application_id=ID_B) as b:
        yield a, b


def cli(*args: str, application_id: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The command line, stopped by PID if it still runs after `timeout` (a shipper that was not refused)."""
    process = subprocess.Popen([sys.executable, "-m", "moesiftornado_durable", *args], cwd=REPO, text=True,
                               env=dict(os.environ, MOESIF_APPLICATION_ID=application_id),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()
        out, err = process.communicate(timeout=30)
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


# -- item 4: one application per SPOOL_DIR -------------------------------------------------------------


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_a_second_application_on_a_spool_dir_is_refused_and_no_event_crosses(
    two_collectors: Any, spool_dir: str, shipper: str
) -> None:
    collector_a, collector_b = two_collectors
    a = MoesifMiddleware(options(spool_dir, ID_A, collector_a, SHIPPER=shipper))
    try:
        get(a, "/a", 20)
        with pytest.raises(ConfigError) as refused:
            MoesifMiddleware(options(spool_dir, ID_B, collector_b, SHIPPER=shipper))
        message = str(refused.value)
        assert "SPOOL_DIR" in message and os.path.realpath(spool_dir) in message
        assert collector_a.base_uri in message and collector_b.base_uri in message
        assert ID_A not in message and ID_B not in message  # the ids are secrets
        assert a.flush(15)
    finally:
        a.close(5)
    assert uris(collector_a) == sorted(f"a-{n}" for n in range(20))
    assert collector_b.events == [] and collector_b.requests == []


def test_the_ship_and_replay_commands_refuse_another_applications_backlog(
    two_collectors: Any, spool_dir: str
) -> None:
    """The reported case: A's events wait in SPOOL_DIR (A's collector is down); a shipper started with B's id
    and URI sent them to B's account. Now it is refused, and A's own replay delivers them to A."""
    collector_a, collector_b = two_collectors
    collector_a.go_down()
    a = MoesifMiddleware(options(spool_dir, ID_A, collector_a))
    get(a, "/a", 20)
    a.close(1)
    shipped = cli("ship", "--spool-dir", spool_dir, "--base-uri", collector_b.base_uri, application_id=ID_B)
    assert shipped.returncode == 2, shipped.stderr
    assert "belongs to another application" in shipped.stderr and collector_b.base_uri in shipped.stderr
    replayed = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector_b.base_uri, application_id=ID_B)
    assert replayed.returncode == 2 and "belongs to another application" in replayed.stderr
    assert collector_b.requests == []
    collector_a.come_up()
    own = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector_a.base_uri, application_id=ID_A)
    assert own.returncode == 0, own.stderr
    assert uris(collector_a) == sorted(f"a-{n}" for n in range(20))


def test_a_shipper_process_handed_another_applications_settings_refuses(two_collectors: Any, spool_dir: str) -> None:
    """The shipper process checks the settings it gets over its pipe again, whoever started it."""
    collector_a, collector_b = two_collectors
    collector_a.go_down()
    a = MoesifMiddleware(options(spool_dir, ID_A, collector_a, SHIPPER="thread"))
    get(a, "/a", 3)
    a.close(0.5)
    handed = {"options": options(spool_dir, ID_B, collector_b), "parent": os.getpid()}
    process = subprocess.Popen([sys.executable, "-c", shipper_module._BOOTSTRAP], cwd=REPO, text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = process.communicate(json.dumps(handed), timeout=20)
    except subprocess.TimeoutExpired:  # it did not refuse: it is shipping A's events to B
        process.terminate()
        out, err = process.communicate(timeout=30)
    assert collector_b.requests == []
    assert process.returncode == shipper_module.EXIT_REFUSED, err
    assert "belongs to another application" in err and ID_A not in err and ID_B not in err


def test_the_same_id_with_another_base_uri_is_refused(two_collectors: Any, spool_dir: str) -> None:
    collector_a, collector_b = two_collectors
    MoesifMiddleware(options(spool_dir, ID_A, collector_a, SHIPPER="thread")).close(2)
    with pytest.raises(ConfigError, match="its BASE_URI differs"):
        MoesifMiddleware(options(spool_dir, ID_A, collector_b, SHIPPER="thread"))
    again = MoesifMiddleware(options(spool_dir, ID_A, collector_a, SHIPPER="thread"))  # its own settings: fine
    again.close(2)


def test_the_identity_file_is_private_and_never_holds_the_id(collector: Collector, spool_dir: str) -> None:
    """A directory from before the identity file (records waiting, no directory.json) is adopted by the
    first application to start, which then delivers its backlog."""
    os.makedirs(spool_dir, mode=0o700)
    old = Spool(locks.spool_path(spool_dir, 0))
    old.put({"transaction_id": "from-before", "request": {"uri": "http://x/old", "verb": "GET", "time": "2026-01-01T"
             "00:00:00.000000"}, "response": {"status": 200, "time": "2026-01-01T00:00:00.100000"}}, "event")
    old.close()
    middleware = MoesifMiddleware(options(spool_dir, "test-app-id", collector))
    try:
        assert middleware.flush(15)
    finally:
        middleware.close(5)
    assert collector.transaction_ids() == ["from-before"]
    path = os.path.join(spool_dir, IDENTITY_FILE)
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    with open(path, "rb") as f:
        raw = f.read()
    assert b"test-app-id" not in raw and json.loads(raw)["base_uri"] == collector.base_uri


def test_racing_applications_claim_a_directory_once(tmp_path: Any) -> None:
    """Eight applications claiming one new directory at once: exactly one gets it, the others are refused."""
    directory = str(tmp_path)
    start = threading.Barrier(8)
    outcomes: List[str] = []

    def contend(n: int) -> None:
        start.wait(10)
        try:
            claim(directory, f"id-{n}", "http://127.0.0.1:9")
            outcomes.append("claimed")
        except ConfigError:
            outcomes.append("refused")

    threads = [threading.Thread(target=contend, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert sorted(outcomes) == ["claimed"] + ["refused"] * 7
    assert [name for name in os.listdir(directory) if name != IDENTITY_FILE] == []  # no temporary file left


def test_a_damaged_identity_file_is_a_clear_error(collector: Collector, spool_dir: str) -> None:
    os.makedirs(spool_dir, mode=0o700)
    with open(os.path.join(spool_dir, IDENTITY_FILE), "w") as f:
        f.write("{not json")
    with pytest.raises(ConfigError, match="directory.json.*damaged"):
        MoesifMiddleware(options(spool_dir, ID_A, collector, SHIPPER="thread"))


# -- item 7: the directory, and files opened without following links ---------------------------------


@pytest.fixture
def victim(tmp_path: Any) -> Iterator[str]:
    """A file of the app's user outside SPOOL_DIR that a planted link points at; it must never change."""
    path = str(tmp_path / "victim.txt")
    with open(path, "w") as f:
        f.write("precious")
    os.utime(path, (1_000_000, 1_000_000))
    yield path
    with open(path) as f:
        assert f.read() == "precious"
    assert os.stat(path).st_mtime == 1_000_000


@pytest.mark.parametrize("name", ["intake-0.lock", "shipper.lock", "spool-0.lock", "shipper.db", "shipper.db-wal",
                                  "shipper-stats.json", "flush-request", SOCKET, IDENTITY_FILE])
def test_a_link_planted_in_spool_dir_is_refused_at_start(
    collector: Collector, spool_dir: str, victim: str, name: str
) -> None:
    os.makedirs(spool_dir, mode=0o700)
    os.symlink(victim, os.path.join(spool_dir, name))
    for shipper in ("process", "thread"):
        with pytest.raises(ConfigError, match=f"symbolic link at '{name}'"):
            MoesifMiddleware(options(spool_dir, ID_A, collector, SHIPPER=shipper))


@pytest.mark.parametrize("slot, prefix", [(0, "intake"), (locks.SHIPPER_SLOT, "spool"), (3, "spool")])
@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_lock_file_planted_after_start_is_not_written_through(
    tmp_path: Any, victim: str, slot: int, prefix: str, link: str
) -> None:
    """A link planted after the start-up check (a race): taking the lock fails, the victim is untouched."""
    directory = str(tmp_path / "spool")
    os.makedirs(directory, mode=0o700)
    planted = locks.lock_path(directory, slot, prefix)
    (os.symlink if link == "symbolic" else os.link)(victim, planted)
    with pytest.raises(OSError):
        locks.try_lock(directory, slot, prefix)
    if link == "symbolic":  # a look at a lock's owner only reads: a hard link is harmless there
        with pytest.raises(OSError):
            locks.owner(directory, slot, prefix)


def test_a_spool_file_others_could_read_is_made_private_when_opened(tmp_path: Any) -> None:
    """Files an older version (or a tool) left readable by others become 0600 when the library opens them."""
    with open(tmp_path / "shipper.lock", "w"):
        pass
    os.chmod(tmp_path / "shipper.lock", 0o644)
    lock = locks.try_lock(str(tmp_path), locks.SHIPPER_SLOT)
    assert lock is not None
    lock.release()
    assert stat.S_IMODE(os.stat(tmp_path / "shipper.lock").st_mode) == 0o600


def test_an_app_never_connects_to_a_channel_through_a_link(tmp_path: Any) -> None:
    """A link planted at shipper.sock, to a socket someone else listens on: the app does not connect."""
    directory = str(tmp_path / "spool")
    os.makedirs(directory, mode=0o700)
    elsewhere = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    elsewhere.bind(str(tmp_path / "theirs.sock"))
    elsewhere.listen(1)
    os.symlink(tmp_path / "theirs.sock", os.path.join(directory, SOCKET))
    client = ChannelClient(directory, lambda figures: None)
    try:
        assert client._connect() is None
        elsewhere.setblocking(False)
        with pytest.raises(BlockingIOError):
            elsewhere.accept()  # no connection ever arrived
    finally:
        elsewhere.close()


def test_the_channel_socket_is_0600_and_replaces_a_planted_link(
    collector: Collector, spool_dir: str, victim: str
) -> None:
    """Links at shipper.sock and at the files older builds used (stats file, flush request, their temporary
    names): the shipper removes the old names and binds its socket in place of the link, 0600, never
    writing through a link; an app connects and gets the shipper's figures."""
    config = Config.from_dict(options(spool_dir, ID_A, collector))
    for name in (SOCKET, "shipper-stats.json", "flush-request", ".shipper-stats-k1ll3d.tmp"):
        os.symlink(victim, os.path.join(config.spool_dir, name))
    shipper = Shipper(config)
    arrived = threading.Event()
    client = ChannelClient(config.spool_dir, lambda figures: arrived.set())
    try:
        shipper.start()
        path = os.path.join(config.spool_dir, SOCKET)
        assert stat.S_ISSOCK(os.lstat(path).st_mode) and stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        assert not {"shipper-stats.json", "flush-request", ".shipper-stats-k1ll3d.tmp"} & set(os.listdir(spool_dir))
        client.start()
        assert arrived.wait(10) and client.figures["pid"] == os.getpid()
    finally:
        client.close()
        shipper.close(2)
    assert SOCKET not in os.listdir(config.spool_dir)  # a shipper that stopped leaves no socket behind


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_every_file_in_spool_dir_is_0600(collector: Collector, spool_dir: str, shipper: str) -> None:
    """Walk SPOOL_DIR while the app runs (the SQLite -wal and -shm files exist then) and after it stopped."""
    middleware = MoesifMiddleware(options(spool_dir, ID_A, collector, SHIPPER=shipper))

    def modes() -> Dict[str, str]:
        return {name: oct(stat.S_IMODE(os.lstat(os.path.join(spool_dir, name)).st_mode))
                for name in os.listdir(spool_dir)}

    try:
        get(middleware, "/a", 5)
        assert middleware.flush(15)
        assert wait_until(lambda: SOCKET in os.listdir(spool_dir), timeout=10)
        running = modes()
        assert stat.S_ISSOCK(os.lstat(os.path.join(spool_dir, SOCKET)).st_mode)  # the channel, 0600 as the rest
    finally:
        middleware.close(5)
    assert stat.S_IMODE(os.stat(spool_dir).st_mode) == 0o700
    assert any(name.endswith("-wal") for name in running) and any(name.endswith("-shm") for name in running)
    for seen in (running, modes()):
        assert {name: mode for name, mode in seen.items() if mode != "0o600"} == {}
        assert all(stat.S_ISREG(os.lstat(os.path.join(spool_dir, name)).st_mode) for name in modes() if name != SOCKET)


@pytest.mark.parametrize("mode, who", [(0o777, "its group and others"), (0o770, "its group"), (0o703, "others")])
def test_a_spool_dir_others_can_write_is_refused(collector: Collector, spool_dir: str, mode: int, who: str) -> None:
    os.makedirs(spool_dir)
    os.chmod(spool_dir, mode)
    with pytest.raises(ConfigError, match=f"SPOOL_DIR: .* is writable by {who} .*chmod 700") as refused:
        MoesifMiddleware(options(spool_dir, ID_A, collector))
    assert spool_dir in str(refused.value)
    assert os.listdir(spool_dir) == []  # refused before anything was written
    result = cli("replay", "--spool-dir", spool_dir, "--base-uri", collector.base_uri, application_id=ID_A)
    assert result.returncode == 2 and "is writable by" in result.stderr


def test_a_spool_dir_owned_by_another_user_is_refused(collector: Collector, spool_dir: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root, to give the directory to another user")
    os.makedirs(spool_dir, mode=0o700)
    os.chown(spool_dir, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"SPOOL_DIR: .* is owned by uid {NOBODY}, not by this process's user"):
        MoesifMiddleware(options(spool_dir, ID_A, collector))
    assert os.listdir(spool_dir) == []


def test_a_spool_dir_reached_through_a_link_is_used_where_it_resolves(
    collector: Collector, tmp_path: Any
) -> None:
    """A link to the directory (say onto another disk) is the administrator's choice: it is followed once,
    and the real directory is checked and used."""
    real = tmp_path / "disk" / "spool"
    os.makedirs(real, mode=0o700)
    os.symlink(real, tmp_path / "spool")
    middleware = MoesifMiddleware(options(str(tmp_path / "spool"), ID_A, collector, SHIPPER="thread"))
    try:
        assert middleware.config.spool_dir == str(real)
        get(middleware, "/a", 2)
        assert middleware.flush(15)
    finally:
        middleware.close(5)
    assert len(collector.transaction_ids()) == 2 and IDENTITY_FILE in os.listdir(real)
