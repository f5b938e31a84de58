"""What one Dagster run of an event fact does, as plain functions.

The fact asset builds its clients from Dagster resources, calls these and turns the
outcomes into metadata; the benchmark (``bench.pipeline``) calls the very same functions,
so what it measures is the path a run takes:

- :func:`plan_runs`: the sensor's planning (ledger heads, log bounds, in-flight shards,
  time-partition cuts), as the runs it requests, one per time partition;
- :func:`run_micro_batches`: a micro-batch run over the planned ranges, partitions loaded in
  parallel, each with its own consumer and connections;
- :func:`reprocess_partitions`: a backfill run over time partitions, oldest first, each
  replaced in one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager, ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from types import MappingProxyType
from typing import TYPE_CHECKING, Protocol

import psycopg

from kappa.catalog.captures import CaptureSpec
from kappa.edw.connection import connect
from kappa.edw.types import LedgerHead, Schemas
from kappa.exceptions import BatchSupersededError, KappaError
from kappa.heal import heal_positions
from kappa.ingest.budget import RUN_MEMORY_RECORDS, RecordBudget
from kappa.ingest.outcome import BatchOutcome, WindowOutcome
from kappa.ingest.plan import OffsetRange, TopicIngest, locate_windows, plan_ranges
from kappa.ingest.reprocess import reprocess_window
from kappa.ingest.topic import run_batch
from kappa.ingest.topic_window import EventWindowLoader
from kappa.partitions import TimeWindows, Window
from kappa.sources.base import ChangeSource, LogBounds
from kappa.sources.topic import EventStore, TopicPartitions
from kappa.state import StateCache
from kappa.steps.completeness import WaitBudget
from kappa.steps.warehouse import VersionCache, WarehouseLookups

#: Partitions of one run loaded at the same time (each with its own consumer and connection).
PARALLEL_PARTITIONS = 4

_LOG = logging.getLogger(__name__)

if TYPE_CHECKING:
    from kappa.settings import Settings


class RunLog(Protocol):
    """Where a run reports progress (Dagster's ``context.log``, or a ``logging.Logger``)."""

    def info(self, msg: str) -> object: ...

    def warning(self, msg: str) -> object: ...

    def error(self, msg: str) -> object: ...


@dataclass(frozen=True)
class FactServices:
    """What the facts' stateful steps read besides their topics: the captured tables by
    target (their lookups name targets), how long a micro-batch waits for their change
    capture (``KAPPA_ENRICH_MAX_WAIT_S``), and how long a backfill waits, in all, per
    partition (``KAPPA_BACKFILL_MAX_WAIT_S``; heal runs repair what it leaves provisional)."""

    captures: Mapping[str, CaptureSpec] = field(default_factory=lambda: MappingProxyType({}))
    max_wait_s: float = 0.0
    reprocess_wait_s: float = 0.0
    #: Targets of the captures turned off (``KAPPA_CAPTURES_OFF``): read, never waited for.
    off: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: Settings) -> FactServices:
        """The catalogue's captures and the waits of the settings."""
        from kappa.catalog.captures import load_captures  # reads the catalogue file
        from kappa.sources.captured import captures_off

        captures = load_captures(settings.catalog)
        off = captures_off(settings.env, captures)
        return cls(
            captures=MappingProxyType({c.target: c for c in captures}),
            off=frozenset(c.target for c in captures if c.name in off),
            max_wait_s=settings.enrich_max_wait_s,
            reprocess_wait_s=settings.backfill_max_wait_s,
        )


@dataclass(frozen=True)
class Connections:
    """How a run opens its clients; each call opens a new one (a partition loaded in
    parallel has its own)."""

    schemas: Schemas
    event_store: Callable[[], AbstractContextManager[EventStore]]
    edw: Callable[[], AbstractContextManager[psycopg.Connection]]
    oltp: Callable[[], AbstractContextManager[psycopg.Connection]] | None = None
    #: The change source of a captured table of another engine than PostgreSQL (MariaDB),
    #: which a step's lookups of it read their completeness from.
    change_source: Callable[[CaptureSpec], AbstractContextManager[ChangeSource]] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Connections:
        """The clients of ``settings``, opened as the Dagster resources open them (outside
        Dagster: the benchmarks, the CLI, tests)."""
        from kappa.sources.captured import open_change_source

        return cls(
            schemas=Schemas(edw=settings.edw_schema, meta=settings.meta_schema),
            event_store=partial(
                EventStore,
                settings.resolved_bootstrap_servers,
                timeout_s=settings.kafka_timeout_s,
            ),
            edw=partial(connect, settings.resolved_edw_url),
            oltp=partial(connect, settings.resolved_oltp_url, setting="KAPPA_OLTP_URL"),
            change_source=partial(open_change_source, settings=settings),
        )


def open_dimensions(
    stack: ExitStack,
    edw: psycopg.Connection,
    spec: TopicIngest,
    connections: Connections,
    services: FactServices,
    versions: VersionCache,
) -> WarehouseLookups | None:
    """The lookups of ``spec``'s stateful step (None without a step), completeness read
    from each looked-up table's change source: PostgreSQL's through one OLTP connection,
    another engine's through ``connections.change_source``; all closed with ``stack``."""
    if spec.step is None:
        return None
    engines = {
        services.captures[lookup.target].engine
        for lookup in spec.step.lookups
        if lookup.target in services.captures and lookup.target not in services.off
    }
    oltp = (
        stack.enter_context(connections.oltp())
        if connections.oltp is not None and "postgresql" in engines
        else None
    )
    sources = {}
    if connections.change_source is not None:
        for target in dict.fromkeys(lookup.target for lookup in spec.step.lookups):
            capture = services.captures.get(target)
            if (
                capture is not None
                and capture.engine != "postgresql"
                and target not in services.off
            ):
                sources[target] = stack.enter_context(connections.change_source(capture))
    return WarehouseLookups(
        edw,
        connections.schemas,
        oltp=oltp,
        captures=services.captures,
        lookups=spec.step.lookups,
        versions=versions,
        off=services.off,
        sources=sources,
    )


# -- planning, as the sensor does it -------------------------------------------------------------


@dataclass(frozen=True)
class PlannedRun:
    """One run request: ranges of one time partition."""

    partition_key: str
    ranges: list[OffsetRange]


@dataclass(frozen=True)
class RunPlan:
    """The runs to request now, oldest time partition first, and the shards whose next
    record belongs to a time partition after the current one (they wait)."""

    runs: list[PlannedRun]
    ahead: dict[int, Window]


def plan_runs(
    store: EventStore,
    spec: TopicIngest,
    windows: TimeWindows,
    heads: Mapping[int, LedgerHead],
    bounds: Mapping[int, LogBounds],
    *,
    busy: frozenset[int],
    max_batch: int,
    max_run: int,
    now: datetime,
) -> RunPlan:
    """The micro-batch runs for ``spec`` from the ledger ``heads`` and the log ``bounds``:
    shards in ``busy`` (a batch in flight) are left out, a batch never crosses a time
    partition's boundary, and a shard whose next record belongs to a partition after the
    one holding ``now`` waits (nothing is skipped)."""
    starts = {
        p: heads[p].end if p in heads else bounds[p].start
        for p in bounds
        if p not in busy and (heads[p].end if p in heads else bounds[p].start) < bounds[p].end
    }
    located = locate_windows(
        store,
        spec.topic,
        windows,
        starts,
        {p: heads[p].partition_key if p in heads else None for p in starts},
        bounds,
    )
    current = windows.at(now)
    ahead = {p: w for p, (w, _) in located.items() if w.start > current.start}
    ranges = plan_ranges(
        spec.topic,
        heads,
        bounds,
        busy=busy | frozenset(ahead),
        max_batch=max_batch,
        max_run=max_run,
        limits={p: end for p, (_, end) in located.items()},
    )
    by_window: dict[str, list[OffsetRange]] = {}
    for r in ranges:
        by_window.setdefault(located[r.partition][0].key, []).append(r)
    runs = [
        PlannedRun(key, by_window[key])
        for key in sorted(by_window, key=lambda k: windows.window(k).start)
    ]
    return RunPlan(runs=runs, ahead=ahead)


# -- a micro-batch run ------------------------------------------------------------------------------


@dataclass
class MicroBatchRun:
    """What a micro-batch run did: the outcomes of the batches that ran (by partition), the
    batches another run committed first, and the errors of those that failed."""

    outcomes: list[BatchOutcome] = field(default_factory=list)
    superseded: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: The most records its batches held at once (see ``memory_records``).
    peak_records: int = 0


def run_micro_batches(
    connections: Connections,
    spec: TopicIngest,
    ranges: list[OffsetRange],
    *,
    run_id: str,
    partition_key: str | None,
    max_batch: int,
    cache: StateCache,
    services: FactServices,
    memory_records: int = RUN_MEMORY_RECORDS,
    parallel: int = PARALLEL_PARTITIONS,
    log: RunLog = _LOG,
) -> MicroBatchRun:
    """Load ``ranges`` (one per topic partition) as one run appending to ``partition_key``.

    Partitions load in parallel (at most ``parallel``; with 1, in the calling thread), each
    batch exactly once (:func:`kappa.ingest.topic.run_batch`), while the batches being
    loaded hold at most ``memory_records`` records together (``KAPPA_RUN_MEMORY_RECORDS``):
    a batch read, decoded, stepped and written is in memory whole, so a run holds at most
    that or one batch, not the backlog (a larger batch loads alone). A batch another run
    committed first is logged and left out; a failing batch does not stop the others: its
    error is returned in ``failures`` for the caller to fail the run with.
    """
    versions = VersionCache()  # dimension versions, shared by the partitions of the run
    budget = RecordBudget(memory_records)

    def load(requested: OffsetRange) -> BatchOutcome:
        with ExitStack() as stack:
            # A batch holds at most its requested range (the ledger only trims it) and
            # never more than the batch bound.
            stack.enter_context(budget.hold(min(max_batch, requested.end - requested.start)))
            store = stack.enter_context(connections.event_store())
            conn = stack.enter_context(connections.edw())
            return run_batch(
                store,
                conn,
                connections.schemas,
                spec,
                requested,
                run_id=run_id,
                max_batch=max_batch,
                partition_key=partition_key,
                cache=cache,
                dimensions=open_dimensions(stack, conn, spec, connections, services, versions),
                max_wait_s=services.max_wait_s,
            )

    result = MicroBatchRun()

    def record(requested: OffsetRange, outcome: Callable[[], BatchOutcome]) -> None:
        try:
            done = outcome()
        except BatchSupersededError as exc:
            log.warning(str(exc))
            result.superseded.append(str(exc))
            return
        except KappaError as exc:
            log.error(str(exc))
            result.failures.append(str(exc))
            return
        # No log line per batch: the materialisation's metadata has each shard's outcome.
        result.outcomes.append(done)

    workers = max(1, min(len(ranges), parallel))
    if workers == 1:  # in this thread (a profiler of the main thread sees it)
        for requested in ranges:
            record(requested, partial(load, requested))
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(load, requested): requested for requested in ranges}
            for future in as_completed(futures):
                record(futures[future], future.result)
    result.outcomes.sort(key=lambda o: o.partition)
    result.peak_records = budget.peak
    return result


# -- a backfill run -------------------------------------------------------------------------------------


@dataclass
class ReprocessRun:
    """What a backfill run did: the outcomes of the partitions it replaced, and the
    partition it stopped at with the error, if one failed (later ones were not touched)."""

    outcomes: list[WindowOutcome] = field(default_factory=list)
    failed_partition: str | None = None
    error: str | None = None


def reprocess_partitions(
    connections: Connections,
    spec: TopicIngest,
    windows: TimeWindows,
    keys: list[str],
    *,
    run_id: str,
    max_batch: int,
    services: FactServices,
    log: RunLog = _LOG,
    heal: bool = False,
) -> ReprocessRun:
    """Replace the time partitions ``keys`` of ``spec.asset`` from the log, in order, each
    in one transaction (:func:`kappa.ingest.reprocess.reprocess_window`), on one connection and two
    consumers (the second reads the next chunk ahead); stops at the first partition that
    fails.

    A ``heal`` re-derives each partition only from each shard's first ledger batch holding
    a provisional row (:func:`kappa.heal.heal_positions`, read when the partition's turn
    comes); shards without one keep their rows.
    """
    result = ReprocessRun()
    with ExitStack() as stack:
        store = stack.enter_context(connections.event_store())
        source = TopicPartitions(store, spec.topic)
        # A second consumer reads a partition's next chunk while the current one is written.
        ahead = TopicPartitions(stack.enter_context(connections.event_store()), spec.topic)
        conn = stack.enter_context(connections.edw())
        dims = open_dimensions(stack, conn, spec, connections, services, VersionCache())
        for key in keys:
            positions = (
                heal_positions(
                    conn, connections.schemas, spec.asset, spec.topic, spec.contract, key
                )
                if heal
                else None
            )
            try:
                window = windows.window(key)
                # A budget per window: the step's wait for change capture is paid once there.
                loader = EventWindowLoader(
                    source,
                    conn,
                    connections.schemas,
                    spec,
                    max_batch=max_batch,
                    dimensions=dims,
                    budget=WaitBudget(services.reprocess_wait_s),
                )
                done = reprocess_window(
                    source,
                    conn,
                    connections.schemas,
                    spec.asset,
                    window,
                    loader,
                    run_id=run_id,
                    is_first=windows.is_first(window),
                    from_positions=positions,
                    read_ahead=ahead,
                )
            except KappaError as exc:
                log.error(str(exc))
                result.failed_partition, result.error = key, str(exc)
                return result
            result.outcomes.extend(done)
            resolved = ", ".join(
                f"{o.topic}[{o.partition}]:{o.start}-{o.end}" for o in done if o.status != "kept"
            )
            stale = sorted({o.stale_from for o in done if o.stale_from})
            what = (
                f"healed, re-derived {resolved or 'nothing (no provisional rows left)'}"
                if heal
                else f"replaced {resolved or 'nothing (no records)'}"
            )
            log.info(
                f"{spec.asset} partition {key}: {what}; "
                f"{sum(o.loaded for o in done)} loaded, {sum(o.removed_rows for o in done)} "
                "removed"
                + (
                    f"; the state it ends with changed: {', '.join(stale)} and later are stale"
                    if stale
                    else ""
                )
            )
    return result
