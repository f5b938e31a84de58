"""Data contracts of the event store (DESIGN.md §3), as data rather than code per topic.

An :class:`EventContract` names the envelope's ``event_type``, the accepted
``schema_version`` values and the payload fields with their types; the decoder validates
any batch against it, and the warehouse derives the fact table from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

FieldKind = Literal["text", "amount", "currency", "country", "count", "status"]

#: SQL type of each field kind in the EDW.
SQL_TYPES: dict[FieldKind, str] = {
    "text": "text",
    "amount": "numeric(14, 2)",
    "currency": "char(3)",
    "country": "char(2)",
    "count": "integer",
    "status": "text",
}


@dataclass(frozen=True)
class PayloadField:
    """One field of an event's payload."""

    name: str
    kind: FieldKind
    allowed: tuple[str, ...] = ()


@dataclass(frozen=True)
class EventContract:
    """What a valid message on one topic looks like, and where it lands."""

    event_type: str
    schema_versions: frozenset[int]
    fields: tuple[PayloadField, ...]
    table: str
    key_field: str = "customer_id"
    max_message_bytes: int = 1024 * 1024
    max_future_skew: timedelta = timedelta(hours=1)
    max_age: timedelta = timedelta(days=365)
    #: Columns a stateful step adds (nullable), after the decoded ones.
    derived: tuple[tuple[str, str], ...] = ()

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)


ORDER_PLACED = EventContract(
    event_type="order_placed",
    schema_versions=frozenset({1}),
    fields=(
        PayloadField("order_id", "text"),
        PayloadField("customer_id", "text"),
        PayloadField("amount", "amount"),
        PayloadField("currency", "currency"),
        PayloadField("item_count", "count"),
        PayloadField("channel", "text"),
    ),
    table="fact_order",
    derived=(
        ("customer_sk", "bigint"),
        ("customer_segment", "text"),
        ("customer_country", "text"),
        ("enrichment", "text"),
        ("customer_orders_before", "integer"),
        ("customer_avg_amount_before", "numeric(14, 2)"),
        ("customer_stddev_amount_before", "double precision"),
    ),
)

PAYMENT_ATTEMPTED = EventContract(
    event_type="payment_attempted",
    schema_versions=frozenset({1}),
    fields=(
        PayloadField("payment_id", "text"),
        PayloadField("order_id", "text"),
        PayloadField("customer_id", "text"),
        PayloadField("card_id", "text"),
        PayloadField("amount", "amount"),
        PayloadField("currency", "currency"),
        PayloadField("merchant_country", "country"),
        PayloadField("status", "status", allowed=("approved", "declined")),
    ),
    table="fact_payment",
    derived=(
        ("customer_sk", "bigint"),
        ("customer_country", "text"),
        ("enrichment", "text"),
        ("fraud_score", "numeric(4, 3)"),
    ),
)

#: Columns every fact row carries besides its payload fields, in table order.
ENVELOPE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_id", "uuid"),
    ("event_time", "timestamptz"),
    ("source", "text"),
    ("schema_version", "integer"),
)
#: Where the row came from in the log (deterministic, so replays reproduce them).
SOURCE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("topic", "text"),
    ("kafka_partition", "integer"),
    ("kafka_offset", "bigint"),
    ("broker_time", "timestamptz"),
)


def fact_columns(contract: EventContract) -> list[tuple[str, str]]:
    """The decoded columns of the fact table (name, SQL type), in the order the decoder
    emits them; ``contract.derived`` follows them in the table."""
    envelope = list(ENVELOPE_COLUMNS)
    payload = [(f.name, SQL_TYPES[f.kind]) for f in contract.fields]
    return envelope[:1] + payload + envelope[1:] + list(SOURCE_COLUMNS)
