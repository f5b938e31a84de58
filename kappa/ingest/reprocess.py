"""Reprocessing one time partition of a topic asset from the retained log (a backfill, or a heal
of its tail): the window's offsets, the chunks read ahead on a second consumer, the
replacement in one transaction per shard.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace

import psycopg

from kappa.catalog.streams import EventContract
from kappa.decode.batch import DecodedBatch, decode_batch
from kappa.edw.ledger import insert_ledger_row, read_heads
from kappa.edw.poison import write_isolated
from kappa.edw.types import BatchCounts, BatchRecord, Schemas
from kappa.edw.window import replace_window
from kappa.ingest.outcome import WindowOutcome
from kappa.ingest.plan import (
    TopicIngest,
    event_dates,
)
from kappa.ingest.topic import step_batch
from kappa.partitions import TimeWindows, Window
from kappa.sources.base import LogBounds, RawBatch, check_continuity
from kappa.sources.topic import EventStore
from kappa.state import AsOfStateCache
from kappa.state.postgres import PostgresStateBackend
from kappa.steps.completeness import WaitBudget
from kappa.steps.context import Lookups


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
                    output, rerun = step_batch(
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
