"""The durable local broker and its S3 server SIGKILLed while a producer streams.

A producer (``acks=all``) sends simulated events in a thread; mid-stream the broker (or the
S3 server under it) is killed and started again on the same folder. The log is then read
back as it is (a retried send may have left a second copy, which the pipeline deduplicates)
and the EDW, after a drain, is audited against the independent reference over that log;
every acknowledged record must be in it, at its acknowledged offset.
"""

from __future__ import annotations

import random
import threading
import time
import uuid

import pytest
from kafka import KafkaProducer

from kappa.local.broker import LocalBroker
from kappa.local.processes import free_port
from kappa.local.topics import ensure_topics
from tests.chaos.conftest import full_only, record, trials
from tests.chaos.reference import Anomalies, Record
from tests.chaos.streams import audit, drain, read_back, simulated
from tests.integration.harness import Pipeline, wait_for

pytestmark = pytest.mark.integration

SEED = 20261201
TOPICS = {"orders": 4, "payments": 2}


class StreamingProducer(threading.Thread):
    """Sends ``messages`` at about ``rate`` per second; keeps what the broker acknowledged."""

    def __init__(self, bootstrap: str, messages: list, rate: float) -> None:  # type: ignore[type-arg]
        super().__init__(name="chaos-producer", daemon=True)
        self.bootstrap = bootstrap
        self.messages = messages
        self.rate = rate
        self.acked: list[Record] = []
        self.failed = 0
        self.sent = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            producer = KafkaProducer(
                bootstrap_servers=self.bootstrap,
                acks="all",
                linger_ms=5,
                retries=2**31 - 1,
                request_timeout_ms=5000,
                delivery_timeout_ms=120_000,
                reconnect_backoff_max_ms=500,
            )
            lock = threading.Lock()

            def on_ack(m, ts, meta) -> None:  # type: ignore[no-untyped-def]
                with lock:
                    self.acked.append(
                        Record(m.topic, meta.partition, meta.offset, ts, m.key, m.value)
                    )

            def on_error(_exc) -> None:  # type: ignore[no-untyped-def]
                with lock:
                    self.failed += 1

            started = time.monotonic()
            for i, m in enumerate(self.messages):
                ts = int(time.time() * 1000)
                future = producer.send(m.topic, key=m.key, value=m.value, timestamp_ms=ts)
                future.add_callback(lambda meta, m=m, ts=ts: on_ack(m, ts, meta))
                future.add_errback(on_error)
                self.sent += 1
                ahead = started + (i + 1) / self.rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            producer.flush()
            producer.close()
        except BaseException as exc:  # reported by the test, not swallowed
            self.error = exc


@pytest.mark.parametrize(
    "victim",
    [
        # Both fail today: after a SIGKILL of either process, Tansu 0.6's object-store
        # engine acknowledges some batches retried across the restart with offset -1 and
        # does not store them (broker: 1 to 31 of 1,500 acknowledged events per trial; S3
        # server: 0 in some trials, 7 in another). Durable storage is experimental for that
        # reason; make chaos shows it, make test leaves it out.
        pytest.param("broker", marks=full_only),
        pytest.param("S3 server", marks=full_only),
    ],
)
def test_a_sigkilled_durable_broker_or_s3_server_loses_no_acknowledged_event(
    victim, database_url, local_state_dir, instance, monkeypatch
):
    state = local_state_dir / f"durable-{uuid.uuid4().hex[:8]}"
    broker = LocalBroker(
        free_port(), state / "broker.log", storage="durable", data_dir=state / "broker"
    )
    broker.start()
    assert broker.object_store is not None
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "KAPPA_EDW_URL": database_url,
        "KAPPA_OLTP_URL": database_url,
        "KAPPA_TOPIC_ORDERS": "orders",
        "KAPPA_TOPIC_PAYMENTS": "payments",
        "KAPPA_BATCH_MAX_RECORDS": "2000",
        "KAPPA_RUN_MAX_RECORDS": "6000",
        "KAPPA_ENRICH_MAX_WAIT_S": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rng = random.Random(SEED + (victim == "broker"))
    count = trials(1, 3)
    total = Anomalies()
    acked = failed = lost_acked = no_offset = 0
    sent_during: list[tuple[int, int]] = []
    try:
        ensure_topics(broker.bootstrap_servers, TOPICS, timeout_s=15)
        pipeline = Pipeline(env=env, instance=instance)
        for _ in range(count):
            # A ledger in place before the fault: the restart must continue it.
            drain(pipeline)
            stream = StreamingProducer(
                broker.bootstrap_servers,
                simulated(pipeline, 1500, seed=rng.randrange(2**31)),
                rate=300.0,
            )
            stream.start()
            wait_for(lambda s=stream: s.sent >= 300, timeout=60, what="300 events sent")
            if victim == "broker":
                broker.kill()
            else:
                broker.object_store.kill()
            at_kill = (stream.sent, len(stream.acked))
            assert at_kill[0] < len(stream.messages), "the stream ended before the kill"
            time.sleep(rng.uniform(0.2, 1.5))  # sends fail or wait meanwhile
            if victim == "broker":
                broker.start()
            else:
                broker.object_store.start()  # same port and folder
            sent_during.append(at_kill)
            stream.join(180)
            assert not stream.is_alive(), "the producer did not finish within 180 s"
            assert stream.error is None, stream.error
            acked += len(stream.acked)
            failed += stream.failed
            log = read_back(broker.bootstrap_servers, TOPICS)
            held = {(r.topic, r.partition, r.offset): r.value for r in log}
            values = {(r.topic, r.partition, r.value) for r in log}
            # An acknowledgement may carry offset -1 (Tansu answers so for a batch retried
            # across its restart): then the record must be somewhere in its partition.
            no_offset += sum(r.offset < 0 for r in stream.acked)
            lost = [
                r
                for r in stream.acked
                if (
                    held.get((r.topic, r.partition, r.offset)) != r.value
                    if r.offset >= 0
                    else (r.topic, r.partition, r.value) not in values
                )
            ]
            lost_acked += len(lost)
            report = drain(pipeline)
            assert report.failed_runs == 0, report.errors
            found = audit(pipeline, log, complete=True)
            if lost:
                replaced = sum((r.topic, r.partition, r.offset) in held for r in lost)
                found.note(
                    "lost",
                    len(lost),
                    f"{len(lost)} acknowledged records not in the log ({replaced} of their "
                    f"offsets now hold another record; first: {lost[0].topic}"
                    f"[{lost[0].partition}]@{lost[0].offset})",
                )
            total += found
    finally:
        broker.stop()
    record(
        f"SIGKILL of the durable {victim} mid-stream (producer acks=all), restart",
        count,
        f"killed after {', '.join(f'{s} sent/{a} acknowledged' for s, a in sent_during)}; "
        f"{acked} events acknowledged ({no_offset} with offset -1), {failed} sends failed; "
        f"acknowledged and missing from the log {lost_acked}; EDW against the log read back",
        total,
    )
    assert lost_acked == 0
    assert total.total == 0, total.details
