"""Validating captured changes with pandas: typed columns, dead letters for what does not fit."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import orjson
import pandas as pd

from kappa.catalog.captures import CaptureSpec, Column
from kappa.changes.target import (
    OPERATIONS,
)
from kappa.exact import NumericType, loads_exact, numeric_reasons, shown


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
