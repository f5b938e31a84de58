"""The local broker's durable storage: what survives a restart, and what the engine cannot do.

Each test starts its own durable broker (Tansu's object-store engine on a local S3 server),
so stopping and killing it disturbs no other test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, KafkaAdminClient, NewTopic
from kafka.errors import KafkaError

from kappa.local.broker import LocalBroker
from kappa.local.processes import free_port
from kappa.local.topics import ensure_topics
from kappa.sources.topic import EventStore
from tests.integration.harness import Pipeline, expected_event_ids

pytestmark = pytest.mark.integration

TOPICS = {"orders": 4, "payments": 2}


@pytest.fixture
def durable_broker(tmp_path: Path) -> Iterator[LocalBroker]:
    broker = LocalBroker(
        free_port(), tmp_path / "broker.log", storage="durable", data_dir=tmp_path / "broker"
    )
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def _pipeline(broker: LocalBroker, database_url: str, instance, monkeypatch) -> Pipeline:  # type: ignore[no-untyped-def]
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "KAPPA_EDW_URL": database_url,
        "KAPPA_OLTP_URL": database_url,
        "KAPPA_TOPIC_ORDERS": "orders",
        "KAPPA_TOPIC_PAYMENTS": "payments",
        "KAPPA_BATCH_MAX_RECORDS": "300",
        "KAPPA_ENRICH_MAX_WAIT_S": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    ensure_topics(broker.bootstrap_servers, TOPICS, timeout_s=15)
    return Pipeline(env=env, instance=instance)


def _log_state(broker: LocalBroker) -> dict[str, tuple[str | None, dict[int, int]]]:
    """Per topic: its id and where each partition's log ends."""
    with EventStore(broker.bootstrap_servers) as store:
        return {
            topic: (
                store.topic_id(topic),
                {p: b.end for p, b in store.log_bounds(topic, range(n)).items()},
            )
            for topic, n in TOPICS.items()
        }


def _ledger_tiles(pipeline: Pipeline, asset: str) -> dict[int, list[tuple[int, int]]]:
    """The asset's batches per shard, in order; fails on a gap or an overlap."""
    rows = pipeline.query(
        "SELECT shard, start_position, end_position FROM kappa.batch_ledger "
        "WHERE asset = %s ORDER BY shard, start_position",
        (asset,),
    )
    tiles: dict[int, list[tuple[int, int]]] = {}
    for shard, start, end in rows:
        spans = tiles.setdefault(shard, [])
        expected_start = spans[-1][1] if spans else 0
        assert start == expected_start, (
            f"{asset} shard {shard}: batch at {start}, ledger at {expected_start}"
        )
        spans.append((start, end))
    return tiles


def test_a_restarted_durable_broker_keeps_the_log_and_the_ledger_goes_on(
    durable_broker: LocalBroker, database_url, instance, monkeypatch
):
    broker = durable_broker
    pipeline = _pipeline(broker, database_url, instance, monkeypatch)
    first = pipeline.simulate(800, seed=3, invalid_rate=0.0)
    pipeline.drain("fact_order")
    before = _log_state(broker)
    loaded = pipeline.query("SELECT count(*) FROM edw.fact_order")[0][0]
    assert loaded == len(expected_event_ids(first, "orders"))

    broker.stop()  # broker and S3 server, as Ctrl-C on `kappa up` does
    assert broker.object_store is not None and not broker.object_store.is_running()
    broker.start()
    # Same records, same ends, same topic ids: nothing for the ledger to object to.
    assert _log_state(broker) == before

    second = pipeline.simulate(500, seed=4, invalid_rate=0.0)
    pipeline.drain("fact_order")  # a LogResetError here would fail the test
    ids = {str(r[0]) for r in pipeline.query("SELECT event_id FROM edw.fact_order")}
    assert ids == expected_event_ids(first, "orders") | expected_event_ids(second, "orders")
    assert pipeline.query("SELECT count(*) FROM edw.fact_order")[0][0] == len(ids)
    tiles = _ledger_tiles(pipeline, "fact_order")
    ends = _log_state(broker)["orders"][1]
    assert {shard: spans[-1][1] for shard, spans in tiles.items()} == {
        p: e for p, e in ends.items() if e
    }


def test_killed_broker_and_s3_server_come_back_with_every_acknowledged_record(
    durable_broker: LocalBroker,
):
    broker = durable_broker
    assert broker.object_store is not None and broker.object_store.pid is not None
    ensure_topics(broker.bootstrap_servers, {"k": 2}, timeout_s=15)
    acked: list[tuple[int, int, bytes]] = []

    def produce(count: int, tag: str) -> None:
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
        try:
            futures = [
                (producer.send("k", key=b"%d" % (i % 5), value=f"{tag}-{i}".encode()), i)
                for i in range(count)
            ]
            producer.flush()
            for future, i in futures:
                meta = future.get(timeout=30)
                acked.append((meta.partition, meta.offset, f"{tag}-{i}".encode()))
        finally:
            producer.close()

    produce(400, "a")
    broker.kill()  # no clean shutdown: nothing flushed on the way out
    broker.start()
    produce(300, "b")
    broker.object_store.kill()
    broker.object_store.start()  # same port, same folder: the broker finds its store again
    produce(300, "c")
    broker.stop()
    broker.start()

    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap_servers, enable_auto_commit=False)
    try:
        tps = [TopicPartition("k", p) for p in range(2)]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        seen: dict[tuple[int, int], bytes] = {}
        deadline = time.monotonic() + 60
        while len(seen) < len(acked) and time.monotonic() < deadline:
            for tp, records in consumer.poll(500).items():
                for r in records:
                    seen[(tp.partition, r.offset)] = r.value
    finally:
        consumer.close()
    missing = [(p, o, v) for p, o, v in acked if seen.get((p, o)) != v]
    assert not missing, f"{len(missing)} acknowledged records lost, first: {missing[:3]}"
    assert len(seen) == len(acked) == 1000


def test_what_the_object_store_engine_cannot_do_is_pinned(durable_broker: LocalBroker):
    """The README's "Known limits of the local broker", measured: topic configs are accepted
    and then forgotten, no retention, no compaction, and DeleteRecords drops the connection
    (a panicking broker thread) while the broker and its log stay intact. A new Tansu that
    changes any of this fails here, and the README must follow."""
    broker = durable_broker
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap_servers)
    try:
        admin.create_topics(
            [
                NewTopic("expiring", 1, 1, topic_configs={"retention.ms": "1000"}),
                NewTopic("compacted", 1, 1, topic_configs={"cleanup.policy": "compact"}),
            ]
        )
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap_servers, acks="all")
        hour_ago = int(time.time() * 1000) - 3_600_000
        for i in range(30):
            producer.send("expiring", value=b"%d" % i, timestamp_ms=hour_ago)
            producer.send("compacted", key=b"k%d" % (i % 3), value=b"%d" % i)
        producer.flush()
        producer.close()
        configs = admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t) for t in ("expiring", "compacted")]
        )
        described = configs if isinstance(configs, dict) else {}
        assert not any(described.get("topic", {}).values()), described
        with pytest.raises(KafkaError):
            admin.delete_records({TopicPartition("expiring", 0): 10})
    finally:
        admin.close()
    with EventStore(broker.bootstrap_servers) as store:
        for topic in ("expiring", "compacted"):
            bounds = store.log_bounds(topic, [0])[0]
            assert (bounds.start, bounds.end) == (0, 30), (topic, bounds)
            assert len(store.fetch(topic, 0, 0, 30)) == 30
    assert broker.is_running()
