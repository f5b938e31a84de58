"""The EDW table a capture lands in: its DDL, the staging table's, and which rows a range of
transactions wrote."""

from __future__ import annotations

import psycopg
from psycopg import sql

from kappa.catalog.captures import CaptureSpec, Column
from kappa.edw.types import Schemas

OPERATIONS = ("I", "U", "D")


def surrogate_key(spec: CaptureSpec) -> str:
    """The surrogate key column of an SCD2 target: ``dim_<name>`` → ``<name>_sk``."""
    base = spec.target.removeprefix("dim_")
    return f"{base}_sk"


def _columns_ddl(columns: tuple[Column, ...]) -> list[sql.Composable]:
    return [sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.sql_type)) for c in columns]


def ensure_target(conn: psycopg.Connection, schemas: Schemas, spec: CaptureSpec) -> None:
    """Create the target table of a capture (idempotent)."""
    table = sql.Identifier(schemas.edw, spec.target)
    keys = sql.SQL(", ").join(sql.Identifier(k) for k in spec.keys)
    columns = sql.SQL(",\n  ").join(_columns_ddl(spec.columns))
    if spec.mode == "scd2":
        ddl = sql.SQL(
            """
CREATE TABLE IF NOT EXISTS {table} (
  {sk} bigint PRIMARY KEY,
  {columns},
  valid_from timestamptz NOT NULL,
  valid_to timestamptz,
  is_current boolean NOT NULL,
  source_xid bigint NOT NULL,
  source_change_id bigint NOT NULL,
  change_op char(1) NOT NULL,
  CHECK (valid_to IS NULL OR valid_to >= valid_from)
);
-- The transaction that closed a version, so readers can refresh exactly what changed.
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS closed_by_xid bigint;
ALTER TABLE {table} ADD COLUMN IF NOT EXISTS closed_by_change_id bigint;
CREATE UNIQUE INDEX IF NOT EXISTS {current_index} ON {table} ({keys}) WHERE is_current;
CREATE INDEX IF NOT EXISTS {history_index} ON {table} ({keys}, valid_from);
CREATE INDEX IF NOT EXISTS {xid_index} ON {table} (source_xid);
CREATE INDEX IF NOT EXISTS {closed_index} ON {table} (closed_by_xid) WHERE closed_by_xid IS NOT NULL;
"""
        ).format(
            table=table,
            sk=sql.Identifier(surrogate_key(spec)),
            columns=columns,
            keys=keys,
            current_index=sql.Identifier(f"{spec.target}_current_idx"),
            history_index=sql.Identifier(f"{spec.target}_history_idx"),
            xid_index=sql.Identifier(f"{spec.target}_xid_idx"),
            closed_index=sql.Identifier(f"{spec.target}_closed_idx"),
        )
    else:
        ddl = sql.SQL(
            """
CREATE TABLE IF NOT EXISTS {table} (
  {columns},
  source_xid bigint NOT NULL,
  source_change_id bigint NOT NULL,
  changed_at timestamptz NOT NULL,
  PRIMARY KEY ({keys})
);
"""
        ).format(table=table, columns=columns, keys=keys)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('kappa-etl:ensure_schema'))")
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schemas.edw)))
        conn.execute(ddl)


def stage_ddl(spec: CaptureSpec) -> sql.Composable:
    return sql.SQL(", ").join(
        [
            *_columns_ddl(spec.columns),
            sql.SQL("op char(1)"),
            sql.SQL("source_xid bigint"),
            sql.SQL("source_change_id bigint"),
            sql.SQL("change_time timestamptz"),
        ]
    )


def written_by(spec: CaptureSpec) -> sql.Composable:
    """The target rows that transactions ``[%(start)s, %(end)s)`` wrote (or, SCD2, closed)."""
    written: sql.Composable = sql.SQL("source_xid >= %(start)s AND source_xid < %(end)s")
    if spec.mode == "scd2":
        written = sql.SQL("{} OR (closed_by_xid >= %(start)s AND closed_by_xid < %(end)s)").format(
            written
        )
    return written
