"""The shop's events, generated: `order_placed` and `payment_attempted`, with their mischief.

They stand in for the order and payment services of the shop (DESIGN.md §3), and
deliberately misbehave the way real producers do: resent messages (duplicates), event times
in the past (late data) and malformed messages. Every one of those is marked in the
generated stream, so tests can reconcile "produced = loaded + dead-lettered + deduplicated"
exactly. The generator is pure and deterministic (seeded RNG, injected start time);
:mod:`examples.shop.simulator` sends it to a broker.
"""

from __future__ import annotations

import heapq
import itertools
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson

if TYPE_CHECKING:
    from examples.shop.settings import ShopSettings
    from kappa.settings import Settings

ORDER_PLACED: Final = "order_placed"
PAYMENT_ATTEMPTED: Final = "payment_attempted"
ORDER_SOURCE: Final = "order-service"
PAYMENT_SOURCE: Final = "payment-service"
SCHEMA_VERSION: Final = 1

CURRENCIES: Final = ("EUR", "USD", "GBP")
CHANNELS: Final = ("web", "app", "store")
COUNTRIES: Final = ("DE", "FR", "US", "GB", "NL", "ES", "IT", "PL")
_COUNTRY_WEIGHTS: Final = (25, 15, 15, 12, 10, 9, 9, 5)
_HOME_CURRENCY: Final = {"US": "USD", "GB": "GBP"}
_CHANNEL_WEIGHTS: Final = (50, 35, 15)

INVALID_REASONS: Final = (
    "invalid_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "unknown_event_type",
    "unknown_schema_version",
    "not_utf8",
    "null_key",
    "null_value",
)
"""Every kind of malformed message the simulator writes (``SimulatedMessage.invalid_reason``)."""

_ORDER_SHARE: Final = 0.6
_LATE_MIN_S: Final = 1.0
_LATE_MAX_S: Final = 600.0
_DUPLICATE_MAX_DELAY: Final = 1000
"""A resend follows its original by 1..this many messages: near ones land in the same
micro-batch, far ones in a later batch, and the consumer must drop both."""
_RECENT_ORDERS: Final = 2000
_FOREIGN_MERCHANT_SHARE: Final = 0.15
_DECLINE_SHARE: Final = {False: 0.05, True: 0.25}
_UNKNOWN_EVENT_TYPE: Final = {
    ORDER_PLACED: "order_cancelled",
    PAYMENT_ATTEMPTED: "payment_refunded",
}
_UNKNOWN_SCHEMA_VERSION: Final = 99

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class SimulatedMessage:
    """One message as it goes onto the wire, with what the simulator meant it to be.

    ``kind`` is the ground truth that tests reconcile against: ``"duplicate"`` is a
    byte-identical resend of an earlier ``"valid"`` message, ``"invalid"`` is malformed on
    purpose and ``invalid_reason`` (one of :data:`INVALID_REASONS`) says how. ``event_id``
    is the id a reader can recover from the value, ``None`` when the value hides it.
    """

    topic: str
    key: bytes | None
    value: bytes | None
    event_id: str | None
    kind: Literal["valid", "duplicate", "invalid"]
    invalid_reason: str | None


@dataclass(frozen=True)
class SimulatorConfig:
    """What to simulate; rates are probabilities in [0, 1].

    ``invalid_rate`` is the share of all messages that are malformed; ``duplicate_rate``
    and ``late_rate`` are shares of valid events (resent once later, or stamped 1 s to
    10 min in the past), matching the ``KAPPA_SIM_*`` settings.
    """

    topic_orders: str
    topic_payments: str
    customers: int
    seed: int
    duplicate_rate: float
    late_rate: float
    invalid_rate: float

    def __post_init__(self) -> None:
        if self.topic_orders == self.topic_payments:
            raise ValueError("topic_orders and topic_payments must differ")
        if self.customers < 1:
            raise ValueError(f"customers must be at least 1, got {self.customers}")
        for name in ("duplicate_rate", "late_rate", "invalid_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")

    @classmethod
    def from_settings(cls, settings: Settings, shop: ShopSettings) -> SimulatorConfig:
        """The simulator's configuration: the topics of the catalogue's shop streams, the
        rest from the shop's settings."""
        return cls(
            topic_orders=settings.stream("fact_order").topic,
            topic_payments=settings.stream("fact_payment").topic,
            customers=shop.sim_customers,
            seed=shop.sim_seed,
            duplicate_rate=shop.sim_duplicate_rate,
            late_rate=shop.sim_late_rate,
            invalid_rate=shop.sim_invalid_rate,
        )


@dataclass(frozen=True)
class CustomerProfile:
    """A simulated customer: where they live and which cards they pay with."""

    customer_id: str
    home_country: str
    currency: str
    cards: tuple[str, ...]


def customer_profile(seed: int, index: int) -> CustomerProfile:
    """The customer ``c-<index>`` for ``seed``.

    Derived from (seed, index) alone, not from the event stream, so a customer keeps their
    home country and cards across simulator restarts and any other simulator with the same
    seed can describe the same people.
    """
    rng = random.Random(f"kappa-sim-customer:{seed}:{index}")
    home = rng.choices(COUNTRIES, weights=_COUNTRY_WEIGHTS)[0]
    cards = tuple(f"card-{rng.getrandbits(64):016x}" for _ in range(rng.choice((1, 1, 2))))
    return CustomerProfile(
        customer_id=f"c-{index:05d}",
        home_country=home,
        currency=_HOME_CURRENCY.get(home, "EUR"),
        cards=cards,
    )


@dataclass(frozen=True)
class _Order:
    order_id: str
    customer: CustomerProfile
    amount: float
    currency: str


@dataclass(frozen=True)
class _Draft:
    topic: str
    key: bytes
    envelope: dict[str, Any]


def _iso(moment: datetime) -> str:
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000).isoformat(
        timespec="microseconds"
    )


class _EventStream:
    """The generator's state: customers met so far, recent orders, pending resends, ids."""

    def __init__(self, config: SimulatorConfig, start: datetime, rate: float) -> None:
        self._config = config
        self._start = start.astimezone(UTC)
        self._rate = rate
        start_us = (self._start - _EPOCH) // timedelta(microseconds=1)
        # The start instant is part of the seed and of the id numbering so that a restarted
        # simulator neither repeats the event ids of its previous run (they would all be
        # dropped as duplicates) nor reuses its order and payment numbers.
        self._rng = random.Random(f"kappa-sim-events:{config.seed}:{start_us}")
        self._order_numbers = itertools.count(start_us)
        self._payment_numbers = itertools.count(start_us)
        self._customers: dict[int, CustomerProfile] = {}
        self._recent_orders: list[_Order] = []
        self._resends: list[tuple[int, int, SimulatedMessage]] = []

    def __iter__(self) -> Iterator[SimulatedMessage]:
        rng = self._rng
        config = self._config
        for slot in itertools.count():
            now = self._start + timedelta(seconds=slot / self._rate)
            if rng.random() < config.invalid_rate:
                yield self._invalid(now)
            elif self._resends and self._resends[0][0] <= slot:
                yield replace(heapq.heappop(self._resends)[2], kind="duplicate")
            else:
                message = self._valid(now)
                if rng.random() < config.duplicate_rate:
                    due = slot + rng.randint(1, _DUPLICATE_MAX_DELAY)
                    heapq.heappush(self._resends, (due, slot, message))
                yield message

    def _customer(self, index: int) -> CustomerProfile:
        profile = self._customers.get(index)
        if profile is None:
            profile = self._customers[index] = customer_profile(self._config.seed, index)
        return profile

    def _valid(self, now: datetime) -> SimulatedMessage:
        if self._rng.random() < self._config.late_rate:
            now -= timedelta(seconds=self._rng.uniform(_LATE_MIN_S, _LATE_MAX_S))
        draft = self._draft(now, remember=True)
        return SimulatedMessage(
            topic=draft.topic,
            key=draft.key,
            value=orjson.dumps(draft.envelope),
            event_id=draft.envelope["event_id"],
            kind="valid",
            invalid_reason=None,
        )

    def _draft(self, event_time: datetime, *, remember: bool) -> _Draft:
        if self._recent_orders and self._rng.random() >= _ORDER_SHARE:
            return self._payment(event_time)
        return self._order(event_time, remember=remember)

    def _envelope(
        self, event_type: str, source: str, event_time: datetime, payload: dict[str, Any]
    ) -> dict[str, Any]:
        return {
            "event_id": str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            "event_type": event_type,
            "event_time": _iso(event_time),
            "source": source,
            "schema_version": SCHEMA_VERSION,
            "payload": payload,
        }

    def _order(self, event_time: datetime, *, remember: bool) -> _Draft:
        rng = self._rng
        customer = self._customer(rng.randrange(self._config.customers))
        currency = customer.currency if rng.random() < 0.9 else rng.choice(CURRENCIES)
        order = _Order(
            order_id=f"o-{next(self._order_numbers)}",
            customer=customer,
            amount=round(max(1.0, rng.lognormvariate(3.6, 0.8)), 2),
            currency=currency,
        )
        if remember:
            if len(self._recent_orders) < _RECENT_ORDERS:
                self._recent_orders.append(order)
            else:
                self._recent_orders[rng.randrange(_RECENT_ORDERS)] = order
        payload = {
            "order_id": order.order_id,
            "customer_id": customer.customer_id,
            "amount": order.amount,
            "currency": order.currency,
            "item_count": 1 + min(int(rng.expovariate(0.6)), 19),
            "channel": rng.choices(CHANNELS, weights=_CHANNEL_WEIGHTS)[0],
        }
        return _Draft(
            topic=self._config.topic_orders,
            key=customer.customer_id.encode(),
            envelope=self._envelope(ORDER_PLACED, ORDER_SOURCE, event_time, payload),
        )

    def _payment(self, event_time: datetime) -> _Draft:
        rng = self._rng
        order = rng.choice(self._recent_orders)
        customer = order.customer
        foreign = rng.random() < _FOREIGN_MERCHANT_SHARE
        country = (
            rng.choice([c for c in COUNTRIES if c != customer.home_country])
            if foreign
            else customer.home_country
        )
        declined = rng.random() < _DECLINE_SHARE[foreign]
        payload = {
            "payment_id": f"p-{next(self._payment_numbers)}",
            "order_id": order.order_id,
            "customer_id": customer.customer_id,
            "card_id": rng.choice(customer.cards),
            "amount": order.amount,
            "currency": order.currency,
            "merchant_country": country,
            "status": "declined" if declined else "approved",
        }
        return _Draft(
            topic=self._config.topic_payments,
            key=customer.customer_id.encode(),
            envelope=self._envelope(PAYMENT_ATTEMPTED, PAYMENT_SOURCE, event_time, payload),
        )

    def _invalid(self, now: datetime) -> SimulatedMessage:
        rng = self._rng
        reason = rng.choice(INVALID_REASONS)
        draft = self._draft(now, remember=False)
        envelope = draft.envelope
        event_id: str | None = envelope["event_id"]
        key: bytes | None = draft.key
        value: bytes | None
        match reason:
            case "invalid_json":
                text = orjson.dumps(envelope)
                value = text[: rng.randrange(1, len(text))]
                event_id = None
            case "not_an_object":
                value = orjson.dumps(rng.choice([[envelope], envelope["event_id"], 42, None]))
                event_id = None
            case "missing_field":
                field = rng.choice(
                    [*envelope, *(f"payload.{name}" for name in envelope["payload"])]
                )
                if field.startswith("payload."):
                    del envelope["payload"][field.removeprefix("payload.")]
                else:
                    del envelope[field]
                event_id = envelope.get("event_id")
                value = orjson.dumps(envelope)
            case "wrong_type":
                envelope["payload"]["amount"] = f"{envelope['payload']['amount']:.2f}"
                value = orjson.dumps(envelope)
            case "unknown_event_type":
                envelope["event_type"] = _UNKNOWN_EVENT_TYPE[envelope["event_type"]]
                value = orjson.dumps(envelope)
            case "unknown_schema_version":
                envelope["schema_version"] = _UNKNOWN_SCHEMA_VERSION
                value = orjson.dumps(envelope)
            case "not_utf8":
                value = orjson.dumps(envelope).decode().encode("utf-16")
                event_id = None
            case "null_key":
                key = None
                value = orjson.dumps(envelope)
            case "null_value":
                value = None
                event_id = None
            case _:
                raise AssertionError(reason)
        return SimulatedMessage(
            topic=draft.topic,
            key=key,
            value=value,
            event_id=event_id,
            kind="invalid",
            invalid_reason=reason,
        )


def generate(
    config: SimulatorConfig, *, start: datetime, rate: float
) -> Iterator[SimulatedMessage]:
    """An endless, deterministic stream of messages for both topics (about 60 % orders).

    Message ``i`` is stamped ``start + i / rate`` (UTC, millisecond precision) unless it is
    late, so the live loop, which sends message ``i`` at that wall-clock instant, produces
    event times that track arrival times. The same config, start instant and rate give the
    same bytes; the start instant also seeds the stream, so separate runs never share ids.
    """
    if start.tzinfo is None or start.utcoffset() is None:
        raise ValueError("start must be a timezone-aware datetime")
    if not rate > 0:
        raise ValueError(f"rate must be positive, got {rate}")
    return iter(_EventStream(config, start, rate))
