"""The event simulator: determinism, the data contract, and the share of each kind of mischief."""

from __future__ import annotations

import itertools
import re
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from kafka.errors import KafkaTimeoutError
from kafka.future import Future

from examples.shop import simulator
from examples.shop.settings import ShopSettings
from examples.shop.simulator import (
    INVALID_REASONS,
    SimulatedMessage,
    SimulatorConfig,
    customer_profile,
    generate,
    produce,
    run,
)
from kappa.settings import Settings

START = datetime(2026, 11, 26, 5, 50, 37, 123456, tzinfo=UTC)
RATE = 100.0

ENVELOPE_FIELDS = {"event_id", "event_type", "event_time", "source", "schema_version", "payload"}
ORDER_FIELDS = {"order_id", "customer_id", "amount", "currency", "item_count", "channel"}
PAYMENT_FIELDS = {
    "payment_id",
    "order_id",
    "customer_id",
    "card_id",
    "amount",
    "currency",
    "merchant_country",
    "status",
}
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
EVENT_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}000\+00:00$")


def config(**overrides: Any) -> SimulatorConfig:
    values: dict[str, Any] = {
        "topic_orders": "orders",
        "topic_payments": "payments",
        "customers": 300,
        "seed": 7,
        "duplicate_rate": 0.1,
        "late_rate": 0.1,
        "invalid_rate": 0.05,
    }
    values.update(overrides)
    return SimulatorConfig(**values)


def take(
    cfg: SimulatorConfig, n: int, *, start: datetime = START, rate: float = RATE
) -> list[SimulatedMessage]:
    return list(itertools.islice(generate(cfg, start=start, rate=rate), n))


@pytest.fixture(scope="module")
def stream() -> list[SimulatedMessage]:
    return take(config(), 20_000)


def classify(message: SimulatedMessage, topics: dict[str, str]) -> str | None:
    """What a strict consumer would reject the message for, or ``None`` if it meets the contract.

    Written from DESIGN.md §3, independently of the simulator, so it checks the simulator
    rather than restating it. ``topics`` maps topic name to the event type it carries.
    """
    if message.value is None:
        return "null_value"
    if message.key is None:
        return "null_key"
    try:
        text = message.value.decode("utf-8")
    except UnicodeDecodeError:
        return "not_utf8"
    try:
        envelope = orjson.loads(text)
    except orjson.JSONDecodeError:
        return "invalid_json"
    if not isinstance(envelope, dict):
        return "not_an_object"
    payload = envelope.get("payload")
    if set(envelope) != ENVELOPE_FIELDS or not isinstance(payload, dict):
        return "missing_field"
    event_type = envelope["event_type"]
    if event_type not in ("order_placed", "payment_attempted"):
        return "unknown_event_type"
    if envelope["schema_version"] != 1:
        return "unknown_schema_version"
    expected_fields = ORDER_FIELDS if event_type == "order_placed" else PAYMENT_FIELDS
    if set(payload) != expected_fields:
        return "missing_field"
    amount = payload["amount"]
    if not isinstance(amount, float | int) or isinstance(amount, bool):
        return "wrong_type"
    problems = [
        topics[message.topic] != event_type,
        not UUID4.match(envelope["event_id"]),
        not EVENT_TIME.match(envelope["event_time"]),
        envelope["source"]
        != ("order-service" if event_type == "order_placed" else "payment-service"),
        message.key != payload["customer_id"].encode(),
        not re.fullmatch(r"c-\d{5}", payload["customer_id"]),
        not re.fullmatch(r"o-\d+", payload["order_id"]),
        amount <= 0 or round(amount, 2) != amount,
        payload["currency"] not in ("EUR", "USD", "GBP"),
    ]
    if event_type == "order_placed":
        problems += [
            type(payload["item_count"]) is not int or payload["item_count"] < 1,
            payload["channel"] not in ("web", "app", "store"),
        ]
    else:
        problems += [
            not re.fullmatch(r"p-\d+", payload["payment_id"]),
            not re.fullmatch(r"card-[0-9a-f]+", payload["card_id"]),
            payload["merchant_country"] not in ("DE", "FR", "US", "GB", "NL", "ES", "IT", "PL"),
            payload["status"] not in ("approved", "declined"),
        ]
    return "breaks the contract" if any(problems) else None


TOPICS = {"orders": "order_placed", "payments": "payment_attempted"}


def payload_of(message: SimulatedMessage) -> dict[str, Any]:
    assert message.value is not None
    payload: dict[str, Any] = orjson.loads(message.value)["payload"]
    return payload


def test_same_seed_and_start_give_identical_bytes() -> None:
    first = take(config(), 5000)
    again = take(config(), 5000)
    same_instant_elsewhere = take(
        config(), 5000, start=START.astimezone(timezone(timedelta(hours=2)))
    )
    assert first == again
    assert first == same_instant_elsewhere


def test_a_different_seed_gives_different_events() -> None:
    first = take(config(), 2000)
    other = take(config(seed=8), 2000)
    assert [m.value for m in first] != [m.value for m in other]
    ids = {m.event_id for m in first if m.event_id is not None}
    assert len(ids) > 1500
    assert not ids & {m.event_id for m in other}


def test_a_restarted_simulator_repeats_no_event_or_order_id() -> None:
    first = take(config(), 5000)
    restarted = take(config(), 5000, start=START + timedelta(seconds=50))

    def ids(messages: list[SimulatedMessage]) -> tuple[set[str | None], set[str]]:
        valid = [m for m in messages if m.kind == "valid"]
        orders = {payload_of(m)["order_id"] for m in valid if m.topic == "orders"}
        return {m.event_id for m in valid}, orders

    (events_a, orders_a), (events_b, orders_b) = ids(first), ids(restarted)
    assert not events_a & events_b
    assert not orders_a & orders_b


def test_customers_are_fixed_by_the_seed() -> None:
    profiles = [customer_profile(7, i) for i in range(300)]
    assert profiles == [customer_profile(7, i) for i in range(300)]
    assert profiles != [customer_profile(8, i) for i in range(300)]
    assert {p.customer_id for p in profiles} == {f"c-{i:05d}" for i in range(300)}
    assert all(len(p.cards) in (1, 2) for p in profiles)
    assert len({p.home_country for p in profiles}) == 8


def test_every_valid_message_meets_the_contract(stream: list[SimulatedMessage]) -> None:
    valid = [m for m in stream if m.kind == "valid"]
    assert len(valid) > 15_000
    rejected = Counter(classify(m, TOPICS) for m in valid)
    assert rejected == {None: len(valid)}
    assert all(m.invalid_reason is None for m in valid)
    assert len({m.event_id for m in valid}) == len(valid)
    for message in valid:
        assert message.value is not None
        assert message.event_id == orjson.loads(message.value)["event_id"]


def test_payments_refer_to_an_earlier_order_of_the_same_customer(
    stream: list[SimulatedMessage],
) -> None:
    orders: dict[str, str] = {}
    cards: dict[str, set[str]] = {}
    payments = 0
    for message in (m for m in stream if m.kind == "valid"):
        payload = payload_of(message)
        if message.topic == "orders":
            orders[payload["order_id"]] = payload["customer_id"]
        else:
            payments += 1
            assert orders.get(payload["order_id"]) == payload["customer_id"]
            cards.setdefault(payload["customer_id"], set()).add(payload["card_id"])
    assert payments > 5000
    assert all(1 <= len(c) <= 2 for c in cards.values())
    owners = Counter(card for c in cards.values() for card in c)
    assert max(owners.values()) == 1


def test_about_sixty_percent_are_orders(stream: list[SimulatedMessage]) -> None:
    valid = [m for m in stream if m.kind == "valid"]
    share = sum(m.topic == "orders" for m in valid) / len(valid)
    assert 0.57 < share < 0.63


def test_duplicates_resend_an_earlier_valid_message_byte_for_byte(
    stream: list[SimulatedMessage],
) -> None:
    seen: dict[str | None, SimulatedMessage] = {}
    resent: Counter[str | None] = Counter()
    for message in stream:
        if message.kind == "duplicate":
            original = seen[message.event_id]
            assert (message.topic, message.key, message.value) == (
                original.topic,
                original.key,
                original.value,
            )
            assert message.invalid_reason is None
            resent[message.event_id] += 1
        elif message.kind == "valid":
            seen[message.event_id] = message
    assert resent
    assert max(resent.values()) == 1


@pytest.mark.parametrize(
    ("duplicate_rate", "late_rate", "invalid_rate"),
    [(0.1, 0.1, 0.05), (0.02, 0.05, 0.005), (0.3, 0.5, 0.2), (0.0, 0.0, 0.0)],
)
def test_shares_follow_the_configured_rates(
    duplicate_rate: float, late_rate: float, invalid_rate: float
) -> None:
    n = 20_000
    messages = take(
        config(duplicate_rate=duplicate_rate, late_rate=late_rate, invalid_rate=invalid_rate), n
    )
    kinds = Counter(m.kind for m in messages)
    valid = kinds["valid"]
    late = 0
    for index, message in enumerate(messages):
        if message.kind != "valid":
            continue
        assert message.value is not None
        event_time = datetime.fromisoformat(orjson.loads(message.value)["event_time"])
        lag = (START + timedelta(seconds=index / RATE) - event_time).total_seconds()
        if lag >= 0.999:
            assert lag <= 600.001
            late += 1
        else:
            assert 0 <= lag < 0.002
    # Four standard deviations of a binomial share, plus the resends still pending at the end.
    for observed, rate, trials, slack in [
        (kinds["invalid"] / n, invalid_rate, n, 0.0),
        (kinds["duplicate"] / valid, duplicate_rate, valid, 0.01),
        (late / valid, late_rate, valid, 0.0),
    ]:
        tolerance = 4 * (rate * (1 - rate) / trials) ** 0.5 + slack * rate
        assert abs(observed - rate) <= tolerance, (observed, rate)


def test_every_invalid_kind_appears_and_is_what_it_claims(stream: list[SimulatedMessage]) -> None:
    invalid = [m for m in stream if m.kind == "invalid"]
    assert Counter(m.invalid_reason for m in invalid).keys() == set(INVALID_REASONS)
    for message in invalid:
        assert classify(message, TOPICS) == message.invalid_reason, message


def test_invalid_messages_keep_the_customer_key_unless_the_key_is_the_fault(
    stream: list[SimulatedMessage],
) -> None:
    for message in (m for m in stream if m.kind == "invalid"):
        if message.invalid_reason == "null_key":
            assert message.key is None
        else:
            assert message.key is not None
            assert re.fullmatch(rb"c-\d{5}", message.key)


def test_unknown_schema_version_and_wrong_type_look_as_described(
    stream: list[SimulatedMessage],
) -> None:
    by_reason: dict[str | None, list[SimulatedMessage]] = {}
    for message in (m for m in stream if m.kind == "invalid"):
        by_reason.setdefault(message.invalid_reason, []).append(message)
    for message in by_reason["unknown_schema_version"]:
        assert message.value is not None
        assert orjson.loads(message.value)["schema_version"] == 99
    for message in by_reason["wrong_type"]:
        amount = payload_of(message)["amount"]
        assert isinstance(amount, str)
        assert float(amount) > 0


def test_generate_rejects_naive_start_and_non_positive_rate() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        generate(config(), start=datetime(2026, 1, 1), rate=1.0)
    with pytest.raises(ValueError, match="rate"):
        generate(config(), start=START, rate=0.0)


def test_config_rejects_rates_outside_unit_interval() -> None:
    with pytest.raises(ValueError, match="late_rate"):
        config(late_rate=1.5)
    with pytest.raises(ValueError, match="differ"):
        config(topic_payments="orders")


def test_config_takes_the_catalogue_s_topics_and_the_shop_s_settings() -> None:
    env = {
        "KAPPA_TOPIC_ORDERS": "o",
        "KAPPA_TOPIC_PAYMENTS": "p",
        "KAPPA_SIM_SEED": "3",
        "KAPPA_SIM_CUSTOMERS": "9",
        "KAPPA_SIM_DUPLICATE_RATE": "0.25",
        "KAPPA_SIM_LATE_RATE": "0.5",
        "KAPPA_SIM_INVALID_RATE": "0.125",
    }
    config = SimulatorConfig.from_settings(Settings.from_env(env), ShopSettings.from_env(env))
    assert config == SimulatorConfig(
        topic_orders="o",
        topic_payments="p",
        customers=9,
        seed=3,
        duplicate_rate=0.25,
        late_rate=0.5,
        invalid_rate=0.125,
    )


class FakeProducer:
    """Records sends and acknowledges them, or fails the ones at ``fail_at``."""

    def __init__(self, *, fail_at: frozenset[int] = frozenset(), **kwargs: Any) -> None:
        self.kwargs = kwargs
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []
        self.events: list[str] = []
        self.fail_at = fail_at

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Future:
        future = Future()
        if len(self.sent) in self.fail_at:
            future.failure(KafkaTimeoutError("no ack"))
        else:
            future.success(None)
        self.sent.append((topic, key, value))
        self.events.append("send")
        return future

    def flush(self, timeout: float | None = None) -> None:
        self.events.append("flush")

    def close(self, timeout: float | None = None) -> None:
        self.events.append("close")


def test_produce_sends_each_message_in_order_then_flushes() -> None:
    messages = take(config(), 300)
    producer = FakeProducer()
    assert produce(messages, producer) == 300
    assert producer.sent == [(m.topic, m.key, m.value) for m in messages]
    assert producer.events == ["send"] * 300 + ["flush"]


def test_produce_raises_when_a_message_was_not_acknowledged() -> None:
    producer = FakeProducer(fail_at=frozenset({17}))
    with pytest.raises(KafkaTimeoutError):
        produce(take(config(), 50), producer)


class InstantStop(threading.Event):
    """A stop event whose waits return at once, so a run paced by a fake clock takes no real time."""

    def wait(self, timeout: float | None = None) -> bool:
        return self.is_set()


class SteppingClock:
    """A clock that moves 7 ms forward each time it is read."""

    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        self.now += timedelta(milliseconds=7)
        return self.now


def test_run_paces_the_deterministic_stream_against_the_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = {"KAPPA_SIM_RATE": "50", "KAPPA_SIM_SEED": "5"}
    settings, shop = Settings.from_env(env), ShopSettings.from_env(env)
    clock = SteppingClock(START)
    stop = InstantStop()
    send_times: list[datetime] = []
    producers: list[FakeProducer] = []

    class StoppingProducer(FakeProducer):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            producers.append(self)

        def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Future:
            send_times.append(clock.now)
            if len(self.sent) == 199:
                stop.set()
            return super().send(topic, value=value, key=key)

    monkeypatch.setattr(simulator, "KafkaProducer", StoppingProducer)
    run(settings, shop, stop=stop, clock=clock)

    (producer,) = producers
    assert producer.kwargs["bootstrap_servers"] == settings.resolved_bootstrap_servers
    assert producer.kwargs["acks"] == "all"
    start = START + timedelta(milliseconds=7)
    expected = take(SimulatorConfig.from_settings(settings, shop), 200, start=start, rate=50)
    assert len(producer.sent) == 200
    assert producer.sent == [(m.topic, m.key, m.value) for m in expected]
    for index, sent_at in enumerate(send_times):
        due = start + timedelta(seconds=index / 50)
        assert due <= sent_at < due + timedelta(milliseconds=30)
    assert producer.events[-2:] == ["flush", "close"]


def test_run_at_rate_zero_idles_without_a_producer(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_producer(**_: Any) -> None:
        raise AssertionError("rate 0 must not connect")

    monkeypatch.setattr(simulator, "KafkaProducer", no_producer)
    stop = threading.Event()
    worker = threading.Thread(
        target=run,
        args=(Settings.from_env({}), ShopSettings.from_env({"KAPPA_SIM_RATE": "0"})),
        kwargs={"stop": stop},
    )
    worker.start()
    worker.join(0.2)
    assert worker.is_alive(), "the idle simulator ended without being asked to"
    stop.set()
    worker.join(120)
    assert not worker.is_alive(), "the idle simulator did not stop within 120 s of the stop event"
