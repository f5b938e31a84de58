"""Micro-batch ingestion of topic partitions into the EDW, without Dagster.

The sensor plans offset ranges with :func:`plan_ranges`; a run executes each range with
:func:`run_batch`. Both consult the ledger, which is the only truth about where a shard's
next batch starts: a requested range is a hint that the ledger trims or extends.
"""

from __future__ import annotations

from collections import Counter

import pandas as pd
import psycopg

from kappa.decode.batch import DecodedBatch, decode_batch, describe_reason
from kappa.edw.ledger import existing_event_ids
from kappa.edw.poison import Rerun, commit_isolated
from kappa.edw.types import BatchRecord, LedgerHead, Schemas
from kappa.ingest.batch import run_source_batch
from kappa.ingest.outcome import BatchOutcome
from kappa.ingest.plan import (
    OffsetRange,
    TopicIngest,
    event_dates,
)
from kappa.sources.base import LogBounds
from kappa.sources.topic import EventStore, TopicPartitions
from kappa.state import ScopedStateCache, StateAccess, StateCache
from kappa.steps.api import StepOutput
from kappa.steps.completeness import WaitBudget
from kappa.steps.context import Lookups
from kappa.steps.engine import apply_step, wait_for_step


def step_batch(
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
    source = TopicPartitions(store, requested.topic)
    bounds = source.bounds([requested.partition])[requested.partition]
    loader = EventLoader(
        source, conn, schemas, spec, bounds, max_batch, cache, dimensions, max_wait_s
    )
    return run_source_batch(
        source,
        conn,
        schemas,
        spec.asset,
        requested.partition,
        loader,
        bounds=bounds,
        requested_start=requested.start,
        requested_end=requested.end,
        run_id=run_id,
        partition_key=partition_key,
    )


class EventLoader:
    """A topic partition's part of a batch: decode, the stateful step, COPY with isolation
    of what the database refuses."""

    def __init__(
        self,
        source: TopicPartitions,
        conn: psycopg.Connection,
        schemas: Schemas,
        spec: TopicIngest,
        bounds: LogBounds,
        max_batch: int,
        cache: StateCache | None,
        dimensions: Lookups | None,
        max_wait_s: float,
    ) -> None:
        self.source = source
        self.conn = conn
        self.schemas = schemas
        self.spec = spec
        self.bounds = bounds
        self.max_batch = max_batch
        self.cache = cache
        self.dimensions = dimensions
        self.max_wait_s = max_wait_s

    def admit(self, head: LedgerHead | None) -> None:
        return None

    def ready_end(self, start: int) -> int:
        return min(start + self.max_batch, self.bounds.end)

    def lag(self, position: int) -> int:
        return self.bounds.end - position

    def load(self, record: BatchRecord, head: LedgerHead | None) -> BatchOutcome:
        conn, schemas, spec, partition = self.conn, self.schemas, self.spec, record.shard
        raw = self.source.read(partition, record.start, record.end)
        decoded = decode_batch(raw, spec.contract)
        scoped = ScopedStateCache(self.cache, spec.asset) if self.cache is not None else None
        budget = WaitBudget(self.max_wait_s)
        output, rerun = step_batch(
            conn, schemas, spec, decoded, partition, scoped, self.dimensions, budget
        )
        final, load = commit_isolated(
            conn,
            schemas,
            spec.contract,
            record,
            raw,
            decoded,
            output=output,
            rerun=rerun,
            cache=scoped,
        )
        decoded, output = load.decoded, load.output
        return BatchOutcome(
            asset=spec.asset,
            topic=record.source,
            partition=partition,
            start=record.start,
            end=record.end,
            status="committed",
            received=final.received,
            loaded=final.loaded,
            dead_lettered=final.dead_lettered,
            deduplicated=final.deduplicated,
            lag_after=self.bounds.end - record.end,
            dead_letter_reasons=Counter(describe_reason(r) for r in decoded.dead_letters["reason"]),
            side_rows={
                name: len(frame) for name, frame in (output.side_tables if output else {}).items()
            },
            event_dates=event_dates(output.rows if output is not None else decoded.rows),
            probes=load.probes,
            capture_wait_s=budget.waited_s,
        )
