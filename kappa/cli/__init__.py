"""The ``kappa`` command: bring up the local stack, check a deployment, replay, reconcile.

One module per command (or group): :mod:`~kappa.cli.up`, :mod:`~kappa.cli.prepare` (``init``),
:mod:`~kappa.cli.check`, :mod:`~kappa.cli.status`, :mod:`~kappa.cli.backfill` (``backfill``,
``replay``), :mod:`~kappa.cli.reconcile`; what they share is in :mod:`~kappa.cli.output`.
"""

from __future__ import annotations

import argparse
import sys

from kappa.cli.backfill import backfill, replay
from kappa.cli.check import check
from kappa.cli.output import timestamp, utc_time
from kappa.cli.prepare import prepare
from kappa.cli.reconcile import reconcile
from kappa.cli.status import status
from kappa.cli.up import up
from kappa.exceptions import KappaError
from kappa.settings import Settings

__all__ = ["main", "prepare"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kappa", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="bring up the local stack and the Dagster UI")
    up_parser.add_argument(
        "--reset", action="store_true", help="start from empty local state (KAPPA_HOME)"
    )
    up_parser.add_argument(
        "--no-simulator",
        "--no-producers",
        dest="no_producers",
        action="store_true",
        help="do not start the catalogue's producers (local.producers)",
    )
    up_parser.add_argument(
        "--seed",
        action="store_true",
        help="pass top_up to the catalogue's local.seed (by default it seeds an empty table only)",
    )
    init_parser = commands.add_parser(
        "init", help="create schemas, tables, capture triggers and topics (idempotent)"
    )
    init_parser.add_argument(
        "--local",
        action="store_true",
        help="also run the catalogue's local.prepare and local.seed against the OLTP database",
    )
    init_parser.add_argument(
        "--seed",
        action="store_true",
        help="with --local: pass top_up to local.seed (seed even a table that has rows)",
    )
    commands.add_parser("check", help="check that databases, broker and topics answer")
    status_parser = commands.add_parser(
        "status", help="lag per shard, the last batches and the failing asset checks"
    )
    status_parser.add_argument(
        "--batches", type=int, default=5, help="how many of the last batches to list (default 5)"
    )
    status_parser.add_argument(
        "--no-checks",
        action="store_true",
        help="do not read Dagster (check results, failed runs)",
    )
    commands.add_parser(
        "reconcile", help="source = received = loaded + dead-lettered + deduplicated, per shard"
    )
    replay_parser = commands.add_parser("replay", help="reload an asset from the start of its log")
    replay_parser.add_argument(
        "asset", help="a stream or a captured table's target (the catalogue's assets)"
    )
    replay_parser.add_argument(
        "--yes", action="store_true", help="confirm: the asset's rows are deleted"
    )
    replay_parser.add_argument(
        "--from",
        dest="since",
        type=timestamp,
        help="replay from this broker time on (ISO-8601 with zone), not from the beginning",
    )
    backfill_parser = commands.add_parser(
        "backfill",
        help="reprocess time partitions of a fact as a Dagster backfill (needs the webserver)",
    )
    backfill_parser.add_argument(
        "asset", help="a time-partitioned asset (a stream or a captured table)"
    )
    backfill_parser.add_argument(
        "--from",
        dest="since",
        type=utc_time,
        help="first partition: the one holding this date or time (UTC); default: the first",
    )
    backfill_parser.add_argument(
        "--to", dest="until", type=utc_time, help="last partition (default: the current one)"
    )
    backfill_parser.add_argument(
        "--url", help="Dagster webserver (default http://127.0.0.1:KAPPA_UI_PORT)"
    )
    backfill_parser.add_argument(
        "--wait", type=float, metavar="SECONDS", help="wait for the backfill to finish"
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "up":
            return up(settings, reset=args.reset, producers=not args.no_producers, seed=args.seed)
        if args.command == "init":
            prepare(settings, create_topics=True, local=args.local, seed=args.seed)
            return 0
        if args.command == "check":
            return check(settings)
        if args.command == "status":
            return status(settings, batches=max(args.batches, 0), checks=not args.no_checks)
        if args.command == "reconcile":
            return reconcile(settings)
        if args.command == "backfill":
            return backfill(
                settings,
                args.asset,
                since=args.since,
                until=args.until,
                url=args.url,
                wait_s=args.wait,
            )
        return replay(settings, args.asset, confirmed=args.yes, since=args.since)
    except KappaError as exc:
        print(f"\nkappa: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
