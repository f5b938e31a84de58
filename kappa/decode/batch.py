"""Vectorised decode and validation of a batch of raw messages against a contract.

Each message is parsed once (orjson); every check after that runs on whole columns with
pandas. A message that fails any check becomes a dead letter carrying the first reason
found; the batch goes on. Valid events are deduplicated by ``event_id`` within the batch
(first offset wins); duplicates of events loaded by earlier batches are dropped at load.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    """Decode and validate ``batch``; never raises for bad messages."""
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
