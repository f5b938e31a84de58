"""The fast path of :func:`kappa.decode.batch.decode_batch`: messages proven valid column-wise.

Each message is decoded by msgspec straight into a typed struct of the contract's envelope and
payload (a str field is a ``str``, an integer one an ``int`` and never a ``bool``, a numeric
one a double; no unknown field, no null), then every check runs on whole columns with numpy
and sets (byte-level layout checks instead of regular expressions, uniques instead of per-row
pattern matches, one ``in`` over the joined column for NUL characters).

The fast path only ever *accepts*: a message it cannot decode this way (bad JSON, a wrong
type, a missing or extra field, a long number literal, too large) or that fails or cannot be
decided by any of its checks goes to the general path with the rest of its kind, which gives
every dead letter its reason. So the reasons stay those of the general path by construction,
and what the fast path must guarantee is only that a message it accepts is one the general
path accepts, with the same values (tests/unit/test_decode_fast.py compares both).
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import compress
from operator import attrgetter
from typing import Any

import msgspec
import numpy as np
import orjson
import pandas as pd

from kappa.catalog.fields import INTEGER_RANGES, PayloadField
from kappa.catalog.streams import EventContract
from kappa.decode.columns import Reasons, check_field
from kappa.decode.shapes import iso_shaped, lengths, no_nul, uuid_shaped
from kappa.exact import NumericType, check_doubles, long_literals
from kappa.sources.base import RawBatch

#: Field kinds the fast path checks itself (non-nullable fields only); any other field is
#: decoded as any JSON value and checked by the general column check on the fast rows.
_TYPED: dict[str, type] = {
    "text": str,
    "char": str,
    "enum": str,
    "uuid": str,
    # The literal itself: parsed by orjson as the general path parses it, and its length
    # tells a literal a double may not carry exactly (see kappa/exact.py).
    "numeric": msgspec.Raw,
    "integer": int,
    "bigint": int,
    "boolean": bool,
}

#: A number literal this long may be one a double does not carry exactly (kappa/exact.py).
_LONG_LITERAL = 16


@dataclass(frozen=True)
class FastRows:
    """The messages the fast path accepted: their positions in the batch (increasing) and
    their converted columns (event_id lower-cased, payload fields as the general path
    converts them, event_time as instants), each of ``len(positions)``."""

    positions: np.ndarray
    event_id: list[str]
    converted: dict[str, Any]
    event_time: pd.Series
    source: list[str]
    schema_version: np.ndarray


@dataclass(frozen=True)
class _Plan:
    decode: Callable[[bytes], Any]
    fields: tuple[tuple[PayloadField, str, bool], ...]  # field, attribute, checked here
    #: A number may reach a field checked by the general column check: messages holding a
    #: long number literal are then left to the general path (which re-parses them exactly).
    long_literals: bool


_PLANS: dict[EventContract, _Plan | None] = {}


def _plan(contract: EventContract) -> _Plan | None:
    """The msgspec decoder of ``contract``'s messages (cached per contract); None when the
    contract has a jsonb field (arbitrarily nested values, which orjson limits in depth)."""
    try:
        return _PLANS[contract]
    except KeyError:
        pass
    except TypeError:  # an unhashable contract: built each time
        return _build_plan(contract)
    plan = _PLANS[contract] = _build_plan(contract)
    return plan


def _build_plan(contract: EventContract) -> _Plan | None:
    if any(f.type.kind == "jsonb" for f in contract.fields):
        return None
    fields: list[tuple[PayloadField, str, bool]] = []
    spec: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    rename: dict[str, str] = {}
    for index, f in enumerate(contract.fields):
        attribute = f"f{index}"  # payload names need not be Python identifiers
        rename[attribute] = f.name
        typed = not f.nullable and f.type.kind in _TYPED
        spec.append((attribute, _TYPED[f.type.kind]) if typed else (attribute, Any, None))
        fields.append((f, attribute, typed))
    payload = msgspec.defstruct(
        "Payload", spec, rename=rename, kw_only=True, forbid_unknown_fields=True, gc=False
    )
    envelope = msgspec.defstruct(
        "Envelope",
        [
            ("event_id", str),
            ("event_type", str),
            ("event_time", str),
            ("source", str),
            ("schema_version", int),
            ("payload", payload),
        ],
        kw_only=True,
        forbid_unknown_fields=True,
        gc=False,
    )
    untyped_numbers = any(
        not typed and (f.type.kind == "numeric" or f.type.kind in INTEGER_RANGES)
        for f, _, typed in fields
    )
    return _Plan(
        decode=msgspec.json.Decoder(envelope).decode,
        fields=tuple(fields),
        long_literals=untyped_numbers,
    )


def _in(values: list, allowed: Iterable[object]) -> np.ndarray:
    """Membership by equality, as ``Series.isin`` decides it for these values."""
    allowed_set = frozenset(allowed)
    return np.fromiter(map(allowed_set.__contains__, values), dtype=bool, count=len(values))


def _fullmatch(values: list[str], pattern: str) -> np.ndarray:
    """``Series.str.fullmatch(pattern)`` decided once per distinct value."""
    import re

    regex = re.compile(pattern)
    verdict = {v: regex.fullmatch(v) is not None for v in set(values)}
    return np.fromiter(map(verdict.__getitem__, values), dtype=bool, count=len(values))


def _text(f: PayloadField, values: list[str]) -> tuple[np.ndarray, Any]:
    kind = f.type
    ok = no_nul(values)
    length = lengths(values)
    if kind.kind == "text":
        ok &= length >= kind.min_length
        if kind.max_length is not None:
            ok &= length <= kind.max_length
    elif kind.kind == "char":
        ok &= length == kind.length
    elif kind.kind == "enum":
        ok &= _in(values, kind.values)
    elif kind.kind == "uuid":
        ok &= uuid_shaped(values)
    if kind.pattern is not None:
        ok &= _fullmatch(values, kind.pattern)
    return ok, pd.array(values, dtype="string")


#: The types of a JSON number as orjson parses it (a bool is not one).
_NUMBERS = frozenset({int, float})


def _loads_number(literal: msgspec.Raw) -> object:
    try:
        return orjson.loads(bytes(literal))
    except orjson.JSONDecodeError:  # 1e400: the general path says why
        return None


def _number(f: PayloadField, values: list[msgspec.Raw]) -> tuple[np.ndarray, Any]:
    """Each value is one JSON value as written (msgspec checked its syntax): parsed by orjson
    in one array, as the general path parses the message; a literal of 16 characters or more
    (every one a double may not carry exactly among them) is left to the general path."""
    kind = f.type
    target = NumericType(kind.precision or 0, kind.scale or 0)
    try:
        parsed = orjson.loads(b"[" + b",".join(values) + b"]")
    except orjson.JSONDecodeError:
        parsed = [_loads_number(v) for v in values]
    ok = lengths(values) < _LONG_LITERAL
    types = list(map(type, parsed))
    if set(types) <= _NUMBERS and ok.all():
        doubles = np.array(parsed, dtype=np.float64)
    else:  # only short literals of numbers are converted (no int beyond a double's range)
        ok &= np.fromiter(map(_NUMBERS.__contains__, types), dtype=bool, count=len(types))
        doubles = np.full(len(parsed), np.nan)
        objects = np.fromiter(parsed, dtype=object, count=len(parsed))
        doubles[ok] = objects[ok].astype(np.float64)
    ok &= np.isfinite(doubles)
    with np.errstate(invalid="ignore"):
        if kind.exclusive_min is not None:
            ok &= ~(doubles <= float(kind.exclusive_min))
        if kind.minimum is not None:
            ok &= ~(doubles < float(kind.minimum))
    too_large, inexact = check_doubles(doubles, target)
    return ok & ~too_large & ~inexact, doubles


def _integer(f: PayloadField, values: list[int]) -> tuple[np.ndarray, Any]:
    kind = f.type
    low, high = INTEGER_RANGES[kind.kind]
    try:
        ints = np.array(values, dtype=np.int64)
        ok = (ints >= low) & (ints <= high)
    except OverflowError:  # beyond 64 bits: refused here, the general path says why
        ok = np.fromiter((low <= v <= high for v in values), dtype=bool, count=len(values))
        ints = np.array([v if inside else 0 for v, inside in zip(values, ok, strict=True)])
    if kind.minimum is not None:
        ok &= ints >= int(kind.minimum)  # an integer field's bounds are ints (the catalogue)
    if kind.maximum is not None:
        ok &= ints <= kind.maximum
    return ok, pd.array(ints, dtype="Int64")


def _check(f: PayloadField, values: list) -> tuple[np.ndarray, Any]:
    """(accepted, converted) of one typed payload column."""
    kind = f.type.kind
    if kind == "numeric":
        return _number(f, values)
    if kind in INTEGER_RANGES:
        return _integer(f, values)
    if kind == "boolean":
        return np.ones(len(values), dtype=bool), pd.array(values, dtype="boolean")
    return _text(f, values)


#: Equal to no key (not even a missing one).
_NO_TEXT = object()


def _utf8(word: object) -> object:
    try:
        return word.encode("utf-8") if isinstance(word, str) else _NO_TEXT
    except UnicodeEncodeError:
        return _NO_TEXT


def _keys_match(keys: list[bytes | None], expected: Any) -> np.ndarray:
    """Which keys the general path finds equal to the payload's key field: the key decoded
    (invalid UTF-8 replaced) against the field as text. A key that is the field's text in
    UTF-8 is equal (when every one is, one comparison of the joined columns says so: joined
    with NUL, which neither side then holds, so the parts line up); any other key is
    compared as the general path compares it."""
    text = pd.Series(expected).astype("string")
    words = text.tolist()
    if None not in keys and not text.isna().any():
        joined = "\x00".join(words)
        if joined.count("\x00") == len(words) - 1:
            try:
                if b"\x00".join(keys) == joined.encode("utf-8"):  # type: ignore[arg-type]
                    return np.ones(len(keys), dtype=bool)
            except UnicodeEncodeError:  # a lone surrogate: compared row by row below
                pass
    encoded = [_utf8(w) for w in words]
    same = np.fromiter(map(operator.eq, keys, encoded), dtype=bool, count=len(keys))
    for index in np.flatnonzero(~same).tolist():
        key, word = keys[index], words[index]
        same[index] = (
            key is not None and isinstance(word, str) and key.decode("utf-8", "replace") == word
        )
    return same


def _pick(column: Any, keep: np.ndarray) -> Any:
    if isinstance(column, list):
        return list(compress(column, keep))
    if isinstance(column, pd.Series):
        return column[keep].reset_index(drop=True)
    return column[keep]


#: Messages decoded by one ``map`` call; a chunk holding a message that fails is decoded
#: again message by message.
_CHUNK = 1024


def _decode_all(
    decode: Callable[[bytes], Any], values: list[bytes | None], max_bytes: int, long: set[int]
) -> tuple[list[Any], list[int]]:
    """The structs of the messages that decode (and their positions): a chunk at a time
    while every message of it does, otherwise message by message."""
    decoded: list[Any] = []
    positions: list[int] = []
    for start in range(0, len(values), _CHUNK):
        chunk = values[start : start + _CHUNK]
        if not long:
            try:
                if max(map(len, chunk)) <= max_bytes:  # type: ignore[arg-type]
                    whole = list(map(decode, chunk))  # type: ignore[arg-type]
                    decoded.extend(whole)
                    positions.extend(range(start, start + len(chunk)))
                    continue
            except (TypeError, msgspec.DecodeError, RecursionError):
                pass  # a null value, bad JSON, a wrong type: one by one below
        for index, value in enumerate(chunk, start):
            if value is None or len(value) > max_bytes or index in long:
                continue
            try:
                decoded.append(decode(value))
            except (msgspec.DecodeError, RecursionError):  # the general path says why
                continue
            positions.append(index)
    return decoded, positions


def decode_fast(batch: RawBatch, contract: EventContract) -> FastRows | None:
    """The messages of ``batch`` proven valid without the general path (possibly none);
    None when the fast path does not apply to ``contract``."""
    plan = _plan(contract)
    if plan is None:
        return None
    values = batch.values
    max_bytes = contract.max_message_bytes
    long = set(long_literals(values).tolist()) if plan.long_literals else set()
    decoded, positions = _decode_all(plan.decode, values, max_bytes, long)
    if not decoded:
        return FastRows(np.zeros(0, dtype=np.int64), [], {}, pd.Series([]), [], np.zeros(0))
    count = len(decoded)

    event_type = list(map(attrgetter("event_type"), decoded))
    ok = _in(event_type, contract.event_types)
    versions = list(map(attrgetter("schema_version"), decoded))
    ok &= _in(versions, contract.schema_versions)
    event_id = list(map(attrgetter("event_id"), decoded))
    ok &= uuid_shaped(event_id)
    source = list(map(attrgetter("source"), decoded))
    ok &= (lengths(source) > 0) & no_nul(source)
    raw_time = list(map(attrgetter("event_time"), decoded))
    ok &= iso_shaped(raw_time)

    payloads = list(map(attrgetter("payload"), decoded))
    converted: dict[str, Any] = {}
    for f, attribute, typed in plan.fields:
        column = list(map(attrgetter(attribute), payloads))
        if typed:
            accepted, converted[f.name] = _check(f, column)
            ok &= accepted
        else:
            reasons = Reasons([None] * count)
            converted[f.name] = check_field(f, pd.Series(column, dtype=object), reasons)
            ok &= reasons.open

    keys = [batch.keys[i] for i in positions]
    ok &= _keys_match(keys, converted[contract.key_field])

    # Instants last, on the rows still accepted: the general path's own conversion.
    position = np.asarray(positions, dtype=np.int64)
    shaped_time = list(compress(raw_time, ok))
    event_time = pd.Series(
        pd.to_datetime(
            pd.Series(shaped_time, dtype="string"), utc=True, format="ISO8601", errors="coerce"
        )
    )
    broker_time = pd.to_datetime(
        pd.Series([batch.timestamps[i] for i in position[ok].tolist()], dtype="int64"),
        unit="ms",
        utc=True,
    )
    timely = (
        event_time.notna()
        & ~((event_time - broker_time) > contract.max_future_skew).fillna(False)
        & ~((broker_time - event_time) > contract.max_age).fillna(False)
    ).to_numpy(dtype=bool)
    accepted = np.flatnonzero(ok)[timely]
    keep = np.zeros(count, dtype=bool)
    keep[accepted] = True
    ids = list(compress(event_id, keep))
    if any(c in "ABCDEF" for c in set("".join(ids))):
        ids = [i.lower() for i in ids]
    return FastRows(
        positions=position[keep],
        event_id=ids,
        converted={name: _pick(column, keep) for name, column in converted.items()},
        event_time=event_time[timely].reset_index(drop=True),
        source=list(compress(source, keep)),
        schema_version=np.array(list(compress(versions, keep)), dtype=np.int64),
    )
