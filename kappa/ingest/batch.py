"""One micro-batch of any source, exactly once: the part every kind shares.

The source's epoch and the ledger head are read, the continuity rule applied, the requested
range trimmed to the ledger, the ledger record made; what a kind does with its records
(decode, step and COPY for events; validate and merge for changes) is its :class:`Loader`.
"""

from __future__ import annotations

import time
from typing import Protocol

import psycopg

from kappa.edw.ledger import read_head
from kappa.edw.types import BatchRecord, LedgerHead, Schemas
from kappa.ingest.outcome import BatchOutcome, trim_range
from kappa.sources.base import LogBounds, Source, check_continuity


class Loader(Protocol):
    """What one kind of source does in a batch, between the shared planning and the outcome."""

    def admit(self, head: LedgerHead | None) -> None:
        """Refuse the batch before anything is read (or read what must precede planning)."""
        ...

    def ready_end(self, start: int) -> int:
        """Where a batch starting at ``start`` may end at most: what the source has ready."""
        ...

    def lag(self, position: int) -> int:
        """Records past ``position``, for the outcome of a batch that loads nothing."""
        ...

    def load(self, record: BatchRecord, head: LedgerHead | None) -> BatchOutcome:
        """Read, transform and commit ``record``'s positions with its ledger row."""
        ...


def run_source_batch(
    source: Source,
    conn: psycopg.Connection,
    schemas: Schemas,
    asset: str,
    shard: int,
    loader: Loader,
    *,
    bounds: LogBounds | None,
    requested_start: int | None,
    requested_end: int | None,
    run_id: str,
    partition_key: str | None,
) -> BatchOutcome:
    """Load shard ``shard`` of ``source``'s next batch for ``asset``, exactly once.

    ``bounds``: the shard's bounds as just read, for a source whose ledger must stay inside
    them (None: a source that keeps everything; the first batch starts at position 0).
    """
    started = time.monotonic()
    epoch = source.epoch()
    head = read_head(conn, schemas, asset, source.name, shard)
    check_continuity(asset, source.name, shard, head, bounds, epoch, positions=source.positions)
    loader.admit(head)
    trimmed = trim_range(
        head,
        first=bounds.start if bounds is not None else 0,
        ready_end=loader.ready_end,
        requested_start=requested_start,
        requested_end=requested_end,
    )
    if trimmed.skipped is not None:
        return BatchOutcome(
            asset,
            source.name,
            shard,
            trimmed.start,
            trimmed.start,
            status=trimmed.skipped,
            lag_after=loader.lag(trimmed.start),
            seconds=time.monotonic() - started,
        )
    record = BatchRecord(
        asset=asset,
        source=source.name,
        shard=shard,
        epoch=epoch,
        start=trimmed.start,
        end=trimmed.end,
        run_id=run_id,
        partition_key=partition_key,
        fresh=head is None,
    )
    outcome = loader.load(record, head)
    outcome.seconds = time.monotonic() - started
    return outcome
