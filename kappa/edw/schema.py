"""The EDW's tables from the catalogue: facts, the machinery (ledger, dead letters, state,
checkpoints), created idempotently, evolved only as the catalogue allows.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg import sql

from kappa.catalog.streams import EventContract, fact_column_specs
from kappa.edw.evolution import (
    plan_evolution,
)
from kappa.edw.types import Schemas
from kappa.steps.api import SIDE_TABLE_ENGINE_COLUMNS, SideTable


def _fact_ddl(schemas: Schemas, contract: EventContract) -> sql.Composed:
    # Types are from the catalogue's checked set (kappa/catalog/fields.py), names identifiers.
    columns = sql.SQL(",\n  ").join(
        [
            sql.SQL("{} {}{}").format(
                sql.Identifier(c.name),
                sql.SQL(c.sql_type),
                sql.SQL(" NOT NULL" if c.not_null else ""),
            )
            for c in fact_column_specs(contract)
        ]
        + [
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(sql_type))
            for name, sql_type in contract.derived
        ]
    )
    table = sql.Identifier(schemas.edw, contract.table)
    return sql.SQL(
        """
CREATE TABLE IF NOT EXISTS {table} (
  {columns},
  PRIMARY KEY (event_id)
);
CREATE INDEX IF NOT EXISTS {position_index} ON {table} (topic, kafka_partition, kafka_offset);
CREATE INDEX IF NOT EXISTS {time_index} ON {table} (event_time);
{derived}
"""
    ).format(
        derived=sql.SQL("\n").join(
            sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {};").format(
                table, sql.Identifier(name), sql.SQL(sql_type)
            )
            for name, sql_type in contract.derived
        ),
        table=table,
        columns=columns,
        position_index=sql.Identifier(f"{contract.table}_position_idx"),
        time_index=sql.Identifier(f"{contract.table}_event_time_idx"),
    )


_META_DDL = """
CREATE TABLE IF NOT EXISTS {meta}.ledger_head (
  asset text NOT NULL,
  source text NOT NULL,
  shard integer NOT NULL,
  epoch text NOT NULL DEFAULT '',
  end_position bigint NOT NULL,
  batches bigint NOT NULL DEFAULT 0,
  updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (asset, source, shard)
);
ALTER TABLE {meta}.ledger_head ADD COLUMN IF NOT EXISTS watermark timestamptz;
ALTER TABLE {meta}.ledger_head ADD COLUMN IF NOT EXISTS partition_key text;
CREATE TABLE IF NOT EXISTS {meta}.batch_ledger (
  batch_id bigserial PRIMARY KEY,
  asset text NOT NULL,
  source text NOT NULL,
  shard integer NOT NULL,
  epoch text NOT NULL DEFAULT '',
  start_position bigint NOT NULL,
  end_position bigint NOT NULL,
  run_id text NOT NULL,
  partition_key text,
  received integer NOT NULL,
  loaded integer NOT NULL,
  dead_lettered integer NOT NULL,
  deduplicated integer NOT NULL,
  committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  CHECK (end_position > start_position),
  CHECK (received = loaded + dead_lettered + deduplicated),
  UNIQUE (asset, source, shard, epoch, start_position)
);
ALTER TABLE {meta}.batch_ledger ADD COLUMN IF NOT EXISTS watermark timestamptz;
CREATE INDEX IF NOT EXISTS batch_ledger_partition_idx
  ON {meta}.batch_ledger (asset, source, partition_key);
CREATE TABLE IF NOT EXISTS {meta}.checkpoint (
  asset text NOT NULL,
  source text NOT NULL,
  shard integer NOT NULL,
  partition_key text NOT NULL,
  position bigint NOT NULL,
  digest text NOT NULL,
  stale_reason text,
  run_id text NOT NULL,
  written_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (asset, source, shard, partition_key)
);
CREATE TABLE IF NOT EXISTS {meta}.state (
  store text NOT NULL,
  shard integer NOT NULL,
  key text NOT NULL,
  position bigint NOT NULL,
  value jsonb NOT NULL,
  PRIMARY KEY (store, shard, key, position)
);
CREATE TABLE IF NOT EXISTS {meta}.dead_letter (
  dead_letter_id bigserial PRIMARY KEY,
  asset text NOT NULL,
  source text NOT NULL,
  shard integer NOT NULL,
  epoch text NOT NULL DEFAULT '',
  position bigint NOT NULL,
  broker_time timestamptz,
  raw_key bytea,
  raw_value bytea,
  reason text NOT NULL,
  run_id text NOT NULL,
  dead_lettered_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  UNIQUE (asset, source, shard, epoch, position)
);
"""


def side_tables_of(contract: EventContract) -> tuple[SideTable, ...]:
    """The side tables the stream's step declares (none without a step)."""
    if contract.step is None:
        return ()
    from kappa.catalog.streams import resolve_step  # the catalogue checked it resolves

    return tuple(getattr(resolve_step(contract.step), "side_tables", ()))


def side_table_ddl(schemas: Schemas, table: SideTable) -> sql.Composed:
    """A step's side table: the event it belongs to, the step's columns (NOT NULL unless
    declared nullable), and the source coordinates replay and replacement delete by."""
    columns = [
        sql.SQL("{} {}{}").format(
            sql.Identifier(name),
            sql.SQL(sql_type),
            sql.SQL("" if name in table.nullable else " NOT NULL"),
        )
        for name, sql_type in (("event_id", "uuid"), *table.columns, *SIDE_TABLE_ENGINE_COLUMNS)
    ]
    return sql.SQL("CREATE TABLE IF NOT EXISTS {table} ({columns}, PRIMARY KEY ({key}))").format(
        table=sql.Identifier(schemas.edw, table.name),
        columns=sql.SQL(", ").join(columns),
        key=sql.SQL(", ").join(map(sql.Identifier, ("event_id", *table.key))),
    )


def ensure_schema(
    conn: psycopg.Connection, schemas: Schemas, contracts: Sequence[EventContract]
) -> list[str]:
    """Create schemas and tables that do not exist yet and evolve the existing fact tables to
    the catalogue (see :func:`plan_evolution`); running it again changes nothing. Returns
    the changes made to existing tables."""
    from kappa.heal import heal_ddl, heals  # heal builds on this module

    with conn.transaction():
        # Serialise concurrent bootstraps (stack start, tests in parallel) on one lock.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('kappa-etl:ensure_schema'))")
        # Every stream is checked before anything is written.
        plans = plan_evolution(conn, schemas, contracts)
        for schema in (schemas.edw, schemas.meta):
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL(_META_DDL).format(meta=sql.Identifier(schemas.meta)))
        for plan in plans:
            for statement in plan.statements:
                conn.execute(statement)
        for contract in contracts:
            conn.execute(_fact_ddl(schemas, contract))
            if heals(contract):
                conn.execute(heal_ddl(schemas, contract))
            for side in side_tables_of(contract):
                conn.execute(side_table_ddl(schemas, side))
    return [change for plan in plans for change in plan.changes]
