"""The shop's event simulator: its generated events (:mod:`examples.shop.events`) to the broker.

``python -m examples.shop.simulator`` produces at ``KAPPA_SIM_RATE`` until SIGINT or SIGTERM;
``kappa up`` runs it as the catalogue's producer ``simulator``. Only :func:`produce` and
:func:`run` talk to a broker.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, Protocol

from kafka import KafkaProducer

from examples.shop.events import (
    CHANNELS,
    COUNTRIES,
    CURRENCIES,
    INVALID_REASONS,
    ORDER_PLACED,
    PAYMENT_ATTEMPTED,
    SCHEMA_VERSION,
    CustomerProfile,
    SimulatedMessage,
    SimulatorConfig,
    customer_profile,
    generate,
)

if TYPE_CHECKING:
    from examples.shop.settings import ShopSettings
    from kappa.settings import Settings

__all__ = [
    "CHANNELS",
    "COUNTRIES",
    "CURRENCIES",
    "INVALID_REASONS",
    "ORDER_PLACED",
    "PAYMENT_ATTEMPTED",
    "SCHEMA_VERSION",
    "CustomerProfile",
    "EventProducer",
    "SimulatedMessage",
    "SimulatorConfig",
    "customer_profile",
    "generate",
    "produce",
    "run",
]

logger = logging.getLogger("examples.shop.simulator")

_PACE_STEP_S: Final = 0.05
_PROGRESS_EVERY: Final = timedelta(seconds=10)


class _Delivery(Protocol):
    exception: BaseException | None

    def failed(self) -> bool: ...


class EventProducer(Protocol):
    """The part of :class:`kafka.KafkaProducer` the simulator uses."""

    def send(self, topic: str, value: bytes | None = None, key: bytes | None = None) -> Any: ...

    def flush(self, timeout: float | None = None) -> None: ...


def produce(messages: Iterable[SimulatedMessage], producer: EventProducer) -> int:
    """Send ``messages`` in order, wait until the broker acknowledged all, return the count.

    A delivery failure raises the producer's error instead of returning a count that
    overstates what the log holds, which would break every reconciliation downstream.
    """
    deliveries: list[_Delivery] = [
        producer.send(message.topic, key=message.key, value=message.value) for message in messages
    ]
    producer.flush()
    for delivery in deliveries:
        if delivery.failed() and delivery.exception is not None:
            raise delivery.exception
    return len(deliveries)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _paced(
    messages: Iterable[SimulatedMessage],
    *,
    start: datetime,
    rate: float,
    stop: threading.Event,
    clock: Callable[[], datetime],
) -> Iterator[SimulatedMessage]:
    """Release message ``i`` once ``clock()`` reaches ``start + i / rate``; end when ``stop`` is set."""
    for index, message in enumerate(messages):
        due = start + timedelta(seconds=index / rate)
        while (wait := (due - clock()).total_seconds()) > 0:
            if stop.wait(min(wait, _PACE_STEP_S)):
                return
        if stop.is_set():
            return
        yield message


def run(
    settings: Settings,
    shop: ShopSettings,
    *,
    stop: threading.Event,
    clock: Callable[[], datetime] = _utc_now,
) -> None:
    """Produce simulated events at ``shop.sim_rate`` per second until ``stop`` is set.

    The loop behind ``python -m examples.shop.simulator``. Pacing follows ``clock`` (injected so tests control
    time), a progress line is logged every 10 s, and everything sent is flushed before it
    returns. A rate of 0 idles without connecting. An unreachable broker or a delivery
    failure raises within ``settings.kafka_timeout_s`` (kafka-python's defaults would block
    for 30-60 s) instead of being logged and skipped, so the operator sees it.
    """
    rate = shop.sim_rate
    if rate <= 0:
        logger.info("simulator idle: KAPPA_SIM_RATE is 0")
        stop.wait()
        return
    config = SimulatorConfig.from_settings(settings, shop)
    timeout_s = settings.kafka_timeout_s
    producer = KafkaProducer(
        bootstrap_servers=settings.resolved_bootstrap_servers,
        acks="all",
        linger_ms=20,
        bootstrap_timeout_ms=int(timeout_s * 1000),
        max_block_ms=int(timeout_s * 1000),
    )
    failures: list[BaseException] = []
    start = clock()
    logger.info(
        "simulator: %g events/s to %s (topics %s, %s), seed %d, %d customers",
        rate,
        settings.resolved_bootstrap_servers,
        config.topic_orders,
        config.topic_payments,
        config.seed,
        config.customers,
    )
    sent: Counter[str] = Counter()
    last_report, last_total = start, 0
    try:
        stream = generate(config, start=start, rate=rate)
        for message in _paced(stream, start=start, rate=rate, stop=stop, clock=clock):
            if failures:
                raise failures[0]
            producer.send(message.topic, key=message.key, value=message.value).add_errback(
                failures.append
            )
            sent[message.kind] += 1
            now = clock()
            if now - last_report >= _PROGRESS_EVERY:
                total = sent.total()
                logger.info(
                    "simulator: %d messages sent (%d valid, %d duplicate, %d invalid), %.1f/s",
                    total,
                    sent["valid"],
                    sent["duplicate"],
                    sent["invalid"],
                    (total - last_total) / (now - last_report).total_seconds(),
                )
                last_report, last_total = now, total
        producer.flush(timeout=timeout_s)
        if failures:
            raise failures[0]
    finally:
        producer.close(timeout=timeout_s)
    logger.info("simulator stopped after %d messages", sent.total())


if __name__ == "__main__":
    # ``python -m examples.shop.simulator``: what ``kappa up`` runs as the catalogue's
    # producer ``simulator``, until SIGINT or SIGTERM.
    import sys

    from examples.shop.process import run_producer

    sys.exit(
        run_producer(
            "examples.shop.simulator",
            lambda settings, shop, stop: run(settings, shop, stop=stop),
        )
    )
