"""Producing with acknowledgements, draining through Dagster with failures counted, auditing."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice

import dagster as dg
from kafka import KafkaProducer

from examples.shop import simulator
from tests.chaos.reference import Anomalies, Record, audit_topic
from tests.integration.harness import Pipeline

FACTS = {"fact_order": "order_placed", "fact_payment": "payment_attempted"}


@dataclass(frozen=True)
class Message:
    topic: str
    key: bytes | None
    value: bytes | None
    #: Broker (create) time relative to now, in ms; 0 for now.
    skew_ms: int = 0


def produce(
    bootstrap: str, messages: Iterable[Message | simulator.SimulatedMessage]
) -> list[Record]:
    """Send ``messages`` in order with explicit timestamps; return what the broker acknowledged."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=16 * 1024 * 1024
    )
    try:
        pending = []
        for m in messages:
            ts = int(time.time() * 1000) + getattr(m, "skew_ms", 0)
            future = producer.send(m.topic, key=m.key, value=m.value, timestamp_ms=ts)
            pending.append((m, ts, future))
        producer.flush()
        out = []
        for m, ts, future in pending:
            meta = future.get(timeout=30)
            out.append(Record(m.topic, meta.partition, meta.offset, ts, m.key, m.value))
        return out
    finally:
        producer.close()


def read_back(bootstrap: str, topics: Iterable[str], timeout_s: float = 120) -> list[Record]:
    """Every record the broker holds in ``topics``, read from the start up to each partition's
    fetch high watermark (ListOffsets under-reports on Tansu): the log as it is, retried
    sends' extra copies included."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    try:
        tps = [TopicPartition(t, p) for t in topics for p in consumer.partitions_for_topic(t)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        ends: dict[TopicPartition, int | None] = dict.fromkeys(tps)
        records: list[Record] = []
        seen: set[tuple[str, int, int]] = set()
        deadline = time.monotonic() + timeout_s
        while True:
            for tp, batch in consumer.poll(500).items():
                for r in batch:
                    if (tp.topic, tp.partition, r.offset) not in seen:
                        seen.add((tp.topic, tp.partition, r.offset))
                        records.append(
                            Record(tp.topic, tp.partition, r.offset, r.timestamp, r.key, r.value)
                        )
            for tp in tps:
                if ends[tp] is None:
                    ends[tp] = consumer.highwater(tp)
            if all(e is not None and consumer.position(tp) >= e for tp, e in ends.items()):
                return records
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"read back {len(records)} records of {sorted(set(topics))} within "
                    f"{timeout_s:g} s, the log ends at {ends}"
                )
    finally:
        consumer.close()


def simulated(
    pipeline: Pipeline, count: int, *, seed: int, **rates: float
) -> list[simulator.SimulatedMessage]:
    config = simulator.SimulatorConfig(
        topic_orders=pipeline.settings.stream("fact_order").topic,
        topic_payments=pipeline.settings.stream("fact_payment").topic,
        customers=int(rates.pop("customers", 60)),
        seed=seed,
        duplicate_rate=rates.pop("duplicate_rate", 0.05),
        late_rate=rates.pop("late_rate", 0.05),
        invalid_rate=rates.pop("invalid_rate", 0.03),
    )
    return list(islice(simulator.generate(config, start=datetime.now(UTC), rate=1000.0), count))


@dataclass
class DrainReport:
    runs: int = 0
    failed_runs: int = 0
    errors: list[str] = field(default_factory=list)
    records_per_run: list[int] = field(default_factory=list)


def drain(
    pipeline: Pipeline,
    assets: Iterable[str] = tuple(FACTS),
    *,
    max_ticks: int = 200,
    max_failures: int = 3,
) -> DrainReport:
    """Tick and run every asset until nothing is left; a failing run is retried (as Dagster
    would) up to ``max_failures`` times per asset, then the asset is left where it is."""
    report = DrainReport()
    for asset in assets:
        failures = 0
        for _ in range(max_ticks):
            result = pipeline.tick(asset)
            if not result.run_requests:
                break
            for request in result.run_requests:
                report.runs += 1
                spans = request.tags.get("kappa/ranges", "").split(":", 1)[-1]
                report.records_per_run.append(
                    sum(
                        int(e) - int(s)
                        for s, e in (x.split(":")[1].split("-") for x in spans.split(",") if x)
                    )
                )
                run = pipeline.execute(request, raise_on_error=False)
                if not run.success:
                    report.failed_runs += 1
                    failures += 1
                    report.errors.extend(
                        str(e.event_specific_data.error.message).strip().splitlines()[0]  # type: ignore[union-attr]
                        for e in run.all_events
                        if e.event_type == dg.DagsterEventType.STEP_FAILURE
                    )
            if failures >= max_failures:
                break
    return report


def audit(pipeline: Pipeline, records: list[Record], *, complete: bool) -> Anomalies:
    """Both facts against the reference (see :mod:`tests.chaos.reference`)."""
    found = Anomalies()
    from kappa.edw.connection import connect

    with connect(pipeline.edw_url) as conn:
        for asset, event_type in FACTS.items():
            topic = (
                pipeline.settings.stream("fact_order").topic
                if asset == "fact_order"
                else pipeline.settings.stream("fact_payment").topic
            )
            found += audit_topic(
                conn,
                edw=pipeline.settings.edw_schema,
                meta=pipeline.settings.meta_schema,
                asset=asset,
                table=asset,
                topic=topic,
                event_type=event_type,
                records=records,
                complete=complete,
            )
    return found
