"""Micro-batches and partition replacements of captured tables: a range of transactions of a
change table applied to its target, exactly once, with the ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import replace
from datetime import datetime

import psycopg

from kappa.catalog.captures import CaptureSpec
from kappa.changes.merge import apply_changes
from kappa.changes.replace import reload_capture_window
from kappa.edw.types import BatchRecord, LedgerHead, Schemas
from kappa.edw.window import WindowReplacement
from kappa.exceptions import BatchSupersededError
from kappa.ingest.batch import run_source_batch
from kappa.ingest.outcome import BatchOutcome, WindowOutcome
from kappa.partitions import parse_key
from kappa.sources import pg_capture
from kappa.sources.base import ChangeSource, Source


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
    source = pg_capture.ChangeTable(oltp, spec)
    return run_source_batch(
        source,
        edw,
        schemas,
        spec.asset,
        0,
        ChangeLoader(source, edw, schemas, spec, max_changes, partition_key),
        bounds=None,
        requested_start=None,
        requested_end=requested_end,
        run_id=run_id,
        partition_key=partition_key,
    )


def refuse_closed_partition(asset: str, partition_key: str | None, head: LedgerHead | None) -> None:
    """A change batch for a partition before the one the ledger reached is superseded: change
    times only move forward, so a closed partition takes no new batch (any change source)."""
    requested = parse_key(partition_key) if partition_key else None
    last = parse_key(head.partition_key) if head is not None and head.partition_key else None
    if requested is not None and last is not None and requested.end <= last.start:
        raise BatchSupersededError(
            f"{asset}: partition {requested.key} is closed, the ledger already has "
            f"batches of {last.key}; the sensor plans the next batch there"
        )


class ChangeLoader:
    """A change table's part of a batch: whole transactions below the horizon, validated and
    merged into the target, with the completeness the batch gives it."""

    def __init__(
        self,
        source: pg_capture.ChangeTable,
        edw: psycopg.Connection,
        schemas: Schemas,
        spec: CaptureSpec,
        max_changes: int,
        partition_key: str | None,
    ) -> None:
        self.source = source
        self.oltp = source.conn
        self.edw = edw
        self.schemas = schemas
        self.spec = spec
        self.max_changes = max_changes
        self.partition_key = partition_key
        self.complete_until: datetime | None = None

    def admit(self, head: LedgerHead | None) -> None:
        refuse_closed_partition(self.spec.asset, self.partition_key, head)
        # Before the horizon, which planning reads: see complete_until.
        self.complete_until = pg_capture.complete_until(self.oltp)

    def ready_end(self, start: int) -> int:
        return pg_capture.plan_end(self.oltp, self.spec, start, max_changes=self.max_changes)

    def lag(self, position: int) -> int:
        # A batch that applies nothing reports no lag: counting the pending changes scans
        # the change table, and the sensor reads the lag on its own tick.
        return 0

    def load(self, record: BatchRecord, head: LedgerHead | None) -> BatchOutcome:
        oltp, spec, start, end = self.oltp, self.spec, record.start, record.end
        changes = self.source.read(0, start, end)
        # The batch makes its target complete up to `complete_until` only if it takes every
        # ready change; a batch cut short keeps the completeness its predecessor recorded.
        cut_short = pg_capture.plan_end(oltp, spec, end, max_changes=1) > end
        watermark = (
            (head.watermark if head is not None else None) if cut_short else self.complete_until
        )
        received, applied, dead, probes = apply_changes(
            self.edw,
            self.schemas,
            spec,
            replace(record, watermark=watermark),
            changes,
            history=lambda keys: pg_capture.read_key_history(oltp, spec, keys, end),
        )
        lag = pg_capture.capture_lag(oltp, spec, end)
        return BatchOutcome(
            asset=spec.asset,
            topic=record.source,
            partition=0,
            start=start,
            end=end,
            status="committed",
            received=received,
            loaded=applied,
            dead_lettered=dead,
            deduplicated=0,
            lag_after=lag.pending_changes,
            capture_lag=lag,
            probes=probes,
        )


class ChangeWindowLoader:
    """A captured table's part of reprocessing a time partition (see
    :func:`kappa.ingest.reprocess.reprocess_window`), for every kind of change source (a
    PostgreSQL change table, a MariaDB binlog): the transactions its ledger batches cover are
    read again and every key they touched is rebuilt from its history (see
    :func:`kappa.changes.replace.reload_capture_window`)."""

    stateful = False
    checkpoints = False

    def __init__(
        self,
        source: ChangeSource,
        edw: psycopg.Connection,
        schemas: Schemas,
        spec: CaptureSpec,
    ) -> None:
        self.source = source
        self.edw = edw
        self.schemas = schemas
        self.spec = spec

    def begin(
        self,
        plan: Mapping[int, tuple[int, int]],
        stack: ExitStack,
        read_ahead: Source | None,
    ) -> None:
        return None

    def reload(
        self, record: BatchRecord, replaced: WindowReplacement, outcome: WindowOutcome
    ) -> None:
        done = reload_capture_window(
            self.edw,
            self.schemas,
            self.spec,
            record,
            head_end=replaced.head_end,
            read=lambda start, end: self.source.read(0, start, end),
            history=self.source.key_history,
        )
        replaced.removed_rows = done.removed_rows
        outcome.received += done.received
        outcome.loaded += done.loaded
        outcome.dead_lettered += done.dead_lettered
        outcome.probes += done.probes
        outcome.batches += 1
