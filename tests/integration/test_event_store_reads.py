"""The event store's reads on the real broker: the same records kafka-python's own consumer
returns, through the project's record-batch reader (``kappa.sources.records``)."""

from __future__ import annotations

import uuid

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from kappa.local.topics import ensure_topics
from kappa.sources.topic import EventStore

pytestmark = pytest.mark.integration


def _stock(
    bootstrap: str, topic: str, end: int
) -> list[tuple[int, int, bytes | None, bytes | None]]:
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
        isolation_level="read_committed",
    )  # fmt: skip
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek(tp, 0)
    rows: list[tuple[int, int, bytes | None, bytes | None]] = []
    try:
        while consumer.position(tp) < end:
            for record in consumer.poll(timeout_ms=500).get(tp, []):
                rows.append((record.offset, record.timestamp, record.key, record.value))
    finally:
        consumer.close()
    return rows


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_fetch_returns_what_kafka_pythons_consumer_returns(broker: str, compression) -> None:
    topic = f"reads-{compression}-{uuid.uuid4().hex[:8]}"
    ensure_topics(broker, {topic: 1}, timeout_s=15)
    producer = KafkaProducer(
        bootstrap_servers=broker, compression_type=compression, linger_ms=20,
        batch_size=64 * 1024,
    )  # fmt: skip
    for i in range(3000):
        key = None if i % 7 == 0 else f"k{i}".encode()  # never both None (i % 77)
        value = (
            None
            if i % 11 == 0 and i % 77
            else b"x" * (i % 400) + (b"y" * 20_000 if i % 500 == 1 else b"")
        )
        headers = [("trace", str(i).encode())] if i % 3 == 0 else None
        producer.send(topic, key=key, value=value, headers=headers, partition=0)
    producer.flush()
    producer.close()

    with EventStore(broker) as store:
        assert store.rows, "this kafka-python takes the project's record-batch reader"
        end = store.log_bounds(topic, [0])[0].end
        whole = store.fetch(topic, 0, 0, end)
        middle = store.fetch(topic, 0, 1234, 2345)  # starts and ends inside producer batches
    expected = _stock(broker, topic, end)
    assert len(expected) == 3000
    assert (
        list(zip(whole.offsets, whole.timestamps, whole.keys, whole.values, strict=True))
        == expected
    )
    assert middle.offsets == list(range(1234, 2345))
    assert middle.values == [value for offset, _, _, value in expected if 1234 <= offset < 2345]
