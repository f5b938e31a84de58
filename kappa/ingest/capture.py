"""Micro-batches and partition replacements of captured tables: a range of transactions of a
change table applied to its target, exactly once, with the ledger.
"""

from __future__ import annotations

import time

import psycopg

from kappa.catalog.captures import CaptureSpec
from kappa.changes.merge import apply_changes
from kappa.changes.replace import replace_capture_window
from kappa.edw.ledger import read_head
from kappa.edw.types import BatchRecord, Schemas
from kappa.exceptions import BatchSupersededError
from kappa.ingest.outcome import BatchOutcome, WindowOutcome, trim_range
from kappa.partitions import parse_key
from kappa.sources import pg_capture
from kappa.sources.base import TRANSACTIONS, check_continuity


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
    check_continuity(spec.asset, source, 0, head, None, epoch, positions=TRANSACTIONS)
    requested = parse_key(partition_key) if partition_key else None
    last = parse_key(head.partition_key) if head is not None and head.partition_key else None
    if requested is not None and last is not None and requested.end <= last.start:
        # Visibility times only move forward: a closed partition takes no new batch.
        raise BatchSupersededError(
            f"{spec.asset}: partition {requested.key} is closed, the ledger already has "
            f"batches of {last.key}; the sensor plans the next batch there"
        )
    complete_until = pg_capture.complete_until(oltp)  # before the horizon: see complete_until
    trimmed = trim_range(
        head,
        first=0,
        ready_end=lambda start: pg_capture.plan_end(oltp, spec, start, max_changes=max_changes),
        requested_start=None,
        requested_end=requested_end,
    )
    start, end = trimmed.start, trimmed.end
    if trimmed.skipped is not None:
        return BatchOutcome(
            spec.asset,
            source,
            0,
            start,
            start,
            status=trimmed.skipped,
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
