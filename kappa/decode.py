"""Vectorised decode and validation of a batch of raw messages against a contract.

Each message is parsed once (orjson); every check after that runs on whole columns with
pandas. A message that fails any check becomes a dead letter carrying the first reason
found; the batch goes on. Valid events are deduplicated by ``event_id`` within the batch
(first offset wins); duplicates of events loaded by earlier batches are dropped at load.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal

import numpy as np
import orjson
import pandas as pd

from kappa.contracts import INTEGER_RANGES, EventContract, FieldType, PayloadField, fact_columns
from kappa.event_store import RawBatch
from kappa.exact import (
    NumericType,
    check_decimal,
    check_doubles,
    exact_payload,
    long_literals,
    shown,
)

_UUID = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_ISO_WITH_ZONE = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2}(\.\d{1,9})?)?(Z|[+-]\d{2}:?\d{2})"
#: A payload timestamptz: PostgreSQL keeps microseconds, so more digits would be rounded.
#: ASCII digits only: Python's \d also matches other scripts' digits, which PostgreSQL refuses.
_PAYLOAD_TIME = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?"
    r"(Z|[+-][0-9]{2}:?[0-9]{2})"
)
_ENVELOPE = ("event_id", "event_type", "event_time", "source", "schema_version")


@dataclass
class DecodedBatch:
    """The outcome of decoding one :class:`RawBatch`.

    ``rows`` has the fact table's columns in order; ``dead_letters`` has ``offset``,
    ``broker_time``, ``key``, ``value`` and ``reason``.
    """

    rows: pd.DataFrame
    dead_letters: pd.DataFrame
    duplicates_in_batch: int

    @classmethod
    def empty(cls, contract: EventContract) -> DecodedBatch:
        """No rows: what a range holding only transaction markers decodes to."""
        return cls(
            rows=pd.DataFrame(columns=[name for name, _ in fact_columns(contract)]),
            dead_letters=pd.DataFrame(columns=["offset", "broker_time", "key", "value", "reason"]),
            duplicates_in_batch=0,
        )

    @property
    def received(self) -> int:
        return len(self.rows) + len(self.dead_letters) + self.duplicates_in_batch


def _parse(
    values: list[bytes | None], max_bytes: int, payload_fields: tuple[str, ...]
) -> tuple[dict[str, list], dict[str, list], list[str | None]]:
    """Parse each message once and keep only its envelope and payload fields, by column
    (the only per-message Python in the decode path). The parsed objects are dropped as
    the loop goes, so a batch never holds every message as a dict at once."""
    envelope: dict[str, list] = {name: [] for name in _ENVELOPE}
    payload: dict[str, list] = {name: [] for name in payload_fields}
    envelope_columns = [(name, envelope[name].append) for name in _ENVELOPE]
    payload_columns = [(name, payload[name].append) for name in payload_fields]
    absent = [column.append for column in (*envelope.values(), *payload.values())]
    reasons: list[str | None] = []
    loads = orjson.loads
    for value in values:
        reason: str | None = None
        obj = None
        if value is None:
            reason = "empty message (null value)"
        elif len(value) > max_bytes:
            reason = f"message of {len(value)} bytes exceeds the {max_bytes}-byte limit"
        else:
            try:
                obj = loads(value)
            except orjson.JSONDecodeError as exc:
                reason = f"invalid JSON: {exc}"
            else:
                if not isinstance(obj, dict):
                    reason = f"envelope is a JSON {type(obj).__name__}, not an object"
                elif not isinstance(obj.get("payload"), dict):
                    reason = "envelope has no 'payload' object"
        reasons.append(reason)
        if reason is not None:
            for append in absent:
                append(None)
            continue
        assert isinstance(obj, dict)
        get = obj.get
        for name, append in envelope_columns:
            append(get(name))
        get = obj["payload"].get
        for name, append in payload_columns:
            append(get(name))
    # A number literal a double cannot carry exactly: re-parse those few messages exactly.
    for index in long_literals(values).tolist():
        value = values[index]
        exact = exact_payload(value) if reasons[index] is None and value is not None else None
        if exact is not None:
            for name in payload_fields:
                payload[name][index] = exact.get(name)
    return envelope, payload, reasons


class _Reasons:
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


def _of_type(col: pd.Series, *kinds: type) -> pd.Series:
    """Which values have exactly one of the JSON types ``kinds`` (``bool`` is not ``int``)."""
    return col.map(type).isin(kinds)


def _has_nul(text: pd.Series) -> np.ndarray:
    """Strings holding U+0000, which a PostgreSQL text column cannot store (the COPY of the
    whole batch would fail on it)."""
    return text.str.contains("\x00", regex=False).fillna(False).to_numpy(dtype=bool)


def _number_check(
    name: str, kind: FieldType, col: pd.Series, present: np.ndarray, reasons: _Reasons
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
    name: str, kind: FieldType, col: pd.Series, present: np.ndarray, reasons: _Reasons
) -> pd.Series:
    is_int = _of_type(col, int).to_numpy()
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
    name: str, kind: FieldType, col: pd.Series, present: np.ndarray, reasons: _Reasons
) -> pd.Series:
    is_str = _of_type(col, str).to_numpy()
    reasons.flag(~is_str & present, f"'{name}' is not a string")
    text = col.where(is_str).astype("string")
    reasons.flag(_has_nul(text), f"'{name}' contains a NUL character")
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
            is_str & ~text.str.fullmatch(_UUID).fillna(False).to_numpy(), f"'{name}' is not a UUID"
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


def _check_field(field: PayloadField, col: pd.Series, reasons: _Reasons) -> pd.Series:
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
        is_bool = _of_type(col, bool).to_numpy()
        reasons.flag(~is_bool & present, f"'{name}' is not a boolean")
        return pd.Series(
            pd.array(col.where(is_bool, None).tolist(), dtype="boolean"), index=col.index
        )
    if kind.kind == "jsonb":
        is_json = _of_type(col, dict, list).to_numpy()
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


def decode_batch(batch: RawBatch, contract: EventContract) -> DecodedBatch:
    """Decode and validate ``batch``; never raises for bad messages."""
    envelope, payload, initial = _parse(
        batch.values, contract.max_message_bytes, contract.field_names
    )
    reasons = _Reasons(initial)
    frame = pd.DataFrame(envelope, dtype=object)
    del envelope
    for name in _ENVELOPE:
        reasons.flag(frame[name].isna().to_numpy(), f"missing field '{name}'")

    event_type = frame["event_type"].where(_of_type(frame["event_type"], str)).astype("string")
    wrong_type = ~event_type.isin(contract.event_types).fillna(False).to_numpy(dtype=bool)
    expected = " or ".join(repr(t) for t in contract.event_types)
    reasons.flag(
        wrong_type,
        lambda mask: [
            f"unexpected event_type {v!r} on topic {batch.topic!r} (expected {expected})"
            for v in frame["event_type"].to_numpy(dtype=object)[mask]
        ],
    )
    version_ok = (
        (_of_type(frame["schema_version"], int))
        & frame["schema_version"].isin(sorted(contract.schema_versions))
    ).to_numpy()
    supported = ", ".join(str(v) for v in sorted(contract.schema_versions))
    reasons.flag(
        ~version_ok,
        lambda mask: [
            f"unsupported schema_version {v!r} (supported: {supported})"
            for v in frame["schema_version"].to_numpy(dtype=object)[mask]
        ],
    )

    event_id = frame["event_id"].where(_of_type(frame["event_id"], str)).astype("string")
    reasons.flag(
        ~event_id.str.fullmatch(_UUID).fillna(False).to_numpy(), "'event_id' is not a UUID"
    )
    # `source` lands in a NOT NULL text column: anything but a non-empty string (a number,
    # "", a NUL inside) would fail the COPY of the whole batch and stall the partition.
    source = frame["source"].where(_of_type(frame["source"], str)).astype("string")
    reasons.flag(source.isna().to_numpy(), "'source' is not a string")
    reasons.flag((source.str.len() == 0).fillna(False).to_numpy(), "'source' is empty")
    reasons.flag(_has_nul(source), "'source' contains a NUL character")
    raw_time = frame["event_time"].where(_of_type(frame["event_time"], str)).astype("string")
    iso = raw_time.str.fullmatch(_ISO_WITH_ZONE).fillna(False).to_numpy()
    reasons.flag(~iso, "'event_time' is not ISO-8601 with a zone")
    event_time = pd.to_datetime(raw_time.where(iso), utc=True, format="ISO8601", errors="coerce")
    reasons.flag(iso & event_time.isna().to_numpy(), "'event_time' is not a valid time")
    broker_time = pd.to_datetime(pd.Series(batch.timestamps, dtype="int64"), unit="ms", utc=True)
    future = (event_time - broker_time) > contract.max_future_skew
    reasons.flag(
        future.fillna(False).to_numpy(),
        f"'event_time' is more than {contract.max_future_skew} after the broker time",
    )
    past = (broker_time - event_time) > contract.max_age
    reasons.flag(
        past.fillna(False).to_numpy(),
        f"'event_time' is more than {contract.max_age.days} days before the broker time",
    )

    payload_frame = pd.DataFrame(payload, dtype=object)
    del payload
    converted = {f.name: _check_field(f, payload_frame[f.name], reasons) for f in contract.fields}

    keys = pd.Series(
        [k.decode("utf-8", "replace") if k is not None else None for k in batch.keys],
        dtype="string",
    )
    reasons.flag(
        keys.isna().to_numpy(), f"message has no key (expected payload.{contract.key_field})"
    )
    key_mismatch = (keys != converted[contract.key_field].astype("string")).fillna(False).to_numpy()
    reasons.flag(key_mismatch, f"message key does not match payload.{contract.key_field}")

    valid = reasons.open
    offsets = np.asarray(batch.offsets, dtype=np.int64)
    rows = pd.DataFrame(
        {
            "event_id": event_id.str.lower(),
            **converted,
            "event_time": event_time,
            "source": source,
            "schema_version": pd.to_numeric(
                frame["schema_version"].where(valid), errors="coerce"
            ).astype("Int64"),
            "topic": batch.topic,
            "kafka_partition": batch.partition,
            "kafka_offset": offsets,
            "broker_time": broker_time,
        }
    )[[name for name, _ in fact_columns(contract)]]
    rows = rows[valid]
    duplicated = rows["event_id"].duplicated(keep="first").to_numpy()
    rows = rows[~duplicated].reset_index(drop=True)

    dead_mask = ~valid
    dead_letters = pd.DataFrame(
        {
            "offset": offsets[dead_mask],
            "broker_time": broker_time[dead_mask].reset_index(drop=True),
            "key": [k for k, d in zip(batch.keys, dead_mask, strict=True) if d],
            "value": [v for v, d in zip(batch.values, dead_mask, strict=True) if d],
            "reason": reasons.values[dead_mask],
        }
    )
    return DecodedBatch(
        rows=rows, dead_letters=dead_letters, duplicates_in_batch=int(duplicated.sum())
    )


def describe_reason(reason: str) -> str:
    """A reason's category (the text before any quoted or trailing value), for counting in
    metadata: a reason naming its field first keeps the field and drops the value."""
    if reason.startswith("'"):
        return reason.split(": ", 1)[0]
    return re.split(r"[:']", reason, maxsplit=1)[0].strip() or reason
