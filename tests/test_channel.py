"""The one channel between app processes and their shipper (channel.py): flush answered on an event,
figures pushed, reconnection across shipper restarts, and the in-process host's election."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any, Callable, Dict, List

import pytest
from conftest import wait_until

from moesiftornado_durable import MoesifMiddleware, locks
from moesiftornado_durable.channel import ChannelClient, ChannelServer
from moesiftornado_durable.spool import Spool
from moesiftornado_durable.testing import Collector

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# An app process of its own on the same SPOOL_DIR: journals `count` user updates, flushes, says what it saw.
OTHER_APP = textwrap.dedent("""
    import json, sys
    from moesiftornado_durable import MoesifMiddleware
    options, count, name = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    middleware = MoesifMiddleware(options)
    runtime = middleware._runtime_here()
    print("started", flush=True)
    for n in range(count):
        middleware.update_user({"user_id": f"{name}-{n}"})
    flushed = middleware.flush(30)
    print(json.dumps({"flushed": flushed, "sent": middleware.stats()["sent"],
                      "own_shipper": getattr(runtime.host, "starts", 0) + getattr(runtime.host, "ships", 0)}),
          flush=True)
    sys.stdin.readline()  # stay alive (and the shipper with us, if it is ours) until told
    middleware.close(5)
""")


def other_app(options: Dict[str, Any], count: int, name: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    import json

    child = subprocess.Popen([sys.executable, "-c", OTHER_APP, json.dumps(options), str(count), name],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "started"
    return child


def finish(child: subprocess.Popen) -> None:
    """Let the other app close, and wait for it (killed by its PID if it does not end)."""
    try:
        assert child.stdin is not None
        child.stdin.write("\n")
        child.stdin.close()
        child.wait(20)
    except (OSError, subprocess.TimeoutExpired):
        child.kill()
        child.wait(5)
    finally:
        if child.stdout is not None:
            child.stdout.close()


def options_for(collector: Collector, spool_dir: str, **more: Any) -> Dict[str, Any]:
    options: Dict[str, Any] = {"APPLICATION_ID": "test-app-id", "SPOOL_DIR": spool_dir, "BASE_URI": collector.base_uri,
                               "FLUSH_INTERVAL": 0.05, "SEND_TIMEOUT": 2.0, "RETRY_MAX_WAIT": 0.2}
    options.update(more)
    return options


class CallCounter:
    """Counts, on the calling thread, the calls to `time.sleep` and to the `wait` of threading's Event and
    Condition: how a blocking call waits (a sleep loop, or one wait on an event)."""

    def __init__(self) -> None:
        self.sleeps = 0
        self.waits = 0

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event == "c_call" and arg is time.sleep:
            self.sleeps += 1
        elif event == "call" and frame.f_code.co_name == "wait" and frame.f_code.co_filename == threading.__file__:
            self.waits += 1


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_flush_waits_on_one_event_and_returns_once_the_collector_acked(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, shipper: str
) -> None:
    """The collector holds the batch 1.5 s: a flush that polled (every 50 ms, as before) would sleep some 30
    times. This one sleeps never, waits on one event (`Event.wait` calls `Condition.wait` once), and when it
    returns the collector has the records."""
    middleware = make_middleware(SHIPPER=shipper, BATCH_SIZE=100, FLUSH_INTERVAL=30)
    runtime: Any = middleware._runtime_here()
    assert wait_until(lambda: runtime.channel.connected, timeout=20)
    collector.stall(1.5)
    for n in range(10):
        middleware.update_user({"user_id": f"u-{n}"})
    counter = CallCounter()
    sys.setprofile(counter)
    try:
        flushed = middleware.flush(20)
    finally:
        sys.setprofile(None)
    assert flushed
    assert sorted(u["user_id"] for u in collector.users) == sorted(f"u-{n}" for n in range(10))
    assert counter.sleeps == 0 and counter.waits <= 2  # Event.wait → Condition.wait, once
    assert middleware.stats()["sent"] == 10  # the figures arrived before the answer


def test_flush_across_two_app_processes_sharing_one_shipper(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    """This process's supervisor starts the shipper; another app process finds it running, starts none,
    and its flush is answered by that shipper over the channel, as is ours."""
    middleware = make_middleware(BATCH_SIZE=100, FLUSH_INTERVAL=30)
    runtime: Any = middleware._runtime_here()
    assert wait_until(lambda: runtime.channel.connected, timeout=20)
    child = other_app(options_for(collector, spool_dir, BATCH_SIZE=100, FLUSH_INTERVAL=30), 25, "other")
    try:
        import json

        assert child.stdout is not None
        said = json.loads(child.stdout.readline())
        assert said["flushed"] is True and said["own_shipper"] == 0  # no shipper of its own
        assert sum(u["user_id"].startswith("other-") for u in collector.users) == 25  # delivered by then
        assert said["sent"] >= 25  # its stats came over the channel too
        for n in range(15):
            middleware.update_user({"user_id": f"here-{n}"})
        assert middleware.flush(20)
        assert sum(u["user_id"].startswith("here-") for u in collector.users) == 15
        assert runtime.host.starts == 1
    finally:
        finish(child)


@pytest.mark.parametrize("comes_back", [True, False])
def test_a_flush_outlives_a_shipper_restart_or_ends_at_its_deadline(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, comes_back: bool
) -> None:
    """The shipper is SIGKILLed while a flush waits: the client reconnects to the next shipper and asks
    again; the flush completes once the collector is back, or returns False at its deadline. Never hangs."""
    middleware = make_middleware()
    runtime: Any = middleware._runtime_here()
    assert wait_until(lambda: runtime.channel.connected and runtime.host._child is not None, timeout=20)
    connects = runtime.channel.connects
    collector.go_down()
    for n in range(10):
        middleware.update_user({"user_id": f"u-{n}"})
    result: List[bool] = []
    waiter = threading.Thread(target=lambda: result.append(middleware.flush(20 if comes_back else 4)))
    waiter.start()
    first = runtime.host._child
    assert wait_until(lambda: runtime.channel.figures.get("failing") is True, timeout=10)  # the flush waits
    os.kill(first.pid, signal.SIGKILL)
    assert wait_until(lambda: runtime.channel.connects > connects and runtime.host._child is not None
                      and runtime.host._child.pid != first.pid, timeout=15)
    if comes_back:
        collector.come_up()
    waiter.join(30)
    assert not waiter.is_alive()
    assert result == [comes_back]
    if comes_back:
        assert sorted(u["user_id"] for u in collector.users) == sorted(f"u-{n}" for n in range(10))


def test_the_shipper_pushes_its_figures_to_every_client_as_they_change(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    """A client that only listens (no flush) gets the delivery counters and the failure as they happen."""
    middleware = make_middleware()
    seen: List[Dict[str, Any]] = []
    listener = ChannelClient(middleware.config.spool_dir, seen.append)
    listener.start()
    try:
        assert wait_until(lambda: listener.connected, timeout=20)
        for n in range(5):
            middleware.update_user({"user_id": f"u-{n}"})
        assert wait_until(lambda: (listener.figures.get("counters") or {}).get("sent") == 5, timeout=20)
        collector.go_down()
        middleware.update_user({"user_id": "refused"})
        assert wait_until(lambda: listener.figures.get("failing") is True, timeout=20)
        assert "connection failed" in listener.figures["last_error"]
        # the middleware's own channel client gets the same push, in its own time (CI once read it first)
        assert wait_until(lambda: middleware.stats()["last_error"] == listener.figures["last_error"], timeout=20)
        assert all(figures["pid"] == seen[-1]["pid"] for figures in seen)  # one shipper told them all
    finally:
        listener.close()


def test_figures_go_out_at_most_once_per_interval_the_last_change_when_it_ends_and_at_once_before_a_flush(
    tmp_path: Any
) -> None:
    """Each figures message wakes every app's channel thread (which takes the GIL from its IOLoop), and the
    counters change on every delivered batch: changes within `figures_interval` are held back, the latest
    goes out when the interval ends, and a flush's answer is preceded by the current figures at once. The
    server's clock is the test's: it stands still until the test moves it, and each of its readings is a
    look the server took."""
    directory = str(tmp_path)
    os.chmod(directory, 0o700)
    now = [1000.0]
    looked = threading.Event()

    def clock() -> float:
        looked.set()
        return now[0]

    current: Dict[str, Any] = {"n": 0}
    server = ChannelServer(directory, lambda: dict(current), lambda request: True, lambda: None,
                           figures_interval=0.1, clock=clock)
    server.start()
    seen: List[int] = []
    client = ChannelClient(directory, lambda figures: seen.append(figures["n"]))
    client.start()
    try:
        assert wait_until(lambda: client.connected and seen, timeout=20)
        for n in range(1, 6):  # five changes, each looked at, the clock within the interval
            current["n"] = n
            looked.clear()
            server.poke()
            assert looked.wait(20)
        looked.clear()
        assert looked.wait(20)  # a look after the last change's: its messages, if any, are on the stream
        now[0] += 0.1
        server.poke()
        assert wait_until(lambda: seen[-1] == 5, timeout=20)
        assert [n for i, n in enumerate(seen) if i == 0 or seen[i - 1] != n] == [0, 5]  # nothing in between
        current["n"] = 6  # within the new interval: only a flush's answer sends it now
        assert client.flush({}, timeout=20)
        assert client.figures["n"] == 6
    finally:
        client.close()
        server.close()


def test_the_in_process_host_does_not_ship_while_another_process_does_and_takes_over_after(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str
) -> None:
    """SHIPPER 'thread' next to an app whose shipper process already ships the directory: our host loses
    the election and ships nothing, our flush is answered by the other shipper; once that one is gone,
    ours takes the lock and ships."""
    child = other_app(options_for(collector, spool_dir), 5, "other")  # its supervisor starts a shipper
    try:
        import json

        assert child.stdout is not None
        assert json.loads(child.stdout.readline())["flushed"] is True
        other_shipper = locks.owner(spool_dir, locks.SHIPPER_SLOT)
        assert other_shipper[1] and other_shipper[0] != os.getpid()
        middleware = make_middleware(SHIPPER="thread")
        runtime: Any = middleware._runtime_here()
        for n in range(5):
            middleware.update_user({"user_id": f"here-{n}"})
        assert middleware.flush(20)
        assert sum(u["user_id"].startswith("here-") for u in collector.users) == 5
        assert runtime.host.ships == 0 and locks.owner(spool_dir, locks.SHIPPER_SLOT) == other_shipper
    finally:
        finish(child)  # its shipper stops with it
    assert wait_until(lambda: runtime.host.ships == 1, timeout=20)
    assert locks.owner(spool_dir, locks.SHIPPER_SLOT) == (os.getpid(), True)
    for n in range(5):
        middleware.update_user({"user_id": f"after-{n}"})
    assert middleware.flush(20)
    assert sum(u["user_id"].startswith("after-") for u in collector.users) == 5


@pytest.mark.parametrize("shipper", ["process", "thread"])
def test_a_spool_file_an_older_thread_mode_left_is_drained_and_removed(
    make_middleware: Callable[..., MoesifMiddleware], collector: Collector, spool_dir: str, shipper: str
) -> None:
    """Older builds' SHIPPER 'thread' kept a spool-N.db per app process. After an upgrade nothing writes
    there any more: whichever host runs the shipper adopts the file, delivers it, and deletes it."""
    left = Spool(locks.spool_path(spool_dir, 0))
    for n in range(7):
        left.put({"user_id": f"left-{n}"}, "user")
    left.close()
    middleware = make_middleware(SHIPPER=shipper)
    assert middleware.flush(20)  # a flush waits for adopted orphans too
    assert sorted(u["user_id"] for u in collector.users) == [f"left-{n}" for n in range(7)]
    assert wait_until(lambda: not os.path.exists(locks.spool_path(spool_dir, 0)), timeout=20)
