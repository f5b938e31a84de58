"""A stream declared only in a catalogue file (no engine code) loads end to end: events with
duplicates and malformed messages go to the real broker and through
``kappa.run.run_micro_batches`` (what a Dagster run of the asset executes) into a real
PostgreSQL, each valid event exactly once, every malformed message a dead letter."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import orjson
import pytest
from kafka import KafkaProducer

from kappa.catalog.ingests import topic_ingests
from kappa.edw.connection import connect
from kappa.edw.ledger import read_heads
from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.ingest.plan import OffsetRange, TopicIngest
from kappa.run import Connections, FactServices, plan_runs, run_micro_batches
from kappa.settings import Settings
from kappa.sources.base import LogBounds
from kappa.state import StateCache
from kappa.state.postgres import PostgresStateBackend

pytestmark = pytest.mark.integration

CATALOG = """
streams:
  - name: fact_meter_reading
    topic: {topic}
    key_field: meter_id
    event_types: [meter_read]
    schema_versions: [1, 2]
    description: Meter readings.
    fields:
      meter_id: {{type: text, pattern: "m-[0-9]+"}}
      reading_id: uuid
      wh: bigint
      tariff: "numeric(8,4)"
      estimated: boolean
      billed_on: date
      phase: {{type: enum, values: [l1, l2, l3]}}
      tags: jsonb
      read_at: timestamptz
      grid: char(2)
      comment: {{type: text, min_length: 0, nullable: true, since: 2}}
"""


def reading(n: int, **payload_overrides) -> dict:
    payload = {
        "meter_id": f"m-{n % 3}",
        "reading_id": str(uuid.UUID(int=n)),
        "wh": 2**40 + n,
        "tariff": 0.1234,
        "estimated": n % 2 == 0,
        "billed_on": "2026-11-30",
        "phase": ("l1", "l2", "l3")[n % 3],
        "tags": {"n": n, "list": [1, "two", None]},
        "read_at": "2026-11-26T05:00:00.5+02:00",
        "grid": "NL",
        "comment": "" if n % 4 == 0 else None,
    }
    payload.update(payload_overrides)
    return {
        "event_id": str(uuid.UUID(int=10**6 + n)),
        "event_type": "meter_read",
        "event_time": (datetime.now(UTC) - timedelta(seconds=n)).isoformat(),
        "source": "meter-head-end",
        "schema_version": 2,
        "payload": payload,
    }


def _run_all(settings: Settings, spec: TopicIngest, run: str) -> int:
    """Plan as the sensor does and run every planned micro-batch run; returns the runs.

    The run's partitions load in parallel, holding at most KAPPA_RUN_MEMORY_RECORDS (7,
    the batch bound) together: batches of 7 records go one at a time, smaller ones side by side.
    """
    clients = Connections.from_settings(settings)
    services = FactServices(max_wait_s=0, reprocess_wait_s=0)
    with clients.event_store() as store, clients.edw() as conn:
        bounds = store.log_bounds(spec.topic, store.partitions(spec.topic))
        plan = plan_runs(
            store,
            spec,
            settings.windows,
            read_heads(conn, clients.schemas, spec.asset, spec.topic),
            {p: LogBounds(b.start, b.end) for p, b in bounds.items()},
            busy=frozenset(),
            max_batch=settings.batch_max_records,
            max_run=settings.run_max_records,
            now=datetime.now(UTC),
        )
    for index, planned in enumerate(plan.runs):
        result = run_micro_batches(
            clients,
            spec,
            planned.ranges,
            run_id=f"{run}-{index}",
            partition_key=planned.partition_key,
            max_batch=settings.batch_max_records,
            memory_records=settings.run_memory_records,
            cache=StateCache(PostgresStateBackend(clients.schemas), max_keys=1000),
            services=services,
        )
        assert not result.failures, result.failures
        held = [o.end - o.start for o in result.outcomes]
        assert result.peak_records <= settings.run_memory_records == 7, (held, result)
        assert result.peak_records >= max(held, default=0), (held, result)
    return len(plan.runs)


def test_a_stream_declared_in_the_catalogue_loads_exactly_once_with_its_dead_letters(
    broker, database_url, topic_factory, tmp_path: Path
):
    topic = topic_factory("meter-readings", 2)
    catalog = tmp_path / "catalog.yaml"
    catalog.write_text(CATALOG.format(topic=topic))
    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": broker,
            "KAPPA_EDW_URL": database_url,
            "KAPPA_OLTP_URL": database_url,
            "KAPPA_CATALOG": str(catalog),
            "KAPPA_BATCH_MAX_RECORDS": "7",
            "KAPPA_RUN_MEMORY_RECORDS": "7",
        }
    )
    [(spec, setting)] = topic_ingests(settings)
    assert (spec.asset, spec.topic, spec.step, setting) == (
        "fact_meter_reading",
        topic,
        None,
        "KAPPA_CATALOG",
    )
    with connect(database_url) as conn:
        ensure_schema(conn, Schemas(), settings.streams)

    valid = [reading(n) for n in range(1, 31)]
    messages: list[tuple[bytes | None, bytes | None]] = [
        (e["payload"]["meter_id"].encode(), orjson.dumps(e)) for e in valid
    ]
    # Duplicates: a byte-identical resend and a resend with another payload (first wins).
    messages.append(messages[3])
    resent = dict(valid[5], payload={**valid[5]["payload"], "wh": 1})
    messages.append((b"m-0", orjson.dumps(resent)))
    malformed = {
        "bad JSON": (b"m-1", b"{not json"),
        "uuid": (b"m-1", orjson.dumps(reading(101, meter_id="m-1", reading_id="nope"))),
        "boolean": (b"m-1", orjson.dumps(reading(102, meter_id="m-1", estimated="yes"))),
        "date": (b"m-1", orjson.dumps(reading(103, meter_id="m-1", billed_on="2026-02-30"))),
        "enum": (b"m-1", orjson.dumps(reading(104, meter_id="m-1", phase="l4"))),
        "jsonb": (b"m-1", orjson.dumps(reading(105, meter_id="m-1", tags="n=1"))),
        "bigint": (b"m-1", orjson.dumps(reading(106, meter_id="m-1", wh=2**63))),
        "numeric": (b"m-1", orjson.dumps(reading(107, meter_id="m-1", tariff=0.12345))),
        "char": (b"m-1", orjson.dumps(reading(108, meter_id="m-1", grid="NLD"))),
        "key": (b"m-2", orjson.dumps(reading(109, meter_id="m-1"))),
        "pattern": (b"x-1", orjson.dumps(reading(110, meter_id="x-1"))),
    }
    messages.extend(malformed.values())
    producer = KafkaProducer(bootstrap_servers=broker, acks="all")
    try:
        for key, value in messages:
            producer.send(topic, key=key, value=value)
        producer.flush()
    finally:
        producer.close()

    # Sensor ticks until nothing is left to plan (batches of 7 records: several runs).
    ticks = [_run_all(settings, spec, f"tick{i}") for i in range(20)]
    assert ticks[0] >= 1 and ticks[-1] == 0, ticks
    # A run of ranges already loaded (a retried or duplicated run) commits nothing.
    clients = Connections.from_settings(settings)
    with clients.event_store() as store:
        bounds = store.log_bounds(topic, store.partitions(topic))
    replay = run_micro_batches(
        clients,
        spec,
        [OffsetRange(topic, p, 0, min(b.end, 7)) for p, b in bounds.items()],
        run_id="replayed",
        partition_key=None,
        max_batch=settings.batch_max_records,
        cache=StateCache(PostgresStateBackend(clients.schemas), max_keys=1000),
        services=FactServices(max_wait_s=0, reprocess_wait_s=0),
    )
    assert [o.status for o in replay.outcomes] == ["already loaded"] * len(bounds), replay.outcomes

    with connect(database_url) as conn:
        rows = conn.execute(
            "SELECT event_id::text, meter_id, reading_id, wh, tariff, estimated, billed_on, "
            "phase, tags, read_at, grid, comment FROM edw.fact_meter_reading"
        ).fetchall()
        dead = conn.execute(
            "SELECT reason FROM kappa.dead_letter WHERE asset = 'fact_meter_reading'"
        ).fetchall()
        ledger = conn.execute(
            "SELECT sum(received), sum(loaded), sum(dead_lettered), sum(deduplicated) "
            "FROM kappa.batch_ledger WHERE asset = 'fact_meter_reading'"
        ).fetchone()
    by_id = {r[0]: r for r in rows}
    assert len(rows) == len(by_id) == len(valid)
    assert ledger == (len(messages), len(valid), len(malformed), 2)
    for event in valid:
        p = event["payload"]
        row = by_id[event["event_id"]]
        assert row[1:] == (
            p["meter_id"],
            uuid.UUID(p["reading_id"]),
            p["wh"],
            Decimal("0.1234"),
            p["estimated"],
            datetime(2026, 11, 30).date(),
            p["phase"],
            p["tags"],
            datetime(2026, 11, 26, 3, 0, 0, 500000, tzinfo=UTC),
            "NL",
            p["comment"],
        )
    reasons = sorted(r[0] for r in dead)
    assert len(reasons) == len(malformed)
    for fragment in (
        "invalid JSON",
        "'payload.reading_id' is not a UUID",
        "'payload.estimated' is not a boolean",
        "'payload.billed_on' is not a valid date",
        "'payload.phase' is not one of: l1, l2, l3",
        "'payload.tags' is not a JSON object or array",
        "'payload.wh' is outside the bigint range",
        "'payload.tariff' has more than 4 decimals",
        "'payload.grid' is not exactly 2 characters",
        "message key does not match payload.meter_id",
        "'payload.meter_id' does not match m-[0-9]+",
    ):
        assert sum(fragment in r for r in reasons) == 1, (fragment, reasons)
