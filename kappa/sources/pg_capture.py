"""Change data capture in the OLTP database: change tables, triggers, and gap-free reading.

Triggers write each row change into the captured table's change table with the writing
transaction's id (``xid8``). Change ids commit out of order, so reading ``id > watermark``
loses rows of transactions still open. Here a batch covers the transaction ids
``[start, end)`` with ``end`` at most the snapshot horizon ``pg_snapshot_xmin``: every
transaction below it has ended, so the rows in the range are final and read in
``(xid, change_id)`` order. A transaction left open holds the horizon back: it delays
changes, it never drops them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
import psycopg
from psycopg import sql

from kappa.catalog.captures import SETTING, CaptureSpec
from kappa.exceptions import ConfigurationError
from kappa.sources.base import TRANSACTIONS, LogBounds

#: One trigger function for every captured table; the change table is the trigger's argument.
_CAPTURE_FUNCTION = """
CREATE OR REPLACE FUNCTION {schema}.kappa_capture() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  EXECUTE format('INSERT INTO %s (op, before, after) VALUES ($1, $2, $3)', TG_ARGV[0])
    USING left(TG_OP, 1),
          CASE WHEN TG_OP <> 'INSERT' THEN to_jsonb(OLD) END,
          CASE WHEN TG_OP <> 'DELETE' THEN to_jsonb(NEW) END;
  RETURN NULL;
END
$$;
"""

_CHANGE_TABLE = """
CREATE TABLE IF NOT EXISTS {table} (
  change_id bigserial PRIMARY KEY,
  xid xid8 NOT NULL DEFAULT pg_current_xact_id(),
  op text NOT NULL,
  changed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  before jsonb,
  after jsonb
);
CREATE INDEX IF NOT EXISTS {index} ON {table} (xid, change_id);
"""


def install_capture(conn: psycopg.Connection, spec: CaptureSpec) -> None:
    """Create the change table and the capture trigger (idempotent)."""
    change_table = sql.Identifier(spec.change_table.schema, spec.change_table.table)
    source = sql.Identifier(spec.source.schema, spec.source.table)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('kappa-etl:install_capture'))")
        exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (str(spec.source),)).fetchone()
        if not exists or not exists[0]:
            raise ConfigurationError(
                SETTING,
                f"captured table {spec.source} ({spec.name}) does not exist in the OLTP database",
            )
        schema = sql.Identifier(spec.change_table.schema)
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(schema))
        conn.execute(sql.SQL(_CAPTURE_FUNCTION).format(schema=schema))
        conn.execute(
            sql.SQL(_CHANGE_TABLE).format(
                table=change_table, index=sql.Identifier(f"{spec.change_table.table}_xid_idx")
            )
        )
        conn.execute(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER kappa_capture AFTER INSERT OR UPDATE OR DELETE ON {source} "
                "FOR EACH ROW EXECUTE FUNCTION {schema}.kappa_capture({argument})"
            ).format(
                source=source,
                schema=schema,
                argument=sql.Literal(change_table.as_string(conn)),
            )
        )


def horizon(conn: psycopg.Connection) -> int:
    """The snapshot horizon: every transaction with a smaller id has committed or aborted."""
    row = conn.execute("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint").fetchone()
    assert row is not None
    return int(row[0])


def complete_until(conn: psycopg.Connection) -> datetime:
    """A time before which every change still to come, or not yet below the horizon, lies.

    Read it before the horizon: a transaction writing now started no earlier than the
    oldest one that holds a transaction id, and one that starts writing later stamps its
    changes later (change times are commit times or the change's own clock time).
    """
    row = conn.execute(
        "SELECT least(clock_timestamp(), min(xact_start) FILTER (WHERE backend_xid IS NOT NULL "
        "AND pid <> pg_backend_pid())) FROM pg_stat_activity"
    ).fetchone()
    assert row is not None
    return row[0]


def source_epoch(conn: psycopg.Connection, spec: CaptureSpec) -> str:
    """Identity of the change table (database and table oids): changes when it is recreated."""
    row = conn.execute(
        "SELECT (SELECT oid FROM pg_database WHERE datname = current_database())::text "
        "|| ':' || to_regclass(%s)::oid::text",
        (str(spec.change_table),),
    ).fetchone()
    if row is None or row[0] is None:
        raise ConfigurationError(
            SETTING, f"change table {spec.change_table} does not exist (run `kappa init`)"
        )
    return str(row[0])


def plan_end(conn: psycopg.Connection, spec: CaptureSpec, start: int, *, max_changes: int) -> int:
    """Where a batch starting at ``start`` ends: at most ``max_changes`` changes, whole
    transactions only, never past the horizon. Equals ``start`` when nothing is ready."""
    limit = horizon(conn)
    table = sql.Identifier(spec.change_table.schema, spec.change_table.table)
    first = conn.execute(
        sql.SQL(
            "SELECT xid::text::bigint FROM {} WHERE xid >= %s::text::xid8 AND xid < %s::text::xid8 "
            "ORDER BY xid, change_id LIMIT 1"
        ).format(table),
        (str(start), str(limit)),
    ).fetchone()
    if first is None:
        return start
    row = conn.execute(
        sql.SQL(
            "SELECT xid::text::bigint FROM {} WHERE xid >= %s::text::xid8 AND xid < %s::text::xid8 "
            "ORDER BY xid, change_id OFFSET %s LIMIT 1"
        ).format(table),
        (str(start), str(limit), max_changes),
    ).fetchone()
    if row is None:
        return limit
    boundary = int(row[0])
    # A transaction larger than max_changes is taken whole: batches never split one, and
    # a batch always holds at least the first ready transaction.
    return boundary if boundary > int(first[0]) else boundary + 1


def read_changes(conn: psycopg.Connection, spec: CaptureSpec, start: int, end: int) -> pd.DataFrame:
    """The changes of transactions ``[start, end)`` in (xid, change_id) order.

    ``change_time`` is the commit time where ``track_commit_timestamp`` is on, else the
    clock time of the change itself. ``end`` must not pass the horizon.
    """
    limit = horizon(conn)
    if end > limit:
        raise ConfigurationError(
            SETTING,
            f"{spec.change_table}: batch [{start}, {end}) passes the snapshot horizon {limit}; "
            "the OLTP database was replaced or its transaction ids went back",
        )
    return _select_changes(
        conn,
        spec,
        sql.SQL("xid >= %s::text::xid8 AND xid < %s::text::xid8"),
        (str(start), str(end)),
        order=sql.SQL("xid, change_id"),
    )


def read_key_history(
    conn: psycopg.Connection, spec: CaptureSpec, keys: list[tuple[str, ...]], end: int
) -> pd.DataFrame:
    """Every change of the given keys by transactions below ``end``, in change-id order.

    Used to rebuild a key whose changes arrived out of order across batches (an older
    transaction wrote the row after a newer one committed, and a batch boundary fell
    between them). Key values are compared as text.
    """
    image = sql.SQL("coalesce(after, before)")
    key_exprs = sql.SQL(", ").join(
        sql.SQL("{} ->> {}").format(image, sql.Literal(k)) for k in spec.keys
    )
    arrays = sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in spec.keys)
    columns = [[str(key[i]) for key in keys] for i in range(len(spec.keys))]
    return _select_changes(
        conn,
        spec,
        sql.SQL("xid < %s::text::xid8 AND ({keys}) IN (SELECT * FROM unnest({arrays}))").format(
            keys=key_exprs, arrays=arrays
        ),
        (str(end), *columns),
        order=sql.SQL("change_id"),
    )


def _select_changes(
    conn: psycopg.Connection,
    spec: CaptureSpec,
    where: sql.Composable,
    params: tuple,
    *,
    order: sql.Composable,
) -> pd.DataFrame:
    commit_ts = conn.execute("SELECT current_setting('track_commit_timestamp') = 'on'").fetchone()
    change_time = (
        sql.SQL("coalesce(pg_xact_commit_timestamp(xid::xid), changed_at)")
        if commit_ts and commit_ts[0]
        else sql.SQL("changed_at")
    )
    rows = conn.execute(
        sql.SQL(
            "SELECT change_id, xid::text::bigint, op, {change_time}, before::text, after::text "
            "FROM {table} WHERE {where} ORDER BY {order}"
        ).format(
            change_time=change_time,
            table=sql.Identifier(spec.change_table.schema, spec.change_table.table),
            where=where,
            order=order,
        ),
        params,
    ).fetchall()
    return pd.DataFrame(rows, columns=["change_id", "xid", "op", "change_time", "before", "after"])


def pending_since(
    conn: psycopg.Connection, spec: CaptureSpec, loaded_until: int, column: str, values: list[str]
) -> dict[str, datetime]:
    """For each of ``values`` with a committed change not loaded yet (transactions at or after
    ``loaded_until``, below the horizon or not) that has it as ``column`` in its before or
    after image: the earliest such change's clock time (never after its commit time)."""
    table = sql.Identifier(spec.change_table.schema, spec.change_table.table)
    rows = conn.execute(
        sql.SQL(
            "SELECT v, min(changed_at) FROM ("
            "SELECT after ->> %(c)s AS v, changed_at FROM {t} WHERE xid >= %(x)s::text::xid8 "
            "AND after ->> %(c)s = ANY(%(v)s) UNION ALL "
            "SELECT before ->> %(c)s, changed_at FROM {t} WHERE xid >= %(x)s::text::xid8 "
            "AND before ->> %(c)s = ANY(%(v)s)) p GROUP BY v"
        ).format(t=table),
        {"c": column, "x": str(loaded_until), "v": values},
    ).fetchall()
    return {str(v): at for v, at in rows}


@dataclass(frozen=True)
class CaptureLag:
    """How far the EDW is behind a change table, and who holds the horizon back."""

    horizon: int
    pending_changes: int
    ready_changes: int
    oldest_pending_age_s: float | None
    holding_back: list[dict[str, object]]
    #: What ``horizon`` is, in the metadata: the snapshot horizon's xid for a change table,
    #: the first GTID sequence number not written yet for a binlog.
    horizon_name: str = "horizon_xid"

    def as_metadata(self) -> dict[str, Any]:
        return {
            self.horizon_name: self.horizon,
            "pending_changes": self.pending_changes,
            "ready_changes": self.ready_changes,
            "oldest_pending_change_age_s": self.oldest_pending_age_s,
            "transactions_holding_horizon": self.holding_back,
        }


def capture_lag(conn: psycopg.Connection, spec: CaptureSpec, loaded_until: int) -> CaptureLag:
    """Pending changes past the ledger, and the open transactions that delay them."""
    limit = horizon(conn)
    table = sql.Identifier(spec.change_table.schema, spec.change_table.table)
    row = conn.execute(
        sql.SQL(
            "SELECT count(*), count(*) FILTER (WHERE xid < %s::text::xid8), "
            "extract(epoch FROM clock_timestamp() - min(changed_at))::float8 "
            "FROM {} WHERE xid >= %s::text::xid8"
        ).format(table),
        (str(limit), str(loaded_until)),
    ).fetchone()
    assert row is not None
    holders = conn.execute(
        "SELECT pid, coalesce(application_name, ''), state, backend_xid::text, "
        "round(extract(epoch FROM clock_timestamp() - xact_start)::numeric, 1)::float8 "
        "FROM pg_stat_activity WHERE backend_xid IS NOT NULL AND pid <> pg_backend_pid() "
        "ORDER BY xact_start LIMIT 5"
    ).fetchall()
    return CaptureLag(
        horizon=limit,
        pending_changes=int(row[0]),
        ready_changes=int(row[1]),
        oldest_pending_age_s=None if row[2] is None else round(float(row[2]), 1),
        holding_back=[
            {"pid": h[0], "application": h[1], "state": h[2], "xid": h[3], "open_for_s": h[4]}
            for h in holders
        ],
    )


def count_changes(conn: psycopg.Connection, spec: CaptureSpec, start: int, end: int) -> int:
    """How many changes transactions ``[start, end)`` wrote to the change table."""
    row = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {} WHERE xid >= %s::text::xid8 AND xid < %s::text::xid8"
        ).format(sql.Identifier(spec.change_table.schema, spec.change_table.table)),
        (str(start), str(end)),
    ).fetchone()
    return int(row[0]) if row else 0


class ChangeTable:
    """A captured table's change table as a :class:`~kappa.sources.base.Source`: one shard
    (0), positions are transaction ids up to the snapshot horizon, the epoch is the change
    table's identity (database and table oids)."""

    positions = TRANSACTIONS

    def __init__(self, conn: psycopg.Connection, spec: CaptureSpec) -> None:
        self.conn = conn
        self.spec = spec
        self.name = str(spec.change_table)

    def shards(self) -> list[int]:
        return [0]

    def key_history(self, keys: list[tuple[str, ...]], end: int) -> pd.DataFrame:
        return read_key_history(self.conn, self.spec, keys, end)

    def shard_name(self, shard: int) -> str:
        return self.name

    def epoch(self) -> str:
        return source_epoch(self.conn, self.spec)

    def bounds(self, shards: Iterable[int]) -> dict[int, LogBounds]:
        # Every transaction below the horizon has ended; the change table keeps them all.
        limit = horizon(self.conn)
        return {shard: LogBounds(0, limit) for shard in shards}

    def read(self, shard: int, start: int, end: int) -> pd.DataFrame:
        return read_changes(self.conn, self.spec, start, end)

    def count(self, shard: int, start: int, end: int) -> int:
        return count_changes(self.conn, self.spec, start, end)

    def behind(self, shard: int, end: int, bounds: LogBounds) -> int:
        # Changes, not transaction ids: the pending ones, below the horizon or not.
        return capture_lag(self.conn, self.spec, end).pending_changes

    def plan_end(self, start: int, *, max_changes: int) -> int:
        return plan_end(self.conn, self.spec, start, max_changes=max_changes)

    def lag(self, loaded_until: int) -> CaptureLag:
        return capture_lag(self.conn, self.spec, loaded_until)

    def complete_until(self) -> datetime:
        return complete_until(self.conn)

    def pending_since(
        self, loaded_until: int, column: str, values: list[str]
    ) -> dict[str, datetime]:
        return pending_since(self.conn, self.spec, loaded_until, column, values)
