"""The EDW's value types: where its tables live, a batch's ledger record and head, counts.

No database client here: steps, plans and tests use these without psycopg.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True)
class Schemas:
    """Where the EDW tables (``edw``) and the machinery tables (``meta``) live."""

    edw: str = "edw"
    meta: str = "kappa"


@dataclass(frozen=True)
class LedgerHead:
    """Where a shard's ledger ends: the next batch starts at ``end``."""

    asset: str
    source: str
    shard: int
    epoch: str
    end: int
    batches: int
    watermark: datetime | None = None
    #: The time partition of the shard's last batch.
    partition_key: str | None = None


@dataclass(frozen=True)
class BatchRecord:
    """The coordinates and counts of one committed batch (one ledger row)."""

    asset: str
    source: str
    shard: int
    epoch: str
    start: int
    end: int
    run_id: str
    partition_key: str | None = None
    #: Filled in by the commit (see :class:`BatchCounts`).
    received: int = 0
    loaded: int = 0
    dead_lettered: int = 0
    deduplicated: int = 0
    watermark: datetime | None = None
    #: Planned with no ledger head (the shard's first batch): only then may one be created.
    fresh: bool = False


@dataclass
class BatchCounts:
    """Counts a batch's writer fills in inside :func:`ledger_transaction`."""

    received: int = 0
    loaded: int = 0
    dead_lettered: int = 0

    @property
    def deduplicated(self) -> int:
        return self.received - self.loaded - self.dead_lettered
