"""``kappa status``: lag per shard, the last batches and the failing asset checks."""

from __future__ import annotations

from contextlib import ExitStack

import pymysql
from psycopg import sql

from kappa.catalog.ingests import topic_ingests
from kappa.cli.output import compact_age, print_table, say, shorten
from kappa.edw.connection import connect
from kappa.edw.ledger import read_heads
from kappa.edw.types import LedgerHead, Schemas
from kappa.exceptions import KappaError
from kappa.freshness import ShardFreshness, capture_freshness, topic_freshness
from kappa.health import RunFailures, failure_threshold, recent_failures
from kappa.settings import Settings
from kappa.sources.captured import active_captures, open_change_source
from kappa.sources.topic import EventStore


def status(settings: Settings, *, batches: int = 5, checks: bool = True) -> int:
    """Lag per shard, the last batches and the failing asset checks, as compact tables.

    A shard that cannot load (:mod:`kappa.health`) shows ``stopped`` as its lag, and the
    reason below the table. Exit 0 when no shard is stopped and every check the Dagster
    instance knows of passes (or the instance cannot be read, which is said), 1 otherwise.
    """
    schemas = Schemas(settings.edw_schema, settings.meta_schema)
    failures: dict[str, dict[int, RunFailures]]
    failures, runs_note = _run_failures(settings) if checks else ({}, "not read (--no-checks)")
    header = (
        "asset",
        "shard",
        "log end",
        "loaded to",
        "lag",
        "oldest",
        "batches",
        "loaded",
        "dead",
        "dedup",
        "last batch",
    )
    rows: list[tuple[str, ...]] = []
    stopped: list[tuple[str, str, str]] = []
    unreachable: list[tuple[str, str, str]] = []
    with connect(settings.resolved_edw_url) as edw:
        meta = sql.Identifier(schemas.meta)
        totals = {
            (r[0], r[1], r[2]): r[3:]
            for r in edw.execute(
                sql.SQL(
                    "SELECT asset, source, shard, sum(loaded), sum(dead_lettered), sum(deduplicated), "
                    "extract(epoch FROM clock_timestamp() - max(committed_at))::float8 "
                    "FROM {}.batch_ledger GROUP BY 1, 2, 3"
                ).format(meta)
            ).fetchall()
        }

        def row(
            asset: str,
            source: str,
            shard: int,
            end: int | str,
            head: LedgerHead | None,
            lag: int,
            fresh: ShardFreshness | None,
        ) -> None:
            loaded, dead, dedup, age = totals.get((asset, source, shard), (0, 0, 0, None))
            why = fresh.stopped if fresh is not None else None
            if why is not None:
                stopped.append((asset, f"{source}[{shard}]", why))
            rows.append(
                (
                    asset,
                    f"{source}[{shard}]",
                    str(end),
                    str(head.end if head else "-"),
                    "stopped" if why is not None else str(lag),
                    compact_age(fresh.lag_s if fresh is not None else None),
                    str(head.batches if head else 0),
                    str(loaded),
                    str(dead),
                    str(dedup),
                    "-" if age is None else f"{compact_age(age)} ago",
                )
            )

        with EventStore(
            settings.resolved_bootstrap_servers, timeout_s=settings.kafka_timeout_s
        ) as store:
            for spec, _ in topic_ingests(settings):
                bounds = store.log_bounds(spec.topic, store.partitions(spec.topic))
                heads = read_heads(edw, schemas, spec.asset, spec.topic)
                shards = {
                    f.shard: f
                    for f in topic_freshness(
                        store, edw, schemas, spec, failures=failures.get(spec.asset)
                    )
                }
                for partition, bound in sorted(bounds.items()):
                    head = heads.get(partition)
                    row(
                        spec.asset,
                        spec.topic,
                        partition,
                        bound.end,
                        head,
                        bound.end - (head.end if head else bound.start),
                        shards.get(f"{spec.topic}[{partition}]"),
                    )
        for capture in active_captures(settings):
            with ExitStack() as stack:
                try:
                    changes = stack.enter_context(open_change_source(capture, settings))
                except (KappaError, pymysql.MySQLError) as exc:
                    if capture.engine == "postgresql":
                        raise
                    # Another server, which may be down while the rest runs: say so, go on.
                    unreachable.append((capture.asset, str(capture.source), str(exc)))
                    continue
                head = read_heads(edw, schemas, capture.asset, str(capture.change_table)).get(0)
                lag = changes.lag(head.end if head else changes.bounds([0])[0].start)
                row(
                    capture.asset,
                    str(capture.change_table),
                    0,
                    f"{'gtid' if capture.engine == 'mariadb' else 'xid'} {lag.horizon}",
                    head,
                    lag.pending_changes,
                    capture_freshness(
                        changes, edw, schemas, capture, failures=failures.get(capture.asset)
                    ),
                )
        recent = edw.execute(
            sql.SQL(
                "SELECT asset, source, shard, start_position, end_position, received, loaded, "
                "dead_lettered, deduplicated, "
                "extract(epoch FROM clock_timestamp() - committed_at)::float8, run_id "
                "FROM {}.batch_ledger ORDER BY committed_at DESC, batch_id DESC LIMIT %s"
            ).format(meta),
            (batches,),
        ).fetchall()
    say(
        f"lag per shard (oldest: age of the oldest record or change not loaded yet; bound {settings.freshness_max_lag_s:g} s)"
    )
    print_table(header, rows)
    for asset, source, why in unreachable:
        say(f"  {asset} {source}: not read ({why})")
    if stopped:
        say(f"\n{len(stopped)} shard(s) stopped: they load nothing until an operator acts")
        for asset, shard, why in stopped:
            say(f"  {asset} {shard}: {why}")
    say(f"\nfailed runs: {runs_note}")
    if batches > 0:
        say(f"\nlast {len(recent)} batches")
        print_table(
            (
                "asset",
                "shard",
                "positions",
                "received",
                "loaded",
                "dead",
                "dedup",
                "committed",
                "run",
            ),
            [
                (
                    r[0],
                    f"{r[1]}[{r[2]}]",
                    f"[{r[3]}, {r[4]})",
                    str(r[5]),
                    str(r[6]),
                    str(r[7]),
                    str(r[8]),
                    f"{compact_age(r[9])} ago",
                    str(r[10])[:8],
                )
                for r in recent
            ]
            or [("-",) * 9],
        )
    halted = 1 if stopped else 0
    if not checks:
        return halted
    from kappa.dagster.check_status import read_check_states
    from kappa.dagster.instance import InstanceUnavailable

    try:
        states = read_check_states(settings)
    except InstanceUnavailable as exc:
        say(f"\nchecks: not read ({exc})")
        return halted
    failing = [s for s in states if s.failing]
    counts = {name: sum(s.state == name for s in states) for name in ("passed", "running", "never")}
    say(
        f"\nchecks: {len(states)} defined, {counts['passed']} passed, {len(failing)} failing, "
        f"{counts['running']} running, {counts['never']} never evaluated"
    )
    if failing:
        print_table(
            ("asset", "check", "state", "severity", "when", "why"),
            [
                (
                    s.asset,
                    s.check,
                    s.state,
                    s.severity.lower() or "-",
                    f"{compact_age(s.age_s)} ago",
                    shorten(s.description) or "-",
                )
                for s in failing
            ],
        )
    from kappa.dagster.retention import status_lines

    say("\n".join(status_lines(settings)))
    return 1 if failing or stopped else 0


def _run_failures(settings: Settings) -> tuple[dict[str, dict[int, RunFailures]], str]:
    """Per asset, the shards whose last runs failed (from the Dagster instance), and a note
    saying what was read; an instance that cannot be read leaves them unknown, said so."""
    from kappa.dagster.instance import InstanceUnavailable, open_instance

    threshold = failure_threshold(settings.run_retries)
    assets = [spec.asset for spec, _ in topic_ingests(settings)] + [
        c.asset for c in active_captures(settings)
    ]
    try:
        with open_instance(settings) as instance:
            found = {a: recent_failures(instance, a, threshold=threshold) for a in assets}
    except InstanceUnavailable as exc:
        return {}, f"not read ({exc})"
    return found, (
        f"read from the Dagster instance (a shard whose last {threshold} runs failed is stopped, "
        "KAPPA_RUN_RETRIES + 1)"
    )
