"""The stream-processing peer: Quix Streams 3.x doing the orders' enrichment and running
statistics into the same PostgreSQL table (``edw.fact_order``).

Per message, as a Quix Streams application is written:

* ``join_lookup`` with Quix's own ``PostgresLookup`` fetches the customer's
  ``dim_customer`` versions (one query per customer, then its LRU cache);
* a stateful ``apply`` (RocksDB state, changelog topic) picks the version valid at the
  event time and advances the customer's running count, sum and sum of squares of cents,
  exactly as :func:`kappa.steps.running_stats` does;
* a ``BatchingSink`` writes each checkpoint's rows with COPY (Quix's PostgreSQL sink keeps
  only the columns of a batch's first row, and an order's deviation is empty for a
  customer's first orders, so it would drop that column for the whole batch).

Quix Streams reads ``retention.ms`` of the input topic from DescribeConfigs to configure
its changelog topic; the local broker answers DescribeConfigs with the configs a topic was
created with, so the benchmark creates its topics with explicit ``retention.ms`` and
``retention.bytes`` (-1: kept forever, which is what a memory broker does anyway).

Timing starts at the first message processed (the consumer-group join, about 20 s on the
local broker, is not counted) and ends when ``Application.run`` has returned, its last
checkpoint committed. Run as a command; the last line printed is JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import shutil
import sys
import tempfile
import time
import uuid
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from quixstreams import Application
from quixstreams.dataframe.joins.lookups.postgresql import PostgresLookup, PostgresLookupField
from quixstreams.sinks import BatchingSink, SinkBatch
from sqlalchemy.engine import make_url

from bench.demo import ORDER_PLACED
from kappa.catalog.streams import fact_columns
from kappa.exact import round_half_even_div

COLUMNS = [name for name, _ in fact_columns(ORDER_PLACED)] + [
    name for name, _ in ORDER_PLACED.derived
]


class FactCopySink(BatchingSink):
    """Rows of one checkpoint into ``edw.fact_order`` with COPY, in one transaction."""

    def __init__(self, url: str, schema: str, table: str) -> None:
        super().__init__()
        self._url = url
        self._table = sql.Identifier(schema, table)
        self._conn: psycopg.Connection | None = None
        self.rows = 0

    def setup(self) -> None:
        self._conn = psycopg.connect(self._url, application_name="kappa-bench-quix")

    def write(self, batch: SinkBatch) -> None:
        assert self._conn is not None
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS)
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(self._table, columns)
        with (
            self._conn.transaction(),
            self._conn.cursor() as cur,
            cur.copy(statement) as copy,
        ):
            for item in batch:
                value = item.value
                copy.write_row([value[c] for c in COLUMNS])
                self.rows += 1


def _as_of(versions: list[dict[str, Any]] | None, at: datetime) -> dict[str, Any] | None:
    """The version valid at ``at`` (latest valid_from, then highest key), as enrich_as_of."""
    best = None
    for version in versions or ():
        if version["valid_from"] <= at and (
            best is None
            or (version["valid_from"], version["customer_sk"])
            > (best["valid_from"], best["customer_sk"])
        ):
            best = version
    if best is None or (best["valid_to"] is not None and at >= best["valid_to"]):
        return None
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer_quix")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--edw-url", required=True)
    parser.add_argument("--count", type=int, required=True, help="messages to process")
    parser.add_argument("--watermark", required=True, help="change capture complete until")
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    url = make_url(args.edw_url)
    complete_until = datetime.fromisoformat(args.watermark)
    state_dir = tempfile.mkdtemp(prefix="kappa-bench-quix-")
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=f"kappa-bench-quix-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        state_dir=state_dir,
        loglevel="WARNING",
    )
    topic = app.topic(args.topic, value_deserializer="json", key_deserializer="str")
    sdf = app.dataframe(topic)
    lookup = PostgresLookup(
        host=url.host or "127.0.0.1",
        port=url.port or 5432,
        dbname=url.database or "postgres",
        user=url.username or "postgres",
        password=url.password or "",
        cache_size=100_000,
    )
    sdf = sdf.join_lookup(
        lookup,
        {
            "customer_versions": PostgresLookupField(
                table="dim_customer",
                schema="edw",
                columns=["customer_sk", "segment", "country", "valid_from", "valid_to"],
                on="customer_id",
                first_match_only=False,
                ttl=3600.0,
            )
        },
        on=lambda value, key: value["payload"]["customer_id"],
    )
    clock: dict[str, float] = {}

    def enrich(value: dict, key: Any, timestamp: int, headers: Any, state: Any) -> dict:
        if "first" not in clock:
            clock["first"] = time.perf_counter()
        from quixstreams import message_context

        context = message_context()
        payload = value["payload"]
        at = datetime.fromisoformat(value["event_time"])
        version = _as_of(value.get("customer_versions"), at)
        n, total, sumsq = state.get("stats", [0, 0, 0])
        cents = round(float(payload["amount"]) * 100)
        # As kappa.steps.running_stats: the mean in whole cents, rounded half to even in
        # exact integers (a float division first rounds 1.5 cents, 0.015, down to 0.01).
        mean = round_half_even_div(total, n) / 100.0 if n > 0 else None
        stddev = (
            float(
                np.round(
                    math.sqrt(max((n * sumsq - total * total) / (n * (n - 1)), 0.0)) / 100.0, 4
                )
            )
            if n > 1
            else None
        )
        state.set("stats", [n + 1, total + cents, sumsq + cents * cents])
        row = {
            "event_id": value["event_id"],
            **{f.name: payload[f.name] for f in ORDER_PLACED.fields},
            "event_time": at,
            "source": value["source"],
            "schema_version": value["schema_version"],
            "topic": context.topic,
            "kafka_partition": context.partition,
            "kafka_offset": context.offset,
            "broker_time": datetime.fromtimestamp(timestamp / 1000, tz=at.tzinfo),
            "customer_sk": version["customer_sk"] if version else None,
            "customer_segment": version["segment"] if version else None,
            "customer_country": version["country"] if version else None,
            "enrichment": (
                "unknown_customer"
                if version is None
                else ("as_of" if at <= complete_until else "provisional")
            ),
            "customer_orders_before": n,
            "customer_avg_amount_before": mean,
            "customer_stddev_amount_before": stddev,
        }
        return row

    sdf = sdf.apply(enrich, stateful=True, metadata=True)
    sink = FactCopySink(args.edw_url, "edw", "fact_order")
    sdf.sink(sink)
    started = time.perf_counter()
    app.run(count=args.count, timeout=args.timeout)
    ended = time.perf_counter()
    shutil.rmtree(state_dir, ignore_errors=True)
    first = clock.get("first", ended)
    print(
        json.dumps(
            {
                "peer": "quixstreams",
                "events": sink.rows,
                "seconds": ended - first,
                "startup_seconds": first - started,
                "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            }
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
