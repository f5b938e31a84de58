"""Merging a staged batch of changes into its target in set-based SQL (SCD2 or current state)."""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import psycopg
from psycopg import sql

from kappa.catalog.captures import CaptureSpec
from kappa.changes.target import (
    stage_ddl,
    surrogate_key,
)
from kappa.changes.validate import (
    change_dead_letters,
    validate_changes,
)
from kappa.edw.copy import copy_frame, stage_frame, write_dead_letters
from kappa.edw.ledger import ledger_transaction
from kappa.edw.poison import write_rows_isolated
from kappa.edw.types import BatchRecord, Schemas


def _merge_scd2(
    conn: psycopg.Connection, schemas: Schemas, spec: CaptureSpec, stage: sql.Identifier
) -> None:
    dim = sql.Identifier(schemas.edw, spec.target)
    keys = [sql.Identifier(k) for k in spec.keys]
    key_list = sql.SQL(", ").join(keys)
    same_key = sql.SQL(" AND ").join(sql.SQL("d.{k} = f.{k}").format(k=k) for k in keys)
    # One key's changes are serialised by its row lock, so change ids give their true order
    # (a transaction with a lower xid may write the row after one with a higher xid).
    order = sql.SQL("source_change_id")
    conn.execute(
        sql.SQL(
            """
CREATE TEMP TABLE scd_versions ON COMMIT DROP AS
WITH bound AS (
  SELECT {keys}, max(coalesce(valid_to, valid_from)) AS bound
  FROM {dim} WHERE ({keys}) IN (SELECT DISTINCT {keys} FROM {stage}) GROUP BY {keys}
)
SELECT s.*,
       greatest(max(s.clock) OVER w, coalesce(s.bound, '-infinity'::timestamptz)) AS valid_from
FROM (
  -- A delete with nothing before it (no version, no earlier change) leaves no trace in the
  -- dimension, so its time must not push later versions either: otherwise the result
  -- would depend on whether it shared a batch with them.
  SELECT s.*, b.bound,
         CASE WHEN s.op = 'D' AND b.bound IS NULL
                   AND row_number() OVER (PARTITION BY {keys} ORDER BY {order}) = 1
              THEN NULL ELSE s.change_time END AS clock
  FROM {stage} s LEFT JOIN bound b USING ({keys})
) s
WINDOW w AS (PARTITION BY {keys} ORDER BY {order} ROWS UNBOUNDED PRECEDING)
"""
        ).format(keys=key_list, dim=dim, stage=stage, order=order)
    )
    conn.execute(
        sql.SQL(
            """
UPDATE {dim} d SET valid_to = f.valid_from, is_current = false, closed_by_xid = f.source_xid,
  closed_by_change_id = f.source_change_id
FROM (
  SELECT DISTINCT ON ({keys}) {keys}, valid_from, source_xid, source_change_id
  FROM scd_versions ORDER BY {keys}, {order}
) f
WHERE d.is_current AND {same_key}
"""
        ).format(dim=dim, keys=key_list, order=order, same_key=same_key)
    )
    columns = sql.SQL(", ").join(sql.Identifier(c.name) for c in spec.columns)
    conn.execute(
        sql.SQL(
            """
INSERT INTO {dim} ({sk}, {columns}, valid_from, valid_to, is_current, source_xid, source_change_id,
  change_op, closed_by_xid, closed_by_change_id)
SELECT source_change_id, {columns}, valid_from, next_from, next_from IS NULL, source_xid, source_change_id,
  op, next_xid, next_change_id
FROM (
  -- A version closed within the batch names its closer, as one closed by a later batch does.
  SELECT v.*, lead(valid_from) OVER w AS next_from, lead(source_xid) OVER w AS next_xid,
         lead(source_change_id) OVER w AS next_change_id
  FROM scd_versions v
  WINDOW w AS (PARTITION BY {keys} ORDER BY {order})
) versions
WHERE op <> 'D'
ORDER BY {order}
"""
        ).format(
            dim=dim,
            sk=sql.Identifier(surrogate_key(spec)),
            columns=columns,
            keys=key_list,
            order=order,
        )
    )
    conn.execute("DROP TABLE scd_versions")


def _merge_current(
    conn: psycopg.Connection, schemas: Schemas, spec: CaptureSpec, stage: sql.Identifier
) -> None:
    target = sql.Identifier(schemas.edw, spec.target)
    keys = [sql.Identifier(k) for k in spec.keys]
    key_list = sql.SQL(", ").join(keys)
    same_key = sql.SQL(" AND ").join(sql.SQL("t.{k} = l.{k}").format(k=k) for k in keys)
    columns = sql.SQL(", ").join(sql.Identifier(c.name) for c in spec.columns)
    updates = sql.SQL(", ").join(
        sql.SQL("{c} = EXCLUDED.{c}").format(c=sql.Identifier(name))
        for name in [c.name for c in spec.value_columns]
        + ["source_xid", "source_change_id", "changed_at"]
    )
    conn.execute(
        sql.SQL(
            "CREATE TEMP TABLE current_last ON COMMIT DROP AS SELECT DISTINCT ON ({keys}) * FROM {stage} "
            "ORDER BY {keys}, source_change_id DESC"
        ).format(keys=key_list, stage=stage)
    )
    conn.execute(
        sql.SQL(
            "DELETE FROM {target} t USING current_last l "
            "WHERE l.op = 'D' AND t.source_change_id < l.source_change_id AND {same_key}"
        ).format(target=target, same_key=same_key)
    )
    conn.execute(
        sql.SQL(
            "INSERT INTO {target} ({columns}, source_xid, source_change_id, changed_at) "
            "SELECT {columns}, source_xid, source_change_id, change_time FROM current_last WHERE op <> 'D' "
            "ON CONFLICT ({keys}) DO UPDATE SET {updates} "
            # An older change of the key (a later batch can hold one) never overwrites a newer.
            "WHERE {target}.source_change_id < EXCLUDED.source_change_id"
        ).format(target=target, columns=columns, keys=key_list, updates=updates)
    )
    conn.execute("DROP TABLE current_last")


def _key_matches(spec: CaptureSpec) -> sql.Composable:
    """``(key columns as text) IN (unnest of one text array per key column)``."""
    keys = [sql.Identifier(k) for k in spec.keys]
    return sql.SQL("({}) IN (SELECT * FROM unnest({}))").format(
        sql.SQL(", ").join(sql.SQL("{}::text").format(k) for k in keys),
        sql.SQL(", ").join(sql.SQL("%s::text[]") for _ in keys),
    )


def delete_keys(
    conn: psycopg.Connection, schemas: Schemas, spec: CaptureSpec, keys: list[tuple[str, ...]]
) -> int:
    """Delete every target row of ``keys``; returns how many went."""
    if not keys:
        return 0
    columns = tuple([row[i] for row in keys] for i in range(len(spec.keys)))
    target = sql.Identifier(schemas.edw, spec.target)
    removed = conn.execute(
        sql.SQL("DELETE FROM {} WHERE {}").format(target, _key_matches(spec)), columns
    )
    return removed.rowcount


def without_dead_letters(
    conn: psycopg.Connection, schemas: Schemas, spec: CaptureSpec, changes: pd.DataFrame
) -> pd.DataFrame:
    """``changes`` less those the capture dead-lettered already (invalid, or refused by the
    target): a key rebuilt from its history must not meet them again."""
    if changes.empty:
        return changes
    dead = conn.execute(
        sql.SQL(
            "SELECT position FROM {}.dead_letter WHERE asset = %s AND source = %s AND shard = 0 "
            "AND position = ANY(%s)"
        ).format(sql.Identifier(schemas.meta)),
        (spec.asset, str(spec.change_table), [int(c) for c in changes["change_id"]]),
    ).fetchall()
    return changes[~changes["change_id"].isin([int(r[0]) for r in dead])]


def _restage_keys(
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: CaptureSpec,
    stage: sql.Identifier,
    keys: list[tuple[str, ...]],
    history: Callable[[list[tuple[str, ...]]], pd.DataFrame],
) -> int:
    """Drop ``keys`` from the target and the stage, and stage their whole history instead:
    the merge then computes them exactly as a replay from the beginning would. Returns how
    many target rows went."""
    if not keys:
        return 0
    rebuilt = validate_changes(spec, history(keys)).rows
    columns = tuple([row[i] for row in keys] for i in range(len(spec.keys)))
    removed = delete_keys(conn, schemas, spec, keys)
    conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(stage, _key_matches(spec)), columns)
    copy_frame(conn, stage, rebuilt)
    return removed


def _rebuild_late_keys(
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: CaptureSpec,
    stage: sql.Identifier,
    history: Callable[[list[tuple[str, ...]]], pd.DataFrame],
) -> int:
    """Rebuild the keys whose incoming changes are older (by change id) than versions
    already applied: their whole history is restaged from the change table and their
    versions recomputed, exactly as a replay from the beginning would. Returns how many."""
    dim = sql.Identifier(schemas.edw, spec.target)
    keys = [sql.Identifier(k) for k in spec.keys]
    same_key = sql.SQL(" AND ").join(sql.SQL("d.{k} = s.{k}").format(k=k) for k in keys)
    late = conn.execute(
        sql.SQL(
            "SELECT DISTINCT {s_keys} FROM {stage} s JOIN {dim} d ON {same_key} "
            "WHERE greatest(d.source_change_id, coalesce(d.closed_by_change_id, 0)) > s.source_change_id"
        ).format(
            s_keys=sql.SQL(", ").join(sql.SQL("s.{}::text").format(k) for k in keys),
            stage=stage,
            dim=dim,
            same_key=same_key,
        )
    ).fetchall()
    _restage_keys(conn, schemas, spec, stage, [tuple(row) for row in late], history)
    return len(late)


def merge(
    conn: psycopg.Connection, schemas: Schemas, spec: CaptureSpec, stage: sql.Identifier
) -> None:
    if spec.mode == "scd2":
        _merge_scd2(conn, schemas, spec, stage)
    else:
        _merge_current(conn, schemas, spec, stage)


def apply_changes(
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: CaptureSpec,
    record: BatchRecord,
    changes: pd.DataFrame,
    *,
    history: Callable[[list[tuple[str, ...]]], pd.DataFrame] | None = None,
) -> tuple[int, int, int, int]:
    """Apply one batch of changes with its dead letters and ledger row, exactly once.

    ``history`` gives every change of some keys up to the batch's end (see
    :func:`kappa.sources.pg_capture.read_key_history`); with it, an SCD2 key whose changes arrived out of
    order across batches is rebuilt instead of getting a wrong current version.
    Changes the target refuses are isolated into dead letters (see :mod:`kappa.edw.poison`).
    Returns (received, applied, dead-lettered, probes).
    """
    validated = validate_changes(spec, changes)
    with ledger_transaction(conn, schemas, record) as counts:
        refused: set[int] = set()

        def known(keys: list[tuple[str, ...]]) -> pd.DataFrame:
            # A rebuilt key's history leaves out the changes the target refused, in this
            # batch or before.
            assert history is not None
            found = without_dead_letters(conn, schemas, spec, history(keys))
            return found[~found["change_id"].isin(list(refused))]

        def write(rows: pd.DataFrame) -> None:
            stage = stage_frame(conn, f"stage_{spec.name}", None, rows, columns_ddl=stage_ddl(spec))
            if not rows.empty:
                if spec.mode == "scd2" and history is not None:
                    _rebuild_late_keys(conn, schemas, spec, stage, known)
                merge(conn, schemas, spec, stage)
            conn.execute(sql.SQL("DROP TABLE {}").format(stage))

        # Changes the target refuses (a constraint the validation cannot know) become dead
        # letters with the database's message; the rest applies (see kappa.edw.poison).
        isolated = write_rows_isolated(conn, validated.rows, "source_change_id", write)
        refused.update(isolated.refused)
        dead = validated.dead_letters
        if isolated.refused:
            ids = list(isolated.refused)
            refusals = changes[changes["change_id"].isin(ids)]
            dead = pd.concat(
                [
                    dead,
                    change_dead_letters(
                        refusals, [isolated.refused[int(c)] for c in refusals["change_id"]]
                    ),
                ],
                ignore_index=True,
            )
        counts.received = len(changes)
        # A key-changing update is two rows of one change: count changes, not rows.
        counts.loaded = int(isolated.rows["source_change_id"].nunique())
        counts.dead_lettered = write_dead_letters(conn, schemas, record, dead)
    return counts.received, counts.loaded, counts.dead_lettered, isolated.probes


# -- reprocessing a time partition ------------------------------------------------------------
#
# A change table's time partition is the transactions its ledger batches cover: a batch
# belongs to the partition in which the sensor saw its changes committed (visibility time,
# recorded in the ledger), because a transaction's own timestamp can lie in a partition
# that has already closed. So partition P is [first start, last end) of P's ledger batches;
# the ledger is the only record of that mapping, and it never changes once P has closed.
#
# Replacing P re-applies those transactions: every key they touch is rebuilt from its whole
# history up to the ledger head (the same computation as a replay from the beginning), so a
# version that a later change closed is closed again, and nothing after P goes stale.
