"""A topic partition's part of reprocessing a time partition (see
:func:`kappa.ingest.reprocess.reprocess_window`): the window's offsets deleted and reloaded in
chunks, read ahead on a second consumer, decoded, stepped from the state as of the window's
start and written with the isolation live batches use.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace

import psycopg

from kappa.catalog.streams import EventContract
from kappa.decode.batch import DecodedBatch, decode_batch
from kappa.edw.ledger import insert_ledger_row
from kappa.edw.poison import write_isolated
from kappa.edw.replay import delete_positions
from kappa.edw.types import BatchCounts, BatchRecord, Schemas
from kappa.edw.window import WindowReplacement
from kappa.ingest.outcome import WindowOutcome
from kappa.ingest.plan import TopicIngest, event_dates
from kappa.ingest.topic import step_batch
from kappa.sources.base import RawBatch, Source
from kappa.state import AsOfStateCache
from kappa.state.postgres import PostgresStateBackend
from kappa.steps.completeness import WaitBudget
from kappa.steps.context import Lookups

#: One chunk of a reprocessed window: (shard, start, end).
Chunk = tuple[int, int, int]


class _ChunkReader:
    """The chunks of a reprocessed window, read and decoded in order; with a second reader
    (``ahead``), the next chunk is read and decoded in a thread while the current one is
    stepped and written (the database's time and the broker's overlap, as a live run's
    partitions do in their threads). At most two chunks are in memory."""

    def __init__(
        self,
        source: Source,
        ahead: Source | None,
        contract: EventContract,
        chunks: list[Chunk],
        pool: ThreadPoolExecutor | None,
    ) -> None:
        self.source = source
        self.ahead = ahead
        self.contract = contract
        self.chunks = chunks
        self.pool = pool
        self.next = 0
        self.pending: Future[tuple[RawBatch, DecodedBatch]] | None = None
        self._submit()

    def _read(self, chunk: Chunk, source: Source) -> tuple[RawBatch, DecodedBatch]:
        shard, start, end = chunk
        raw = source.read(shard, start, end)
        return raw, decode_batch(raw, self.contract)

    def _submit(self) -> None:
        if self.pool is not None and self.ahead is not None and self.next < len(self.chunks):
            self.pending = self.pool.submit(self._read, self.chunks[self.next], self.ahead)

    def read(self, shard: int, start: int, end: int) -> tuple[RawBatch, DecodedBatch]:
        """The chunk ``[start, end)`` of ``shard``: the next one planned."""
        chunk = self.chunks[self.next]
        assert chunk == (shard, start, end), (chunk, (shard, start, end))
        self.next += 1
        if self.pending is None:
            return self._read(chunk, self.source)
        done, self.pending = self.pending, None
        self._submit()
        return done.result()


class EventWindowLoader:
    """Reloads a topic asset's window in batches of at most ``max_batch`` offsets (ledger rows
    included), a stateful step starting from the state checkpointed at the window's start.

    The step waits for change capture within ``budget``, one deadline for the whole window
    (every chunk of every topic partition); rows still newer than change capture are
    ``provisional``, which healing re-derives. A budget is spent once: make one loader per
    window.
    """

    checkpoints = True

    def __init__(
        self,
        source: Source,
        conn: psycopg.Connection,
        schemas: Schemas,
        spec: TopicIngest,
        *,
        max_batch: int,
        dimensions: Lookups | None = None,
        budget: WaitBudget | None = None,
    ) -> None:
        self.source = source
        self.conn = conn
        self.schemas = schemas
        self.spec = spec
        self.max_batch = max_batch
        self.dimensions = dimensions
        self.budget = budget if budget is not None else WaitBudget(0.0)
        self.stateful = spec.step is not None
        self.backend = PostgresStateBackend(schemas)
        self.reader: _ChunkReader | None = None

    def begin(
        self,
        plan: Mapping[int, tuple[int, int]],
        stack: ExitStack,
        read_ahead: Source | None,
    ) -> None:
        chunks = [
            (shard, chunk_start, min(chunk_start + self.max_batch, end))
            for shard, (start, end) in plan.items()
            for chunk_start in range(start, end, self.max_batch)
        ]
        pool = (
            stack.enter_context(ThreadPoolExecutor(max_workers=1))
            if read_ahead is not None and len(chunks) > 1
            else None
        )
        # Registered after the pool: on the way out the pending read is cancelled first.
        reader = _ChunkReader(self.source, read_ahead, self.spec.contract, chunks, pool)
        stack.callback(lambda: reader.pending.cancel() if reader.pending else None)
        self.reader = reader

    def reload(
        self, record: BatchRecord, replaced: WindowReplacement, outcome: WindowOutcome
    ) -> None:
        conn, schemas, spec, shard = self.conn, self.schemas, self.spec, record.shard
        assert self.reader is not None, "begin() first"
        step = spec.step
        replaced.removed_rows, _ = delete_positions(
            conn,
            schemas,
            spec.contract.table,
            record.asset,
            record.source,
            shard,
            record.start,
            replaced.held_end,
            [t.name for t in step.side_tables] if step is not None else (),
        )
        state = AsOfStateCache(self.backend, spec.asset, record.start) if step is not None else None
        for chunk_start in range(record.start, record.end, self.max_batch):
            chunk = replace(
                record, start=chunk_start, end=min(chunk_start + self.max_batch, record.end)
            )
            raw, decoded = self.reader.read(shard, chunk.start, chunk.end)
            output, rerun = step_batch(
                conn, schemas, spec, decoded, shard, state, self.dimensions, self.budget
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
                    state.remember(name, shard, values)
                outcome.side_rows.update(
                    {name: len(frame) for name, frame in output.side_tables.items()}
                )
            outcome.event_dates |= event_dates(output.rows if output is not None else decoded.rows)
            outcome.received += counts.received
            outcome.loaded += counts.loaded
            outcome.dead_lettered += counts.dead_lettered
            outcome.deduplicated += counts.deduplicated
            outcome.batches += 1
