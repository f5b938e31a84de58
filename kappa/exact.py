"""Exact checks of numbers against the EDW column that will hold them.

orjson parses a JSON number to a double. A decimal literal of at most 15 significant digits
survives the trip through a double (DBL_DIG = 15): no other literal of at most 15 digits
rounds to the same double. So for such a literal, "the double equals cents / 100 for an
integer cents" decides exactly whether the literal has at most 2 decimals, and the double's
shortest repr is the literal's value. Only a literal with 16 or more significant digits can
collapse onto a double that looks harmless (``1.000000000000000001`` parses to ``1.0``):
messages holding one are found with one numpy scan of the whole batch and re-parsed
exactly (``json.loads(..., parse_float=Decimal)``), message by message.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

import numpy as np
import orjson
import pandas as pd

#: A JSON number literal (after ``:``, ``,`` or ``[``) with 16 or more digits and dots: every
#: literal of 16+ significant digits matches (a few shorter ones too, which only cost an
#: exact re-parse). Strings cannot match: their digits follow a quote.
_LONG_NUMBER = re.compile(rb"[:,\[]\s*-?[0-9][0-9.]{15,}")
_LONG_DIGITS = 16
_BEFORE_NUMBER = np.frombuffer(b":,[ \t\r\n", dtype=np.uint8)
_SEPARATOR = b"\n"  # never inside a JSON token, so no run spans two messages


@dataclass(frozen=True)
class NumericType:
    """``numeric(precision, scale)``: values below ``10**(precision - scale)`` in magnitude
    with at most ``scale`` decimals."""

    precision: int
    scale: int

    @classmethod
    def parse(cls, sql_type: str) -> NumericType | None:
        """``numeric(14, 2)`` -> NumericType(14, 2); None for another type."""
        found = re.fullmatch(r"\s*numeric\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)\s*", sql_type)
        return cls(int(found.group(1)), int(found.group(2))) if found else None

    def __str__(self) -> str:
        return f"numeric({self.precision}, {self.scale})"

    @property
    def limit(self) -> int:
        return 10 ** (self.precision - self.scale)


def shown(value: object) -> str:
    """A number as the message had it (a double's repr is its short literal)."""
    return repr(value) if isinstance(value, float) else str(value)


def long_literals(values: list[bytes | None]) -> np.ndarray:
    """Indices of the messages holding a number literal a double may not carry exactly:
    a run of 16 or more digits and dots after ``:``, ``,``, ``[`` or a space (so not a
    string's content, which follows a quote). Found with numpy over the joined batch, no
    per-message Python; a false hit only costs that message an exact re-parse."""
    blobs = [v if v is not None else b"" for v in values]
    if not blobs:
        return np.zeros(0, dtype=np.int64)
    data = np.frombuffer(_SEPARATOR.join(blobs), dtype=np.uint8)
    number = ((data >= ord("0")) & (data <= ord("9"))) | (data == ord("."))
    edges = np.diff(number.view(np.int8), prepend=np.int8(0), append=np.int8(0))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    starts = starts[(ends - starts) >= _LONG_DIGITS]
    before = np.maximum(starts - 1, 0)
    before = np.where(data[before] == ord("-"), np.maximum(before - 1, 0), before)
    hits = starts[np.isin(data[before], _BEFORE_NUMBER)]
    if hits.size == 0:
        return np.zeros(0, dtype=np.int64)
    message_ends = np.cumsum([len(b) + 1 for b in blobs])  # exclusive, separator included
    return np.unique(np.searchsorted(message_ends, hits, side="right"))


def exact_payload(value: bytes) -> dict | None:
    """The payload of one message with every non-integer number as an exact Decimal
    (None when it does not parse or has no payload object: orjson decided that already)."""
    try:
        obj = json.loads(value, parse_float=Decimal)
    except (ValueError, RecursionError):
        return None
    payload = obj.get("payload") if isinstance(obj, dict) else None
    return payload if isinstance(payload, dict) else None


def loads_exact(text: str | bytes) -> object:
    """A JSON document as orjson parses it, re-parsed with exact Decimals when it holds a
    number literal a double may not carry exactly (see the module docstring)."""
    value = orjson.loads(text)
    raw = text.encode() if isinstance(text, str) else text
    if _LONG_NUMBER.search(raw):
        return json.loads(raw, parse_float=Decimal)
    return value


def check_doubles(values: np.ndarray, kind: NumericType) -> tuple[np.ndarray, np.ndarray]:
    """Masks (does not fit, has more decimals than ``kind.scale``) for doubles parsed from
    literals of at most 15 significant digits (or from integers), vectorised; NaN is neither."""
    with np.errstate(invalid="ignore", over="ignore"):
        too_large = np.abs(values) >= float(kind.limit)
        scale = 10.0**kind.scale
        units = np.rint(values * scale)
        # cents / 100 is correctly rounded, so it equals the double exactly when the literal
        # had at most `scale` decimals (see the module docstring).
        inexact = ~too_large & (units / scale != values)
    finite = np.isfinite(values)
    return too_large & finite, inexact & finite


def check_decimal(value: Decimal, kind: NumericType) -> str | None:
    """Why ``value`` does not fit ``kind`` exactly ("fit" or "decimals"), or None."""
    try:
        if abs(value) >= kind.limit:
            return "fit"
        if value != value.quantize(Decimal(1).scaleb(-kind.scale)):
            return "decimals"
    except InvalidOperation:
        return "fit"
    return None


def numeric_reasons(
    name: str,
    target: NumericType,
    numeric: pd.Series,
    converted: pd.Series,
    why: np.ndarray,
) -> None:
    """Fill ``why`` with the reason of each value a numeric(p, s) column would round or
    overflow: doubles (short literals) vectorised, exact Decimals (long literals) one by
    one. ``numeric`` holds the parsed values, ``converted`` them as doubles."""
    exact = numeric.map(lambda v: isinstance(v, Decimal)).to_numpy(dtype=bool)
    too_large, inexact = check_doubles(converted.to_numpy(dtype=float, na_value=np.nan), target)
    too_large &= ~exact
    inexact &= ~exact
    raw = numeric.to_numpy(dtype=object)
    for index in np.flatnonzero(exact):
        verdict = check_decimal(raw[index], target)
        too_large[index] = verdict == "fit"
        inexact[index] = verdict == "decimals"
    why[too_large] = [f"'{name}' does not fit {target}: {shown(v)}" for v in raw[too_large]]
    why[inexact] = [
        f"'{name}' has more than {target.scale} decimals: {shown(v)}" for v in raw[inexact]
    ]


def round_half_even_div(numerator: int, denominator: int) -> int:
    """``numerator / denominator`` rounded half to even, in exact integer arithmetic."""
    quotient, remainder = divmod(numerator, denominator)
    twice = 2 * remainder
    if twice > denominator or (twice == denominator and quotient % 2 == 1):
        quotient += 1
    return quotient
