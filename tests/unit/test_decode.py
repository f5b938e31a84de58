"""Decode and validation of raw messages; expectations written out by hand."""

from datetime import UTC, datetime

import orjson
import pytest

from kappa.catalog.streams import fact_columns
from kappa.decode.batch import decode_batch
from kappa.sources.base import RawBatch
from tests.demo import ORDER_PLACED, PAYMENT_ATTEMPTED

BROKER_MS = int(datetime(2026, 11, 26, 6, 0, tzinfo=UTC).timestamp() * 1000)


def order(n: int, **overrides) -> dict:
    envelope = {
        "event_id": f"00000000-0000-4000-8000-{n:012d}",
        "event_type": "order_placed",
        "event_time": "2026-11-26T05:59:00.250+01:00",
        "source": "order-service",
        "schema_version": 1,
        "payload": {
            "order_id": f"o-{n}",
            "customer_id": "c-00001",
            "amount": 19.99,
            "currency": "EUR",
            "item_count": 2,
            "channel": "web",
        },
    }
    payload = overrides.pop("payload", {})
    envelope.update(overrides)
    envelope["payload"].update(payload)
    return envelope


def with_amount(literal: bytes) -> bytes:
    """An order whose amount is the JSON number ``literal`` exactly as written."""
    return orjson.dumps(order(1, payload={"amount": "AMOUNT"})).replace(b'"AMOUNT"', literal)


def batch(values: list[bytes | None], keys: list[bytes | None] | None = None) -> RawBatch:
    n = len(values)
    return RawBatch(
        topic="orders",
        partition=3,
        start=100,
        end=100 + n,
        offsets=list(range(100, 100 + n)),
        timestamps=[BROKER_MS] * n,
        keys=keys if keys is not None else [b"c-00001"] * n,
        values=values,
    )


def test_a_valid_order_becomes_one_row_with_typed_columns():
    decoded = decode_batch(batch([orjson.dumps(order(1))]), ORDER_PLACED)
    assert decoded.dead_letters.empty and decoded.duplicates_in_batch == 0
    assert list(decoded.rows.columns) == [name for name, _ in fact_columns(ORDER_PLACED)]
    row = decoded.rows.iloc[0]
    assert row["event_id"] == "00000000-0000-4000-8000-000000000001"
    assert row["event_time"] == datetime(2026, 11, 26, 4, 59, 0, 250000, tzinfo=UTC)
    assert row["amount"] == 19.99 and row["item_count"] == 2 and row["channel"] == "web"
    assert (row["topic"], row["kafka_partition"], row["kafka_offset"]) == ("orders", 3, 100)
    assert row["broker_time"] == datetime(2026, 11, 26, 6, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "key", "reason"),
    [
        (b"{not json", b"c-00001", "invalid JSON"),
        (b"\xff\xfe\x00", b"c-00001", "invalid JSON"),
        (b"[1, 2]", b"c-00001", "envelope is a JSON list, not an object"),
        (None, b"c-00001", "empty message (null value)"),
        (
            orjson.dumps({**order(1), "payload": None}),
            b"c-00001",
            "envelope has no 'payload' object",
        ),
        (
            orjson.dumps({k: v for k, v in order(1).items() if k != "event_id"}),
            b"c-00001",
            "missing field 'event_id'",
        ),
        (
            orjson.dumps(order(1, event_type="order_cancelled")),
            b"c-00001",
            "unexpected event_type 'order_cancelled'",
        ),
        (orjson.dumps(order(1, schema_version=99)), b"c-00001", "unsupported schema_version 99"),
        (orjson.dumps(order(1, schema_version="1")), b"c-00001", "unsupported schema_version '1'"),
        (orjson.dumps(order(1, event_id="not-a-uuid")), b"c-00001", "'event_id' is not a UUID"),
        (
            orjson.dumps(order(1, event_time="2026-11-26T05:59:00")),
            b"c-00001",
            "not ISO-8601 with a zone",
        ),
        (orjson.dumps(order(1, event_time="2026-13-45T05:59:00Z")), b"c-00001", "not a valid time"),
        (
            orjson.dumps(order(1, event_time="2031-01-01T00:00:00Z")),
            b"c-00001",
            "after the broker time",
        ),
        (
            orjson.dumps(order(1, event_time="1999-01-01T00:00:00Z")),
            b"c-00001",
            "days before the broker time",
        ),
        (
            orjson.dumps(order(1, payload={"amount": "19.99"})),
            b"c-00001",
            "'payload.amount' is not a number",
        ),
        (
            orjson.dumps(order(1, payload={"amount": -5})),
            b"c-00001",
            "'payload.amount' must be > 0",
        ),
        (
            orjson.dumps(order(1, payload={"item_count": True})),
            b"c-00001",
            "'payload.item_count' is not an integer",
        ),
        (
            orjson.dumps(order(1, payload={"item_count": 0})),
            b"c-00001",
            "'payload.item_count' must be >= 1",
        ),
        (
            orjson.dumps(order(1, payload={"currency": "euro"})),
            b"c-00001",
            "'payload.currency' is not exactly 3 characters",
        ),
        (
            orjson.dumps(order(1, payload={"currency": "eur"})),
            b"c-00001",
            "'payload.currency' does not match [A-Z]{3}",
        ),
        (orjson.dumps(order(1, payload={"channel": ""})), b"c-00001", "'payload.channel' is empty"),
        (
            orjson.dumps(order(1, payload={"order_id": None})),
            b"c-00001",
            "missing field 'payload.order_id'",
        ),
        (orjson.dumps(order(1)), None, "message has no key"),
        (orjson.dumps(order(1)), b"c-99999", "message key does not match payload.customer_id"),
        (b"x" * (1024 * 1024 + 1), b"c-00001", "exceeds the 1048576-byte limit"),
        # Beyond the EDW columns (numeric(14, 2), integer): one such row must not fail the COPY.
        (
            orjson.dumps(order(1, payload={"amount": 1e13})),
            b"c-00001",
            "'payload.amount' does not fit numeric(14, 2): 10000000000000.0",
        ),
        # Issue 13: rounded to 1000000000000.00 it overflowed the COPY and stalled the partition.
        (
            with_amount(b"999999999999.995"),
            b"c-00001",
            "'payload.amount' has more than 2 decimals: 999999999999.995",
        ),
        (
            with_amount(b"1000000000000.00"),
            b"c-00001",
            "'payload.amount' does not fit numeric(14, 2): 1000000000000.00",
        ),
        # Issue 13: loaded as 0.00 before (rounded silently).
        (with_amount(b"0.004"), b"c-00001", "'payload.amount' has more than 2 decimals: 0.004"),
        # 19 significant digits: the double is 1.0, only the exact re-parse sees the decimals.
        (
            with_amount(b"1.000000000000000001"),
            b"c-00001",
            "'payload.amount' has more than 2 decimals: 1.000000000000000001",
        ),
        (
            orjson.dumps(order(1, payload={"item_count": 3_000_000_000})),
            b"c-00001",
            "outside the integer range",
        ),
        # Found by the chaos suite: each of these failed the COPY of its whole batch (a NOT
        # NULL `source`, a NUL in a text column), so the partition stalled on it forever.
        (orjson.dumps(order(1, source=42)), b"c-00001", "'source' is not a string"),
        (orjson.dumps(order(1, source="")), b"c-00001", "'source' is empty"),
        (orjson.dumps(order(1, source="a\x00b")), b"c-00001", "'source' contains a NUL"),
        (
            orjson.dumps(order(1, payload={"order_id": "o\x001"})),
            b"c-00001",
            "'payload.order_id' contains a NUL character",
        ),
    ],
)
def test_each_kind_of_bad_message_is_dead_lettered_with_its_reason(value, key, reason):
    good = orjson.dumps(order(2))
    decoded = decode_batch(batch([value, good], keys=[key, b"c-00001"]), ORDER_PLACED)
    assert len(decoded.rows) == 1, "the batch goes on: the good message behind it is kept"
    assert decoded.rows.iloc[0]["kafka_offset"] == 101
    [dead] = decoded.dead_letters.to_dict("records")
    assert reason in dead["reason"]
    assert dead["offset"] == 100 and dead["value"] == value and dead["key"] == key


def test_duplicates_keep_the_first_offset_and_are_counted():
    first = orjson.dumps(order(1))
    resent = orjson.dumps(order(1, payload={"amount": 5.0}))
    decoded = decode_batch(batch([first, orjson.dumps(order(2)), resent, first]), ORDER_PLACED)
    assert decoded.duplicates_in_batch == 2
    assert list(decoded.rows["kafka_offset"]) == [100, 101]
    assert decoded.rows.iloc[0]["amount"] == 19.99
    assert decoded.received == 4


def test_payment_status_must_be_one_of_the_allowed_values():
    payment = {
        "event_id": "00000000-0000-4000-8000-000000000009",
        "event_type": "payment_attempted",
        "event_time": "2026-11-26T05:59:00Z",
        "source": "payment-service",
        "schema_version": 1,
        "payload": {
            "payment_id": "p-1",
            "order_id": "o-1",
            "customer_id": "c-00001",
            "card_id": "card-ab",
            "amount": 10,
            "currency": "USD",
            "merchant_country": "DE",
            "status": "approved",
        },
    }
    refused = {
        **payment,
        "event_id": "00000000-0000-4000-8000-000000000010",
        "payload": {**payment["payload"], "status": "pending"},
    }
    decoded = decode_batch(batch([orjson.dumps(payment), orjson.dumps(refused)]), PAYMENT_ATTEMPTED)
    assert list(decoded.rows["payment_id"]) == ["p-1"]
    assert (
        "'payload.status' is not one of: approved, declined"
        in decoded.dead_letters.iloc[0]["reason"]
    )


def test_an_empty_batch_decodes_to_nothing():
    decoded = decode_batch(batch([]), ORDER_PLACED)
    assert decoded.rows.empty and decoded.dead_letters.empty and decoded.received == 0
