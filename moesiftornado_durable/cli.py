"""The `moesiftornado-durable` command: look at spools, drain a backlog, handle dead letters.

Each command is a small function over the spool API. Nothing a command does can lose an event: a replay
that fails leaves the events where they were, and only `dead-letter purge` deletes (after asking).
Exit codes: 0 done, 1 the command failed, 2 bad usage, 3 a spool was locked by a live process,
130 interrupted. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import sqlite3
import sys
import threading
import time
from typing import Any, Callable, Dict, Iterator, List, Optional, TextIO, Tuple

from . import __version__, locks, proctitle, spooldir
from .channel import read_figures
from .codec import Codec
from .config import DEFAULT_BASE_URI, DEFAULT_BATCH_SIZE, SPOOL_SYNC_MODES, Config, default_spool_dir
from .errors import ConfigError
from .flusher import Courier, Outcome, remove_spool_files
from .journal import count_records, damaged_segments, segments
from .kinds import EVENT, KINDS
from .sender import Sender, delivery_policy
from .shipper import EXIT_ANOTHER_SHIPPER, StopRequest, journal_reader, serve
from .spool import Spool, SpoolStats, open_spool, read_journal_offsets, read_stats, salvage

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
DEFAULT_REPLAY_BATCH_SIZE = 500
DEFAULT_REPLAY_CONNECTIONS = 2  # one batch in flight while the next is read, compressed and the last acked
REPLAY_ATTEMPTS = 5  # per batch, before replay gives up and says why
REPLAY_MAX_WAIT = 5.0
KEY_ENVIRONMENT_VARIABLE = "MOESIF_SPOOL_ENCRYPTION_KEY"
APPLICATION_ID_VARIABLE = "MOESIF_APPLICATION_ID"
_SPOOL_DIR_HELP = (f"default: the directory the middleware uses when SPOOL_DIR is not set, found from "
                   f"${APPLICATION_ID_VARIABLE}")

_MAX_INGEST_PASSES = 10_000  # passes of up to 8 MB each over the journals before replay sends what it has

class CommandError(Exception):
    """A failure to report as one line on stderr, with its exit code."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the console script and of ``python -m moesiftornado_durable``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["collector"]:  # its options are the collector's own
        from . import testing  # a large module only this command needs: not imported on every start

        return testing.main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        _default_spool_dir(args)
        return int(args.run(args))
    except CommandError as exc:
        print(f"moesiftornado-durable: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("moesiftornado-durable: interrupted; nothing was lost", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moesiftornado-durable", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[argparse.Namespace], int], text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text)
        sub.set_defaults(run=run)
        return sub

    status = command("status", _status, "counts per spool file and in total (read-only, safe next to a live app)")
    status.add_argument("--spool-dir", help=_SPOOL_DIR_HELP)
    status.add_argument("--json", action="store_true", help="print JSON")

    replay = command("replay", _replay, "send the backlog of every spool file not owned by a live process")
    replay.add_argument("--spool-dir", help=_SPOOL_DIR_HELP)
    replay.add_argument("--application-id", help="default: $MOESIF_APPLICATION_ID (safer: not shown in ps)")
    replay.add_argument("--base-uri", default=DEFAULT_BASE_URI)
    replay.add_argument("--batch-size", type=int, default=DEFAULT_REPLAY_BATCH_SIZE)
    replay.add_argument("--max-events", type=int, help="stop after this many")
    replay.add_argument("--connections", type=int, default=DEFAULT_REPLAY_CONNECTIONS,
                        help=f"batches in flight at once, each on its own connection (default "
                             f"{DEFAULT_REPLAY_CONNECTIONS}); 1 sends strictly oldest first")
    replay.add_argument("--send-timeout", type=float, default=30.0, help="seconds per request (default 30)")
    replay.add_argument("--dry-run", action="store_true", help="count what would be sent; send nothing")

    ship = command("ship", _ship, "run the shipper of a SPOOL_DIR in the foreground, as a service (app processes "
                   "then start none); stops on SIGTERM or Ctrl-C")
    ship.add_argument("--spool-dir", help=_SPOOL_DIR_HELP)
    ship.add_argument("--application-id", help="default: $MOESIF_APPLICATION_ID (safer: not shown in ps)")
    ship.add_argument("--base-uri", default=DEFAULT_BASE_URI)
    ship.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    ship.add_argument("--spool-sync", choices=SPOOL_SYNC_MODES, default="normal")

    dead = command("dead-letter", _dead_letter, "list, requeue, purge or export dead-lettered records")
    dead.add_argument("action", choices=["list", "requeue", "purge", "export"])
    dead.add_argument("--spool-dir", help=_SPOOL_DIR_HELP)
    dead.add_argument("--reason", help="only records whose reason contains this text")
    dead.add_argument("--older-than", type=_age, help="only records dead-lettered longer ago, e.g. 90s, 30m, 12h, 7d")
    dead.add_argument("--out", help="export: write JSONL here instead of stdout")
    dead.add_argument("--yes", action="store_true", help="purge: do not ask for confirmation")
    dead.add_argument("--json", action="store_true", help="list: print JSONL")

    export = command("export", _export, "write every record of every spool file as JSONL (for an audit)")
    export.add_argument("--spool-dir", help=_SPOOL_DIR_HELP)
    export.add_argument("--out", required=True, help="the JSONL file to write")

    imp = command("import", _import, "add the records of a JSONL export to a spool (as ready records)")
    imp.add_argument("file")
    imp.add_argument("--spool-dir", help=_SPOOL_DIR_HELP)

    salv = command("salvage", _salvage, "copy every readable record of a damaged spool file into a spool")
    salv.add_argument("file")
    salv.add_argument("--spool-dir", help=_SPOOL_DIR_HELP)

    command("collector", lambda args: EXIT_OK, "run the local Moesif-compatible collector in the foreground "
            "(see: collector --help)")
    return parser


def _default_spool_dir(args: argparse.Namespace) -> None:
    """Without --spool-dir: the middleware's own default for the application id (`config.default_spool_dir`),
    said on stderr. The id comes from the environment (or `replay`/`ship`'s --application-id): a command
    line shows in `ps`, so status, dead-letter, export, import and salvage take no id there."""
    if not hasattr(args, "spool_dir") or args.spool_dir:
        return
    application_id = getattr(args, "application_id", None) or os.environ.get(APPLICATION_ID_VARIABLE)
    if not application_id:
        raise CommandError(f"no --spool-dir: pass one, or set {APPLICATION_ID_VARIABLE} to use the default "
                           f"directory of that application", EXIT_USAGE)
    args.spool_dir = default_spool_dir(application_id)
    print(f"using SPOOL_DIR {args.spool_dir}", file=sys.stderr)


# -- status --------------------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    rows = [_file_status(args.spool_dir, slot) for slot in _existing_slots(args.spool_dir)]
    totals = {key: sum(row[key] for row in rows)
              for key in ("ready", "in_flight", "dead_letter", "undecryptable", "bytes_on_disk")}
    ages = [row["oldest_age_seconds"] for row in rows if row["oldest_age_seconds"] is not None]
    totals["oldest_age_seconds"] = max(ages) if ages else None
    journals: List[Dict[str, Any]] = [{"file": os.path.basename(path), "bytes": os.path.getsize(path)}
                                      for _, _, path in segments(args.spool_dir)]
    shipper = read_figures(args.spool_dir)  # the live shipper's own figures, over its channel; None if none runs
    if shipper is not None:
        shipper = {key: shipper.get(key) for key in ("pid", "counters", "last_error", "last_error_at", "failing")}
    if args.json:
        print(json.dumps({"spool_dir": args.spool_dir, "files": rows, "total": totals,
                          "journals": journals, "quarantined": _quarantined(args.spool_dir),
                          "damaged_journals": damaged_segments(args.spool_dir), "shipper": shipper}))
        return EXIT_OK
    header = ("file", "owner", "alive", "ready", "in flight", "dead", "oldest", "bytes")
    print(f"{header[0]:<16} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], (8, 5, 9, 9, 7, 10, 12))))
    for row in rows + [dict(totals, file="total", owner_pid=None, owner_alive=None)]:
        owner = "-" if row["owner_pid"] is None else str(row["owner_pid"])
        alive = {True: "yes", False: "no", None: ""}[row["owner_alive"]]
        oldest = "-" if row["oldest_age_seconds"] is None else _duration(row["oldest_age_seconds"])
        print(f"{row['file']:<16} {owner:>8} {alive:>5} {row['ready']:>9} {row['in_flight']:>9} "
              f"{row['dead_letter']:>7} {oldest:>10} {row['bytes_on_disk']:>12}")
    if journals:
        journal_bytes = sum(int(j["bytes"]) for j in journals)
        print(f"journals: {len(journals)} segment(s), {journal_bytes} bytes "
              "(records the shipper spools into shipper.db)")
    if totals["undecryptable"]:
        print(f"{totals['undecryptable']} record(s) cannot be decrypted with the configured key(s); kept untouched")
    for name in _quarantined(args.spool_dir):
        print(f"quarantined (damaged, kept for `salvage`): {name}")
    for name in damaged_segments(args.spool_dir):
        print(f"damaged journal segment (its intact records were spooled; kept for inspection): {name}")
    return EXIT_OK


def _quarantined(directory: str) -> List[str]:
    """Damaged spool files renamed aside at start (see spool.quarantine)."""
    return [name for name in sorted(os.listdir(directory))
            if ".corrupt-" in name and not name.endswith(("-wal", "-shm"))]


def _file_status(directory: str, slot: int) -> Dict[str, Any]:
    path = locks.spool_path(directory, slot)
    try:
        if slot == locks.SHIPPER_SLOT and not os.path.exists(path):  # journals only, no shipper yet
            stats = SpoolStats(ready=0, in_flight=0, dead_letter=0, oldest_spooled_at=None, bytes_on_disk=0)
        else:
            stats = read_stats(path)
    except Exception as exc:  # sqlite3.DatabaseError and kin: not a readable spool
        raise CommandError(f"cannot read {path}: {exc}") from exc
    pid, alive = locks.owner(directory, slot)
    age = None if stats.oldest_spooled_at is None else round(time.time() - stats.oldest_spooled_at, 1)
    return dict(dataclasses.asdict(stats), file=os.path.basename(path), owner_pid=pid, owner_alive=alive,
                oldest_age_seconds=age)


# -- ship ----------------------------------------------------------------------------------------


def _ship(args: argparse.Namespace) -> int:
    application_id = args.application_id or os.environ.get(APPLICATION_ID_VARIABLE)
    if not application_id:
        raise CommandError("no application id: set MOESIF_APPLICATION_ID (or pass --application-id)", EXIT_USAGE)
    options: Dict[str, Any] = {"APPLICATION_ID": application_id, "SPOOL_DIR": args.spool_dir,
                               "BASE_URI": args.base_uri, "BATCH_SIZE": args.batch_size,
                               "SPOOL_SYNC": args.spool_sync}
    keys = [key.strip() for key in os.environ.get(KEY_ENVIRONMENT_VARIABLE, "").split(",") if key.strip()]
    if keys:
        options["SPOOL_ENCRYPTION_KEY"] = keys
    try:
        config = Config.from_dict(options)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc
    logging.basicConfig(level=logging.INFO, format="%(asctime)s moesif-shipper %(levelname)s %(message)s")
    proctitle.set_title(proctitle.shipper_title(config.spool_dir))  # also hides an --application-id from ps
    stop = StopRequest()
    signal.signal(signal.SIGTERM, stop.set)
    print(f"shipping {config.spool_dir} to {config.base_uri} (pid {os.getpid()}); Ctrl-C or SIGTERM stops",
          file=sys.stderr)
    try:
        code = serve(config, stop)
    except ConfigError as exc:  # SPOOL_DIR belongs to another application
        raise CommandError(str(exc), EXIT_USAGE) from exc
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    if code == EXIT_ANOTHER_SHIPPER:
        raise CommandError(f"another shipper already runs for {config.spool_dir}", EXIT_LOCKED)
    return EXIT_OK


# -- replay --------------------------------------------------------------------------------------


def _replay(args: argparse.Namespace) -> int:
    application_id = args.application_id or os.environ.get(APPLICATION_ID_VARIABLE)
    if not application_id and not args.dry_run:
        raise CommandError("no application id: set MOESIF_APPLICATION_ID (or pass --application-id)", EXIT_USAGE)
    if args.batch_size < 1:
        raise CommandError("--batch-size must be at least 1", EXIT_USAGE)
    if args.connections < 1:
        raise CommandError("--connections must be at least 1", EXIT_USAGE)
    _checked_directory(args)
    if application_id and not args.dry_run:  # its records go out under this id and URI: they must be its own
        try:
            spooldir.claim(args.spool_dir, application_id, args.base_uri.rstrip("/"))
        except ConfigError as exc:
            raise CommandError(str(exc), EXIT_USAGE) from exc
    if args.dry_run:
        return _dry_run(args)
    stop = threading.Event()
    sender = Sender(args.base_uri, application_id or "", args.send_timeout)
    courier = Courier(sender, delivery_policy(stop, max_wait=REPLAY_MAX_WAIT, attempts=REPLAY_ATTEMPTS,
                                              retry_auth=False))
    owned = list(_lock_all(args.spool_dir))
    skipped = sorted(set(_existing_slots(args.spool_dir)) - {lock.slot for lock in owned})
    spools: List[Tuple[locks.SlotLock, Spool]] = []
    try:
        for lock in owned:
            spools.append((lock, open_spool(lock.spool_path, codec=_codec())))
            if lock.slot == locks.SHIPPER_SLOT:  # no shipper runs: spool the journals of stopped app processes
                reader = journal_reader(spools[-1][1])
                for _ in range(_MAX_INGEST_PASSES):  # bounded: a live app may write while this reads
                    if not reader.ingest():
                        break
        total = sum(spool.ready_count() for _, spool in spools)
        if args.max_events is not None:
            total = min(total, args.max_events)
        progress = Progress(total, sys.stderr)
        with _stop_on_sigint(stop):
            outcome = _drain_all(courier, spools, args, stop, progress)
        progress.finish()
    finally:
        for lock, spool in spools:
            empty = spool.is_empty()
            spool.close()
            if empty:
                remove_spool_files(lock.spool_path)
        for lock in owned:
            lock.release()
        sender.close()
    print(f"sent {courier.counters['sent']} record(s), dead-lettered {courier.counters['dead_lettered']}")
    if stop.is_set():
        print("stopped by Ctrl-C; the rest stays in the spool", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome is Outcome.RETURNED:
        raise CommandError(f"delivery failed ({courier.last_error}); unsent records stay in the spool")
    if skipped:
        names = ", ".join(os.path.basename(locks.spool_path(args.spool_dir, slot)) for slot in skipped)
        raise CommandError(f"{len(skipped)} spool file(s) locked by a live process, not replayed: {names}",
                           EXIT_LOCKED)
    return EXIT_OK


def _dry_run(args: argparse.Namespace) -> int:
    """Count what `replay` would send, through read-only looks: no lock taken, no journal spooled, no file
    written, created or deleted (opening a spool would also put its in-flight rows back in the queue)."""
    total = skipped = files = 0
    for slot in _existing_slots(args.spool_dir):
        if locks.owner(args.spool_dir, slot)[1]:
            skipped += 1  # a live process holds it: replay would leave it alone
            continue
        path = locks.spool_path(args.spool_dir, slot)
        files += 1
        if os.path.exists(path):
            stats = read_stats(path)
            total += stats.ready + stats.in_flight
        if slot == locks.SHIPPER_SLOT:  # no shipper runs: replay spools the journals' records first
            spooled = read_journal_offsets(path)
            total += sum(count_records(segment, spooled.get(os.path.basename(segment), 0))
                         for _, _, segment in segments(args.spool_dir))
    if args.max_events is not None:
        total = min(total, args.max_events)
    print(f"would send {total} record(s) from {files} spool file(s) and the journals; "
          f"{skipped} file(s) locked by a live process")
    return EXIT_OK


def _drain_all(courier: Courier, spools: List[Tuple[locks.SlotLock, Spool]], args: argparse.Namespace,
               stop: threading.Event, progress: Progress) -> Outcome:
    remaining = args.max_events
    for _, spool in spools:
        with spool.checkpoints_aside():
            outcome = courier.drain(spool, args.batch_size, stop, max_records=remaining, on_batch=progress.advance,
                                    connections=args.connections)
        if outcome is Outcome.RETURNED or stop.is_set():
            return outcome
        if remaining is not None:
            remaining = max(0, args.max_events - courier.counters["sent"] - courier.counters["dead_lettered"])
            if remaining == 0:
                break
    return Outcome.DELIVERED


class _stop_on_sigint:
    """First Ctrl-C: finish the current batch and stop. Second: abort at once (the batch goes back)."""

    def __init__(self, stop: threading.Event) -> None:
        self._stop = stop
        self._previous: Any = None

    def __enter__(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        print("\nstopping after the current batch (Ctrl-C again to abort)", file=sys.stderr)
        self._stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)


class Progress:
    """Events, events/s and ETA: a redrawn line on a terminal, a plain line every few seconds otherwise."""

    def __init__(self, total: int, stream: TextIO, every: float = 2.0) -> None:
        self.total, self.done = total, 0
        self._stream = stream
        self._tty = stream.isatty()
        self._every = every
        self._started = self._last = time.monotonic()

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self._tty or now - self._last >= self._every:
            self._last = now
            self._write(now)

    def finish(self) -> None:
        self._write(time.monotonic())
        if self._tty:
            self._stream.write("\n")

    def _write(self, now: float) -> None:
        elapsed = max(now - self._started, 1e-9)
        rate = self.done / elapsed
        eta = "-" if not rate else _duration(max(0, self.total - self.done) / rate)
        line = f"{self.done}/{self.total} events  {rate:,.0f} ev/s  ETA {eta}"
        self._stream.write(f"\r{line}" if self._tty else line + "\n")
        self._stream.flush()


# -- dead letters, export, import, salvage -------------------------------------------------------


def _dead_letter(args: argparse.Namespace) -> int:
    _checked_directory(args)
    found = list(_dead_letters(args.spool_dir, args.reason, args.older_than))
    if args.action == "list":
        for path, record in found:
            if args.json:
                print(json.dumps(dict(record, file=os.path.basename(path))))
            else:
                print(f"{os.path.basename(path)}:{record['id']}  HTTP {record['http_status']}  "
                      f"{_iso(record['dead_at'])}  {record['kind']}  {_transaction_id(record)}  {record['reason']}")
        if not args.json:
            print(f"{len(found)} dead-lettered record(s)")
        return EXIT_OK
    if args.action == "export":
        with _output(args.out) as out:
            for path, record in found:
                out.write(json.dumps(dict(record, file=os.path.basename(path))) + "\n")
        print(f"exported {len(found)} dead-lettered record(s)", file=sys.stderr)
        return EXIT_OK
    if args.action == "purge" and found and not args.yes:
        if not sys.stdin.isatty():
            raise CommandError("purge deletes records for good: confirm with --yes when not on a terminal")
        answer = input(f"Delete {len(found)} dead-lettered record(s) for good? Type 'yes': ")
        if answer.strip().lower() != "yes":
            raise CommandError("not confirmed; nothing deleted")
    changed = 0
    for path, ids in _group_ids(found).items():
        with _opened_beside_its_owner(path) as spool:
            changed += spool.requeue_dead_letters(ids) if args.action == "requeue" else spool.purge_dead_letters(ids)
    print(f"{'requeued' if args.action == 'requeue' else 'purged'} {changed} record(s)")
    return EXIT_OK


def _dead_letters(directory: str, reason: Optional[str], older_than: Optional[float]) -> Iterator[Tuple[str, Any]]:
    for path in _spool_files(directory):
        with _opened_beside_its_owner(path) as spool:
            for record in spool.dead_letters(reason, older_than):
                yield path, record


def _group_ids(found: List[Tuple[str, Any]]) -> Dict[str, List[int]]:
    grouped: Dict[str, List[int]] = {}
    for path, record in found:
        grouped.setdefault(path, []).append(record["id"])
    return grouped


def _export(args: argparse.Namespace) -> int:
    _checked_directory(args)
    count = 0
    with _output(args.out) as out:
        for path in _spool_files(args.spool_dir):
            with _opened_beside_its_owner(path) as spool:
                for record in spool.records():
                    out.write(json.dumps(dict(record, file=os.path.basename(path))) + "\n")
                    count += 1
    print(f"exported {count} record(s) to {args.out}", file=sys.stderr)
    return EXIT_OK


def _import(args: argparse.Namespace) -> int:
    records: List[Tuple[str, Any, float]] = []
    try:
        with open(args.file, encoding="utf-8") as source:
            for number, line in enumerate(source, 1):
                if line.strip():
                    records.append(_import_record(json.loads(line), number))
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise CommandError(f"{args.file}: {exc}") from exc
    added = _into_new_slot(args.spool_dir, lambda spool: spool.put_many(records))
    print(f"imported {added} record(s) into {args.spool_dir}; a running app or `replay` will send them")
    return EXIT_OK


def _import_record(record: Any, number: int) -> Tuple[str, Any, float]:
    if not isinstance(record, dict) or "body" not in record:
        raise ValueError(f"line {number}: expected an exported record with a 'body'")
    kind = record.get("kind", EVENT)
    if kind not in KINDS:
        raise ValueError(f"line {number}: unknown kind {kind!r}")
    return kind, record["body"], float(record.get("spooled_at") or time.time())


def _salvage(args: argparse.Namespace) -> int:
    if not os.path.isfile(args.file):
        raise CommandError(f"no such file: {args.file}")
    try:
        report = _into_new_slot(args.spool_dir, lambda spool: salvage(args.file, spool))
    except OSError as exc:
        raise CommandError(f"cannot read {args.file}: {exc.strerror or exc}") from exc
    except sqlite3.Error as exc:  # the new spool, e.g. a full disk: what was committed stays there
        raise CommandError(f"salvage stopped: cannot write into {args.spool_dir} ({exc}); the records copied so "
                           f"far stay there, `status` counts them; the damaged file was not changed") from exc
    census = report.census
    if census.header_damaged and not census.leaf_pages:
        raise CommandError(f"{args.file} holds no SQLite page that could be read; nothing salvaged "
                           f"(the file was not changed)")
    dead = f" ({report.dead_letters} of them dead letters, now ready again)" if report.dead_letters else ""
    print(f"salvaged {report.copied} record(s){dead} from {args.file}; unreadable: {report.unreadable()}; "
          f"the file was not changed")
    if report.unopened:
        print(f"{report.unopened} of them are encrypted and no key in ${KEY_ENVIRONMENT_VARIABLE} opens them: "
              f"copied as stored, sent once the right key is configured")
    if report.duplicates:
        print(f"{report.duplicates} row(s) found twice were copied once")
    return EXIT_OK


def _into_new_slot(directory: str, fill: Callable[[Spool], Any]) -> Any:
    """Fill a free slot, then release it: a live app adopts it, or `replay` sends it."""
    try:
        directory = spooldir.prepare(directory)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc
    lock = locks.lock_free_slot(directory)
    try:
        spool = Spool(lock.spool_path, codec=_codec())
        try:
            return fill(spool)
        finally:
            spool.close()
    finally:
        lock.release()


# -- helpers -------------------------------------------------------------------------------------


def _codec() -> Codec:
    """Records are read and written with the keys in $MOESIF_SPOOL_ENCRYPTION_KEY (comma-separated,
    newest first), like the app's SPOOL_ENCRYPTION_KEY; never taken from the command line (ps shows it)."""
    keys = [key.strip() for key in os.environ.get(KEY_ENVIRONMENT_VARIABLE, "").split(",") if key.strip()]
    try:
        return Codec(keys)
    except ConfigError as exc:
        raise CommandError(f"{KEY_ENVIRONMENT_VARIABLE}: {exc}", EXIT_USAGE) from exc


@contextlib.contextmanager
def _opened_beside_its_owner(path: str) -> Iterator[Spool]:
    """A spool file opened without resuming its in-flight rows: its owner may be alive and sending them."""
    spool = Spool(path, resume=False, codec=_codec())
    try:
        yield spool
    finally:
        spool.close()


def _checked_directory(args: argparse.Namespace) -> None:
    """Refuse a --spool-dir others could plant files in (`spooldir.check`); use the directory it resolves to."""
    if not os.path.isdir(args.spool_dir):
        raise CommandError(f"no spool directory at {args.spool_dir}")
    try:
        args.spool_dir = spooldir.check(args.spool_dir)
    except ConfigError as exc:
        raise CommandError(str(exc), EXIT_USAGE) from exc


def _spool_files(directory: str) -> List[str]:
    return [locks.spool_path(directory, slot) for slot in _existing_slots(directory)]


def _existing_slots(directory: str) -> List[int]:
    if not os.path.isdir(directory):
        raise CommandError(f"no spool directory at {directory}")
    return locks.slots(directory)


def _lock_all(directory: str) -> Iterator[locks.SlotLock]:
    for slot in _existing_slots(directory):
        lock = locks.try_lock(directory, slot)
        if lock is not None:
            yield lock


class _output:
    """A file to write, or stdout for '-' / None."""

    def __init__(self, path: Optional[str]) -> None:
        self._path = path
        self._file: Optional[TextIO] = None

    def __enter__(self) -> TextIO:
        if self._path in (None, "-"):
            return sys.stdout
        try:
            self._file = open(self._path, "w", encoding="utf-8")  # noqa: SIM115
        except OSError as exc:
            raise CommandError(f"cannot write {self._path}: {exc.strerror or exc}") from exc
        os.chmod(self._path, 0o600)  # it holds event data
        return self._file

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.close()


def _age(text: str) -> float:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"expected an age such as 90s, 30m, 12h or 7d, got {text!r}")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _iso(timestamp: Optional[float]) -> str:
    return "-" if timestamp is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


def _transaction_id(record: Dict[str, Any]) -> str:
    body = record.get("body")
    return str(body.get("transaction_id", "-")) if isinstance(body, dict) else "-"
