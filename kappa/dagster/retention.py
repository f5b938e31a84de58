"""Bounded Dagster storage: summaries of closed partitions, then deletion of old micro-batch runs.

Every micro-batch is a Dagster run with its event log (run and step events, a materialisation
with metadata tables). Dagster's own ``retention:`` covers sensor and schedule ticks only, so
without this the runs and event-log tables grow by every batch forever.

Deleting a run deletes its materialisations with it (``DagsterInstance.delete_run`` removes the
run's rows of ``event_logs`` and ``asset_event_tags``). What the instance then reports for a
time partition (measured in ``tests/integration/test_retention.py``):

* the cached partition status (``asset_keys.cached_status_data``) keeps the partition as
  materialised, but only until the cache is rebuilt from the event log (a new partitions
  definition, e.g. another ``KAPPA_PARTITIONS_START``), which then forgets it;
* the latest materialisation of the partition, and the list of its materialisations, are gone.

So before any run of a partition goes, the partition gets one summarising materialisation
(runless, reported through the instance) with its totals from the EDW's batch ledger, the
record of what was loaded. A partition is summarised once it is *closed*: its window ended more
than ``grace_s`` ago, no run of it is in flight and no shard's latest run failed in it (that
shard loads there next, and its failed runs are what stop it). Only runs that carry offset ranges (the
micro-batches the sensors plan) are ever deleted; backfill runs, heal runs, check runs and
anything launched from the UI are kept.

Progress is kept in the instance's key-value store (one key per asset): the last partition
summarised and the last partition whose micro-batch runs are all gone, so a tick does a bounded
amount of work and a restarted daemon neither summarises twice nor skips a partition.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any

import dagster as dg
import psycopg
from dagster._core.storage.tags import BACKFILL_ID_TAG, PARTITION_NAME_TAG
from psycopg import sql

from kappa.dagster.assets.recent_batches import SUMMARY_MODE
from kappa.dagster.sensors.micro_batch import IN_FLIGHT, RANGES_TAG
from kappa.edw.types import Schemas
from kappa.health import ASSET_TAG, recent_failures
from kappa.partitions import TimeWindows

__all__ = ["SUMMARY_MODE", "RetentionPolicy", "apply_retention", "storage_report"]

_SUMMARISED_KEY = "kappa/retention/summarised/{asset}"
_PRUNED_KEY = "kappa/retention/pruned/{asset}"
#: Partitions summarised, and partitions examined for deletion, per asset and tick: a daemon
#: that was down (or a first tick over months of partitions) catches up over ticks.
SUMMARIES_PER_TICK = 24
PARTITIONS_PER_TICK = 48

FINISHED = [
    dg.DagsterRunStatus.SUCCESS,
    dg.DagsterRunStatus.FAILURE,
    dg.DagsterRunStatus.CANCELED,
]


@dataclass(frozen=True)
class RetentionPolicy:
    """How long finished micro-batch runs are kept, and how much a tick may delete."""

    keep_hours: int
    deletes_per_tick: int
    #: A partition is closed this long after its window ends (a batch planned just before the
    #: end may still be running or retried).
    grace_s: int

    @property
    def enabled(self) -> bool:
        return self.keep_hours > 0

    def describe(self) -> str:
        if not self.enabled:
            return "off: every run is kept (KAPPA_RUN_RETENTION_HOURS=0)"
        return (
            f"micro-batch runs kept {self.keep_hours} h after they end and until their partition "
            f"is closed (window end + {self.grace_s} s) and summarised; at most "
            f"{self.deletes_per_tick} deleted per tick; backfill, heal and check runs kept"
        )


@dataclass(frozen=True)
class PartitionTotals:
    """What the batch ledger holds for one time partition of an asset."""

    partition_key: str
    batches: int
    runs: int
    received: int
    loaded: int
    dead_lettered: int
    deduplicated: int
    shards: tuple[tuple[str, int, int, int, int], ...]  # source, shard, start, end, batches

    def metadata(self) -> dict[str, Any]:
        from kappa.dagster.assets.event_store import metadata_table

        return {
            "mode": SUMMARY_MODE,
            "batches": self.batches,
            "micro_batch_runs": self.runs,
            "rows_received": self.received,
            "rows_loaded": self.loaded,
            "rows_dead_lettered": self.dead_lettered,
            "rows_deduplicated": self.deduplicated,
            "ledger": metadata_table(
                [
                    {
                        "source": source,
                        "shard": shard,
                        "positions": f"[{start}, {end})",
                        "batches": batches,
                    }
                    for source, shard, start, end, batches in self.shards
                ]
            ),
        }


def ledger_totals(
    conn: psycopg.Connection, schemas: Schemas, asset: str, *, after: str | None, upto: str
) -> list[PartitionTotals]:
    """Totals of ``asset``'s partitions in ``(after, upto]`` that the ledger has batches of,
    oldest first (partition keys sort as their windows do)."""
    rows = conn.execute(
        sql.SQL(
            "SELECT partition_key, source, shard, min(start_position), max(end_position), "
            "count(*), count(DISTINCT run_id), sum(received), sum(loaded), sum(dead_lettered), "
            "sum(deduplicated) FROM {} WHERE asset = %s AND partition_key > %s "
            "AND partition_key <= %s GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
        ).format(sql.Identifier(schemas.meta, "batch_ledger")),
        (asset, after or "", upto),
    ).fetchall()
    totals: dict[str, list[tuple]] = {}
    for row in rows:
        totals.setdefault(row[0], []).append(row)
    return [
        PartitionTotals(
            partition_key=key,
            batches=sum(r[5] for r in group),
            # A run may load several shards: the count per shard is an upper bound.
            runs=max(r[6] for r in group),
            received=sum(r[7] for r in group),
            loaded=sum(r[8] for r in group),
            dead_lettered=sum(r[9] for r in group),
            deduplicated=sum(r[10] for r in group),
            shards=tuple((r[1], r[2], r[3], r[4], r[5]) for r in group),
        )
        for key, group in totals.items()
    ]


def last_closed(windows: TimeWindows, now: datetime, grace_s: int) -> str | None:
    """The newest partition whose window ended at least ``grace_s`` before ``now``."""
    window = windows.at(now - timedelta(seconds=grace_s))
    previous = windows.previous(window)
    return previous.key if previous is not None else None


def _cursor(instance: dg.DagsterInstance, key: str) -> str | None:
    return instance.run_storage.get_cursor_values({key}).get(key) or None


def _set_cursor(instance: dg.DagsterInstance, key: str, value: str) -> None:
    instance.run_storage.set_cursor_values({key: value})


def summarised_through(instance: dg.DagsterInstance, asset: str) -> str | None:
    """The last partition of ``asset`` with its summary reported (None: none yet)."""
    return _cursor(instance, _SUMMARISED_KEY.format(asset=asset))


def in_flight_partitions(instance: dg.DagsterInstance, asset: str) -> set[str]:
    """Partitions of ``asset`` that may still get batches: a run of them is queued or running,
    or a shard's latest finished run failed in them (its retry, or the operator's fix, loads
    there next; :func:`kappa.health.recent_failures` is what stops such a shard, so its failed
    runs must stay)."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={ASSET_TAG: asset}, statuses=IN_FLIGHT))
    busy = {r.tags[PARTITION_NAME_TAG] for r in runs if PARTITION_NAME_TAG in r.tags}
    for failures in recent_failures(instance, asset, threshold=1).values():
        failed = instance.get_run_by_id(failures.run_id)
        if failed is not None and PARTITION_NAME_TAG in failed.tags:
            busy.add(failed.tags[PARTITION_NAME_TAG])
    return busy


def summarise_closed(
    instance: dg.DagsterInstance,
    conn: psycopg.Connection,
    schemas: Schemas,
    asset: str,
    windows: TimeWindows,
    *,
    now: datetime,
    grace_s: int,
    limit: int = SUMMARIES_PER_TICK,
) -> list[str]:
    """Report one summarising materialisation for each closed partition of ``asset`` not yet
    summarised (at most ``limit``, oldest first); returns their keys.

    The summary is stored before the cursor moves: a tick that dies in between reports the
    partition again next time (two summaries with equal totals), never none.
    """
    upto = last_closed(windows, now, grace_s)
    if upto is None:
        return []
    busy = in_flight_partitions(instance, asset)
    cursor_key = _SUMMARISED_KEY.format(asset=asset)
    after = _cursor(instance, cursor_key)
    done: list[str] = []
    for totals in ledger_totals(conn, schemas, asset, after=after, upto=upto)[:limit]:
        if totals.partition_key in busy:
            break  # partitions close in order: nothing after a busy one is summarised yet
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                asset_key=asset,
                partition=totals.partition_key,
                description=(
                    f"Partition {totals.partition_key} closed: {totals.batches} micro-batches "
                    "(its micro-batch runs are deleted after the retention period; this keeps "
                    "the partition materialised)."
                ),
                metadata=totals.metadata(),
            )
        )
        _set_cursor(instance, cursor_key, totals.partition_key)
        done.append(totals.partition_key)
    return done


def prunable(run: dg.DagsterRun) -> bool:
    """A micro-batch the sensors planned (offset ranges), outside any backfill."""
    return RANGES_TAG in run.tags and BACKFILL_ID_TAG not in run.tags


def prune_runs(
    instance: dg.DagsterInstance,
    asset: str,
    windows: TimeWindows,
    *,
    now: datetime,
    keep_hours: int,
    limit: int,
) -> list[str]:
    """Delete up to ``limit`` finished micro-batch runs of ``asset`` (run and event log) that
    ended more than ``keep_hours`` ago, in summarised partitions, oldest partition first;
    returns their run ids."""
    through = summarised_through(instance, asset)
    if through is None or keep_hours <= 0:
        return []
    cutoff = now - timedelta(hours=keep_hours)
    pruned_key = _PRUNED_KEY.format(asset=asset)
    pruned = _cursor(instance, pruned_key)
    try:
        first = windows.next(windows.window(pruned)) if pruned else windows.at(windows.start)
    except ValueError:  # a key of another grain (KAPPA_PARTITIONS changed): start over
        first = windows.at(windows.start)
    try:
        pending = list(islice(_windows(windows, first.key, through), PARTITIONS_PER_TICK))
    except ValueError:  # the last summary is of another grain: wait for one of this grain
        return []
    deleted: list[str] = []
    for window in pending:
        if len(deleted) >= limit:
            break
        # Heal runs of the partition come back in each page and are kept: ask for enough.
        records = instance.get_run_records(
            filters=dg.RunsFilter(
                tags={ASSET_TAG: asset, PARTITION_NAME_TAG: window.key},
                statuses=FINISHED,
                updated_before=cutoff,
            ),
            limit=2 * limit,
            ascending=True,
        )
        for record in records:
            if len(deleted) >= limit:
                break
            if prunable(record.dagster_run):
                instance.delete_run(record.dagster_run.run_id)
                deleted.append(record.dagster_run.run_id)
        remaining = instance.get_run_records(
            filters=dg.RunsFilter(tags={ASSET_TAG: asset, PARTITION_NAME_TAG: window.key}),
            limit=2 * limit,
        )
        if any(prunable(r.dagster_run) for r in remaining):
            break  # runs younger than the window: the partitions after it wait too
        _set_cursor(instance, pruned_key, window.key)
    return deleted


def _windows(windows: TimeWindows, first: str, last: str) -> Iterator[Any]:
    if windows.window(first).start > windows.window(last).start:
        return iter(())
    return windows.span(first, last)


@dataclass(frozen=True)
class TickReport:
    summarised: dict[str, list[str]]
    deleted: dict[str, list[str]]

    def describe(self) -> str:
        parts = [
            f"{asset}: summarised {', '.join(keys)}"
            for asset, keys in self.summarised.items()
            if keys
        ] + [f"{asset}: deleted {len(ids)} runs" for asset, ids in self.deleted.items() if ids]
        return "; ".join(parts) or "nothing to summarise or delete"


def apply_retention(
    instance: dg.DagsterInstance,
    conn: psycopg.Connection,
    schemas: Schemas,
    assets: Iterable[str],
    windows: TimeWindows,
    policy: RetentionPolicy,
    *,
    now: datetime | None = None,
) -> TickReport:
    """One tick: summarise what closed, then delete what the policy lets go (at most
    ``policy.deletes_per_tick`` runs over all assets)."""
    now = now or datetime.now(UTC)
    summarised: dict[str, list[str]] = {}
    deleted: dict[str, list[str]] = {}
    budget = policy.deletes_per_tick
    for asset in assets:
        summarised[asset] = summarise_closed(
            instance, conn, schemas, asset, windows, now=now, grace_s=policy.grace_s
        )
        if policy.enabled and budget > 0:
            deleted[asset] = prune_runs(
                instance, asset, windows, now=now, keep_hours=policy.keep_hours, limit=budget
            )
            budget -= len(deleted[asset])
    return TickReport(summarised, deleted)


# -- what `kappa status` shows ------------------------------------------------------------------

_TABLES = ("runs", "run_tags", "event_logs", "asset_event_tags")


def storage_sizes(instance: dg.DagsterInstance) -> dict[str, tuple[int, int]] | None:
    """table -> (estimated rows, bytes with indexes and TOAST) of the instance's PostgreSQL
    storage; None when the storage is not PostgreSQL."""
    url = getattr(instance.event_log_storage, "postgres_url", None)
    if not url:
        return None
    import sqlalchemy as sa

    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT c.relname, greatest(c.reltuples, 0)::bigint, "
                    "pg_total_relation_size(c.oid) FROM pg_class c "
                    "JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.relkind = 'r' AND n.nspname = current_schema() "
                    "AND c.relname = ANY(:tables)"
                ),
                {"tables": list(_TABLES)},
            ).fetchall()
    finally:
        engine.dispose()
    return {name: (int(count), int(size)) for name, count, size in rows}


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def storage_report(instance: dg.DagsterInstance, policy: RetentionPolicy) -> list[str]:
    """Lines for ``kappa status``: the size of Dagster's run and event-log tables, the
    retention in force."""
    lines = [f"Dagster storage retention: {policy.describe()}"]
    sizes = storage_sizes(instance)
    if sizes is None:
        lines.append("  storage is not PostgreSQL: table sizes not shown")
        return lines
    total = sum(size for _, size in sizes.values())
    lines.append(f"  Dagster storage: {_mib(total)} in {', '.join(_TABLES)}")
    for name in _TABLES:
        if name in sizes:
            count, size = sizes[name]
            lines.append(f"    {name:<17} ~{count:>10} rows  {_mib(size):>11}")
    return lines


def policy_from(settings: Any) -> RetentionPolicy:
    """The policy the settings ask for (``settings``: :class:`kappa.settings.Settings`)."""
    return RetentionPolicy(
        keep_hours=settings.run_retention_hours,
        deletes_per_tick=settings.run_retention_deletes,
        grace_s=settings.run_max_runtime_s + settings.sensor_interval_s,
    )


def status_lines(settings: Any) -> list[str]:
    """:func:`storage_report` of the deployment's instance, for ``kappa status``; an instance
    that cannot be read is said, not raised (the rest of the status stands)."""
    import sqlalchemy.exc

    from kappa.dagster.instance import InstanceUnavailable, open_instance

    policy = policy_from(settings)
    try:
        with open_instance(settings) as instance:
            return ["", *storage_report(instance, policy)]
    except (InstanceUnavailable, sqlalchemy.exc.SQLAlchemyError) as exc:
        return ["", f"Dagster storage retention: {policy.describe()}", f"  sizes not read ({exc})"]
