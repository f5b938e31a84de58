"""Micro-batches of tables captured from a MariaDB binlog: a range of GTID sequence numbers
applied to the target exactly once, with the ledger, through the same batch function and merge
as PostgreSQL change tables. A time partition is reprocessed like theirs:
:func:`kappa.ingest.reprocess.reprocess_window` with
:class:`kappa.ingest.capture.ChangeWindowLoader` over the :class:`BinlogTable`.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

import psycopg

from kappa.catalog.files import SETTING
from kappa.changes.merge import apply_changes
from kappa.edw.types import BatchRecord, LedgerHead, Schemas
from kappa.exceptions import ConfigurationError
from kappa.ingest.batch import run_source_batch
from kappa.ingest.capture import refuse_closed_partition
from kappa.ingest.outcome import BatchOutcome
from kappa.sources.mariadb_binlog import BinlogTable


def run_binlog_batch(
    source: BinlogTable,
    edw: psycopg.Connection,
    schemas: Schemas,
    *,
    requested_end: int | None,
    run_id: str,
    max_changes: int,
    partition_key: str | None = None,
) -> BatchOutcome:
    """Apply the next committed transactions of a MariaDB table, bounded by ``requested_end``.

    Positions are GTID sequence numbers: the batch starts where the ledger ends (the oldest
    retained transaction before the first batch) and ends at a transaction boundary.
    """
    spec = source.spec
    return run_source_batch(
        source,
        edw,
        schemas,
        spec.asset,
        0,
        BinlogLoader(source, edw, schemas, max_changes, partition_key),
        bounds=source.bounds([0])[0],
        requested_start=None,
        requested_end=requested_end,
        run_id=run_id,
        partition_key=partition_key,
    )


def refuse_partial_history(source: BinlogTable) -> None:
    """Before a table's first batch: a binlog whose oldest transactions were purged cannot
    give the rows they wrote, so the target would silently lack them: refused, naming the
    purged range and the catalogue's way out, before anything is read or written."""
    first = source.bounds([0])[0].start
    if first > 1:
        spec = source.spec
        raise ConfigurationError(
            SETTING,
            f"{spec.asset}: the binlog of {spec.source} starts at GTID sequence number {first} "
            f"of domain {source.domain}: transactions [1, {first}) were purged, so rows the "
            f"table got from them would never reach {spec.target}. Capture it from a server "
            "whose binlog holds its whole history, or, if the table was created since (or "
            f"its older rows are not needed), set `start: oldest_retained` on {spec.name} "
            "in the catalogue",
        )


class BinlogLoader:
    """A binlog table's part of a batch: whole transactions, validated and merged into the
    target, with the completeness the batch gives it."""

    def __init__(
        self,
        source: BinlogTable,
        edw: psycopg.Connection,
        schemas: Schemas,
        max_changes: int,
        partition_key: str | None,
    ) -> None:
        self.source = source
        self.edw = edw
        self.schemas = schemas
        self.spec = source.spec
        self.max_changes = max_changes
        self.partition_key = partition_key
        self.complete_until: datetime | None = None
        #: The binlog's end when the batch was planned, and how far planning read it.
        self.written = 0
        self.read_to = 0

    def admit(self, head: LedgerHead | None) -> None:
        refuse_closed_partition(self.spec.asset, self.partition_key, head)
        if head is None and self.spec.start == "history":
            refuse_partial_history(self.source)
        # Before planning reads the binlog's end: a transaction open now commits later.
        self.complete_until = self.source.open_since()

    def ready_end(self, start: int) -> int:
        self.written = self.source.bounds([0])[0].end
        self.read_to = self.source.plan_end(start, max_changes=self.max_changes)
        return self.read_to

    def lag(self, position: int) -> int:
        return 0

    def _cut_watermark(self, start: int, end: int, head: LedgerHead | None) -> datetime | None:
        """The completeness of a batch that stops before what the binlog held: a run's range
        was planned by its sensor a few seconds before, so in a live stream nearly every batch
        ends before the binlog's end by the time it runs. The transactions left out
        (``[end, written)``) were read with the batch's plan when that read reached the
        binlog's end: the target is complete up to their earliest change of the table (none:
        they changed other tables, and up to ``complete_until``). A read stopped short by the
        batch bound keeps the predecessor's completeness."""
        if self.complete_until is None or self.read_to < self.written:
            return head.watermark if head is not None else None
        later = self.source.read(0, start, self.read_to)
        times = later.loc[later["xid"] >= end, "change_time"]
        if times.empty:
            return self.complete_until
        # Binlog event times are whole seconds, never after the statement: an earlier bound.
        return min(self.complete_until, times.min().to_pydatetime())

    def load(self, record: BatchRecord, head: LedgerHead | None) -> BatchOutcome:
        source, spec, start, end = self.source, self.spec, record.start, record.end
        changes = source.read(0, start, end)
        written = self.written
        watermark = self.complete_until
        if end < written:
            watermark = self._cut_watermark(start, end, head)
        received, applied, dead, probes = apply_changes(
            self.edw,
            self.schemas,
            spec,
            replace(record, watermark=watermark),
            changes,
        )
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
            lag_after=max(0, written - end),
            probes=probes,
        )
