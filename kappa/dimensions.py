"""Applying a batch of captured changes to the EDW: SCD type 2 dimensions, current-state tables.

Changes are validated with pandas (unknown operation, malformed row images become dead
letters), staged with COPY, and merged in set-based SQL inside the batch's ledger
transaction. The results do not depend on how the changes were cut into batches:

* SCD2: a version is valid from its change time, clamped so versions of one key never go
  back in time along the (xid, change_id) order (a transaction that commits later may have
  started earlier); it is valid until the next change of its key; a delete closes the
  current version. The surrogate key is the change id, so a replay rebuilds the same keys.
* current: the last change of each key wins; a delete removes the row.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import orjson
import pandas as pd
import psycopg
from psycopg import sql

from kappa.capture import CaptureSpec, Column
from kappa.exact import NumericType, loads_exact, numeric_reasons, shown
from kappa.exceptions import LogResetError, ReprocessError
from kappa.poison import write_rows_isolated
from kappa.warehouse import (
    BatchCounts,
    BatchRecord,
    Schemas,
    copy_frame,
    insert_ledger_row,
    ledger_transaction,
    lock_head,
    stage_frame,
    write_dead_letters,
)

OPERATIONS = ("I", "U", "D")


def surrogate_key(spec: CaptureSpec) -> str:
    """``dim_customer`` → ``customer_sk``."""
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


@dataclass
class ValidatedChanges:
    """Changes ready to stage (typed columns) and the ones that became dead letters."""

    rows: pd.DataFrame
    dead_letters: pd.DataFrame


def _image(raw: object) -> dict | None:
    if raw is None or (isinstance(raw, float) and np.isnan(raw)):
        return None
    try:
        value = loads_exact(raw) if isinstance(raw, str | bytes) else raw
    except (orjson.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


#: Ranges of the integer column types.
_INTEGER_RANGES = {"integer": (-(2**31), 2**31 - 1), "bigint": (-(2**63), 2**63 - 1)}


def _convert(column: Column, values: pd.Series) -> tuple[pd.Series, np.ndarray, np.ndarray]:
    """Typed values, a mask of values that do not convert (nulls are not failures), and the
    reason of each failing value (None: the generic "not a valid <type>"). A value the
    column would round, truncate or refuse (numeric scale and precision, integer range,
    char(n) length) fails here, exactly, instead of being changed or failing the COPY."""
    present = values.notna().to_numpy()
    why = np.full(len(values), None, dtype=object)
    kind = column.sql_type.split("(")[0].strip()
    if kind in ("numeric", "integer", "bigint", "double precision"):
        numeric = values.map(
            lambda v: (
                v if isinstance(v, int | float | Decimal) and not isinstance(v, bool) else np.nan
            )
        )
        converted = pd.to_numeric(numeric.map(float), errors="coerce")
        if kind in _INTEGER_RANGES:
            low, high = _INTEGER_RANGES[kind]
            whole = converted.isna() | (converted == converted.round())
            outside = numeric.map(
                lambda v: isinstance(v, int | float | Decimal) and v == v and not low <= v <= high
            ).to_numpy(dtype=bool)
            why[outside] = [
                f"'{column.name}' is outside the {kind} range: {shown(v)}" for v in values[outside]
            ]
            converted = converted.where(whole.to_numpy() & ~outside)
            return converted.astype("Int64"), present & converted.isna().to_numpy(), why
        target = NumericType.parse(column.sql_type)
        if target is not None:
            numeric_reasons(column.name, target, numeric, converted, why)
            converted = converted.where(pd.isna(why))
        return converted, present & converted.isna().to_numpy(), why
    if kind in ("timestamptz", "date"):
        text = values.where(values.map(lambda v: isinstance(v, str)).to_numpy())
        converted = pd.to_datetime(text, utc=True, format="ISO8601", errors="coerce")
        if kind == "date":
            converted = converted.dt.date
        return converted, present & pd.isna(converted).to_numpy(), why
    if kind == "boolean":
        ok = values.map(lambda v: isinstance(v, bool)).to_numpy()
        return values.where(ok).astype("boolean"), present & ~ok, why
    ok = values.map(lambda v: isinstance(v, str)).to_numpy()
    converted = values.where(ok).astype("string")
    if kind == "char":
        converted = converted.str.rstrip(" ")
    length = re.fullmatch(
        r"\s*(char|character|varchar|character varying)\s*\((\d+)\)\s*", column.sql_type
    )
    if length is not None:
        # PostgreSQL refuses a longer value (unless only spaces are cut): say so per change.
        limit = int(length.group(2))
        measured = converted.str.rstrip(" ") if kind.startswith("char") else converted
        longer = (measured.str.len() > limit).fillna(False).to_numpy(dtype=bool)
        why[longer] = [
            f"'{column.name}' is longer than {column.sql_type}: {v!r}" for v in values[longer]
        ]
        ok = ok & ~longer
        converted = converted.where(ok)
    return converted, present & ~ok, why


def split_key_changes(spec: CaptureSpec, changes: pd.DataFrame) -> pd.DataFrame:
    """An UPDATE that changes a key is a delete of the old key and a write of the new one:
    the old key's version must close. Both rows keep the change's id and position."""
    if changes.empty:
        return changes
    befores = [_image(v) for v in changes["before"]]
    afters = [_image(v) for v in changes["after"]]
    moved = np.array(
        [
            op == "U"
            and b is not None
            and a is not None
            and any(b.get(k) != a.get(k) for k in spec.keys)
            for op, b, a in zip(changes["op"], befores, afters, strict=True)
        ],
        dtype=bool,
    )
    if not moved.any():
        return changes
    closing = changes[moved].assign(op="D", after=None)
    return (
        pd.concat([closing, changes], ignore_index=True)
        .sort_values(["xid", "change_id", "op"], kind="stable", ascending=[True, True, True])
        .reset_index(drop=True)
    )


def validate_changes(spec: CaptureSpec, changes: pd.DataFrame) -> ValidatedChanges:
    """Check operations and row images; extract the captured columns."""
    changes = split_key_changes(spec, changes)
    if changes.empty:
        no_rows = pd.DataFrame(
            columns=[c.name for c in spec.columns]
            + ["op", "source_xid", "source_change_id", "change_time"]
        )
        return ValidatedChanges(
            rows=no_rows,
            dead_letters=pd.DataFrame(
                columns=["position", "broker_time", "key", "value", "reason"]
            ),
        )
    n = len(changes)
    reasons = np.full(n, None, dtype=object)

    def flag(mask: np.ndarray, reason: str | np.ndarray) -> None:
        mask = mask & pd.isna(reasons)
        if isinstance(reason, np.ndarray):
            reasons[mask] = reason[mask]
        else:
            reasons[mask] = reason

    ops = changes["op"].astype("string")
    flag(
        ~ops.isin(OPERATIONS).fillna(False).to_numpy(),
        np.array([f"unknown operation {o!r}" for o in changes["op"]], dtype=object),
    )
    is_delete = (ops == "D").fillna(False).to_numpy()
    after = [_image(v) for v in changes["after"]]
    before = [_image(v) for v in changes["before"]]
    images = [b if d else a for a, b, d in zip(after, before, is_delete, strict=True)]
    flag(
        np.array([i is None for i in images], dtype=bool) & ~is_delete,
        "after image is missing or not a JSON object",
    )
    flag(
        np.array([i is None for i in images], dtype=bool) & is_delete,
        "before image of a delete is missing or not a JSON object",
    )

    empty: dict = {}
    rows = pd.DataFrame(index=changes.index)
    for column in spec.columns:
        raw = pd.Series(
            [(i or empty).get(column.name) for i in images], dtype=object, index=changes.index
        )
        has = np.array([column.name in (i or empty) for i in images], dtype=bool)
        is_key = column.name in spec.keys
        needed = ~is_delete | is_key
        flag(needed & ~has, f"row image lacks column '{column.name}'")
        converted, bad, why = _convert(column, raw)
        flag(
            needed & has & bad,
            np.where(pd.isna(why), f"'{column.name}' is not a valid {column.sql_type}", why),
        )
        if is_key:
            flag(raw.isna().to_numpy(), f"key column '{column.name}' is null")
        rows[column.name] = converted.where(needed) if not is_key else converted
    rows["op"] = ops
    rows["source_xid"] = changes["xid"].astype("int64")
    rows["source_change_id"] = changes["change_id"].astype("int64")
    rows["change_time"] = pd.to_datetime(changes["change_time"], utc=True)

    # The two rows of a key-changing update stand or fall together, as one dead letter.
    ids = changes["change_id"].to_numpy()
    invalid_ids = set(ids[~pd.isna(reasons)].tolist())
    flag(np.isin(ids, list(invalid_ids)), "the other half of this key-changing update is invalid")
    valid = pd.isna(reasons)
    dead = changes[~valid]
    first = ~dead["change_id"].duplicated(keep="first").to_numpy()
    dead_letters = change_dead_letters(dead[first], reasons[~valid][first])
    return ValidatedChanges(rows=rows[valid].reset_index(drop=True), dead_letters=dead_letters)


def change_dead_letters(dead: pd.DataFrame, reasons: np.ndarray | list[str]) -> pd.DataFrame:
    """Dead letters of changes (rows of the change table): the change id is the position,
    the value the change as JSON (operation, transaction, row images)."""
    dead_letters = pd.DataFrame(
        {
            "position": dead["change_id"].astype("int64").to_numpy(),
            "broker_time": pd.to_datetime(dead["change_time"], utc=True).to_numpy(),
            "key": [None] * len(dead),
            "value": [
                orjson.dumps({"op": r.op, "xid": int(r.xid), "before": r.before, "after": r.after})
                for r in dead.itertuples(index=False)
            ],
            "reason": np.asarray(reasons, dtype=object),
        }
    )
    dead_letters["broker_time"] = pd.to_datetime(dead_letters["broker_time"], utc=True)
    return dead_letters


def _stage_ddl(spec: CaptureSpec) -> sql.Composable:
    return sql.SQL(", ").join(
        [
            *_columns_ddl(spec.columns),
            sql.SQL("op char(1)"),
            sql.SQL("source_xid bigint"),
            sql.SQL("source_change_id bigint"),
            sql.SQL("change_time timestamptz"),
        ]
    )


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


def _delete_keys(
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


def _without_dead_letters(
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
    removed = _delete_keys(conn, schemas, spec, keys)
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


def _merge(
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
    :func:`kappa.cdc.read_key_history`); with it, an SCD2 key whose changes arrived out of
    order across batches is rebuilt instead of getting a wrong current version.
    Changes the target refuses are isolated into dead letters (see :mod:`kappa.poison`).
    Returns (received, applied, dead-lettered, probes).
    """
    validated = validate_changes(spec, changes)
    with ledger_transaction(conn, schemas, record) as counts:
        refused: set[int] = set()

        def known(keys: list[tuple[str, ...]]) -> pd.DataFrame:
            # A rebuilt key's history leaves out the changes the target refused, in this
            # batch or before.
            assert history is not None
            found = _without_dead_letters(conn, schemas, spec, history(keys))
            return found[~found["change_id"].isin(list(refused))]

        def write(rows: pd.DataFrame) -> None:
            stage = stage_frame(
                conn, f"stage_{spec.name}", None, rows, columns_ddl=_stage_ddl(spec)
            )
            if not rows.empty:
                if spec.mode == "scd2" and history is not None:
                    _rebuild_late_keys(conn, schemas, spec, stage, known)
                _merge(conn, schemas, spec, stage)
            conn.execute(sql.SQL("DROP TABLE {}").format(stage))

        # Changes the target refuses (a constraint the validation cannot know) become dead
        # letters with the database's message; the rest applies (see kappa.poison).
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


@dataclass
class CaptureWindowReplacement:
    """What replacing one time partition of a captured table did."""

    start: int = 0
    end: int = 0
    received: int = 0
    loaded: int = 0
    dead_lettered: int = 0
    removed_rows: int = 0
    #: Extra writes it took to isolate changes the target refused (0: none refused).
    probes: int = 0


def replace_capture_window(
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: CaptureSpec,
    *,
    epoch: str,
    window: str,
    run_id: str,
    read: Callable[[int, int], pd.DataFrame],
    history: Callable[[list[tuple[str, ...]], int], pd.DataFrame],
) -> CaptureWindowReplacement | None:
    """Replace time partition ``window`` of ``spec.asset`` in one transaction: its ledger
    batches, dead letters and every row of the keys its transactions touched.

    ``read(start, end)`` gives the changes of transactions ``[start, end)``, ``history(keys,
    end)`` every change of ``keys`` below ``end``. Returns None when the ledger holds no batch
    of the partition (nothing became visible in it). Raises :class:`LogResetError` for a
    recreated change table and :class:`ReprocessError` when the change table no longer holds
    what the ledger loaded; in both cases nothing is changed.
    """
    meta = sql.Identifier(schemas.meta)
    source = str(spec.change_table)
    with conn.transaction():
        head = lock_head(conn, schemas, spec.asset, source, 0)
        if head is None:
            return None
        if head.epoch != epoch:
            raise LogResetError(
                spec.asset,
                source,
                0,
                f"was recreated: the ledger loaded transactions up to {head.end} of change table "
                f"{head.epoch}, the OLTP database now has {epoch}.",
            )
        batches = conn.execute(
            sql.SQL(
                "SELECT start_position, end_position, received, watermark FROM {}.batch_ledger "
                "WHERE asset = %s AND source = %s AND shard = 0 AND partition_key = %s "
                "ORDER BY start_position"
            ).format(meta),
            (spec.asset, source, window),
        ).fetchall()
        if not batches:
            return None
        result = CaptureWindowReplacement(start=batches[0][0], end=batches[-1][1])

        def refuse(detail: str) -> ReprocessError:
            return ReprocessError(
                spec.asset,
                source,
                0,
                window,
                result.start,
                result.end,
                detail,
                positions="transactions",
            )

        foreign = conn.execute(
            sql.SQL(
                "SELECT start_position, end_position, partition_key FROM {}.batch_ledger "
                "WHERE asset = %s AND source = %s AND shard = 0 AND start_position >= %s "
                "AND start_position < %s AND partition_key IS DISTINCT FROM %s LIMIT 1"
            ).format(meta),
            (spec.asset, source, result.start, result.end, window),
        ).fetchone()
        if foreign is not None:
            raise refuse(
                f"ledger batch [{foreign[0]}, {foreign[1]}) of partition {foreign[2] or '(none)'} "
                "lies inside it: replay the asset from the beginning."
            )
        changes = read(result.start, result.end)
        expected = sum(int(b[2]) for b in batches)
        if len(changes) != expected:
            raise refuse(
                f"the change table holds {len(changes)} changes of these transactions, the ledger "
                f"loaded {expected}: changes were purged or rewritten and cannot be read again."
            )
        validated = validate_changes(spec, changes)
        stage = stage_frame(
            conn, f"stage_{spec.name}", None, validated.rows, columns_ddl=_stage_ddl(spec)
        )
        keys = _touched_keys(conn, schemas, spec, stage, result.start, result.end)
        change_ids = [int(c) for c in changes["change_id"]]
        conn.execute(
            sql.SQL(
                "DELETE FROM {}.dead_letter WHERE asset = %s AND source = %s AND shard = 0 "
                "AND position = ANY(%s)"
            ).format(meta),
            (spec.asset, source, change_ids),
        )
        conn.execute(
            sql.SQL(
                "DELETE FROM {}.batch_ledger WHERE asset = %s AND source = %s AND shard = 0 "
                "AND partition_key = %s"
            ).format(meta),
            (spec.asset, source, window),
        )
        conn.execute(sql.SQL("DROP TABLE {}").format(stage))
        # Every touched key is rebuilt from its whole history (less the changes dead-lettered
        # by other partitions' batches), the changes the target refuses isolated.
        known = _without_dead_letters(
            conn, schemas, spec, history(keys, head.end) if keys else changes.iloc[0:0]
        )
        rebuilt = validate_changes(spec, known).rows
        result.removed_rows = _delete_keys(conn, schemas, spec, keys)

        def write(rows: pd.DataFrame) -> None:
            staged = stage_frame(
                conn, f"stage_{spec.name}", None, rows, columns_ddl=_stage_ddl(spec)
            )
            if not rows.empty:
                _merge(conn, schemas, spec, staged)
            conn.execute(sql.SQL("DROP TABLE {}").format(staged))

        isolated = write_rows_isolated(conn, rebuilt, "source_change_id", write)
        elsewhere = sorted(set(isolated.refused) - set(change_ids))
        if elsewhere:
            raise refuse(
                f"the target now refuses changes of other partitions (change ids "
                f"{', '.join(map(str, elsewhere[:5]))}): reprocess those partitions, or replay "
                "the asset from the beginning."
            )
        refusals = changes[changes["change_id"].isin(list(isolated.refused))]
        dead = pd.concat(
            [
                validated.dead_letters,
                change_dead_letters(
                    refusals, [isolated.refused[int(c)] for c in refusals["change_id"]]
                ),
            ],
            ignore_index=True,
        )
        record = BatchRecord(
            spec.asset,
            source,
            0,
            epoch,
            result.start,
            result.end,
            run_id,
            window,
            watermark=batches[-1][3],
        )
        counts = BatchCounts(
            received=len(changes),
            loaded=int(validated.rows["source_change_id"].nunique()) - len(isolated.refused),
            dead_lettered=write_dead_letters(conn, schemas, record, dead),
        )
        insert_ledger_row(conn, schemas, record, counts)
        conn.execute(
            sql.SQL(
                "UPDATE {meta}.ledger_head SET updated_at = clock_timestamp(), batches = "
                "(SELECT count(*) FROM {meta}.batch_ledger WHERE asset = %s AND source = %s "
                "AND shard = 0) WHERE asset = %s AND source = %s AND shard = 0"
            ).format(meta=meta),
            (spec.asset, source, spec.asset, source),
        )
        result.received, result.loaded, result.dead_lettered, result.probes = (
            counts.received,
            counts.loaded,
            counts.dead_lettered,
            isolated.probes,
        )
    return result


def written_by(spec: CaptureSpec) -> sql.Composable:
    """The target rows that transactions ``[%(start)s, %(end)s)`` wrote (or, SCD2, closed)."""
    written: sql.Composable = sql.SQL("source_xid >= %(start)s AND source_xid < %(end)s")
    if spec.mode == "scd2":
        written = sql.SQL("{} OR (closed_by_xid >= %(start)s AND closed_by_xid < %(end)s)").format(
            written
        )
    return written


def _touched_keys(
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: CaptureSpec,
    stage: sql.Identifier,
    start: int,
    end: int,
) -> list[tuple[str, ...]]:
    """The keys (as text) of the staged changes, and of the target rows that transactions
    ``[start, end)`` wrote or closed (a change that is now a dead letter still touched its key)."""
    keys = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in spec.keys)
    rows = conn.execute(
        sql.SQL(
            "SELECT {keys} FROM {stage} UNION SELECT {keys} FROM {target} WHERE {written}"
        ).format(
            keys=keys,
            stage=stage,
            target=sql.Identifier(schemas.edw, spec.target),
            written=written_by(spec),
        ),
        {"start": start, "end": end},
    ).fetchall()
    return sorted(tuple(row) for row in rows)
