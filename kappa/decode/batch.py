"""Vectorised decode and validation of a batch of raw messages against a contract.

Each message is parsed once (orjson); every check after that runs on whole columns with
pandas. A message that fails any check becomes a dead letter carrying the first reason
found; the batch goes on. Valid events are deduplicated by ``event_id`` within the batch
(first offset wins); duplicates of events loaded by earlier batches are dropped at load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import compress

import numpy as np
import orjson
import pandas as pd

from kappa.catalog.streams import EventContract, fact_columns
from kappa.decode.columns import (
    ISO_WITH_ZONE,
    UUID_PATTERN,
    Reasons,
    check_field,
    has_nul,
    of_type,
)
from kappa.decode.fast import decode_fast
from kappa.exact import (
    exact_payload,
    long_literals,
)
from kappa.sources.base import RawBatch

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


def decode_batch(batch: RawBatch, contract: EventContract) -> DecodedBatch:
    """Decode and validate ``batch``; never raises for bad messages.

    The messages the fast path (:mod:`kappa.decode.fast`) proves valid column-wise skip the
    general path; every other message (all dead letters among them) goes through it, so the
    rows and reasons are the same either way, in offset order."""
    fast = decode_fast(batch, contract) if _FAST else None
    if fast is None or len(fast.positions) == 0:
        return _finish(batch, *_validate(batch, contract))
    n = len(batch.values)
    rest = np.ones(n, dtype=bool)
    rest[fast.positions] = False
    slow_positions = np.flatnonzero(rest)
    fast_rows = _rows_frame(
        contract,
        batch,
        event_id=pd.array(fast.event_id, dtype="string"),
        converted=fast.converted,
        event_time=fast.event_time,
        source=pd.array(fast.source, dtype="string"),
        schema_version=pd.array(fast.schema_version, dtype="Int64"),
        offsets=np.asarray(batch.offsets, dtype=np.int64)[fast.positions],
        broker_time=_broker_time([batch.timestamps[i] for i in fast.positions.tolist()]),
    )
    if slow_positions.size == 0:
        broker_time = _broker_time(batch.timestamps)
        return _finish(
            batch,
            fast_rows,
            Reasons([None] * n),
            broker_time,
            valid=np.ones(n, dtype=bool),
            dedup_only=True,
        )
    sub = _subset(batch, slow_positions)
    slow_rows, reasons, broker_time = _validate(sub, contract)
    valid = reasons.open
    slow_valid = slow_rows[valid]
    fast_rows, slow_valid = _same_units(fast_rows, slow_valid, slow_rows)
    order = np.argsort(np.concatenate([fast.positions, slow_positions[valid]]), kind="stable")
    rows = pd.concat([fast_rows, slow_valid], ignore_index=True).iloc[order]
    return _finish(sub, rows, reasons, broker_time, valid=valid, dedup_only=True)


#: Off only to compare the two paths (tests, bench/decode_profile.py).
_FAST = True


def _subset(batch: RawBatch, positions: np.ndarray) -> RawBatch:
    picked = positions.tolist()
    return RawBatch(
        topic=batch.topic,
        partition=batch.partition,
        start=batch.start,
        end=batch.end,
        offsets=[batch.offsets[i] for i in picked],
        timestamps=[batch.timestamps[i] for i in picked],
        keys=[batch.keys[i] for i in picked],
        values=[batch.values[i] for i in picked],
    )


def _same_units(
    fast: pd.DataFrame, slow: pd.DataFrame, slow_all: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Instants of both parts in the finer unit of the two, as the general path over the
    whole batch infers one unit per column (nanoseconds when any value needs them; a part
    with no instant at all has the unit of an empty column, which does not count)."""
    for name in fast.columns:
        a, b = fast[name].dtype, slow_all[name].dtype
        if a == b or not (isinstance(a, pd.DatetimeTZDtype) and isinstance(b, pd.DatetimeTZDtype)):
            continue
        if not slow_all[name].notna().any():
            finer = a
        elif not fast[name].notna().any():
            finer = b
        else:
            finer = a if np.datetime64(1, a.unit) < np.datetime64(1, b.unit) else b
        fast = fast.assign(**{name: fast[name].astype(finer)})
        slow = slow.assign(**{name: slow[name].astype(finer)})
    return fast, slow


def _broker_time(timestamps: list[int]) -> pd.Series:
    return pd.to_datetime(pd.Series(timestamps, dtype="int64"), unit="ms", utc=True)


def _rows_frame(
    contract: EventContract,
    batch: RawBatch,
    *,
    event_id: object,
    converted: dict[str, object],
    event_time: object,
    source: object,
    schema_version: object,
    offsets: np.ndarray,
    broker_time: pd.Series,
) -> pd.DataFrame:
    """The fact table's decoded columns, in order (both paths build their rows here)."""
    return pd.DataFrame(
        {
            "event_id": event_id,
            **converted,
            "event_time": event_time,
            "source": source,
            "schema_version": schema_version,
            "topic": batch.topic,
            "kafka_partition": batch.partition,
            "kafka_offset": offsets,
            "broker_time": broker_time,
        }
    )[[name for name, _ in fact_columns(contract)]]


def _validate(batch: RawBatch, contract: EventContract) -> tuple[pd.DataFrame, Reasons, pd.Series]:
    """The general path: every message of ``batch`` as a row (NA where it failed), with the
    first reason of each failing one, and the broker times."""
    envelope, payload, initial = _parse(
        batch.values, contract.max_message_bytes, contract.field_names
    )
    reasons = Reasons(initial)
    frame = pd.DataFrame(envelope, dtype=object)
    del envelope
    for name in _ENVELOPE:
        reasons.flag(frame[name].isna().to_numpy(), f"missing field '{name}'")

    event_type = frame["event_type"].where(of_type(frame["event_type"], str)).astype("string")
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
        (of_type(frame["schema_version"], int))
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

    event_id = frame["event_id"].where(of_type(frame["event_id"], str)).astype("string")
    reasons.flag(
        ~event_id.str.fullmatch(UUID_PATTERN).fillna(False).to_numpy(), "'event_id' is not a UUID"
    )
    # `source` lands in a NOT NULL text column: anything but a non-empty string (a number,
    # "", a NUL inside) would fail the COPY of the whole batch and stall the partition.
    source = frame["source"].where(of_type(frame["source"], str)).astype("string")
    reasons.flag(source.isna().to_numpy(), "'source' is not a string")
    reasons.flag((source.str.len() == 0).fillna(False).to_numpy(), "'source' is empty")
    reasons.flag(has_nul(source), "'source' contains a NUL character")
    raw_time = frame["event_time"].where(of_type(frame["event_time"], str)).astype("string")
    iso = raw_time.str.fullmatch(ISO_WITH_ZONE).fillna(False).to_numpy()
    reasons.flag(~iso, "'event_time' is not ISO-8601 with a zone")
    event_time = pd.to_datetime(raw_time.where(iso), utc=True, format="ISO8601", errors="coerce")
    reasons.flag(iso & event_time.isna().to_numpy(), "'event_time' is not a valid time")
    broker_time = _broker_time(batch.timestamps)
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
    converted = {f.name: check_field(f, payload_frame[f.name], reasons) for f in contract.fields}

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
    rows = _rows_frame(
        contract,
        batch,
        event_id=event_id.str.lower(),
        converted=converted,
        event_time=event_time,
        source=source,
        schema_version=pd.to_numeric(frame["schema_version"].where(valid), errors="coerce").astype(
            "Int64"
        ),
        offsets=offsets,
        broker_time=broker_time,
    )
    return rows, reasons, broker_time


def _finish(
    batch: RawBatch,
    rows: pd.DataFrame,
    reasons: Reasons,
    broker_time: pd.Series,
    *,
    valid: np.ndarray | None = None,
    dedup_only: bool = False,
) -> DecodedBatch:
    """The valid rows (``rows[valid]``, or ``rows`` as they are with ``dedup_only``),
    deduplicated by ``event_id`` (first offset wins), and ``batch``'s dead letters."""
    if valid is None:
        valid = reasons.open
    if not dedup_only:
        rows = rows[valid]
    duplicated = rows["event_id"].duplicated(keep="first").to_numpy()
    rows = (rows[~duplicated] if duplicated.any() else rows).reset_index(drop=True)

    offsets = np.asarray(batch.offsets, dtype=np.int64)
    dead_mask = ~valid
    dead_letters = pd.DataFrame(
        {
            "offset": offsets[dead_mask],
            "broker_time": broker_time[dead_mask].reset_index(drop=True),
            "key": list(compress(batch.keys, dead_mask)),
            "value": list(compress(batch.values, dead_mask)),
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
