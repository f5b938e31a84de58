"""String layouts checked on whole columns by their code points (numpy), for the decoder's
fast path (:mod:`kappa.decode.fast`): UUIDs, ISO-8601 instants with a zone, lengths, NUL
characters. Each check only ever says a value has the layout; a value it refuses is left to
the general path's regular expressions, which give the reason."""

from __future__ import annotations

from collections.abc import Sequence, Sized
from itertools import compress

import numpy as np

_HEX_POSITIONS = [i for i in range(36) if i not in (8, 13, 18, 23)]
_DATE_TIME_DIGITS = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18]
#: The longest event_time the fast path reads: ``YYYY-MM-DDTHH:MM:SS.ffffff+HH:MM``.
_LONGEST_TIME = 32


def lengths(values: Sequence[Sized]) -> np.ndarray:
    return np.fromiter(map(len, values), dtype=np.int64, count=len(values))


def no_nul(values: list[str]) -> np.ndarray:
    """Which strings hold no U+0000: one scan of the joined column when none does."""
    if "\x00" not in "".join(values):
        return np.ones(len(values), dtype=bool)
    return np.fromiter(("\x00" not in v for v in values), dtype=bool, count=len(values))


def _codes(values: Sequence[str], width: int) -> np.ndarray:
    """Strings of exactly ``width`` characters as a (rows, width) array of code points."""
    return np.array(values, dtype=f"U{width}").view(np.uint32).reshape(len(values), width)


def uuid_shaped(values: list[str]) -> np.ndarray:
    """Which strings are 8-4-4-4-12 ASCII hex digits (what ``UUID_PATTERN`` matches)."""
    ok = lengths(values) == 36
    if not ok.any():
        return ok
    codes = _codes(values if ok.all() else list(compress(values, ok)), 36)
    hexes = codes[:, _HEX_POSITIONS]
    lower = hexes | 0x20  # folds A-F onto a-f; no other code point lands in a-f or 0-9
    digits = ((hexes >= 0x30) & (hexes <= 0x39)) | ((lower >= 0x61) & (lower <= 0x66))
    dashes = codes[:, [8, 13, 18, 23]] == 0x2D
    ok[ok] = digits.all(axis=1) & dashes.all(axis=1)
    return ok


def _fraction(codes: np.ndarray, digit: np.ndarray, end: int) -> np.ndarray | bool:
    """Whether characters 19..end are empty or a dot and 1 to 6 ASCII digits."""
    if end == 19:
        return True
    if not 21 <= end <= 26:
        return False
    return (codes[:, 19] == 0x2E) & digit[:, 20:end].all(axis=1)


def iso_shaped(values: list[str]) -> np.ndarray:
    """Which strings are ``YYYY-MM-DDTHH:MM:SS[.f{1,6}](Z|±HH:MM)`` in ASCII digits: a subset
    of what ``ISO_WITH_ZONE`` matches (others are left to the general path)."""
    widths = lengths(values)
    ok = np.zeros(len(values), dtype=bool)
    for width in np.unique(widths).tolist():
        if not 20 <= width <= _LONGEST_TIME:
            continue
        rows = np.flatnonzero(widths == width)
        picked = values if len(rows) == len(values) else [values[i] for i in rows.tolist()]
        codes = _codes(picked, width)
        digit = (codes >= 0x30) & (codes <= 0x39)
        shaped = (
            digit[:, _DATE_TIME_DIGITS].all(axis=1)
            & (codes[:, 4] == 0x2D)
            & (codes[:, 7] == 0x2D)
            & (codes[:, 10] == 0x54)
            & (codes[:, 13] == 0x3A)
            & (codes[:, 16] == 0x3A)
        )
        zulu = (codes[:, width - 1] == 0x5A) & _fraction(codes, digit, width - 1)
        offset: np.ndarray | bool = False
        if width >= 25:
            sign = codes[:, width - 6]
            offset = (
                ((sign == 0x2B) | (sign == 0x2D))
                & digit[:, [width - 5, width - 4, width - 2, width - 1]].all(axis=1)
                & (codes[:, width - 3] == 0x3A)
                & _fraction(codes, digit, width - 6)
            )
        ok[rows] = shaped & (zulu | offset)
    return ok
