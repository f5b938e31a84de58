"""Micro-batch ingestion of topic partitions into the EDW, without Dagster.

The sensor plans offset ranges with :func:`plan_ranges`; a run executes each range with
:func:`run_batch`. Both consult the ledger, which is the only truth about where a shard's
next batch starts: a requested range is a hint that the ledger trims or extends.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace

import pandas as pd
import psycopg

from kappa.catalog.captures import CaptureSpec
from kappa.catalog.streams import EventContract
from kappa.changes.merge import apply_changes
from kappa.changes.replace import replace_capture_window
from kappa.decode.batch import DecodedBatch, decode_batch, describe_reason
from kappa.edw.ledger import existing_event_ids, insert_ledger_row, read_head, read_heads
from kappa.edw.poison import Rerun, commit_isolated, write_isolated
from kappa.edw.types import BatchCounts, BatchRecord, LedgerHead, Schemas
from kappa.edw.window import replace_window
from kappa.exceptions import BatchSupersededError, EventStoreTimeoutError, LogResetError
from kappa.partitions import TimeWindows, Window, parse_key
from kappa.sources import pg_capture
from kappa.sources.base import LogBounds, RawBatch
from kappa.sources.topic import EventStore
from kappa.state import AsOfStateCache, ScopedStateCache, StateAccess, StateCache
from kappa.state.postgres import PostgresStateBackend
from kappa.steps.api import Step, StepOutput
from kappa.steps.completeness import WaitBudget
from kappa.steps.context import Lookups
from kappa.steps.engine import apply_step, wait_for_step


@dataclass(frozen=True)
class TopicIngest:
    """One topic loaded into one EDW asset: configuration, not code per topic."""

    asset: str
    topic: str
    contract: EventContract
    description: str = ""
    step: Step | None = None


@dataclass(frozen=True)
class OffsetRange:
    """Offsets ``[start, end)`` of one topic partition, as planned by the sensor."""

    topic: str
    partition: int
    start: int
    end: int

    @property
    def shard(self) -> str:
        return f"{self.topic}[{self.partition}]"


@dataclass
class BatchOutcome:
    """What one batch did, for materialisation metadata and logs."""

    asset: str
    topic: str
    partition: int
    start: int
    end: int
    status: str
    received: int = 0
    loaded: int = 0
    dead_lettered: int = 0
    deduplicated: int = 0
    lag_after: int = 0
    seconds: float = 0.0
    dead_letter_reasons: Counter[str] = field(default_factory=Counter)
    side_rows: dict[str, int] = field(default_factory=dict)
    #: For change tables: the lag after the batch, read once for the outcome and metadata.
    capture_lag: pg_capture.CaptureLag | None = None
    #: Event dates (UTC, ISO) of the events the batch loaded: the mart partitions it touched.
    event_dates: set[str] = field(default_factory=set)
    #: Extra writes it took to isolate records the database refused (0: none refused).
    probes: int = 0


def event_dates(rows: pd.DataFrame) -> set[str]:
    """The distinct UTC dates of ``rows.event_time``."""
    if rows.empty:
        return set()
    return set(rows["event_time"].dt.tz_convert("UTC").dt.strftime("%Y-%m-%d").unique())


def check_continuity(
    asset: str, topic: str, partition: int, head: LedgerHead | None, bounds: LogBounds, epoch: str
) -> None:
    """Raise :class:`LogResetError` when the log cannot continue where the ledger ends.

    That is: the topic was recreated (its id changed), the log ends before the ledger
    (reset or truncated), or the log starts after the ledger (expired by retention before
    it was loaded). Each case would otherwise skip or re-load data silently.
    """
    if head is None:
        return
    if head.epoch and epoch and head.epoch != epoch:
        raise LogResetError(
            asset,
            topic,
            partition,
            f"was recreated: the ledger loaded offsets up to {head.end} of topic id {head.epoch}, "
            f"the broker now serves topic id {epoch} (log {bounds.start}..{bounds.end}).",
        )
    if head.end > bounds.end:
        raise LogResetError(
            asset,
            topic,
            partition,
            f"holds less than was loaded: the ledger has loaded offsets up to {head.end}, "
            f"the log now ends at {bounds.end}. The broker lost or reset this partition "
            "(a local broker keeps nothing across restarts).",
        )
    if head.end < bounds.start:
        raise LogResetError(
            asset,
            topic,
            partition,
            f"expired offsets [{head.end}, {bounds.start}) before they were loaded: the log "
            f"now starts at {bounds.start} (retention).",
        )


def plan_ranges(
    topic: str,
    heads: Mapping[int, LedgerHead],
    bounds: Mapping[int, LogBounds],
    *,
    busy: frozenset[int] = frozenset(),
    max_batch: int,
    max_run: int,
    limits: Mapping[int, int] | None = None,
) -> list[OffsetRange]:
    """The next range of each partition that has new offsets and no batch in flight.

    A range starts where the ledger ends (or at the log start before the first batch) and
    takes everything up to the log end (or ``limits[partition]``, where its time partition
    ends), capped at ``max_batch``: small when caught up, as large as allowed when lagging.
    The run total stays within ``max_run``; the most lagging partitions are served first.
    """
    candidates: list[OffsetRange] = []
    for partition in sorted(bounds):
        if partition in busy:
            continue
        head = heads.get(partition)
        start = head.end if head is not None else bounds[partition].start
        end = min(bounds[partition].end, start + max_batch)
        if limits is not None and partition in limits:
            end = min(end, limits[partition])
        if end > start:
            candidates.append(OffsetRange(topic, partition, start, end))
    # By lag to the log end, not by the capped batch size: with every partition lagging by
    # more than a batch, a tie broken by partition number would starve the last ones.
    candidates.sort(key=lambda r: (-(bounds[r.partition].end - r.start), r.partition))
    planned: list[OffsetRange] = []
    budget = max_run
    for rng in candidates:
        if budget <= 0:
            break
        size = min(rng.end - rng.start, budget)
        planned.append(OffsetRange(rng.topic, rng.partition, rng.start, rng.start + size))
        budget -= size
    return sorted(planned, key=lambda r: r.partition)


#: Window steps tried to place one position before giving up (each step jumps to the window
#: of the record's own timestamp, so two are the most a monotone log needs).
_MAX_WINDOW_STEPS = 16


def locate_windows(
    store: EventStore,
    topic: str,
    windows: TimeWindows,
    starts: Mapping[int, int],
    hints: Mapping[int, str | None],
    bounds: Mapping[int, LogBounds],
) -> dict[int, tuple[Window, int]]:
    """For each partition's next position ``starts[p]`` (which the log holds): the time
    partition it belongs to, and the offset where that partition ends (the log end while
    no record at or after the partition's end has arrived).

    ``hints[p]`` is the time partition of the shard's last batch (from the ledger); without
    one the record's own timestamp places it. A window that ends at or before the position
    is left for the next one, or the record's window if that is later.
    """
    pending: dict[int, Window] = {}
    for partition, start in starts.items():
        hint = hints.get(partition)
        pending[partition] = (
            windows.window(hint)
            if hint
            else windows.at_ms(store.timestamp_at(topic, partition, start))
        )
    located: dict[int, tuple[Window, int]] = {}
    for _ in range(_MAX_WINDOW_STEPS):
        if not pending:
            return located
        by_end: dict[int, list[int]] = {}
        for partition, window in pending.items():
            by_end.setdefault(window.end_ms, []).append(partition)
        for end_ms, partitions in by_end.items():
            found = store.boundaries(
                topic,
                partitions,
                end_ms,
                floor={p: starts[p] for p in partitions},
                bounds=bounds,
            )
            for partition, boundary in found.items():
                window, start = pending[partition], starts[partition]
                if boundary is None or boundary > start:
                    located[partition] = (
                        window,
                        boundary if boundary is not None else bounds[partition].end,
                    )
                    del pending[partition]
                    continue
                own = windows.at_ms(store.timestamp_at(topic, partition, start))
                following = windows.next(window)
                pending[partition] = own if own.start > following.start else following
    raise EventStoreTimeoutError(
        f"{topic}: could not place offsets {dict(starts)} in time partitions within "
        f"{_MAX_WINDOW_STEPS} steps (broker timestamps far out of order?)"
    )


def _apply_step(
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: TopicIngest,
    decoded: DecodedBatch,
    partition: int,
    state: StateAccess | None,
    dimensions: Lookups | None,
    budget: WaitBudget,
) -> tuple[StepOutput | None, Rerun | None]:
    """Run the asset's stateful step over a decoded batch ((None, None) for a stateless
    asset); also returns how to re-run it on the records that survive the load.

    Events the EDW holds already are dropped first: state never counts an event twice.
    The step waits, within ``budget``, for change capture to cover the batch's event times;
    a re-run (records the database refused taken out) uses the same completeness, no wait.
    """
    if spec.step is None:
        return None, None
    if state is None or dimensions is None:
        raise ValueError(f"{spec.asset} has a stateful step: pass a state cache and lookups")
    step = spec.step
    rows = decoded.rows
    seen = existing_event_ids(conn, schemas, spec.contract, rows["event_id"].astype(str).tolist())
    rows = rows[~rows["event_id"].isin(seen)]
    completeness = wait_for_step(step, dimensions, rows, budget)

    def run(batch: pd.DataFrame) -> StepOutput:
        return apply_step(
            step,
            batch,
            conn=conn,
            state=state,
            shard=partition,
            lookups=dimensions,
            completeness=completeness,
        )

    def rerun(survivors: DecodedBatch) -> StepOutput:
        return run(rows[rows["kafka_offset"].isin(survivors.rows["kafka_offset"])])

    return run(rows), rerun


def run_batch(
    store: EventStore,
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: TopicIngest,
    requested: OffsetRange,
    *,
    run_id: str,
    max_batch: int,
    partition_key: str | None = None,
    cache: StateCache | None = None,
    dimensions: Lookups | None = None,
    max_wait_s: float = 0.0,
) -> BatchOutcome:
    """Load one topic partition's next batch, bounded by ``requested.end``, exactly once.

    With a stateful step, events already in the EDW are dropped before the step (state
    never counts an event twice), the step waits up to ``max_wait_s`` for change capture
    to cover the batch's event times, and its rows, side tables and state commit with
    the batch.
    """
    started = time.monotonic()
    topic, partition = requested.topic, requested.partition
    bounds = store.log_bounds(topic, [partition])[partition]
    epoch = store.topic_id(topic) or ""
    head = read_head(conn, schemas, spec.asset, topic, partition)
    check_continuity(spec.asset, topic, partition, head, bounds, epoch)
    start = head.end if head is not None else bounds.start
    end = min(requested.end, start + max_batch, bounds.end)
    # start < requested.start: the ledger was rewound after this range was planned (a
    # replay); the range may belong to another time partition now, the sensor plans afresh.
    skipped = (
        "superseded" if start < requested.start else "already loaded" if end <= start else None
    )
    if skipped is not None:
        return BatchOutcome(
            spec.asset,
            topic,
            partition,
            start,
            start,
            status=skipped,
            lag_after=bounds.end - start,
            seconds=time.monotonic() - started,
        )
    raw = store.fetch(topic, partition, start, end)
    decoded = decode_batch(raw, spec.contract)
    scoped = ScopedStateCache(cache, spec.asset) if cache is not None else None
    output, rerun = _apply_step(
        conn, schemas, spec, decoded, partition, scoped, dimensions, WaitBudget(max_wait_s)
    )
    record = BatchRecord(
        asset=spec.asset,
        source=topic,
        shard=partition,
        epoch=epoch,
        start=start,
        end=end,
        run_id=run_id,
        partition_key=partition_key,
        fresh=head is None,
    )
    final, load = commit_isolated(
        conn, schemas, spec.contract, record, raw, decoded, output=output, rerun=rerun, cache=scoped
    )
    decoded, output = load.decoded, load.output
    return BatchOutcome(
        asset=spec.asset,
        topic=topic,
        partition=partition,
        start=start,
        end=end,
        status="committed",
        received=final.received,
        loaded=final.loaded,
        dead_lettered=final.dead_lettered,
        deduplicated=final.deduplicated,
        lag_after=bounds.end - end,
        seconds=time.monotonic() - started,
        dead_letter_reasons=Counter(describe_reason(r) for r in decoded.dead_letters["reason"]),
        side_rows={
            name: len(frame) for name, frame in (output.side_tables if output else {}).items()
        },
        event_dates=event_dates(output.rows if output is not None else decoded.rows),
        probes=load.probes,
    )


def check_capture_continuity(spec: CaptureSpec, head: LedgerHead | None, epoch: str) -> None:
    """Raise :class:`LogResetError` when the change table is not the one the ledger read."""
    if head is not None and head.epoch != epoch:
        raise LogResetError(
            spec.asset,
            str(spec.change_table),
            0,
            f"was recreated: the ledger loaded transactions up to {head.end} of change table "
            f"{head.epoch}, the OLTP database now has {epoch}.",
        )


def run_capture_batch(
    oltp: psycopg.Connection,
    edw: psycopg.Connection,
    schemas: Schemas,
    spec: CaptureSpec,
    *,
    requested_end: int | None,
    run_id: str,
    max_changes: int,
    partition_key: str | None = None,
) -> BatchOutcome:
    """Apply the next committed changes of a captured table, bounded by ``requested_end``.

    Positions are transaction ids: the batch starts where the ledger ends (0 before the
    first batch) and never passes the snapshot horizon.
    """
    started = time.monotonic()
    source = str(spec.change_table)
    epoch = pg_capture.source_epoch(oltp, spec)
    head = read_head(edw, schemas, spec.asset, source, 0)
    check_capture_continuity(spec, head, epoch)
    requested = parse_key(partition_key) if partition_key else None
    last = parse_key(head.partition_key) if head is not None and head.partition_key else None
    if requested is not None and last is not None and requested.end <= last.start:
        # Visibility times only move forward: a closed partition takes no new batch.
        raise BatchSupersededError(
            f"{spec.asset}: partition {requested.key} is closed, the ledger already has "
            f"batches of {last.key}; the sensor plans the next batch there"
        )
    start = head.end if head is not None else 0
    complete_until = pg_capture.complete_until(oltp)  # before the horizon: see complete_until
    end = pg_capture.plan_end(oltp, spec, start, max_changes=max_changes)
    if requested_end is not None:
        end = min(end, max(requested_end, start))
    if end <= start:
        return BatchOutcome(
            spec.asset,
            source,
            0,
            start,
            start,
            status="already loaded",
            seconds=time.monotonic() - started,
        )
    changes = pg_capture.read_changes(oltp, spec, start, end)
    # The batch makes its target complete up to `complete_until` only if it takes every
    # ready change; a batch cut short keeps the completeness its predecessor recorded.
    cut_short = pg_capture.plan_end(oltp, spec, end, max_changes=1) > end
    watermark = (head.watermark if head is not None else None) if cut_short else complete_until
    record = BatchRecord(
        asset=spec.asset,
        source=source,
        shard=0,
        epoch=epoch,
        start=start,
        end=end,
        run_id=run_id,
        partition_key=partition_key,
        watermark=watermark,
        fresh=head is None,
    )
    received, applied, dead, probes = apply_changes(
        edw,
        schemas,
        spec,
        record,
        changes,
        history=lambda keys: pg_capture.read_key_history(oltp, spec, keys, end),
    )
    lag = pg_capture.capture_lag(oltp, spec, end)
    return BatchOutcome(
        asset=spec.asset,
        topic=source,
        partition=0,
        start=start,
        end=end,
        status="committed",
        received=received,
        loaded=applied,
        dead_lettered=dead,
        deduplicated=0,
        lag_after=lag.pending_changes,
        seconds=time.monotonic() - started,
        capture_lag=lag,
        probes=probes,
    )


@dataclass
class WindowOutcome:
    """What reprocessing one time partition did in one topic partition."""

    asset: str
    topic: str
    window: str
    partition: int
    start: int
    end: int
    status: str
    received: int = 0
    loaded: int = 0
    dead_lettered: int = 0
    deduplicated: int = 0
    removed_rows: int = 0
    batches: int = 0
    seconds: float = 0.0
    stale_from: str | None = None
    side_rows: Counter[str] = field(default_factory=Counter)
    event_dates: set[str] = field(default_factory=set)
    #: Extra writes it took to isolate records the database refused (0: none refused).
    probes: int = 0


def resolve_window(
    store: EventStore,
    topic: str,
    windows: TimeWindows,
    window: Window,
    partitions: list[int],
    *,
    ahead: EventStore | None = None,
) -> tuple[dict[int, LogBounds], dict[int, tuple[int, int]]]:
    """The log bounds and each partition's offsets ``[start, end)`` of ``window``
    (``offsets_for_times`` of its start and end; the log start for the first window, the
    log end while the window is open). With a second consumer (``ahead``), the ends are
    searched on it while the starts are on ``store``, at the same time."""
    bounds = store.log_bounds(topic, partitions)

    def starts_of() -> dict[int, int | None]:
        if windows.is_first(window):
            return dict.fromkeys(partitions)
        return store.boundaries(topic, partitions, window.start_ms, bounds=bounds)

    if ahead is None:
        starts = starts_of()
        ends = store.boundaries(topic, partitions, window.end_ms, bounds=bounds)
    else:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(ahead.boundaries, topic, partitions, window.end_ms, bounds=bounds)
            starts = starts_of()
            ends = pending.result()
    resolved: dict[int, tuple[int, int]] = {}
    for p in partitions:
        found_start, found_end = starts[p], ends[p]
        if windows.is_first(window):
            start = bounds[p].start
        else:
            start = found_start if found_start is not None else bounds[p].end
        end = found_end if found_end is not None else bounds[p].end
        resolved[p] = (start, max(start, end))
    return bounds, resolved


class _ChunkReader:
    """The chunks of a reprocessed window, fetched and decoded in order; with a second
    consumer (``ahead``), the next chunk is fetched and decoded in a thread while the
    current one is stepped and written (the database's time and the broker's overlap, as
    a live run's partitions do in their threads). At most two chunks are in memory."""

    def __init__(
        self,
        store: EventStore,
        ahead: EventStore | None,
        topic: str,
        contract: EventContract,
        chunks: list[tuple[int, int, int]],
        pool: ThreadPoolExecutor | None,
    ) -> None:
        self.store = store
        self.ahead = ahead
        self.topic = topic
        self.contract = contract
        self.chunks = chunks
        self.pool = pool
        self.next = 0
        self.pending: Future[tuple[RawBatch, DecodedBatch]] | None = None
        self._submit()

    def _read(
        self, chunk: tuple[int, int, int], store: EventStore
    ) -> tuple[RawBatch, DecodedBatch]:
        partition, start, end = chunk
        raw = store.fetch(self.topic, partition, start, end)
        return raw, decode_batch(raw, self.contract)

    def _submit(self) -> None:
        if self.pool is not None and self.ahead is not None and self.next < len(self.chunks):
            self.pending = self.pool.submit(self._read, self.chunks[self.next], self.ahead)

    def read(self, partition: int, start: int, end: int) -> tuple[RawBatch, DecodedBatch]:
        """The chunk ``[start, end)`` of ``partition``: the next one planned."""
        chunk = self.chunks[self.next]
        assert chunk == (partition, start, end), (chunk, (partition, start, end))
        self.next += 1
        if self.pending is None:
            return self._read(chunk, self.store)
        done, self.pending = self.pending, None
        self._submit()
        return done.result()


def reprocess_window(
    store: EventStore,
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: TopicIngest,
    windows: TimeWindows,
    window: Window,
    *,
    run_id: str,
    max_batch: int,
    dimensions: Lookups | None = None,
    max_wait_s: float = 0.0,
    budget: WaitBudget | None = None,
    from_positions: Mapping[int, int] | None = None,
    read_ahead: EventStore | None = None,
) -> list[WindowOutcome]:
    """Replace time partition ``window`` of ``spec.asset`` from the log, in one transaction.

    With ``from_positions`` only a part is re-derived: in each topic partition it names,
    from that position on (a ledger batch boundary inside the window, whose state the state
    versions hold, so the rows equal those of a whole re-derivation); the topic partitions
    it leaves out keep what they hold (status ``kept``).

    ``read_ahead``: a second consumer (not used elsewhere meanwhile) that reads the next
    chunk while the current one is written.

    Every topic partition's offsets of the window are resolved with ``offsets_for_times``;
    each is deleted and reloaded in batches of at most ``max_batch`` (ledger rows included),
    a stateful step starting from the state checkpointed at the window's start. The step
    waits for change capture at most ``max_wait_s`` for the whole window (one deadline
    shared by every chunk of every topic partition, or ``budget``); rows still newer than
    change capture are ``provisional``, which healing re-derives. A reset log,
    expired offsets, a predecessor not loaded or a missing checkpoint raise before anything
    is deleted (:class:`LogResetError`, :class:`ReprocessError`).
    """
    topic = spec.topic
    partitions = store.partitions(topic)
    epoch = store.topic_id(topic) or ""
    bounds, resolved = resolve_window(store, topic, windows, window, partitions, ahead=read_ahead)
    heads = read_heads(conn, schemas, spec.asset, topic)
    for p in partitions:
        check_continuity(spec.asset, topic, p, heads.get(p), bounds[p], epoch)
    budget = budget if budget is not None else WaitBudget(max_wait_s)
    # Where each topic partition's re-derivation starts (None: kept as it is).
    starts: dict[int, int | None] = {p: resolved[p][0] for p in partitions}
    if from_positions is not None:
        starts = {
            p: max(resolved[p][0], from_positions[p]) if p in from_positions else None
            for p in partitions
        }
    chunks = [
        (p, chunk_start, min(chunk_start + max_batch, resolved[p][1]))
        for p in partitions
        if (begin := starts[p]) is not None
        for chunk_start in range(begin, resolved[p][1], max_batch)
    ]
    with ExitStack() as stack:
        pool = (
            stack.enter_context(ThreadPoolExecutor(max_workers=1))
            if read_ahead is not None and len(chunks) > 1
            else None
        )
        # Registered after the pool: on the way out the pending read is cancelled first.
        reader = _ChunkReader(store, read_ahead, topic, spec.contract, chunks, pool)
        stack.callback(lambda: reader.pending.cancel() if reader.pending else None)
        outcomes = _replace_chunks(
            conn,
            schemas,
            spec,
            window,
            partitions,
            resolved,
            starts,
            reader,
            bounds=bounds,
            epoch=epoch,
            run_id=run_id,
            max_batch=max_batch,
            dimensions=dimensions,
            budget=budget,
        )
    return outcomes


def _replace_chunks(
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: TopicIngest,
    window: Window,
    partitions: list[int],
    resolved: Mapping[int, tuple[int, int]],
    starts: Mapping[int, int | None],
    reader: _ChunkReader,
    *,
    bounds: Mapping[int, LogBounds],
    epoch: str,
    run_id: str,
    max_batch: int,
    dimensions: Lookups | None,
    budget: WaitBudget,
) -> list[WindowOutcome]:
    """The body of :func:`reprocess_window`: its one transaction."""
    topic = spec.topic
    backend = PostgresStateBackend(schemas)
    outcomes: list[WindowOutcome] = []
    with conn.transaction():  # every topic partition of the window, or none
        for p in partitions:
            started = time.monotonic()
            opening, end = resolved[p]
            begin = starts[p]
            if begin is None:
                outcomes.append(
                    WindowOutcome(spec.asset, topic, window.key, p, opening, opening, "kept")
                )
                continue
            start = begin
            outcome = WindowOutcome(spec.asset, topic, window.key, p, start, end, "empty")
            outcomes.append(outcome)
            if end <= start:
                continue
            record = BatchRecord(spec.asset, topic, p, epoch, start, end, run_id, window.key)
            state = AsOfStateCache(backend, spec.asset, start) if spec.step is not None else None
            with replace_window(
                conn,
                schemas,
                table=spec.contract.table,
                record=record,
                log_start=bounds[p].start,
                stateful=spec.step is not None,
                side_tables=spec.step.side_tables if spec.step is not None else (),
                partition_start=opening,
            ) as replaced:
                for chunk_start in range(start, end, max_batch):
                    chunk = replace(
                        record, start=chunk_start, end=min(chunk_start + max_batch, end)
                    )
                    raw, decoded = reader.read(p, chunk.start, chunk.end)
                    output, rerun = _apply_step(
                        conn, schemas, spec, decoded, p, state, dimensions, budget
                    )
                    counts = BatchCounts()
                    # The same isolation as live batches: replay gives the same dead letters.
                    load = write_isolated(
                        conn,
                        schemas,
                        spec.contract,
                        chunk,
                        raw,
                        decoded,
                        counts,
                        output=output,
                        rerun=rerun,
                        cache=state,
                    )
                    decoded, output = load.decoded, load.output
                    outcome.probes += load.probes
                    insert_ledger_row(conn, schemas, chunk, counts)
                    if output is not None and state is not None:
                        for name, values in output.state.items():
                            state.remember(name, p, values)
                        outcome.side_rows.update(
                            {name: len(frame) for name, frame in output.side_tables.items()}
                        )
                    outcome.event_dates |= event_dates(
                        output.rows if output is not None else decoded.rows
                    )
                    outcome.received += counts.received
                    outcome.loaded += counts.loaded
                    outcome.dead_lettered += counts.dead_lettered
                    outcome.deduplicated += counts.deduplicated
                    outcome.batches += 1
            outcome.status = "replaced"
            outcome.removed_rows = replaced.removed_rows
            outcome.stale_from = replaced.stale_from
            outcome.seconds = time.monotonic() - started
    return outcomes


def reprocess_capture_window(
    oltp: psycopg.Connection,
    edw: psycopg.Connection,
    schemas: Schemas,
    spec: CaptureSpec,
    window: str,
    *,
    run_id: str,
) -> WindowOutcome:
    """Replace time partition ``window`` of a captured table, in one transaction: the
    transactions its ledger batches cover are read again from the change table and every key
    they touched is rebuilt (see :func:`kappa.changes.replace.replace_capture_window`)."""
    started = time.monotonic()
    source = str(spec.change_table)
    epoch = pg_capture.source_epoch(oltp, spec)
    replaced = replace_capture_window(
        edw,
        schemas,
        spec,
        epoch=epoch,
        window=window,
        run_id=run_id,
        read=lambda start, end: pg_capture.read_changes(oltp, spec, start, end),
        history=lambda keys, end: pg_capture.read_key_history(oltp, spec, keys, end),
    )
    if replaced is None:
        return WindowOutcome(
            spec.asset, source, window, 0, 0, 0, "empty", seconds=time.monotonic() - started
        )
    return WindowOutcome(
        spec.asset,
        source,
        window,
        0,
        replaced.start,
        replaced.end,
        "replaced",
        received=replaced.received,
        loaded=replaced.loaded,
        dead_lettered=replaced.dead_lettered,
        removed_rows=replaced.removed_rows,
        batches=1,
        seconds=time.monotonic() - started,
        probes=replaced.probes,
    )
