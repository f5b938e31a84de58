"""Checks of one payload column against its field type, vectorised: each refusal gives the row a
reason naming the field; valid rows cost no Python per value.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal

import numpy as np
import orjson
import pandas as pd

from kappa.catalog.fields import INTEGER_RANGES, FieldType, PayloadField
from kappa.exact import (
    NumericType,
    check_decimal,
    check_doubles,
    shown,
)

UUID_PATTERN = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"


ISO_WITH_ZONE = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})"


#: A payload timestamptz: PostgreSQL keeps microseconds, so more digits would be rounded.
#: ASCII digits only: Python's \d also matches other scripts' digits, which PostgreSQL refuses.
_PAYLOAD_TIME = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
    r"(Z|[+-][0-9]{2}:?[0-9]{2})"
)


class Reasons:
    """The first failing check's reason per row, filled column-wise."""

    def __init__(self, initial: list[str | None]) -> None:
        self.values = np.array(initial, dtype=object)

    @property
    def open(self) -> np.ndarray:
        return pd.isna(self.values)

    def flag(
        self, bad: np.ndarray | pd.Series, reason: str | Callable[[np.ndarray], list[str]]
    ) -> None:
        """Give ``reason`` to the rows that are ``bad`` and have none yet; a callable gets the
        mask and words the reason of those rows only (valid rows cost nothing)."""
        mask = np.asarray(bad, dtype=bool) & self.open
        if not mask.any():
            return
        self.values[mask] = reason(mask) if callable(reason) else reason


def of_type(col: pd.Series, *kinds: type) -> pd.Series:
    """Which values have exactly one of the JSON types ``kinds`` (``bool`` is not ``int``)."""
    return col.map(type).isin(kinds)


def has_nul(text: pd.Series) -> np.ndarray:
    """Strings holding U+0000, which a PostgreSQL text column cannot store (the COPY of the
    whole batch would fail on it)."""
    return text.str.contains("\x00", regex=False).fillna(False).to_numpy(dtype=bool)


def _number_check(
    name: str, kind: FieldType, col: pd.Series, present: np.ndarray, reasons: Reasons
) -> pd.Series:
    """numeric(p, s) values must fit the EDW column exactly: never rounded, never overflowing
    the COPY.

    Doubles (from literals of at most 15 significant digits) are checked vectorised; the
    rare values re-parsed as Decimal (longer literals) one by one. Precision is at most 15,
    so every value that fits is carried exactly by the double the column is loaded from.
    """
    target = NumericType(kind.precision or 0, kind.scale or 0)
    types = col.map(type)
    exact = types.isin([Decimal]).to_numpy()
    numeric = types.isin([int, float]).to_numpy() | exact
    reasons.flag(~numeric & present, f"'{name}' is not a number")
    values = np.array(
        pd.to_numeric(col.where(numeric & ~exact), errors="coerce").to_numpy(
            dtype=float, na_value=np.nan
        )
    )
    raw = col.to_numpy(dtype=object)
    if exact.any():
        values[exact] = [float(v) for v in raw[exact]]
    reasons.flag(~np.isfinite(values) & numeric, f"'{name}' is not a finite number")
    with np.errstate(invalid="ignore"):
        if kind.exclusive_min is not None:
            reasons.flag(
                numeric & (values <= float(kind.exclusive_min)),
                f"'{name}' must be > {kind.exclusive_min}",
            )
        if kind.minimum is not None:
            reasons.flag(
                numeric & (values < float(kind.minimum)), f"'{name}' must be >= {kind.minimum}"
            )
    too_large, inexact = check_doubles(values, target)
    too_large &= ~exact
    inexact &= ~exact
    for index in np.flatnonzero(exact):
        verdict = check_decimal(raw[index], target)
        too_large[index] = verdict == "fit"
        inexact[index] = verdict == "decimals"
    reasons.flag(
        too_large,
        lambda mask: [f"'{name}' does not fit {target}: {shown(v)}" for v in raw[mask]],
    )
    reasons.flag(
        inexact,
        lambda mask: [
            f"'{name}' has more than {target.scale} decimals: {shown(v)}" for v in raw[mask]
        ],
    )
    return pd.Series(values, index=col.index)


def _integer_check(
    name: str, kind: FieldType, col: pd.Series, present: np.ndarray, reasons: Reasons
) -> pd.Series:
    is_int = of_type(col, int).to_numpy()
    reasons.flag(~is_int & present, f"'{name}' is not an integer")
    low, high = INTEGER_RANGES[kind.kind]
    # Python ints beyond the column are refused before conversion (never wrapped or rounded).
    outside = col.map(lambda v: isinstance(v, int) and not low <= v <= high).to_numpy(dtype=bool)
    reasons.flag(is_int & outside, f"'{name}' is outside the {kind.kind} range ({low}..{high})")
    is_int = is_int & ~outside
    # Built from the Python ints themselves: a float64 detour would round bigints.
    values = pd.array(col.where(is_int, None).tolist(), dtype="Int64")
    if kind.minimum is not None:
        reasons.flag(
            is_int & (values < kind.minimum).fillna(False).to_numpy(dtype=bool),
            f"'{name}' must be >= {kind.minimum}",
        )
    if kind.maximum is not None:
        reasons.flag(
            is_int & (values > kind.maximum).fillna(False).to_numpy(dtype=bool),
            f"'{name}' must be <= {kind.maximum}",
        )
    return pd.Series(values, index=col.index)


def _valid_dates(text: pd.Series, shaped: np.ndarray) -> np.ndarray:
    """Which YYYY-MM-DD strings name a real day (years 0001..9999, as PostgreSQL reads them),
    by numpy calendar arithmetic over the whole column."""
    valid = np.zeros(len(text), dtype=bool)
    if not shaped.any():
        return valid
    parts = text[shaped].str.split("-", expand=True).astype(int).to_numpy()
    year, month, day = parts[:, 0], parts[:, 1], parts[:, 2]
    ok = (year >= 1) & (month >= 1) & (month <= 12) & (day >= 1)
    months = ((year - 1970) * 12 + np.clip(month, 1, 12) - 1).astype("datetime64[M]")
    lengths = ((months + 1).astype("datetime64[D]") - months.astype("datetime64[D]")).astype(int)
    valid[shaped] = ok & (day <= lengths)
    return valid


def _jsonb_text(value: object) -> str | None:
    """A JSON object or array as the text jsonb parses (exact Decimals kept as written)."""
    try:
        return orjson.dumps(value, default=_exact_number).decode()
    except TypeError:
        return None  # an integer beyond 64 bits: refused below


def _exact_number(value: object) -> orjson.Fragment:
    if isinstance(value, Decimal):
        return orjson.Fragment(str(value).encode())
    raise TypeError(type(value).__name__)


def _string_checks(
    name: str, kind: FieldType, col: pd.Series, present: np.ndarray, reasons: Reasons
) -> pd.Series:
    is_str = of_type(col, str).to_numpy()
    reasons.flag(~is_str & present, f"'{name}' is not a string")
    text = col.where(is_str).astype("string")
    reasons.flag(has_nul(text), f"'{name}' contains a NUL character")
    length = text.str.len()
    if kind.kind == "text":
        if kind.min_length == 1:
            reasons.flag((length == 0).fillna(False).to_numpy(), f"'{name}' is empty")
        elif kind.min_length > 1:
            reasons.flag(
                (length < kind.min_length).fillna(False).to_numpy(),
                f"'{name}' is shorter than {kind.min_length} characters",
            )
        if kind.max_length is not None:
            reasons.flag(
                (length > kind.max_length).fillna(False).to_numpy(),
                f"'{name}' is longer than {kind.max_length} characters",
            )
    elif kind.kind == "char":
        # char(n) would pad a shorter value with spaces: refused instead of changed.
        reasons.flag(
            (length != kind.length).fillna(False).to_numpy(),
            f"'{name}' is not exactly {kind.length} characters",
        )
    elif kind.kind == "enum":
        allowed = ", ".join(kind.values)
        reasons.flag(
            is_str & ~text.isin(kind.values).to_numpy(), f"'{name}' is not one of: {allowed}"
        )
    elif kind.kind == "uuid":
        reasons.flag(
            is_str & ~text.str.fullmatch(UUID_PATTERN).fillna(False).to_numpy(),
            f"'{name}' is not a UUID",
        )
    elif kind.kind == "date":
        shaped = (
            text.str.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}").fillna(False).to_numpy(dtype=bool)
        )
        reasons.flag(is_str & ~shaped, f"'{name}' is not a date (YYYY-MM-DD)")
        reasons.flag(shaped & ~_valid_dates(text, shaped), f"'{name}' is not a valid date")
    elif kind.kind == "timestamptz":
        iso = text.str.fullmatch(_PAYLOAD_TIME).fillna(False).to_numpy(dtype=bool)
        reasons.flag(is_str & ~iso, f"'{name}' is not ISO-8601 with a zone (at most microseconds)")
        times = pd.to_datetime(text.where(iso), utc=True, format="ISO8601", errors="coerce")
        reasons.flag(iso & times.isna().to_numpy(), f"'{name}' is not a valid time")
        return pd.Series(times, index=col.index)
    if kind.pattern is not None:
        reasons.flag(
            is_str & ~text.str.fullmatch(kind.pattern).fillna(False).to_numpy(dtype=bool),
            f"'{name}' does not match {kind.pattern}",
        )
    return text


def check_field(field: PayloadField, col: pd.Series, reasons: Reasons) -> pd.Series:
    """Validate one payload column; returns the column converted for loading (NA where a
    nullable field is absent or null)."""
    name = f"payload.{field.name}"
    missing = col.isna().to_numpy()
    if not field.nullable:
        reasons.flag(missing, f"missing field '{name}'")
    present = ~missing
    kind = field.type
    if kind.kind == "numeric":
        return _number_check(name, kind, col, present, reasons)
    if kind.kind in INTEGER_RANGES:
        return _integer_check(name, kind, col, present, reasons)
    if kind.kind == "boolean":
        is_bool = of_type(col, bool).to_numpy()
        reasons.flag(~is_bool & present, f"'{name}' is not a boolean")
        return pd.Series(
            pd.array(col.where(is_bool, None).tolist(), dtype="boolean"), index=col.index
        )
    if kind.kind == "jsonb":
        is_json = of_type(col, dict, list).to_numpy()
        reasons.flag(~is_json & present, f"'{name}' is not a JSON object or array")
        text = col.where(is_json, None).map(_jsonb_text, na_action="ignore")
        reasons.flag(is_json & text.isna().to_numpy(), f"'{name}' holds an integer beyond 64 bits")
        # jsonb cannot store U+0000 inside a string (the COPY of the whole batch would fail).
        reasons.flag(
            text.str.contains("\\u0000", regex=False).fillna(False).to_numpy(dtype=bool),
            f"'{name}' contains a NUL character",
        )
        return text.astype(object)
    return _string_checks(name, kind, col, present, reasons)
