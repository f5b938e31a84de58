"""Micro-batch ingestion of topic partitions into the EDW, without Dagster.

The sensor plans offset ranges with :func:`plan_ranges`; a run executes each range with
:func:`run_batch`. Both consult the ledger, which is the only truth about where a shard's
next batch starts: a requested range is a hint that the ledger trims or extends.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg

from kappa import cdc
from kappa.capture import CaptureSpec
from kappa.contracts import EventContract
from kappa.decode import decode_batch, describe_reason
from kappa.dimensions import apply_changes
from kappa.event_store import EventStore, LogBounds
from kappa.exceptions import LogResetError
from kappa.state import ScopedStateCache, StateCache
from kappa.stateful import Dimensions, StatefulStep, wait_for_dimensions
from kappa.warehouse import (
    BatchRecord,
    LedgerHead,
    Schemas,
    commit_batch,
    existing_event_ids,
    read_head,
)


@dataclass(frozen=True)
class TopicIngest:
    """One topic loaded into one EDW asset: configuration, not code per topic."""

    asset: str
    topic: str
    contract: EventContract
    description: str = ""
    step: StatefulStep | None = None


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
    capture_lag: cdc.CaptureLag | None = None


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
) -> list[OffsetRange]:
    """The next range of each partition that has new offsets and no batch in flight.

    A range starts where the ledger ends (or at the log start before the first batch) and
    takes everything up to the log end, capped at ``max_batch``: small when caught up,
    as large as allowed when lagging. The run total stays within ``max_run``; the most
    lagging partitions are served first.
    """
    candidates: list[OffsetRange] = []
    for partition in sorted(bounds):
        if partition in busy:
            continue
        head = heads.get(partition)
        start = head.end if head is not None else bounds[partition].start
        end = min(bounds[partition].end, start + max_batch)
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
    dimensions: Dimensions | None = None,
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
    if end <= start:
        return BatchOutcome(
            spec.asset,
            topic,
            partition,
            start,
            start,
            status="already loaded",
            lag_after=bounds.end - start,
            seconds=time.monotonic() - started,
        )
    raw = store.fetch(topic, partition, start, end)
    decoded = decode_batch(raw, spec.contract)
    output = None
    if spec.step is not None:
        if cache is None or dimensions is None:
            raise ValueError(f"{spec.asset} has a stateful step: pass a state cache and dimensions")
        rows = decoded.rows
        seen = existing_event_ids(
            conn, schemas, spec.contract, rows["event_id"].astype(str).tolist()
        )
        rows = rows[~rows["event_id"].isin(seen)]
        watermark = (
            wait_for_dimensions(dimensions, rows["event_time"].max(), max_wait_s=max_wait_s)
            if not rows.empty
            else None
        )
        scoped = ScopedStateCache(cache, spec.asset)
        output = spec.step.apply(conn, scoped, dimensions, partition, rows, watermark)
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
    if output is None:
        final = commit_batch(conn, schemas, spec.contract, record, decoded)
    else:
        final = commit_batch(
            conn,
            schemas,
            spec.contract,
            record,
            decoded,
            rows=output.rows,
            side_tables=output.side_tables,
            state=output.state,
            cache=scoped,
        )
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
    epoch = cdc.source_epoch(oltp, spec)
    head = read_head(edw, schemas, spec.asset, source, 0)
    check_capture_continuity(spec, head, epoch)
    start = head.end if head is not None else 0
    complete_until = cdc.complete_until(oltp)  # before the horizon: see complete_until
    end = cdc.plan_end(oltp, spec, start, max_changes=max_changes)
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
    changes = cdc.read_changes(oltp, spec, start, end)
    # The batch makes dim_customer complete up to `complete_until` only if it takes every
    # ready change; a batch cut short keeps the completeness its predecessor recorded.
    cut_short = cdc.plan_end(oltp, spec, end, max_changes=1) > end
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
    received, applied, dead = apply_changes(
        edw,
        schemas,
        spec,
        record,
        changes,
        history=lambda keys: cdc.read_key_history(oltp, spec, keys, end),
    )
    lag = cdc.capture_lag(oltp, spec, end)
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
    )
