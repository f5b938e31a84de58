"""The micro-batch path without Dagster's scheduling, as one run worker executes it.

``drain`` plans bounded runs from the ledger and the log (``plan_ranges``, as the sensor
does) and loads each run's partitions in parallel threads, each with its own consumer and
connection (``run_batch`` with the stateful step, as the fact asset does), until the
ledger reaches the requested end of every partition. It is also a command, so that the
benchmark can run it in a process of its own and read its peak memory::

    python -m bench.pipeline --asset fact_order --bootstrap HOST:PORT --edw-url URL \
        --watermark ISO [--limit PARTITION=END ...] [--mode pipeline|consume|backfill] [--profile]

The last line printed is a JSON object: events, seconds, batches, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson
import pandas as pd
import psycopg

from kappa.capture import CaptureSpec, load_captures
from kappa.catalog import topic_ingests
from kappa.event_store import EventStore, LogBounds
from kappa.ingest import (
    BatchOutcome,
    OffsetRange,
    TopicIngest,
    plan_ranges,
    reprocess_window,
    run_batch,
)
from kappa.settings import REPO_ROOT, Settings
from kappa.state import PostgresStateBackend, StateCache
from kappa.stateful import Completeness, VersionCache, WarehouseDimensions
from kappa.warehouse import Schemas, connect, read_heads

#: As the fact asset: partitions of one run loaded at the same time.
PARALLEL_PARTITIONS = 4


class CompleteDimensions(WarehouseDimensions):
    """EDW dimensions whose change capture is complete up to a fixed time.

    The benchmark fills ``dim_customer`` directly (no OLTP database, no capture lag), so
    the completeness watermark is given instead of read from the OLTP horizon (a few
    one-row queries per batch in a deployment).
    """

    def __init__(
        self,
        edw: psycopg.Connection,
        schemas: Schemas,
        *,
        customers: CaptureSpec,
        calls: CaptureSpec,
        versions: VersionCache,
        complete_until: pd.Timestamp,
    ) -> None:
        super().__init__(
            edw, schemas, oltp=None, customers=customers, calls=calls, versions=versions
        )
        self._complete_until = complete_until

    def watermark(self, customer_ids: Sequence[str] = ()) -> Completeness | None:
        return Completeness(self._complete_until) if self._complete_until is not None else None


@dataclass
class DrainResult:
    asset: str
    topic: str
    mode: str
    events: int = 0
    loaded: int = 0
    runs: int = 0
    batches: int = 0
    seconds: float = 0.0
    started_at: float = 0.0
    ended_at: float = 0.0
    peak_rss_mib: float = 0.0
    profile: str | None = None
    batch_seconds: list[float] = field(default_factory=list)


def spec_for(asset: str, settings: Settings) -> TopicIngest:
    for spec, _ in topic_ingests(settings):
        if spec.asset == asset:
            return spec
    raise SystemExit(f"unknown asset {asset!r}")


def _capped(bounds: dict[int, int], limits: dict[int, int] | None) -> dict[int, int]:
    if not limits:
        return bounds
    return {p: min(end, limits.get(p, end)) for p, end in bounds.items()}


def drain(
    *,
    bootstrap: str,
    edw_url: str,
    spec: TopicIngest,
    complete_until: pd.Timestamp,
    limits: dict[int, int] | None = None,
    max_batch: int = 50_000,
    max_run: int = 200_000,
    cache_keys: int = 200_000,
    parallel: int = PARALLEL_PARTITIONS,
) -> DrainResult:
    """Load ``spec``'s topic up to ``limits`` (partition -> end offset; default the log end)."""
    schemas = Schemas()
    captures = {c.name: c for c in load_captures(REPO_ROOT / "capture.yaml")}
    cache = StateCache(PostgresStateBackend(schemas), max_keys=cache_keys)
    result = DrainResult(asset=spec.asset, topic=spec.topic, mode="pipeline")
    result.started_at = time.time()
    started = time.perf_counter()
    run_number = 0
    while True:
        # What the sensor does each tick: ledger heads and log bounds, bounded ranges.
        with EventStore(bootstrap) as store, connect(edw_url) as conn:
            bounds = store.log_bounds(spec.topic, store.partitions(spec.topic))
            ends = _capped({p: b.end for p, b in bounds.items()}, limits)
            capped = {p: LogBounds(bounds[p].start, ends[p]) for p in bounds}
            ranges = plan_ranges(
                spec.topic,
                read_heads(conn, schemas, spec.asset, spec.topic),
                capped,
                max_batch=max_batch,
                max_run=max_run,
            )
        if not ranges:
            break
        run_number += 1
        run_id = f"bench-{spec.asset}-{run_number}"
        versions = VersionCache()

        def load(
            requested: OffsetRange, run_id: str = run_id, versions: VersionCache = versions
        ) -> BatchOutcome:
            with EventStore(bootstrap) as store, connect(edw_url) as conn:
                dimensions = CompleteDimensions(
                    conn,
                    schemas,
                    customers=captures["customers"],
                    calls=captures["call_center_calls"],
                    versions=versions,
                    complete_until=complete_until,
                )
                return run_batch(
                    store,
                    conn,
                    schemas,
                    spec,
                    requested,
                    run_id=run_id,
                    max_batch=max_batch,
                    cache=cache,
                    dimensions=dimensions,
                    max_wait_s=0.0,
                )

        if parallel == 1:  # in this thread (a profiler sees it)
            outcomes = [load(r) for r in ranges]
        else:
            with ThreadPoolExecutor(max_workers=min(len(ranges), parallel)) as pool:
                outcomes = list(pool.map(load, ranges))
        result.runs += 1
        for outcome in outcomes:
            result.events += outcome.received
            result.loaded += outcome.loaded
            result.batches += 1 if outcome.status == "committed" else 0
            result.batch_seconds.append(round(outcome.seconds, 3))
    result.seconds = time.perf_counter() - started
    result.ended_at = time.time()
    return result


def backfill(
    *,
    bootstrap: str,
    edw_url: str,
    spec: TopicIngest,
    settings: Settings,
    complete_until: pd.Timestamp,
    max_batch: int = 50_000,
) -> DrainResult:
    """Reprocess the time partition holding the topic's first record, as a backfill run does
    (``reprocess_window``: every topic partition of the window deleted and reloaded in one
    transaction, state restored as of the window's start)."""
    schemas = Schemas()
    captures = {c.name: c for c in load_captures(REPO_ROOT / "capture.yaml")}
    result = DrainResult(asset=spec.asset, topic=spec.topic, mode="backfill")
    with EventStore(bootstrap) as store, connect(edw_url) as conn:
        first = store.log_bounds(spec.topic, [0])[0].start
        window = settings.windows.at_ms(store.timestamp_at(spec.topic, 0, first))
        dimensions = CompleteDimensions(
            conn,
            schemas,
            customers=captures["customers"],
            calls=captures["call_center_calls"],
            versions=VersionCache(),
            complete_until=complete_until,
        )
        result.started_at = time.time()
        started = time.perf_counter()
        outcomes = reprocess_window(
            store,
            conn,
            schemas,
            spec,
            settings.windows,
            window,
            run_id=f"bench-backfill-{spec.asset}",
            max_batch=max_batch,
            dimensions=dimensions,
        )
        result.seconds = time.perf_counter() - started
        result.ended_at = time.time()
    result.runs = 1
    for outcome in outcomes:
        result.events += outcome.received
        result.loaded += outcome.loaded
        result.batches += outcome.batches
    return result


def consume_only(
    *, bootstrap: str, topic: str, limits: dict[int, int] | None, max_batch: int = 50_000
) -> DrainResult:
    """The read ceiling: fetch every record (same client, same batch bound) and parse its
    JSON, nothing else; partitions in parallel threads as the pipeline loads them."""
    result = DrainResult(asset="-", topic=topic, mode="consume")
    with EventStore(bootstrap) as store:
        partitions = store.partitions(topic)
        bounds = store.log_bounds(topic, partitions)
    ends = _capped({p: b.end for p, b in bounds.items()}, limits)

    def read(partition: int) -> int:
        count = 0
        with EventStore(bootstrap) as store:
            position = bounds[partition].start
            while position < ends[partition]:
                end = min(position + max_batch, ends[partition])
                batch = store.fetch(topic, partition, position, end)
                for value in batch.values:
                    if value is not None:
                        orjson.loads(value)
                count += len(batch)
                position = end
        return count

    result.started_at = time.time()
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(len(partitions), PARALLEL_PARTITIONS)) as pool:
        result.events = sum(pool.map(read, partitions))
    result.seconds = time.perf_counter() - started
    result.ended_at = time.time()
    return result


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline")
    parser.add_argument("--asset", required=True, help="fact_order or fact_payment")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--edw-url", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--watermark", help="change capture complete until (ISO time)")
    parser.add_argument("--limit", action="append", default=[], help="PARTITION=END")
    parser.add_argument("--mode", choices=("pipeline", "consume", "backfill"), default="pipeline")
    parser.add_argument("--max-batch", type=int, default=50_000)
    parser.add_argument("--max-run", type=int, default=200_000)
    parser.add_argument("--parallel", type=int, default=PARALLEL_PARTITIONS)
    parser.add_argument(
        "--profile",
        type=Path,
        help="write a pyinstrument profile (text) here; it sees the main thread only, so "
        "profile with --parallel 1",
    )
    args = parser.parse_args(argv)
    limits = {int(p): int(e) for p, e in (item.split("=", 1) for item in args.limit)}
    settings = Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": args.bootstrap,
            "KAPPA_EDW_URL": args.edw_url,
            "KAPPA_TOPIC_ORDERS": args.topic if args.asset == "fact_order" else "orders-unused",
            "KAPPA_TOPIC_PAYMENTS": args.topic if args.asset == "fact_payment" else "pay-unused",
        }
    )
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005)
        profiler.start()
    if args.mode == "consume":
        result = consume_only(
            bootstrap=args.bootstrap, topic=args.topic, limits=limits, max_batch=args.max_batch
        )
    elif args.mode == "backfill":
        result = backfill(
            bootstrap=args.bootstrap,
            edw_url=args.edw_url,
            spec=spec_for(args.asset, settings),
            settings=settings,
            complete_until=pd.Timestamp(args.watermark),
            max_batch=args.max_batch,
        )
    else:
        result = drain(
            bootstrap=args.bootstrap,
            edw_url=args.edw_url,
            spec=spec_for(args.asset, settings),
            complete_until=pd.Timestamp(args.watermark),
            limits=limits,
            max_batch=args.max_batch,
            max_run=args.max_run,
            parallel=args.parallel,
        )
    if profiler is not None:
        profiler.stop()
        text = profiler.output_text(unicode=False, color=False, show_all=False)
        args.profile.write_text(text, encoding="utf-8")
        result.profile = str(args.profile)
    result.peak_rss_mib = round(peak_rss_mib(), 1)
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
