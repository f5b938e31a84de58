"""The runs of a fact asset without Dagster's scheduling, on the product's own functions.

``drain`` plans runs as the sensor does (``kappa.run.plan_runs``: ledger heads, log bounds,
time-partition cuts, partition keys) and executes each with the function the fact asset
calls (``kappa.run.run_micro_batches``), with the product's default settings
(``Settings`` defaults: batch and run bounds, ``KAPPA_ENRICH_MAX_WAIT_S``, state cache
size), completeness read from the OLTP database per batch (``WarehouseLookups``) and a
fresh state cache per run, until the ledger reaches the requested end of every partition.
``backfill`` reprocesses a time partition with ``kappa.run.reprocess_partitions``, as a
backfill run does. What this leaves out (process launch, the run queue, the sensor's
interval) is what ``bench.freshness`` measures on a running stack.

It is also a command, so that the benchmark can run it in a process of its own and read
its peak memory::

    python -m bench.pipeline --asset fact_order --bootstrap HOST:PORT --edw-url URL \
        [--oltp-url URL] [--limit PARTITION=END ...] [--mode pipeline|consume|backfill] [--profile]

The last line printed is a JSON object: events, seconds, batches, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import orjson

from bench.demo import BENCH_CATALOG
from kappa.catalog.ingests import topic_ingests
from kappa.edw.ledger import read_heads
from kappa.exceptions import KappaError
from kappa.ingest.plan import TopicIngest
from kappa.run import (
    PARALLEL_PARTITIONS,
    Connections,
    FactServices,
    plan_runs,
    reprocess_partitions,
    run_micro_batches,
)
from kappa.settings import Settings
from kappa.sources.base import LogBounds
from kappa.sources.topic import EventStore
from kappa.state import StateCache
from kappa.state.postgres import PostgresStateBackend

_LOG = logging.getLogger("bench.pipeline")


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
    #: Thread CPU seconds per stage of the batches (``--stages``), summed over threads.
    stages: dict[str, float] = field(default_factory=dict)
    #: CPU seconds of the whole process over the work (all threads).
    cpu_seconds: float = 0.0


def spec_for(asset: str, settings: Settings) -> TopicIngest:
    for spec, _ in topic_ingests(settings):
        if spec.asset == asset:
            return spec
    raise SystemExit(f"unknown asset {asset!r}")


def _capped(bounds: dict[int, int], limits: dict[int, int] | None) -> dict[int, int]:
    if not limits:
        return bounds
    return {p: min(end, limits.get(p, end)) for p, end in bounds.items()}


def product_settings(bootstrap: str, edw_url: str, oltp_url: str, **topics: str) -> Settings:
    """The product's default settings for this broker and these databases (``topics``:
    ``KAPPA_TOPIC_*`` values)."""
    return Settings.from_env(
        {
            "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
            "KAPPA_EDW_URL": edw_url,
            "KAPPA_OLTP_URL": oltp_url,
            "KAPPA_CATALOG": str(BENCH_CATALOG),
            **topics,
        }
    )


def connections(settings: Settings) -> Connections:
    """Clients as the Dagster resources open them, from ``settings``."""
    return Connections.from_settings(settings)


def fact_services(settings: Settings) -> FactServices:
    """The services the code location gives the facts (``kappa.dagster.definitions``)."""
    return FactServices.from_settings(settings)


def drain(
    *,
    settings: Settings,
    spec: TopicIngest,
    limits: dict[int, int] | None = None,
    parallel: int = PARALLEL_PARTITIONS,
) -> DrainResult:
    """Load ``spec``'s topic up to ``limits`` (partition -> end offset; default the log end)
    in the runs the sensor would request, one after another."""
    clients = connections(settings)
    services = fact_services(settings)
    result = DrainResult(asset=spec.asset, topic=spec.topic, mode="pipeline")
    result.started_at = time.time()
    started = time.perf_counter()
    while True:
        # What the sensor does each tick (no run in flight: runs here go one at a time).
        with clients.event_store() as store, clients.edw() as conn:
            bounds = store.log_bounds(spec.topic, store.partitions(spec.topic))
            ends = _capped({p: b.end for p, b in bounds.items()}, limits)
            plan = plan_runs(
                store,
                spec,
                settings.windows,
                read_heads(conn, clients.schemas, spec.asset, spec.topic),
                {p: LogBounds(bounds[p].start, ends[p]) for p in bounds},
                busy=frozenset(),
                max_batch=settings.batch_max_records,
                max_run=settings.run_max_records,
                now=datetime.now(UTC),
            )
        if not plan.runs:
            if plan.ahead:
                raise SystemExit(f"records stamped ahead of the clock wait: {plan.ahead}")
            break
        for planned in plan.runs:
            result.runs += 1
            # A fresh cache per run, as the state cache resource is per run.
            cache = StateCache(
                PostgresStateBackend(clients.schemas), max_keys=settings.state_cache_keys
            )
            run = run_micro_batches(
                clients,
                spec,
                planned.ranges,
                run_id=f"bench-{spec.asset}-{result.runs}",
                partition_key=planned.partition_key,
                max_batch=settings.batch_max_records,
                memory_records=settings.run_memory_records,
                cache=cache,
                services=services,
                parallel=parallel,
                log=_LOG,
            )
            if run.failures:
                raise KappaError("; ".join(run.failures))
            for outcome in run.outcomes:
                result.events += outcome.received
                result.loaded += outcome.loaded
                result.batches += 1 if outcome.status == "committed" else 0
                result.batch_seconds.append(round(outcome.seconds, 3))
    result.seconds = time.perf_counter() - started
    result.ended_at = time.time()
    return result


def backfill(*, settings: Settings, spec: TopicIngest) -> DrainResult:
    """Reprocess the time partition holding the topic's first record, as a backfill run
    does (``reprocess_partitions``: every topic partition of the window deleted and
    reloaded in one transaction, state restored as of the window's start, the default
    enrichment wait)."""
    clients = connections(settings)
    result = DrainResult(asset=spec.asset, topic=spec.topic, mode="backfill")
    with clients.event_store() as store:
        first = store.log_bounds(spec.topic, [0])[0].start
        key = settings.windows.at_ms(store.timestamp_at(spec.topic, 0, first)).key
    result.started_at = time.time()
    started = time.perf_counter()
    run = reprocess_partitions(
        clients,
        spec,
        settings.windows,
        [key],
        run_id=f"bench-backfill-{spec.asset}",
        max_batch=settings.batch_max_records,
        services=fact_services(settings),
        log=_LOG,
    )
    result.seconds = time.perf_counter() - started
    result.ended_at = time.time()
    if run.error is not None:
        raise KappaError(run.error)
    result.runs = 1
    for outcome in run.outcomes:
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


#: The stages of a topic partition's batch, as ``kappa.ingest.topic`` calls them: (name,
#: owner, attribute). ``step`` is the stateful step itself; ``duplicate check`` and
#: ``capture wait`` are the queries before it; ``write`` is the ledger transaction with the
#: COPY.
STAGES = (
    ("read", "TopicPartitions", "read"),
    ("decode", None, "decode_batch"),
    ("duplicate check", None, "existing_event_ids"),
    ("capture wait", None, "wait_for_step"),
    ("step", None, "apply_step"),
    ("write", None, "commit_isolated"),
)


def time_stages(into: dict[str, float]) -> None:
    """Add each stage's thread CPU time to ``into`` from now on (wraps the functions the
    batch calls in ``kappa.ingest.topic``; the path is otherwise the product's)."""
    import threading

    import kappa.ingest.topic as topic_module

    lock = threading.Lock()
    for name, owner, attribute in STAGES:
        target = getattr(topic_module, owner) if owner else topic_module
        original = getattr(target, attribute)

        def timed(*args: object, _f: object = original, _name: str = name, **kwargs: object):
            started = time.thread_time()
            try:
                return _f(*args, **kwargs)  # type: ignore[operator]
            finally:
                spent = time.thread_time() - started
                with lock:
                    into[_name] = into.get(_name, 0.0) + spent

        setattr(target, attribute, timed)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.pipeline")
    parser.add_argument("--asset", required=True, help="fact_order or fact_payment")
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--edw-url", required=True)
    parser.add_argument(
        "--oltp-url", help="the OLTP database with the change tables (default: --edw-url)"
    )
    parser.add_argument("--topic", required=True)
    parser.add_argument("--limit", action="append", default=[], help="PARTITION=END")
    parser.add_argument("--mode", choices=("pipeline", "consume", "backfill"), default="pipeline")
    parser.add_argument("--parallel", type=int, default=PARALLEL_PARTITIONS)
    parser.add_argument(
        "--profile",
        type=Path,
        help="write a pyinstrument profile (text) here; it sees the main thread only, so "
        "profile with --parallel 1",
    )
    parser.add_argument(
        "--stages", action="store_true", help="report the thread CPU time of each batch stage"
    )
    args = parser.parse_args(argv)
    stages: dict[str, float] = {}
    if args.stages:
        time_stages(stages)
    limits = {int(p): int(e) for p, e in (item.split("=", 1) for item in args.limit)}
    settings = product_settings(
        args.bootstrap,
        args.edw_url,
        args.oltp_url or args.edw_url,
        KAPPA_TOPIC_ORDERS=args.topic if args.asset == "fact_order" else "orders-unused",
        KAPPA_TOPIC_PAYMENTS=args.topic if args.asset == "fact_payment" else "pay-unused",
    )
    cpu_started = time.process_time()
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.005)
        profiler.start()
    if args.mode == "consume":
        result = consume_only(
            bootstrap=args.bootstrap,
            topic=args.topic,
            limits=limits,
            max_batch=settings.batch_max_records,
        )
    elif args.mode == "backfill":
        result = backfill(settings=settings, spec=spec_for(args.asset, settings))
    else:
        result = drain(
            settings=settings,
            spec=spec_for(args.asset, settings),
            limits=limits,
            parallel=args.parallel,
        )
    if profiler is not None:
        profiler.stop()
        text = profiler.output_text(unicode=False, color=False, show_all=False)
        args.profile.write_text(text, encoding="utf-8")
        result.profile = str(args.profile)
    result.peak_rss_mib = round(peak_rss_mib(), 1)
    result.stages = {name: round(seconds, 3) for name, seconds in stages.items()}
    result.cpu_seconds = round(time.process_time() - cpu_started, 3)
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
