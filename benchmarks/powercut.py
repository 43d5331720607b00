"""Power-cut suite: SPOOL_DIR on LazyFS, load from several clients, power cuts at seeded random moments.

    python benchmarks/powercut.py              # 20 cuts per mode, default and audit (a few minutes)
    python benchmarks/powercut.py --quick      # the CI smoke run: 4 cuts per mode
    python benchmarks/powercut.py --cuts 30 --seed 7 --mode audit
    python benchmarks/powercut.py --mode default --cpu-load 3   # under 3 busy-looping processes (a loaded machine)

LazyFS (tests/lazyfs.py) keeps every written byte in its own cache until the file is fsynced and drops the
unsynced ones on demand. Without it (not built, not root, no /dev/fuse) the suite prints why and exits 0.

Each run (one per mode: the default options, and SPOOL_SYNC 'audit'):

- examples/app.py serves on SPOOL_DIR on a LazyFS mount, in a subprocess, loaded by CLIENTS client threads
  posting ``/echo?n=<id>`` with a JSON body (--body-bytes; events of a few KB, so journal segments rotate
  every few seconds);
- the collector (in this process) is, for each cut in turn, down (everything waits in the spool), up (the
  shipper delivers: acks delete rows, drained spools are scrubbed: VACUUM and checkpoint, spooled journal
  segments are deleted), rejecting every batch with 400 (batches split and dead-lettered); every tenth
  cut (and the last of a run of fewer than ten, so --quick has one), up while the shipper's spool, damaged
  on purpose before the start (its header zeroed), is quarantined (renamed aside for
  `salvage`; the cut comes 0.05-0.6 s after the app serves, around the rename);
- after a seeded random time the power is cut: every process with a file under the mount is frozen
  (SIGSTOP), LazyFS drops what was not synced, they are SIGKILLed; the app is started again on the
  same SPOOL_DIR, and the next cut comes;
- at the end LazyFS is unmounted, the collector is healthy, and an app instance on the disk underneath (what
  the last cut left) delivers everything (bounded wait) and stops;
- every quarantined spool file is then salvaged as an operator would (`moesiftornado_durable.spool.salvage`,
  into a spool of its own): only the records salvage really gives back count as kept, and it must give back
  every record the damaged spool held (read just before the damage).

An answered request's event is kept if it reached the collector, is in a spool's dead-letter table, or was
salvaged from a quarantined spool. A
lost one is "older" if its response was received more than WINDOW (200 ms) before the cut, else "within".
The exit status is 2 if LazyFS itself crashed (no verdict), 1 when the contract is broken: in the default
mode a lost event older than WINDOW, in audit mode any lost event; or a request logged under two
transaction ids, or a wrong response. A duplicate delivery (a resend after a cut, same transaction_id) is
allowed and counted.
"""

from __future__ import annotations

import argparse
import calendar
import contextlib
import dataclasses
import http.client
import json
import os
import random
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from typing import Any, DefaultDict, Dict, List, Optional, Set, Tuple
from urllib.parse import parse_qs, urlsplit

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from conftest import AppProcess  # noqa: E402
from lazyfs import LazyFS, unavailable  # noqa: E402

from moesiftornado_durable.journal import segments  # noqa: E402
from moesiftornado_durable.locks import SHIPPER_SLOT, slots, spool_path  # noqa: E402
from moesiftornado_durable.spool import TABLE, Spool, SpoolView, directory_stats, salvage  # noqa: E402
from moesiftornado_durable.testing import Collector  # noqa: E402

WINDOW = 0.200  # seconds: the default mode may lose the events answered this long before a cut, no older one
CLIENTS = 8
SCENARIOS = ("down", "up", "reject", "quarantine")
QUARANTINE_UPTIME = (0.05, 0.6)  # seconds after the app serves: around the shipper's quarantine of a damaged spool
MODES = {"default": {}, "audit": {"SPOOL_SYNC": "audit"}}
HOG = "import time\nend = time.monotonic() + 3600\nwhile time.monotonic() < end:\n    pass\n"  # --cpu-load, bounded
LATE_SYNC_LOGGED = re.compile(r"a journal sync made records durable (\d+) ms after .*? it started after (\d+) ms "
                              r".*? the fdatasync took (\d+) ms")  # JournalWriter's warning about a late round
STALL_LOGGED = re.compile(r"has held a journal (write|fdatasync) for (\d+) ms \(pid (\d+), since ([0-9T:.-]+)Z\)")
STALL_ENDED = re.compile(r"the held journal (write|fdatasync) returned after \d+ ms or more \(pid (\d+)\)")


@dataclasses.dataclass(frozen=True)
class Profile:
    cuts: int
    uptime: Tuple[float, float]  # seconds an app instance serves before the cut, uniform in this range
    drain_timeout: float


FULL = Profile(cuts=20, uptime=(1.5, 4.0), drain_timeout=120.0)
QUICK = Profile(cuts=4, uptime=(1.0, 2.0), drain_timeout=60.0)


@dataclasses.dataclass
class Cut:
    at: float  # time.monotonic() just before the SIGSTOPs
    scenario: str
    port: int
    started: float
    killed: List[int]
    app_pid: int


@dataclasses.dataclass
class Stall:
    """A journal write or fdatasync the file system held, as an app instance logged it (`JournalWriter`)."""
    pid: int
    call: str
    since: float  # wall clock
    longest_ms: int
    ended: bool  # its return was logged: it was not under way at the cut


@dataclasses.dataclass
class Result:
    mode: str
    answered: int = 0
    delivered: int = 0
    dead_lettered: int = 0
    lost_older: List[Tuple[str, float]] = dataclasses.field(default_factory=list)  # (n, seconds before the cut)
    lost_within: List[Tuple[str, float]] = dataclasses.field(default_factory=list)
    lost_in_stall: List[Tuple[str, float]] = dataclasses.field(default_factory=list)  # older, held by a stall
    duplicates: int = 0
    logged_twice: int = 0
    wrong: int = 0
    cuts: List[Cut] = dataclasses.field(default_factory=list)
    held_aside: Set[str] = dataclasses.field(default_factory=set)  # records the damaged spools held (read before)
    salvaged: Set[str] = dataclasses.field(default_factory=set)  # records salvage gave back from the quarantined files
    damaged: int = 0
    quarantined: int = 0
    drained: bool = False
    serving_seconds: float = 0.0
    wall: float = 0.0
    load_averages: List[float] = dataclasses.field(default_factory=list)  # the 1-minute load average at each cut
    late_logged: List[str] = dataclasses.field(default_factory=list)  # the late journal syncs the app instances logged
    stalls: List[Stall] = dataclasses.field(default_factory=list)  # the file-system stalls the app instances logged

    @property
    def failed(self) -> List[str]:
        reasons = []
        if self.quarantined < self.damaged:
            reasons.append(f"{self.damaged} spool(s) damaged, only {self.quarantined} kept aside after the cuts")
        if self.held_aside - self.salvaged:
            reasons.append(f"salvage gave back {len(self.held_aside & self.salvaged)} of the {len(self.held_aside)} "
                           f"records the damaged spools held")
        if self.lost_older:
            reasons.append(f"{len(self.lost_older)} event(s) answered more than {WINDOW * 1000:.0f} ms before a cut "
                           f"lost, e.g. {self.lost_older[:3]}")
        if self.mode == "audit" and self.lost_within + self.lost_in_stall:
            lost = self.lost_within + self.lost_in_stall
            reasons.append(f"{len(lost)} answered event(s) lost in audit mode, e.g. {lost[:3]}")
        if self.logged_twice:
            reasons.append(f"{self.logged_twice} request(s) logged under two transaction ids")
        if self.wrong:
            reasons.append(f"{self.wrong} wrong response(s)")
        if not self.drained:
            reasons.append("the last instance did not deliver everything in time")
        return reasons


class Load:
    """CLIENTS threads posting /echo?n=<id> to the port set by `target` (None pauses them); keep-alive."""

    def __init__(self, body_bytes: int) -> None:
        self._port: Optional[int] = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pad = "x" * body_bytes
        self.answered: List[Tuple[str, int, float]] = []  # (n, port, received at)
        self.wrong = 0
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True, name=f"powercut-client-{i}")
                         for i in range(CLIENTS)]
        for thread in self._threads:
            thread.start()

    def target(self, port: Optional[int]) -> None:
        self._port = port

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(15)

    def _run(self, client: int) -> None:
        connection: Optional[http.client.HTTPConnection] = None
        connected_to: Optional[int] = None
        for sequence in range(10**9):
            if self._stop.is_set():
                break
            port = self._port
            if port is None:
                if connection is not None:
                    connection.close()
                    connection = None
                self._stop.wait(0.005)
                continue
            if connection is None or connected_to != port:
                if connection is not None:
                    connection.close()
                connection, connected_to = http.client.HTTPConnection("127.0.0.1", port, timeout=10), port
            n = f"{client}-{sequence}"
            body = json.dumps({"n": n, "pad": self._pad}).encode()
            try:
                connection.request("POST", f"/echo?n={n}", body=body, headers={"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
            except (OSError, http.client.HTTPException):
                connection.close()
                connection = None
                self._stop.wait(0.01)  # the power went, or the app is starting again
                continue
            received = time.monotonic()
            with self._lock:
                if response.status == 200 and answer == body:
                    self.answered.append((n, port, received))
                else:
                    self.wrong += 1
        if connection is not None:
            connection.close()


def set_scenario(collector: Collector, scenario: str) -> None:
    collector.reset()
    collector.come_up()
    if scenario == "down":
        collector.go_down()
    elif scenario == "reject":
        collector.respond_with(400, times=None)


class LazyFSCrashed(Exception):
    """LazyFS itself died (it is a research prototype and can crash under load): no verdict on this run."""


def run_mode(mode: str, profile: Profile, seed: int, workdir: str, body_bytes: int, log: Any) -> Result:
    """The cuts on LazyFS, then the delivery of what survived by an instance on the disk underneath (the
    state after the last cut: LazyFS wrote through only what was synced), so a long drain never depends on
    LazyFS staying up."""
    result = Result(mode)
    started = time.monotonic()
    log_start = log.tell()
    rng = random.Random(f"{seed}:{mode}")
    options = MODES[mode]
    load = Load(body_bytes)
    app: Optional[AppProcess] = None
    with Collector() as collector:
        try:
            with LazyFS(os.path.join(workdir, f"lazyfs-{mode}"), log) as fs:
                spool_dir = os.path.join(fs.mount, "spool")
                for index in range(profile.cuts):
                    last = index == profile.cuts - 1
                    scenario = "quarantine" if index % 10 == 9 or (last and profile.cuts < 10) else SCENARIOS[index % 3]
                    set_scenario(collector, scenario)
                    uptime = rng.uniform(*profile.uptime)
                    if scenario == "quarantine" and os.path.exists(spool_path(spool_dir, SHIPPER_SLOT)):
                        result.held_aside |= _damage_spool(spool_dir)
                        result.damaged += 1
                        uptime = rng.uniform(*QUARANTINE_UPTIME)
                    app = AppProcess(spool_dir, collector.base_uri, workdir, output=log, **options)
                    serving_from = time.monotonic()
                    port = app.port
                    load.target(port)
                    time.sleep(uptime)
                    if not fs.alive():
                        raise LazyFSCrashed(f"LazyFS died during the load before cut {index + 1}")
                    at = time.monotonic()
                    killed = fs.cut(also=[app.process.pid])
                    load.target(None)
                    result.serving_seconds += at - serving_from
                    app.kill()  # reaps it (already SIGKILLed)
                    result.cuts.append(Cut(at, scenario, port, serving_from, killed, app.process.pid))
                    app = None
                    result.load_averages.append(os.getloadavg()[0])
                    print(f"  {mode}: cut {index + 1}/{profile.cuts} ({scenario}) after {at - serving_from:.2f} s, "
                          f"{len(killed)} process(es)", file=sys.stderr, flush=True)
                load.stop()
                if not fs.alive():
                    raise LazyFSCrashed("LazyFS died during the last cut")
                spool_dir = os.path.join(fs.root, "spool")
            set_scenario(collector, "up")
            app = AppProcess(spool_dir, collector.base_uri, workdir, output=log, **options)
            result.drained = _wait_for_delivery(spool_dir, profile.drain_timeout)
            app.terminate()
            app = None
        finally:
            load.stop()
            if app is not None:
                app.kill()
        events = collector.events
    dead = _dead_lettered(spool_dir)
    aside = [name for name in os.listdir(spool_dir) if name.startswith("shipper.db.corrupt-") and
             not name.endswith(("-wal", "-shm"))]
    result.quarantined = len(aside)
    for name in sorted(aside):
        result.salvaged |= _salvage(os.path.join(spool_dir, name), workdir, mode)
    log.flush()
    result.late_logged, result.stalls = _logged(log.name, log_start)
    _analyse(result, load, events, dead | result.salvaged)
    result.dead_lettered = len(dead)
    if result.failed:
        print(f"  {mode}: spool kept in {spool_dir}", file=sys.stderr)
    result.wall = time.monotonic() - started
    return result


def _damage_spool(spool_dir: str) -> Set[str]:
    """Damage the shipper's spool (the app is down) so the next shipper quarantines it; returns the n of the
    records it holds, which `salvage` must give back from the quarantined file (`_salvage`)."""
    path = spool_path(spool_dir, SHIPPER_SLOT)
    held: Set[str] = set()
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        for table in (TABLE, "dead_letter"):
            with contextlib.suppress(sqlite3.Error):
                for (data,) in conn.execute(f"SELECT data FROM {table}"):
                    n = _n_of(json.loads(data))
                    if n is not None:
                        held.add(n)
    with contextlib.closing(sqlite3.connect(path)) as conn:  # page 1 out of the WAL, or it would mask the damage
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"\0" * 100, 0)  # the SQLite header: the file no longer opens as a database
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return held


def _salvage(path: str, workdir: str, mode: str) -> Set[str]:
    """Salvage the quarantined spool file `path` as an operator would, into a new spool under `workdir`; the n
    of every record it gave back. Its report goes to stderr."""
    into = Spool(os.path.join(tempfile.mkdtemp(prefix="salvaged-", dir=workdir), "salvaged.db"))
    try:
        report = salvage(path, into)
        found = {n for n in (_n_of(record["body"] or {}) for record in into.records()) if n is not None}
    finally:
        into.close()
    print(f"  {mode}: salvage of {os.path.basename(path)}: {report.copied} record(s) back; unreadable: "
          f"{report.unreadable()}", file=sys.stderr, flush=True)
    return found


def waiting(spool_dir: str) -> int:
    """Records not yet delivered: ready or in flight in a spool file, plus 1 while a journal segment holds
    bytes the shipper has not spooled (0 only when everything went out)."""
    stats = directory_stats(spool_dir)
    offsets: Dict[str, int] = {}
    shipper_db = spool_path(spool_dir, SHIPPER_SLOT)
    if os.path.exists(shipper_db):
        view = SpoolView(shipper_db)
        try:
            offsets = view.journal_offsets()
        finally:
            view.close()
    unspooled = 0
    for _, _, path in segments(spool_dir):
        with contextlib.suppress(FileNotFoundError):
            unspooled += max(0, os.path.getsize(path) - offsets.get(os.path.basename(path), 0))
    return stats.ready + stats.in_flight + (1 if unspooled else 0)


def _wait_for_delivery(spool_dir: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, sqlite3.Error):
            if waiting(spool_dir) == 0:
                return True
        time.sleep(0.2)
    return False


def _dead_lettered(spool_dir: str) -> Set[str]:
    found: Set[str] = set()
    for slot in slots(spool_dir):
        with contextlib.closing(sqlite3.connect(f"file:{spool_path(spool_dir, slot)}?mode=ro", uri=True)) as conn:
            with contextlib.suppress(sqlite3.Error):
                for (data,) in conn.execute("SELECT data FROM dead_letter"):
                    n = _n_of(json.loads(data))
                    if n is not None:
                        found.add(n)
    return found


def _n_of(event: Dict[str, Any]) -> Optional[str]:
    values = parse_qs(urlsplit((event.get("request") or {}).get("uri") or "").query).get("n")
    return values[0] if values else None


def _analyse(result: Result, load: Load, events: List[Dict[str, Any]], dead: Set[str]) -> None:
    ids: DefaultDict[str, Set[str]] = defaultdict(set)
    all_ids: List[str] = []
    for event in events:
        n = _n_of(event)
        transaction_id = str(event.get("transaction_id"))
        all_ids.append(transaction_id)
        if n is not None:
            ids[n].add(transaction_id)
    result.delivered = len(ids)
    result.duplicates = len(all_ids) - len(set(all_ids))
    result.logged_twice = sum(1 for found in ids.values() if len(found) > 1)
    result.dead_lettered = len(dead)
    result.wrong = load.wrong
    result.answered = len(load.answered)
    wall = time.time() - time.monotonic()  # monotonic to wall clock, for the stalls the apps logged
    for n, port, received in load.answered:
        if n in ids or n in dead:
            continue
        # the cut of the instance that answered (a port may be used again by a later instance)
        cut = [c for c in result.cuts if c.port == port and c.started <= received][-1]
        age = max(0.0, cut.at - received)  # an answer read while the SIGSTOPs were sent: 0
        if age <= WINDOW:
            result.lost_within.append((n, round(age, 3)))
        elif any(stall.pid == cut.app_pid and not stall.ended and received + wall >= stall.since - WINDOW
                 for stall in result.stalls):
            result.lost_in_stall.append((n, round(age, 3)))  # its sync was held by the file system until the cut
        else:
            result.lost_older.append((n, round(age, 3)))


def _stalls_logged(text: str) -> List[Stall]:
    """The file-system stalls in the app log, each marked ended once its instance logged its return."""
    stalls: List[Stall] = []
    events = sorted([(m.start(), "held", m) for m in STALL_LOGGED.finditer(text)] +
                    [(m.start(), "ended", m) for m in STALL_ENDED.finditer(text)], key=lambda e: e[0])
    for _, what, m in events:
        if what == "held":
            call, held_ms, pid, since = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
            started = calendar.timegm(time.strptime(since[:19], "%Y-%m-%dT%H:%M:%S")) + float(since[19:] or 0)
            open_ = [s for s in stalls if s.pid == pid and s.call == call and not s.ended]
            if open_ and abs(open_[-1].since - started) < 0.01:  # the same stall, logged again as it lasts
                open_[-1].longest_ms = max(open_[-1].longest_ms, held_ms)
            else:
                stalls.append(Stall(pid, call, started, held_ms, False))
        else:
            for stall in stalls:
                if stall.pid == int(m.group(2)) and stall.call == m.group(1):
                    stall.ended = True
    return stalls


def _logged(path: str, start: int) -> Tuple[List[str], List[Stall]]:
    """The late journal syncs (`JournalWriter` logs each app instance's first, then each new worst, and at most
    one a minute besides; as "<age> = <waited to start> + <fdatasync>" in ms) and the file-system stalls logged
    in the log from byte `start`."""
    with open(path, encoding="utf-8", errors="replace") as f:
        f.seek(start)
        text = f.read()
    late = [f"{m.group(1)} = {m.group(2)} + {m.group(3)}" for m in LATE_SYNC_LOGGED.finditer(text)]
    return late, _stalls_logged(text)


def print_table(results: List[Result]) -> None:
    def scenarios(r: Result) -> str:
        return ", ".join(f"{s} ×{sum(1 for c in r.cuts if c.scenario == s)}" for s in SCENARIOS)

    def worst(r: Result) -> str:
        ages = [age for _, age in r.lost_older + r.lost_within]
        return f"{max(ages) * 1000:.0f}" if ages else "-"

    rows: List[Tuple[str, Any]] = [
        ("power cuts (collector down / up / rejecting 400 / up, a damaged spool being quarantined)", scenarios),
        ("requests answered", lambda r: f"{r.answered:,} ({r.answered / max(r.serving_seconds, 1e-9):,.0f}/s)"),
        ("events delivered (distinct requests)", lambda r: f"{r.delivered:,}"),
        ("dead-lettered (kept in the spool)", lambda r: f"{r.dead_lettered:,}"),
        ("damaged spools quarantined around a cut / their records salvage gave back, of those they held",
         lambda r: f"{r.quarantined} of {r.damaged} / {len(r.held_aside & r.salvaged):,} of {len(r.held_aside):,}"),
        (f"lost, answered > {WINDOW * 1000:.0f} ms before a cut (must be 0)", lambda r: f"{len(r.lost_older)}"),
        (f"lost, answered > {WINDOW * 1000:.0f} ms before a cut while a file-system stall the app logged held "
         "its sync until the cut (the window runs from the stall's end)", lambda r: f"{len(r.lost_in_stall)}"),
        (f"lost, answered ≤ {WINDOW * 1000:.0f} ms before a cut (audit: must be 0)", lambda r: f"{len(r.lost_within)}"),
        ("oldest lost event: answered this many ms before its cut", worst),
        ("duplicates (resent after a cut, same transaction_id)", lambda r: f"{r.duplicates:,}"),
        ("late journal syncs logged (> 200 ms after the oldest record; per app instance the first and each new worst)",
         lambda r: f"{len(r.late_logged)} in {len(r.cuts) + 1} instances"),
        ("file-system stalls the app instances logged (a journal write or fdatasync held > 100 ms) / under way at "
         "a cut / longest logged, ms",
         lambda r: (f"{len(r.stalls)} / {sum(not s.ended for s in r.stalls)} / {max(s.longest_ms for s in r.stalls)}"
                    if r.stalls else "0")),
        ("load average (1 min) at the cuts, min-max",
         lambda r: f"{min(r.load_averages):.1f}-{max(r.load_averages):.1f}" if r.load_averages else "-"),
        ("wall time, s", lambda r: f"{r.wall:.0f}"),
    ]
    print()
    print("| measure | " + " | ".join(f"{r.mode}" for r in results) + " |")
    print("|---|" + "---|" * len(results))
    for label, cell in rows:
        print(f"| {label} | " + " | ".join(cell(r) for r in results) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short smoke run (CI)")
    parser.add_argument("--cuts", type=int, help="power cuts per mode (default 20; 4 with --quick)")
    parser.add_argument("--seed", type=int, default=11, help="seed of the cut schedule (default 11)")
    parser.add_argument("--mode", choices=(*MODES, "both"), default="both")
    parser.add_argument("--body-bytes", type=int, default=2000, help="padding in each request body (default 2000)")
    parser.add_argument("--cpu-load", type=int, default=0, metavar="N",
                        help="run N busy-looping processes meanwhile (a loaded machine); stopped at the end")
    args = parser.parse_args()
    reason = unavailable()
    if reason is not None:
        print(f"powercut: skipped: {reason}")
        return 0
    profile = QUICK if args.quick else FULL
    if args.cuts is not None:
        profile = dataclasses.replace(profile, cuts=args.cuts)
    workdir = tempfile.mkdtemp(prefix="powercut")
    results = []
    failed = False
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(args.cpu_load)]
    try:
        with open(os.path.join(workdir, "apps.log"), "w") as log:
            for mode in (MODES if args.mode == "both" else (args.mode,)):
                try:
                    result = run_mode(mode, profile, args.seed, workdir, args.body_bytes, log)
                except LazyFSCrashed as exc:
                    print(f"powercut: {mode}: {exc}; no verdict (the app log is in {workdir})", file=sys.stderr)
                    return 2
                log.flush()
                results.append(result)
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    for result in results:
        for reason in result.failed:
            failed = True
            print(f"FAIL {result.mode}: {reason}", file=sys.stderr)
    print_table(results)
    for result in results:
        if result.late_logged:
            print(f"\n{result.mode}: late journal syncs logged, ms (age = waited to start + fdatasync): "
                  f"{'; '.join(result.late_logged)}")
    print(f"\nseed {args.seed}; load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} "
          f"{os.getloadavg()[2]:.2f}; {os.cpu_count()} CPUs; {args.cpu_load} busy-looping processes added")
    if failed:
        print(f"the spools and the app log are kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
