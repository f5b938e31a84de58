"""Self-healing of provisional enrichment: which time partitions hold rows enriched before
change capture covered them, and which of those can be re-derived now.

A row is ``provisional`` when its event was newer than what change capture had loaded when
its batch ran (see :class:`kappa.steps.Completeness`). Once capture is complete past its
event time for its lookup keys (the event fields the step's lookups match on), re-deriving its time partition through the backfill path
(:func:`kappa.ingest.reprocess.reprocess_window`) joins the version valid at the event time, and gives
the rows a backfill gives, so replay equivalence holds. A heal re-derives the partition only
from each shard's first ledger batch holding a provisional row (:func:`heal_positions`). The
heal sensor plans that run; this module finds the partitions, without Dagster.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
import psycopg
from psycopg import sql

from kappa.catalog.streams import EventContract
from kappa.edw.types import Schemas
from kappa.partitions import TimeWindows
from kappa.steps.api import completeness_keys
from kappa.steps.asof import PROVISIONAL, STATUS
from kappa.steps.completeness import Completeness

#: The run tag of a heal run (its value: the time partition healed). Such a run re-derives
#: its partition only from each shard's first ledger batch holding a provisional row.
HEAL_TAG = "kappa/heal"
#: The derived column that says how a row was enriched.
ENRICHMENT_COLUMN = STATUS


def heals(contract: EventContract) -> bool:
    """Whether ``contract``'s fact carries an enrichment that may be provisional (and has
    lookup keys to tell when it no longer is)."""
    return any(name == ENRICHMENT_COLUMN for name, _ in contract.derived) and bool(
        lookup_keys(contract)
    )


def lookup_keys(contract: EventContract) -> tuple[str, ...]:
    """The event fields whose change capture decides whether the stream's rows are final."""
    if contract.step is None:
        return ()
    from kappa.catalog.streams import resolve_step  # the catalogue checked it resolves

    return completeness_keys(tuple(getattr(resolve_step(contract.step), "lookups", ())))


def heal_ddl(schemas: Schemas, contract: EventContract) -> sql.Composed:
    """Indexes that keep the heal sensor's query cheap: the provisional rows alone (a partial
    index, empty when nothing is provisional), and the ledger batch holding an offset."""
    return sql.SQL(
        "CREATE INDEX IF NOT EXISTS {fact_index} ON {table} (topic, kafka_partition, "
        "kafka_offset) INCLUDE ({keys}, event_time) WHERE {enrichment} = {provisional};"
        "CREATE INDEX IF NOT EXISTS batch_ledger_position_idx ON {ledger} "
        "(asset, source, shard, start_position);"
    ).format(
        fact_index=sql.Identifier(f"{contract.table}_provisional_idx"),
        table=sql.Identifier(schemas.edw, contract.table),
        keys=sql.SQL(", ").join(map(sql.Identifier, lookup_keys(contract))),
        enrichment=sql.Identifier(ENRICHMENT_COLUMN),
        provisional=sql.Literal(PROVISIONAL),
        ledger=sql.Identifier(schemas.meta, "batch_ledger"),
    )


@dataclass(frozen=True)
class ProvisionalGroup:
    """The provisional rows of one combination of lookup key values in one time partition.

    ``partition_key`` is that of the ledger batch whose offset range holds the rows (None
    when no batch holds them, which the ledger's tiling rules out); ``keys`` maps each
    lookup key field to its value.
    """

    partition_key: str | None
    keys: tuple[tuple[str, str], ...]
    earliest: pd.Timestamp
    rows: int

    def describe(self) -> str:
        """The key values as an operator reads them: field ``site_id`` value s-1 is "site s-1"."""
        return ", ".join(f"{field.removesuffix('_id')} {value}" for field, value in self.keys)


def provisional_groups(
    conn: psycopg.Connection, schemas: Schemas, asset: str, contract: EventContract
) -> list[ProvisionalGroup]:
    """Every provisional row of ``asset``, by time partition (from the ledger) and lookup
    key values."""
    keys = lookup_keys(contract)
    rows = conn.execute(
        sql.SQL(
            "SELECT l.partition_key, {keys}, min(f.event_time), count(*) FROM {table} f "
            "LEFT JOIN LATERAL (SELECT partition_key FROM {ledger} b WHERE b.asset = %s "
            "AND b.source = f.topic AND b.shard = f.kafka_partition "
            "AND b.start_position <= f.kafka_offset AND f.kafka_offset < b.end_position "
            "ORDER BY b.start_position DESC LIMIT 1) l ON true "
            "WHERE f.{enrichment} = {provisional} GROUP BY {groups}"
        ).format(
            keys=sql.SQL(", ").join(sql.Identifier("f", k) for k in keys),
            table=sql.Identifier(schemas.edw, contract.table),
            ledger=sql.Identifier(schemas.meta, "batch_ledger"),
            enrichment=sql.Identifier(ENRICHMENT_COLUMN),
            provisional=sql.Literal(PROVISIONAL),
            groups=sql.SQL(", ").join(sql.Literal(i + 1) for i in range(len(keys) + 1)),
        ),
        (asset,),
    ).fetchall()
    return [
        ProvisionalGroup(
            row[0],
            tuple((k, str(v)) for k, v in zip(keys, row[1:-2], strict=True)),
            pd.Timestamp(row[-2]).tz_convert("UTC"),
            int(row[-1]),
        )
        for row in rows
    ]


def group_values(groups: Sequence[ProvisionalGroup]) -> dict[str, list[str]]:
    """The distinct values of each lookup key field among ``groups`` (for a watermark)."""
    values: dict[str, set[str]] = {}
    for group in groups:
        for field, value in group.keys:
            values.setdefault(field, set()).add(value)
    return {field: sorted(found) for field, found in values.items()}


@dataclass(frozen=True)
class HealPlan:
    """What to heal now: ``partition_key`` (None: nothing yet), and why the rest waits."""

    partition_key: str | None
    #: Provisional rows of the partition whose keys' capture is past their earliest event.
    ready_rows: int
    provisional_rows: int
    waiting: str


def plan_heal(
    asset: str,
    groups: Sequence[ProvisionalGroup],
    completeness: Completeness | None,
    windows: TimeWindows,
) -> HealPlan:
    """The oldest time partition with a provisional row that change capture now covers.

    A group's rows are ready once its completeness mark reaches their earliest event
    time: re-deriving the partition turns at least that row final (rows newer still stay
    provisional and are healed by a later run).
    """
    total = sum(g.rows for g in groups)
    if not groups:
        return HealPlan(None, 0, 0, f"no provisional rows in {asset}")
    if completeness is None:
        return HealPlan(
            None,
            0,
            total,
            f"{total} provisional rows in {asset} wait for change capture to record how far "
            "it is complete (no capture batch yet, or changes wait past it)",
        )
    unplaced = [g for g in groups if g.partition_key is None]
    placed = [g for g in groups if g.partition_key is not None]
    marks = completeness.marks(
        pd.DataFrame([dict(g.keys) for g in placed], index=range(len(placed)), dtype=object)
    )
    ready: dict[str, int] = {}
    closest: tuple[pd.Timedelta, ProvisionalGroup, pd.Timestamp] | None = None
    for group, mark in zip(placed, marks, strict=True):
        assert group.partition_key is not None
        if group.earliest <= mark:
            ready[group.partition_key] = ready.get(group.partition_key, 0) + group.rows
        elif closest is None or group.earliest - mark < closest[0]:
            closest = (group.earliest - mark, group, mark)
    notes = []
    if unplaced:
        notes.append(
            f"{sum(g.rows for g in unplaced)} provisional rows in no ledger batch (not healed)"
        )
    if not ready:
        if closest is not None:
            _, group, mark = closest
            notes.insert(
                0,
                f"{total} provisional rows in {asset} wait for change capture to pass their "
                f"event times (closest: {group.describe()}, complete up to "
                f"{mark.isoformat()}, earliest provisional event {group.earliest.isoformat()}, "
                f"partition {group.partition_key})",
            )
        return HealPlan(None, 0, total, "; ".join(notes))
    key = min(ready, key=lambda k: windows.window(k).start)
    return HealPlan(key, ready[key], total, "; ".join(notes))


def heal_positions(
    conn: psycopg.Connection,
    schemas: Schemas,
    asset: str,
    topic: str,
    contract: EventContract,
    partition_key: str,
) -> dict[int, int]:
    """Per shard of ``partition_key`` holding a provisional row: where the ledger batch
    holding its first one starts. Re-deriving from there is enough: the rows before are
    final (the changes of their lookup keys were all loaded), and the state as of that batch
    boundary is in the state versions, as a backfill restores it at a partition's start.
    Shards without a provisional row in the partition are not listed."""
    rows = conn.execute(
        sql.SQL(
            "WITH spans AS (SELECT shard, min(start_position) AS lo, max(end_position) AS hi "
            "FROM {ledger} WHERE asset = %(asset)s AND source = %(topic)s "
            "AND partition_key = %(key)s GROUP BY shard) "
            "SELECT s.shard, (SELECT b.start_position FROM {ledger} b WHERE b.asset = %(asset)s "
            "AND b.source = %(topic)s AND b.shard = s.shard AND b.start_position <= f.first "
            "ORDER BY b.start_position DESC LIMIT 1) FROM spans s CROSS JOIN LATERAL "
            "(SELECT min(kafka_offset) AS first FROM {table} WHERE {enrichment} = {provisional} "
            "AND topic = %(topic)s AND kafka_partition = s.shard AND kafka_offset >= s.lo "
            "AND kafka_offset < s.hi) f WHERE f.first IS NOT NULL"
        ).format(
            ledger=sql.Identifier(schemas.meta, "batch_ledger"),
            table=sql.Identifier(schemas.edw, contract.table),
            enrichment=sql.Identifier(ENRICHMENT_COLUMN),
            provisional=sql.Literal(PROVISIONAL),
        ),
        {"asset": asset, "topic": topic, "key": partition_key},
    ).fetchall()
    return {int(shard): int(start) for shard, start in rows if start is not None}


def ledger_fingerprint(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str, partition_key: str
) -> str:
    """Changes whenever a batch of the partition commits (a live batch or a re-derivation):
    a heal run is asked for once per state of the partition, so a failed one is not
    relaunched until the partition changes."""
    row = conn.execute(
        sql.SQL(
            "SELECT coalesce(max(batch_id), 0), count(*) FROM {} "
            "WHERE asset = %s AND source = %s AND partition_key = %s"
        ).format(sql.Identifier(schemas.meta, "batch_ledger")),
        (asset, source, partition_key),
    ).fetchone()
    assert row is not None
    return f"{row[0]}.{row[1]}"
