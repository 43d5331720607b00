"""The `moesiftornado-durable` command: look at a spool, run the local collector.

Each command is a small function over the library's API; exit codes mean something (0 done, 1 the
command failed, 2 bad usage), and errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import List, Optional

from . import __version__, testing
from .spool import read_stats


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the console script and of ``python -m moesiftornado_durable``."""
    parser = argparse.ArgumentParser(prog="moesiftornado-durable", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    status = commands.add_parser("status", help="counts of a spool (read-only, safe next to a live app)")
    status.add_argument("--spool-dir", required=True, help="the SPOOL_DIR to look at")
    status.add_argument("--json", action="store_true", help="print JSON instead of text")
    status.set_defaults(run=_status)

    collector = commands.add_parser(
        "collector", help="run the local Moesif-compatible collector in the foreground", add_help=False
    )
    collector.set_defaults(run=None)

    args, rest = parser.parse_known_args(argv)
    if args.command == "collector":
        return testing.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.run(args))


def _status(args: argparse.Namespace) -> int:
    try:
        stats = read_stats(args.spool_dir)
    except (OSError, ValueError) as exc:
        print(f"moesiftornado-durable: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # sqlite3.DatabaseError and kin: the file is not a readable spool
        print(f"moesiftornado-durable: cannot read the spool in {args.spool_dir}: {exc}", file=sys.stderr)
        return 1
    oldest_age = None if stats.oldest_spooled_at is None else round(time.time() - stats.oldest_spooled_at, 1)
    if args.json:
        print(json.dumps(dict(dataclasses.asdict(stats), oldest_age_seconds=oldest_age, spool_dir=args.spool_dir)))
        return 0
    print(f"spool:        {args.spool_dir}")
    print(f"ready:        {stats.ready}")
    print(f"in flight:    {stats.in_flight}")
    print(f"dead letter:  {stats.dead_letter}")
    print(f"oldest event: {'-' if oldest_age is None else f'{oldest_age} s ago'}")
    print(f"on disk:      {stats.bytes_on_disk} bytes")
    return 0
