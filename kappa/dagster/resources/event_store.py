"""The event store (Kafka API) as a Dagster resource."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from kappa.sources.topic import EventStore


class EventStoreResource(dg.ConfigurableResource):
    """Reads topic partitions by explicit offsets (no consumer groups).

    Usage::

        with event_store.open() as store:
            bounds = store.log_bounds(topic, store.partitions(topic))
    """

    bootstrap_servers: str = Field(
        description="Comma-separated host:port of the Kafka-API brokers (KAFKA_BOOTSTRAP_SERVERS)."
    )
    timeout_s: float = Field(
        default=5.0,
        description="Upper bound of each broker call, in seconds (KAPPA_KAFKA_TIMEOUT_S).",
    )

    @contextmanager
    def open(self) -> Iterator[EventStore]:
        """A connected client, closed on exit."""
        store = EventStore(self.bootstrap_servers, timeout_s=self.timeout_s)
        try:
            yield store
        finally:
            store.close()
