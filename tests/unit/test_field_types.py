"""Decoding each field type of the catalogue: the value a valid message loads, and the
dead letter (with a reason naming the field) of each refused value. Expectations are
written out by hand."""

from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import orjson
import pandas as pd
import pytest

from kappa.catalog.streams import EventContract, load_streams
from kappa.decode.batch import decode_batch
from kappa.sources.base import RawBatch

BROKER_MS = int(datetime(2026, 11, 26, 6, 0, tzinfo=UTC).timestamp() * 1000)

CATALOG = """
streams:
  - name: fact_probe
    key_field: probe_id
    event_types: [probe_read]
    schema_versions: [1, 2]
    fields:
      probe_id: {type: text, max_length: 8, pattern: "p-[0-9]+"}
      note: {type: text, min_length: 0, nullable: true}
      tag: {type: text, min_length: 3}
      small: {type: integer, min: -5, max: 5}
      big: bigint
      price: {type: "numeric(6,3)", min: 0}
      ok: boolean
      at: timestamptz
      day: date
      ref: uuid
      code: {type: char(2), pattern: "[A-Z]{2}"}
      level: {type: enum, values: [low, high]}
      doc: jsonb
      later: {type: integer, nullable: true, since: 2}
"""


@pytest.fixture(scope="module")
def contract(tmp_path_factory) -> EventContract:
    path: Path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(CATALOG)
    [stream] = load_streams(path)
    return stream


def payload(**overrides) -> dict:
    values = {
        "probe_id": "p-1",
        "note": "",
        "tag": "abc",
        "small": -5,
        "big": 2**62 + 1,
        "price": 12.345,
        "ok": False,
        "at": "2026-11-26T05:00:00.123456+01:00",
        "day": "2024-02-29",
        "ref": "6F9619FF-8B86-D011-B42D-00C04FC964FF",
        "code": "DE",
        "level": "high",
        "doc": {"a": [1, 2.5, None], "b": "x"},
    }
    values.update(overrides)
    return values


def message(n: int, body: dict, *, version: int = 1) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"00000000-0000-4000-8000-{n:012d}",
            "event_type": "probe_read",
            "event_time": "2026-11-26T05:59:00Z",
            "source": "probe",
            "schema_version": version,
            "payload": body,
        }
    )


def decode(contract: EventContract, values: list[bytes], keys: list[bytes] | None = None):
    n = len(values)
    return decode_batch(
        RawBatch(
            topic="probes",
            partition=0,
            start=0,
            end=n,
            offsets=list(range(n)),
            timestamps=[BROKER_MS] * n,
            keys=keys if keys is not None else [b"p-1"] * n,
            values=values,
        ),
        contract,
    )


def test_a_valid_message_loads_every_type_as_written(contract):
    decoded = decode(contract, [message(1, payload())])
    assert decoded.dead_letters.empty, decoded.dead_letters["reason"].tolist()
    row = decoded.rows.iloc[0]
    assert row["note"] == "" and row["tag"] == "abc"
    assert row["small"] == -5 and row["big"] == 2**62 + 1
    assert row["price"] == 12.345 and bool(row["ok"]) is False
    assert row["at"] == datetime(2026, 11, 26, 4, 0, 0, 123456, tzinfo=UTC)
    assert row["day"] == "2024-02-29" and date.fromisoformat(row["day"]) == date(2024, 2, 29)
    assert row["ref"] == "6F9619FF-8B86-D011-B42D-00C04FC964FF"
    assert row["code"] == "DE" and row["level"] == "high"
    assert orjson.loads(row["doc"]) == {"a": [1, 2.5, None], "b": "x"}
    assert pd.isna(row["later"])


def test_nullable_fields_may_be_absent_or_null_and_required_ones_may_not(contract):
    body = payload()
    del body["note"]
    decoded = decode(
        contract, [message(1, body), message(2, payload(note=None, later=4), version=2)]
    )
    assert decoded.dead_letters.empty, decoded.dead_letters["reason"].tolist()
    assert decoded.rows["note"].isna().all() and decoded.rows["later"].tolist()[1] == 4
    body = payload()
    del body["ok"]
    [reason] = decode(contract, [message(1, body)]).dead_letters["reason"]
    assert reason == "missing field 'payload.ok'"


def test_an_exact_long_literal_inside_jsonb_is_kept_as_written(contract):
    raw = message(1, payload(doc={"v": "NUMBER"})).replace(b'"NUMBER"', b"0.10000000000000000001")
    decoded = decode(contract, [raw])
    assert decoded.dead_letters.empty, decoded.dead_letters["reason"].tolist()
    assert decoded.rows.iloc[0]["doc"] == '{"v":0.10000000000000000001}'


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"probe_id": "p-123456789"}, "'payload.probe_id' is longer than 8 characters"),
        ({"probe_id": "q-1"}, "'payload.probe_id' does not match p-[0-9]+"),
        ({"tag": "ab"}, "'payload.tag' is shorter than 3 characters"),
        ({"tag": 7}, "'payload.tag' is not a string"),
        ({"tag": "a\u0000c"}, "'payload.tag' contains a NUL character"),
        ({"small": 6}, "'payload.small' must be <= 5"),
        ({"small": -6}, "'payload.small' must be >= -5"),
        ({"small": 1.0}, "'payload.small' is not an integer"),
        ({"small": True}, "'payload.small' is not an integer"),
        ({"small": 2**31}, "'payload.small' is outside the integer range"),
        ({"big": 2**63}, "'payload.big' is outside the bigint range"),
        ({"big": "1"}, "'payload.big' is not an integer"),
        ({"price": -0.001}, "'payload.price' must be >= 0"),
        ({"price": 1000.0}, "'payload.price' does not fit numeric(6, 3): 1000.0"),
        ({"price": 1.0005}, "'payload.price' has more than 3 decimals: 1.0005"),
        ({"price": "1.5"}, "'payload.price' is not a number"),
        ({"ok": 0}, "'payload.ok' is not a boolean"),
        ({"ok": "true"}, "'payload.ok' is not a boolean"),
        ({"at": "2026-11-26T05:00:00"}, "'payload.at' is not ISO-8601 with a zone"),
        ({"at": "2026-11-26T05:00:00.1234567Z"}, "'payload.at' is not ISO-8601 with a zone"),
        ({"at": "2026-02-30T05:00:00Z"}, "'payload.at' is not a valid time"),
        ({"day": "2023-02-29"}, "'payload.day' is not a valid date"),
        ({"day": "0000-01-01"}, "'payload.day' is not a valid date"),
        ({"day": "2024-13-01"}, "'payload.day' is not a valid date"),
        ({"day": "24-01-01"}, "'payload.day' is not a date (YYYY-MM-DD)"),
        # Digits of another script match Python's \d but not PostgreSQL's date input.
        ({"day": "\u0662\u0660\u0662\u0664-01-01"}, "'payload.day' is not a date (YYYY-MM-DD)"),
        ({"day": "2024-01-01T00:00:00Z"}, "'payload.day' is not a date (YYYY-MM-DD)"),
        ({"ref": "not-a-uuid"}, "'payload.ref' is not a UUID"),
        ({"code": "D"}, "'payload.code' is not exactly 2 characters"),
        ({"code": "DEU"}, "'payload.code' is not exactly 2 characters"),
        ({"code": "de"}, "'payload.code' does not match [A-Z]{2}"),
        ({"level": "medium"}, "'payload.level' is not one of: low, high"),
        ({"level": 1}, "'payload.level' is not a string"),
        ({"doc": "{}"}, "'payload.doc' is not a JSON object or array"),
        ({"doc": 3}, "'payload.doc' is not a JSON object or array"),
        ({"doc": {"k": "a\u0000"}}, "'payload.doc' contains a NUL character"),
        ({"later": "x"}, "'payload.later' is not an integer"),
    ],
)
def test_each_refused_value_is_a_dead_letter_naming_its_field(contract, overrides, reason):
    good = message(1, payload())
    decoded = decode(contract, [message(2, payload(**overrides), version=2), good])
    assert decoded.rows["event_id"].tolist() == ["00000000-0000-4000-8000-000000000001"]
    [got] = decoded.dead_letters["reason"].tolist()
    assert got.startswith(reason), got


def test_a_day_outside_the_pandas_time_range_is_still_a_valid_date(contract):
    decoded = decode(
        contract, [message(1, payload(day="1200-03-01")), message(2, payload(day="9999-12-31"))]
    )
    assert decoded.dead_letters.empty, decoded.dead_letters["reason"].tolist()
    assert decoded.rows["day"].tolist() == ["1200-03-01", "9999-12-31"]


def test_the_key_is_compared_with_the_declared_key_field(contract):
    decoded = decode(contract, [message(1, payload())], keys=[b"p-2"])
    assert decoded.dead_letters["reason"].tolist() == [
        "message key does not match payload.probe_id"
    ]


def test_an_event_type_outside_the_list_is_refused_naming_the_list(tmp_path):
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG.replace("[probe_read]", "[probe_read, probe_reread]"))
    [stream] = load_streams(path)
    other = message(1, payload()).replace(b"probe_read", b"probe_lost")
    decoded = decode(stream, [message(2, payload()), other])
    assert len(decoded.rows) == 1
    assert decoded.dead_letters["reason"].tolist() == [
        "unexpected event_type 'probe_lost' on topic 'probes' (expected 'probe_read' or "
        "'probe_reread')"
    ]


def test_a_numeric_decimal_literal_is_checked_exactly(contract):
    raw = message(1, payload(price="NUMBER")).replace(b'"NUMBER"', b"1.0000000000000000001")
    [reason] = decode(contract, [raw]).dead_letters["reason"]
    assert reason == "'payload.price' has more than 3 decimals: 1.0000000000000000001"
    raw = message(1, payload(price="NUMBER")).replace(b'"NUMBER"', b"1.2500000000000000000")
    decoded = decode(contract, [raw])
    assert decoded.dead_letters.empty and decoded.rows.iloc[0]["price"] == float(Decimal("1.25"))
