"""What a batch or a reprocessed window did, for every kind of source, and the one rule by which
the ledger trims a requested range.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from kappa.edw.types import LedgerHead
from kappa.sources import pg_capture


@dataclass
class BatchOutcome:
    """What one batch of any source did, for materialisation metadata and logs.

    ``topic`` and ``partition`` are the ledger's source and shard (a change table is shard 0).
    """

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
    #: Seconds the step waited for change capture of the targets its lookups read.
    capture_wait_s: float = 0.0


@dataclass
class WindowOutcome:
    """What reprocessing one time partition did in one shard of any source."""

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


@dataclass(frozen=True)
class Trimmed:
    """A requested range as the ledger allows it: ``[start, end)`` and why nothing is loaded
    (``skipped``: "superseded", "already loaded"; None when the range is to be loaded)."""

    start: int
    end: int
    skipped: str | None


def trim_range(
    head: LedgerHead | None,
    *,
    first: int,
    ready_end: Callable[[int], int],
    requested_start: int | None,
    requested_end: int | None,
) -> Trimmed:
    """The next batch of a shard: it starts where the ledger ends (``first`` before the first
    batch), ends where the source has records ready (``ready_end(start)``: the log end, a
    batch cap, whole transactions) and no later than ``requested_end``.

    ``start < requested_start``: the ledger was rewound after this range was planned (a
    replay); the range may belong to another time partition now, the sensor plans afresh.
    """
    start = head.end if head is not None else first
    end = ready_end(start)
    if requested_end is not None:
        end = min(end, max(requested_end, start))
    if requested_start is not None and start < requested_start:
        return Trimmed(start, start, "superseded")
    if end <= start:
        return Trimmed(start, start, "already loaded")
    return Trimmed(start, end, None)
