"""``make bench``: the micro-batch pipeline against row by row, a stream-processing peer
and the machine's ceiling, on the same events, the same broker and the same PostgreSQL.

One command, one run (``--scale quick`` finishes in minutes, ``--scale full`` loads 1M
events; ``BENCH_SCALE`` sets the default):

1. the simulator's events (valid ones: every contender does the same work) go to two
   topics on one broker, created with explicit ``retention.ms`` (see ``peer_quix``);
   ``dim_customer`` and the calls are filled for the simulated customers;
2. **scaling and pipeline**: the micro-batch path (``bench.pipeline``: the ``kappa.run``
   functions a fact asset's run calls, planned as the sensor plans, with the product's
   default settings) on 1/10, 4/10 and all of the
   events, one process per asset as Dagster runs them; wall time and peak RSS of each.
   The run on all events gives ``pipeline_eps``;
3. **COPY-only**: the pipeline's output rows (facts and fraud alerts) COPYed into the empty
   tables, formatted beforehand: the database's ceiling;
4. **consume-only**: fetch every record with the same client and parse its JSON: the read
   ceiling. ``efficiency`` = pipeline / min(consume-only, COPY-only);
5. **row by row** (RBAR): per event, consume, look the customer up in the EDW, advance the
   running statistics and fraud state in the EDW, INSERT the fact (and alerts), commit;
   one connection, prepared statements. It runs on a prefix of every partition (it is
   slow) and its rows are checked against the pipeline's;
6. **peer**: Quix Streams on the orders (enrichment and running statistics into
   ``edw.fact_order``), checked against the pipeline's rows too;
7. **backfill** of one time partition (``kappa.run.reprocess_partitions``, the function a
   backfill run calls, default waits) against the
   live micro-batches' throughput on the same events (see ``backfill_to_live``);
8. **freshness** comes from ``make bench-freshness`` (``bench.freshness``), merged in.

Figures go to ``bench/results/latest.json`` and a table is printed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psycopg
from kafka import KafkaConsumer, TopicPartition
from psycopg import sql

from bench.common import (
    PER_MESSAGE_DDL,
    Edw,
    bench_database,
    machine_facts,
    per_message_statements,
    populate_edw,
    stats_before,
    stored_mean_before,
)
from bench.demo import BENCH_CATALOG, ORDER_PLACED, PAYMENT_ATTEMPTED
from examples.shop.simulator import SimulatorConfig, generate
from kappa.catalog.ingests import topic_ingests
from kappa.catalog.streams import EventContract, fact_columns
from kappa.edw.connection import connect
from kappa.exceptions import KappaError
from kappa.local.broker import LocalBroker
from kappa.local.processes import free_port
from kappa.settings import BROKER_STORAGES, BrokerStorage, Settings

RESULTS_DIR = Path(__file__).resolve().parent / "results"
LATEST = RESULTS_DIR / "latest.json"
FRESHNESS = RESULTS_DIR / "freshness.json"
ROOT = Path(__file__).resolve().parents[1]

#: Every key the results carry (the issue's list); the smoke test checks them.
KEYS = (
    "pipeline_eps",
    "rbar_eps",
    "rbar_ratio",
    "consume_only_eps",
    "copy_only_eps",
    "efficiency",
    "peer_name",
    "peer_eps",
    "peer_ratio",
    "rss_ratio_10x",
    "time_ratio_10x",
    "backfill_to_live_ratio",
    "freshness_p50_s",
    "freshness_p95_s",
)


@dataclass(frozen=True)
class Scale:
    events: int
    rbar_events: int
    customers: int = 5_000
    partitions: int = 4


SCALES = {
    "tiny": Scale(events=4_000, rbar_events=300, customers=500),
    "quick": Scale(events=60_000, rbar_events=2_000),
    "full": Scale(events=1_000_000, rbar_events=20_000),
}
#: Events per second of event time in the generated stream (the span ends 15 min ago).
RATE = 200.0
SEED = 11
RUN_TAG = "kappa/bench"


# -- services ---------------------------------------------------------------------------------


@contextmanager
def bench_broker(bootstrap: str | None, storage: BrokerStorage) -> Iterator[str]:
    if bootstrap:
        yield bootstrap
        return
    state = Path(tempfile.mkdtemp(prefix="kappa-bench-broker-"))
    broker = LocalBroker(free_port(), state / "broker.log", storage=storage, data_dir=state / "log")
    broker.start()
    try:
        yield broker.bootstrap_servers
    finally:
        broker.stop()
        shutil.rmtree(state, ignore_errors=True)


def create_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Topics with explicit retention configs, which DescribeConfigs then reports."""
    from kafka.admin import KafkaAdminClient, NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap.split(","), client_id="kappa-bench")
    try:
        admin.create_topics(
            [
                NewTopic(
                    name,
                    num_partitions=n,
                    replication_factor=1,
                    topic_configs={"retention.ms": "-1", "retention.bytes": "-1"},
                )
                for name, n in topics.items()
            ]
        )
        admin.wait_for_topics(list(topics), timeout_ms=30_000)
    finally:
        admin.close()


@dataclass
class Produced:
    topics: dict[str, str]  # "orders"/"payments" -> topic name
    counts: dict[str, int]
    #: topic -> partition -> (first offset, end offset)
    bounds: dict[str, dict[int, tuple[int, int]]] = field(default_factory=dict)
    first: datetime = field(default_factory=lambda: datetime.now(UTC))
    last: datetime = field(default_factory=lambda: datetime.now(UTC))
    seconds: float = 0.0

    @property
    def events(self) -> int:
        return sum(self.counts.values())


def produce_events(bootstrap: str, topics: dict[str, str], events: int, seed: int) -> Produced:
    """``events`` valid simulator messages, keyed by customer (Kafka's murmur2 partitioner,
    as kafka-python and the Java client partition), on the broker."""
    span = timedelta(seconds=events / RATE)
    start = datetime.now(UTC) - span - timedelta(minutes=15)
    config = SimulatorConfig(
        topic_orders=topics["orders"],
        topic_payments=topics["payments"],
        customers=SCALE.customers,
        seed=seed,
        duplicate_rate=0.0,
        late_rate=0.05,
        invalid_rate=0.0,
    )
    counts = {topics["orders"]: 0, topics["payments"]: 0}
    messages = islice(generate(config, start=start, rate=RATE), events)
    started = time.perf_counter()
    try:
        import confluent_kafka  # noqa: F401  (installed with the bench extra)
    except ImportError:
        # Without the bench extra: kafka-python (same murmur2 partitioner), slower.
        from kafka import KafkaProducer

        producer = KafkaProducer(
            bootstrap_servers=bootstrap.split(","), acks="all", linger_ms=20, batch_size=1 << 20
        )
        try:
            for message in messages:
                producer.send(message.topic, key=message.key, value=message.value)
                counts[message.topic] += 1
            producer.flush(120)
        finally:
            producer.close()
    else:
        _produce_confluent(bootstrap, messages, counts)
    name = {v: k for k, v in topics.items()}
    return Produced(
        topics=topics,
        counts={name[t]: n for t, n in counts.items()},
        first=start - timedelta(minutes=11),
        last=start + span,
        seconds=time.perf_counter() - started,
    )


def _produce_confluent(bootstrap: str, messages: Iterable[Any], counts: dict[str, int]) -> None:
    from confluent_kafka import Producer

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "partitioner": "murmur2_random",
            "linger.ms": 20,
            "batch.num.messages": 10_000,
            "queue.buffering.max.messages": 500_000,
            "acks": "all",
        }
    )
    errors: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(str(err))

    for message in messages:
        while True:
            try:
                producer.produce(
                    message.topic, value=message.value, key=message.key, on_delivery=delivered
                )
                break
            except BufferError:
                producer.poll(0.05)
        counts[message.topic] += 1
        producer.poll(0)
    if producer.flush(120) or errors:
        raise RuntimeError(f"messages not delivered: {errors[:1]}")


def log_bounds(bootstrap: str, topic: str) -> dict[int, tuple[int, int]]:
    from kappa.sources.topic import EventStore

    with EventStore(bootstrap, timeout_s=15) as store:
        bounds = store.log_bounds(topic, store.partitions(topic))
    return {p: (b.start, b.end) for p, b in bounds.items()}


# -- the EDW between contenders ----------------------------------------------------------------


OUTPUT_TABLES = ("edw.fact_order", "edw.fact_payment", "edw.fraud_alert")


def reset_outputs(conn: psycopg.Connection) -> None:
    """Every contender starts from the same EDW: dimensions filled, no facts, no state."""
    conn.execute(
        "TRUNCATE edw.fact_order, edw.fact_payment, edw.fraud_alert, kappa.batch_ledger, "
        "kappa.ledger_head, kappa.state, kappa.dead_letter, kappa.checkpoint, bench.customer_stats, "
        "bench.payment_seen"
    )


def keep_pipeline_output(conn: psycopg.Connection) -> None:
    """The pipeline's rows, for the COPY-only ceiling and the agreement checks."""
    for table in OUTPUT_TABLES:
        name = "pipeline_" + table.split(".")[1]
        conn.execute(f"DROP TABLE IF EXISTS bench.{name}")
        conn.execute(f"CREATE TABLE bench.{name} AS SELECT * FROM {table}")  # noqa: S608


# -- the pipeline (scaling) ---------------------------------------------------------------------


def _limits(produced: Produced, topic_key: str, fraction: float) -> dict[int, int]:
    return {
        p: start + math.ceil((end - start) * fraction)
        for p, (start, end) in produced.bounds[topic_key].items()
    }


ASSETS = (("fact_order", "orders"), ("fact_payment", "payments"))


def run_workers(
    produced: Produced,
    edw_url: str,
    bootstrap: str,
    *,
    fraction: float,
    mode: str,
    profile: bool,
    assets: tuple[tuple[str, str], ...] = ASSETS,
) -> dict[str, Any]:
    """One worker process per asset, at the same time (as Dagster runs the two facts); the
    EDW's database is their OLTP database too (see ``populate_edw``)."""
    procs = {}
    for asset, key in assets:
        argv = [
            sys.executable,
            "-m",
            "bench.pipeline",
            "--asset",
            asset,
            "--bootstrap",
            bootstrap,
            "--edw-url",
            edw_url,
            "--topic",
            produced.topics[key],
            "--mode",
            mode,
        ]
        for partition, end in _limits(produced, key, fraction).items():
            argv += ["--limit", f"{partition}={end}"]
        if profile:
            argv += ["--profile", str(RESULTS_DIR / f"profile_{mode}_{asset}.txt")]
        if mode == "pipeline":
            argv.append("--stages")
        procs[asset] = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    results = {}
    for asset, proc in procs.items():
        out, _ = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} worker for {asset} failed ({proc.returncode})")
        results[asset] = json.loads(out.strip().splitlines()[-1])
    events = sum(r["events"] for r in results.values())
    span = max(r["ended_at"] for r in results.values()) - min(
        r["started_at"] for r in results.values()
    )
    return {
        "events": events,
        "seconds": round(span, 3),
        "eps": round(events / span, 1),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in results.values()),
        "per_asset": {
            asset: {
                "events": r["events"],
                "seconds": round(r["seconds"], 3),
                "eps": round(r["events"] / r["seconds"], 1) if r["seconds"] else None,
                "runs": r["runs"],
                "batches": r["batches"],
                "peak_rss_mib": r["peak_rss_mib"],
                "cpu_seconds": r["cpu_seconds"],
                "stages": r["stages"],
            }
            for asset, r in results.items()
        },
    }


# -- COPY-only ----------------------------------------------------------------------------------


def copy_only(conn: psycopg.Connection, events: int) -> dict[str, Any]:
    """COPY the pipeline's output rows, formatted beforehand, into the emptied tables (with
    their keys and indexes), in one transaction: what PostgreSQL can load."""
    payloads: dict[str, bytes] = {}
    for table in OUTPUT_TABLES:
        source = "bench.pipeline_" + table.split(".")[1]
        buffer = bytearray()
        with conn.cursor().copy(f"COPY {source} TO STDOUT") as copy:  # type: ignore[arg-type]
            for chunk in copy:
                buffer += chunk
        payloads[table] = bytes(buffer)
    reset_outputs(conn)
    rows = 0
    started = time.perf_counter()
    with conn.transaction():
        for table, data in payloads.items():
            with conn.cursor().copy(f"COPY {table} FROM STDIN") as copy:  # type: ignore[arg-type]
                for begin in range(0, len(data), 1 << 20):
                    copy.write(data[begin : begin + (1 << 20)])
    seconds = time.perf_counter() - started
    for table in OUTPUT_TABLES:
        query = f"SELECT count(*) FROM {table}"  # noqa: S608
        rows += conn.execute(query).fetchone()[0]  # type: ignore[index,arg-type]
    return {
        "events": events,
        "rows": rows,
        "seconds": round(seconds, 3),
        "eps": round(events / seconds, 1),
        "bytes": sum(len(d) for d in payloads.values()),
    }


# -- row by row -----------------------------------------------------------------------------------


def _insert(conn: psycopg.Connection, contract: EventContract) -> str:
    columns = [name for name, _ in fact_columns(contract)] + [n for n, _ in contract.derived]
    return (
        sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (event_id) DO NOTHING")
        .format(
            sql.Identifier("edw", contract.table),
            sql.SQL(", ").join(sql.Identifier(c) for c in columns),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        )
        .as_string(conn)
    )


def _payment_rules(settings: Settings) -> Any:
    """The fraud rules of the catalogue's payment stream."""
    steps = {spec.asset: spec.step for spec, _ in topic_ingests(settings)}
    return steps["fact_payment"].rules  # type: ignore[union-attr]


def rbar(edw_url: str, bootstrap: str, edw: Edw, produced: Produced, events: int) -> dict[str, Any]:
    """Per event: consume, look the customer up, advance the statistics (and for payments
    the card's velocity, the latest call on a foreign payment) in the EDW, INSERT the fact
    and its alerts, commit. One connection, prepared statements; a prefix of every
    partition (so every processed event has its whole history)."""
    # The rules as the deployment configures them (the payment step's, from the catalogue).
    rules = _payment_rules(
        Settings.from_env(
            {
                "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
                "KAPPA_EDW_URL": edw_url,
                "KAPPA_CATALOG": str(BENCH_CATALOG),
                "KAPPA_TOPIC_ORDERS": produced.topics["orders"],
                "KAPPA_TOPIC_PAYMENTS": produced.topics["payments"],
            }
        )
    )
    total = produced.events
    limits: dict[TopicPartition, int] = {}
    for key in ("orders", "payments"):
        for p, (start, end) in produced.bounds[key].items():
            share = math.ceil(events * (end - start) / total)
            limits[TopicPartition(produced.topics[key], p)] = start + min(share, end - start)
    starts = {
        tp: produced.bounds[k][tp.partition][0]
        for tp in limits
        for k in ("orders", "payments")
        if produced.topics[k] == tp.topic
    }
    order_fields = [f.name for f in ORDER_PLACED.fields]
    payment_fields = [f.name for f in PAYMENT_ATTEMPTED.fields]
    window, call_window = rules.velocity_window, rules.geo_call_window
    consumer = KafkaConsumer(
        bootstrap_servers=bootstrap.split(","),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="none",
        isolation_level="read_committed",
    )
    consumer.assign(list(limits))
    for tp, start in starts.items():
        consumer.seek(tp, start)
    done = 0
    round_trips = 0
    with psycopg.connect(edw_url, application_name="kappa-bench-rbar") as conn:
        q = per_message_statements(conn, edw)
        # The customer version as of the event time, with the segment the order carries.
        q["customer"] = (
            "SELECT customer_sk, country, segment FROM edw.dim_customer WHERE customer_id = %s "
            "AND valid_from <= %s AND (valid_to IS NULL OR valid_to > %s)"
        )
        insert_order = _insert(conn, ORDER_PLACED)
        insert_payment = _insert(conn, PAYMENT_ATTEMPTED)
        insert_alert = (
            "INSERT INTO edw.fraud_alert (event_id, rule, score, evidence, customer_id, "
            "event_time, topic, kafka_partition, kafka_offset) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
        )
        cur = conn.cursor()
        pending = {tp for tp in limits if limits[tp] > starts[tp]}
        started = time.perf_counter()
        while pending:
            for tp, records in consumer.poll(timeout_ms=200).items():
                for record in records:
                    if tp not in pending or record.offset >= limits[tp]:
                        break
                    envelope = orjson.loads(record.value)
                    payload = envelope["payload"]
                    at = datetime.fromisoformat(envelope["event_time"])
                    customer = payload["customer_id"]
                    cents = round(float(payload["amount"]) * 100)
                    broker_time = datetime.fromtimestamp(record.timestamp / 1000, tz=UTC)
                    cur.execute(q["customer"], (customer, at, at), prepare=True)
                    version = cur.fetchone()
                    enrichment = "as_of" if version else "unknown_customer"
                    head = [envelope["event_id"]]
                    tail = [
                        at,
                        envelope["source"],
                        envelope["schema_version"],
                        record.topic,
                        record.partition,
                        record.offset,
                        broker_time,
                    ]
                    if record.topic == produced.topics["orders"]:
                        cur.execute(
                            q["stats"],
                            ("order_stats", customer, cents, cents * cents),
                            prepare=True,
                        )
                        after = cur.fetchone()
                        n, _, stddev = stats_before(after, cents)  # type: ignore[arg-type]
                        mean = stored_mean_before(after, cents)  # type: ignore[arg-type]
                        cur.execute(
                            insert_order,
                            [
                                *head,
                                *(payload[f] for f in order_fields),
                                *tail,
                                version[0] if version else None,
                                version[2] if version else None,
                                version[1] if version else None,
                                enrichment,
                                n,
                                mean,
                                None if stddev is None else float(np.round(stddev, 4)),
                            ],
                            prepare=True,
                        )
                        round_trips += 3
                    else:
                        cur.execute(
                            q["stats"],
                            ("payment_stats", customer, cents, cents * cents),
                            prepare=True,
                        )
                        n, mean, stddev = stats_before(cur.fetchone(), cents)  # type: ignore[arg-type]
                        card = payload["card_id"]
                        cur.execute(q["velocity"], (card, at - window, at), prepare=True)
                        in_window = cur.fetchone()[0] + 1  # type: ignore[index]
                        cur.execute(q["seen"], (payload["payment_id"], card, at), prepare=True)
                        round_trips += 4
                        alerts: list[tuple[str, float, dict[str, Any]]] = []
                        if in_window > rules.velocity_max_payments:
                            score = min(1.0, in_window / (2 * rules.velocity_max_payments))
                            alerts.append(("velocity", score, {"payments_in_window": in_window}))
                        amount = float(payload["amount"])
                        if (
                            mean is not None
                            and stddev is not None
                            and n >= rules.amount_min_history
                            and stddev > 0
                        ):
                            z = (amount - mean) / stddev
                            if z >= rules.amount_z:
                                alerts.append(
                                    ("amount_anomaly", min(1.0, z / (3 * rules.amount_z)), {})
                                )
                        merchant = payload["merchant_country"]
                        if version is not None and version[1] != merchant:
                            cur.execute(q["call"], (customer, at - call_window, at), prepare=True)
                            called = cur.fetchone() is not None
                            round_trips += 1
                            alerts.append(
                                (
                                    "geo_mismatch",
                                    rules.geo_after_call_score if called else rules.geo_score,
                                    {"merchant_country": merchant},
                                )
                            )
                        top = max((s for _, s, _ in alerts), default=None)
                        cur.execute(
                            insert_payment,
                            [
                                *head,
                                *(payload[f] for f in payment_fields),
                                *tail,
                                version[0] if version else None,
                                version[1] if version else None,
                                enrichment,
                                None if top is None else float(np.round(top, 3)),
                            ],
                            prepare=True,
                        )
                        for rule, score, evidence in alerts:
                            cur.execute(
                                insert_alert,
                                (
                                    envelope["event_id"],
                                    rule,
                                    float(np.round(score, 3)),
                                    orjson.dumps(evidence).decode(),
                                    customer,
                                    at,
                                    record.topic,
                                    record.partition,
                                    record.offset,
                                ),
                                prepare=True,
                            )
                            round_trips += 1
                    conn.commit()
                    round_trips += 3  # BEGIN, the fact INSERT, COMMIT
                    done += 1
                    if record.offset + 1 >= limits[tp]:
                        pending.discard(tp)
        seconds = time.perf_counter() - started
    consumer.close()
    return {
        "events": done,
        "seconds": round(seconds, 3),
        "eps": round(done / seconds, 1),
        "round_trips_per_event": round(round_trips / max(done, 1), 2),
    }


def agreement(conn: psycopg.Connection, *, orders_only: bool = False) -> dict[str, Any]:
    """Rows of the current contender that differ from the pipeline's (same event_id)."""
    checks = {
        "orders_compared": "SELECT count(*) FROM edw.fact_order c "
        "JOIN bench.pipeline_fact_order p USING (event_id)",
        "orders_differing": "SELECT count(*) FROM edw.fact_order c "
        "JOIN bench.pipeline_fact_order p USING (event_id) WHERE "
        "c.customer_sk IS DISTINCT FROM p.customer_sk OR "
        "c.customer_country IS DISTINCT FROM p.customer_country OR "
        "c.customer_orders_before IS DISTINCT FROM p.customer_orders_before OR "
        "c.customer_avg_amount_before IS DISTINCT FROM p.customer_avg_amount_before OR "
        "abs(coalesce(c.customer_stddev_amount_before, -1) - "
        "coalesce(p.customer_stddev_amount_before, -1)) > 1e-4",
    }
    if not orders_only:
        checks |= {
            "payments_compared": "SELECT count(*) FROM edw.fact_payment c "
            "JOIN bench.pipeline_fact_payment p USING (event_id)",
            "payments_differing": "SELECT count(*) FROM edw.fact_payment c "
            "JOIN bench.pipeline_fact_payment p USING (event_id) WHERE "
            "c.customer_sk IS DISTINCT FROM p.customer_sk OR "
            "c.fraud_score IS DISTINCT FROM p.fraud_score",
        }
    found: dict[str, Any] = {
        name: conn.execute(query).fetchone()[0]  # type: ignore[index,call-overload]
        for name, query in checks.items()
    }
    if not orders_only and found["payments_differing"]:
        found["payments_sample"] = [
            [str(v) for v in row]
            for row in conn.execute(
                "SELECT c.event_id, c.customer_sk, p.customer_sk, c.fraud_score, p.fraud_score, "
                "(SELECT string_agg(rule || ':' || score, ',') FROM edw.fraud_alert a "
                "WHERE a.event_id = c.event_id), (SELECT string_agg(rule || ':' || score, ',') "
                "FROM bench.pipeline_fraud_alert a WHERE a.event_id = c.event_id) "
                "FROM edw.fact_payment c JOIN bench.pipeline_fact_payment p USING (event_id) "
                "WHERE c.customer_sk IS DISTINCT FROM p.customer_sk "
                "OR c.fraud_score IS DISTINCT FROM p.fraud_score LIMIT 5"
            ).fetchall()
        ]
    return found


# -- the peer ---------------------------------------------------------------------------------------


def peer(edw_url: str, bootstrap: str, produced: Produced) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "bench.peer_quix",
        "--bootstrap",
        bootstrap,
        "--topic",
        produced.topics["orders"],
        "--edw-url",
        edw_url,
        "--count",
        str(produced.counts["orders"]),
        "--watermark",
        (produced.last + timedelta(seconds=1)).isoformat(),
    ]
    proc = subprocess.run(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the Quix Streams peer failed ({proc.returncode})")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["eps"] = round(result["events"] / result["seconds"], 1)
    return result


# -- backfill (issue 5) -------------------------------------------------------------------------------


def backfill_to_live(
    produced: Produced,
    edw_url: str,
    bootstrap: str,
    live: dict[str, Any],
    *,
    profile: bool = False,
) -> tuple[dict[str, Any], float | None, str]:
    """Reprocess the time partition holding the events (each fact's workers at the same
    time, as two backfills would run) over the EDW the live run just loaded, against the
    live micro-batches' throughput on the same events."""
    result = run_workers(
        produced, edw_url, bootstrap, fraction=1.0, mode="backfill", profile=profile
    )
    note = (
        f"one time partition ({result['events']:,} events) reprocessed in one transaction per "
        f"fact against the live micro-batches over the same {live['events']:,} events"
    )
    return result, _ratio(result["eps"], live["eps"]), note


# -- the command ---------------------------------------------------------------------------------------


SCALE = SCALES["quick"]


def _ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return round(a / b, digits) if a and b else None


def main(argv: list[str] | None = None) -> int:
    global SCALE
    parser = argparse.ArgumentParser(prog="python -m bench.suite", description=__doc__)
    parser.add_argument(
        "--scale",
        choices=sorted(SCALES),
        default=os.environ.get("BENCH_SCALE", "quick") or "quick",
        help="quick (default, minutes), full (1M events), tiny (the smoke test)",
    )
    parser.add_argument("--events", type=int, help="override the scale's event count")
    parser.add_argument("--pg-url", help="an existing PostgreSQL server (default: embedded)")
    parser.add_argument("--bootstrap", help="an existing broker (default: a local Tansu)")
    parser.add_argument(
        "--broker-storage",
        choices=BROKER_STORAGES,
        default=os.environ.get("BENCH_BROKER_STORAGE", "memory") or "memory",
        help="storage of the local Tansu: memory (default) or durable (object store on a "
        "local S3 server, as `kappa up` runs it); BENCH_BROKER_STORAGE sets the default",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip the Quix Streams peer")
    parser.add_argument(
        "--profile", action="store_true", help="pyinstrument the 10x run (and the backfill)"
    )
    parser.add_argument(
        "--only",
        choices=("backfill",),
        help="backfill: only the pipeline on all events and the backfill after it, with "
        "backfill_to_live_ratio printed as JSON (bench/results/latest.json is left alone)",
    )
    parser.add_argument("--output", type=Path, default=LATEST)
    args = parser.parse_args(argv)
    SCALE = SCALES[args.scale]
    if args.events:
        SCALE = Scale(events=args.events, rbar_events=min(SCALE.rbar_events, args.events))
    machine = machine_facts()
    figures: dict[str, Any] = {
        "scale": args.scale,
        "events": SCALE.events,
        "broker_storage": "external" if args.bootstrap else args.broker_storage,
    }
    notes: dict[str, str] = {}
    tag = uuid.uuid4().hex[:8]
    topics = {"orders": f"bench-orders-{tag}", "payments": f"bench-payments-{tag}"}
    with (
        bench_database(args.pg_url) as (url, where),
        bench_broker(args.bootstrap, args.broker_storage) as bootstrap,
    ):
        print(f"broker {bootstrap} ({figures['broker_storage']}), PostgreSQL ({where})", flush=True)
        create_topics(bootstrap, {t: SCALE.partitions for t in topics.values()})
        print(f"producing {SCALE.events:,} events ...", flush=True)
        produced = produce_events(bootstrap, topics, SCALE.events, SEED)
        produced.bounds = {k: log_bounds(bootstrap, t) for k, t in topics.items()}
        print(
            f"  {produced.counts} in {produced.seconds:.1f} s; filling dim_customer ...",
            flush=True,
        )
        with connect(url) as conn:
            pg_version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
            edw = populate_edw(conn, SCALE.customers, SEED, produced.first, produced.last)
            conn.execute(PER_MESSAGE_DDL)
            scaling = {}
            for factor in (10,) if args.only == "backfill" else (1, 4, 10):
                reset_outputs(conn)
                print(f"pipeline {factor}x ...", flush=True)
                scaling[f"{factor}x"] = run_workers(
                    produced,
                    url,
                    bootstrap,
                    fraction=factor / 10,
                    mode="pipeline",
                    profile=args.profile and factor == 10,
                )
                print(
                    f"  {scaling[f'{factor}x']['events']:,} events in "
                    f"{scaling[f'{factor}x']['seconds']:.1f} s, peak RSS "
                    f"{scaling[f'{factor}x']['peak_rss_mib']:.0f} MiB",
                    flush=True,
                )
            pipeline = scaling["10x"]
            print("backfill of the partition the live runs just loaded ...", flush=True)
            backfilled, backfill, backfill_note = backfill_to_live(
                produced, url, bootstrap, pipeline, profile=args.profile
            )
            notes["backfill_to_live_ratio"] = backfill_note
            print(
                f"  {backfilled['events']:,} events in {backfilled['seconds']:.1f} s "
                f"({backfilled['eps']:,.0f}/s; live {pipeline['eps']:,.0f}/s)",
                flush=True,
            )
            if args.only == "backfill":
                print(
                    json.dumps(
                        {
                            "events": SCALE.events,
                            "backfill_to_live_ratio": backfill,
                            "pipeline": pipeline,
                            "backfill": backfilled,
                            "load_average_after": [round(x, 2) for x in os.getloadavg()],
                        }
                    ),
                    flush=True,
                )
                return 0
            keep_pipeline_output(conn)
            print("COPY-only ...", flush=True)
            copied = copy_only(conn, pipeline["events"])
            print("consume-only ...", flush=True)
            consumed = run_workers(
                produced, url, bootstrap, fraction=1.0, mode="consume", profile=False
            )
            # The peer loads the orders alone on the machine: so does this pipeline run.
            reset_outputs(conn)
            print("pipeline, fact_order alone (what the peer is compared with) ...", flush=True)
            orders_alone = run_workers(
                produced,
                url,
                bootstrap,
                fraction=1.0,
                mode="pipeline",
                profile=False,
                assets=(ASSETS[0],),
            )
            reset_outputs(conn)
            print(f"row by row on {SCALE.rbar_events:,} events ...", flush=True)
            row_by_row = rbar(url, bootstrap, edw, produced, SCALE.rbar_events)
            row_by_row["agreement"] = agreement(conn)
            peer_result: dict[str, Any] | None = None
            if not args.no_peer:
                reset_outputs(conn)
                print("Quix Streams peer on the orders ...", flush=True)
                peer_result = peer(url, bootstrap, produced)
                peer_result["agreement"] = agreement(conn, orders_only=True)
            else:
                notes["peer"] = "skipped (--no-peer)"

    freshness: dict[str, Any] = {}
    if FRESHNESS.exists():
        freshness = json.loads(FRESHNESS.read_text(encoding="utf-8"))
    else:
        notes["freshness"] = "not measured yet: run make bench-freshness"
    pipeline_orders = orders_alone["eps"]
    ceiling = min(consumed["eps"], copied["eps"])
    figures.update(
        {
            "pipeline_eps": pipeline["eps"],
            "rbar_eps": row_by_row["eps"],
            "rbar_ratio": _ratio(pipeline["eps"], row_by_row["eps"], 1),
            "consume_only_eps": consumed["eps"],
            "copy_only_eps": copied["eps"],
            "efficiency": _ratio(pipeline["eps"], ceiling),
            "peer_name": f"quixstreams {_version('quixstreams')}" if peer_result else None,
            "peer_eps": peer_result["eps"] if peer_result else None,
            "peer_ratio": _ratio(pipeline_orders, peer_result["eps"]) if peer_result else None,
            "rss_ratio_10x": _ratio(scaling["10x"]["peak_rss_mib"], scaling["1x"]["peak_rss_mib"]),
            "time_ratio_10x": _ratio(scaling["10x"]["seconds"], scaling["1x"]["seconds"]),
            "backfill_to_live_ratio": backfill,
            "freshness_p50_s": freshness.get("freshness_p50_s"),
            "freshness_p95_s": freshness.get("freshness_p95_s"),
            "details": {
                "produced": produced.counts,
                "pipeline": pipeline,
                "scaling": scaling,
                "copy_only": copied,
                "consume_only": consumed,
                "rbar": row_by_row,
                "peer": peer_result,
                "pipeline_orders_alone": orders_alone,
                "peer_compared_with": "the pipeline loading fact_order alone, as the peer loads "
                "the orders alone; the peer's group join is not timed",
                "freshness": freshness or None,
                "notes": notes,
            },
            "machine": machine,
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "pg_version": pg_version,
            "pg": where,
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    missing = [k for k in KEYS if k not in figures]
    assert not missing, missing
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print()
    print(render_table(figures))
    print()
    print(render_details(figures))
    print(f"\nfigures written to {args.output}")
    return 0


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


TARGETS = {
    "rbar_ratio": (">=", 100),
    "efficiency": (">=", 0.5),
    "peer_ratio": (">=", 1),
    "freshness_p95_s": ("<=", 15),
    "rss_ratio_10x": ("<=", 1.25),
    "time_ratio_10x": ("<=", 11),
    "backfill_to_live_ratio": (">=", 1),
}


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.2f}" if value < 100 else f"{value:,.0f}"
    return str(value)


def render_table(figures: dict[str, Any]) -> str:
    """The figures as a Markdown table, with the issue's targets."""
    lines = ["| figure | value | target | met |", "| --- | --- | --- | --- |"]
    for key in KEYS:
        value = figures.get(key)
        target = TARGETS.get(key)
        met = ""
        if target and isinstance(value, int | float):
            op, bound = target
            met = "yes" if (value >= bound if op == ">=" else value <= bound) else "no"
        elif target:
            met = "not measured"
        lines.append(
            f"| {key} | {_fmt(value)} | {f'{target[0]} {target[1]}' if target else ''} | {met} |"
        )
    return "\n".join(lines)


def render_details(figures: dict[str, Any]) -> str:
    """What each contender did, and the scaling runs, as Markdown tables."""
    d = figures["details"]
    lines = [
        "| contender | events | seconds | events/s | note |",
        "| --- | --- | --- | --- | --- |",
    ]

    def row(name: str, part: dict[str, Any] | None, note: str) -> None:
        if part:
            lines.append(
                f"| {name} | {part['events']:,} | {part['seconds']:,.2f} | {part['eps']:,.0f} "
                f"| {note} |"
            )

    pipe = d["pipeline"]
    row("pipeline (both facts)", pipe, "kappa.run functions, default settings, 2 run processes")
    row("pipeline, fact_order alone", d.get("pipeline_orders_alone"), "compared with the peer")
    rb = d["rbar"]
    row("row by row", rb, f"{rb['round_trips_per_event']} statements per event, commit each")
    peer = d["peer"]
    if peer:
        peer = {**peer, "seconds": peer["seconds"]}
        row("Quix Streams (orders)", peer, "from first message; group join not timed")
    row("consume-only", d["consume_only"], "fetch + JSON parse")
    row("COPY-only", d["copy_only"], f"{d['copy_only']['rows']:,} rows (facts + alerts)")
    lines += [
        "",
        "| scaling | events | seconds | peak RSS (MiB) |",
        "| --- | --- | --- | --- |",
    ]
    for name, part in d["scaling"].items():
        lines.append(
            f"| {name} | {part['events']:,} | {part['seconds']:,.2f} | {part['peak_rss_mib']:,.0f} |"
        )
    lines += stage_table(d["scaling"].get("10x"))
    return "\n".join(lines)


def stage_table(run: dict[str, Any] | None) -> list[str]:
    """Thread CPU per event of each stage of the 10x run's batches, per fact, and the
    process's CPU per event (the rest is planning, connections and the threads' waits)."""
    if not run or not all(part.get("stages") for part in run["per_asset"].values()):
        return []
    assets = list(run["per_asset"])
    names = list(dict.fromkeys(n for a in assets for n in run["per_asset"][a]["stages"]))
    lines = [
        "",
        "| CPU per event, 10x (µs) | " + " | ".join(assets) + " |",
        "| --- |" + " --- |" * len(assets),
    ]

    def per_event(asset: str, seconds: float) -> str:
        events = run["per_asset"][asset]["events"]
        return f"{seconds / events * 1e6:.1f}" if events else "-"

    for name in names:
        cells = [per_event(a, run["per_asset"][a]["stages"].get(name, 0.0)) for a in assets]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    cells = [per_event(a, run["per_asset"][a]["cpu_seconds"]) for a in assets]
    lines.append("| whole process | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KappaError as exc:
        sys.exit(f"error: {exc}")
