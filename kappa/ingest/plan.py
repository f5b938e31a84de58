"""Planning micro-batches of topic partitions from the ledger and the log: offset ranges for the
sensor, the offsets where time windows start. (The continuity of a shard, same log and nothing
lost, is :func:`kappa.sources.base.check_continuity`, the same rule for every kind of source.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd

from kappa.catalog.streams import EventContract
from kappa.edw.types import LedgerHead
from kappa.exceptions import EventStoreTimeoutError
from kappa.partitions import TimeWindows, Window
from kappa.sources.base import LogBounds
from kappa.sources.topic import EventStore
from kappa.steps.protocol import Step


@dataclass(frozen=True)
class TopicIngest:
    """One topic loaded into one EDW asset: configuration, not code per topic."""

    asset: str
    topic: str
    contract: EventContract
    description: str = ""
    step: Step | None = None


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


def event_dates(rows: pd.DataFrame) -> set[str]:
    """The distinct UTC dates of ``rows.event_time``."""
    if rows.empty:
        return set()
    return set(rows["event_time"].dt.tz_convert("UTC").dt.strftime("%Y-%m-%d").unique())


def plan_ranges(
    topic: str,
    heads: Mapping[int, LedgerHead],
    bounds: Mapping[int, LogBounds],
    *,
    busy: frozenset[int] = frozenset(),
    max_batch: int,
    max_run: int,
    limits: Mapping[int, int] | None = None,
) -> list[OffsetRange]:
    """The next range of each partition that has new offsets and no batch in flight.

    A range starts where the ledger ends (or at the log start before the first batch) and
    takes everything up to the log end (or ``limits[partition]``, where its time partition
    ends), capped at ``max_batch``: small when caught up, as large as allowed when lagging.
    The run total stays within ``max_run``; the most lagging partitions are served first.
    """
    candidates: list[OffsetRange] = []
    for partition in sorted(bounds):
        if partition in busy:
            continue
        head = heads.get(partition)
        start = head.end if head is not None else bounds[partition].start
        end = min(bounds[partition].end, start + max_batch)
        if limits is not None and partition in limits:
            end = min(end, limits[partition])
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


#: Window steps tried to place one position before giving up (each step jumps to the window
#: of the record's own timestamp, so two are the most a monotone log needs).
_MAX_WINDOW_STEPS = 16


def locate_windows(
    store: EventStore,
    topic: str,
    windows: TimeWindows,
    starts: Mapping[int, int],
    hints: Mapping[int, str | None],
    bounds: Mapping[int, LogBounds],
) -> dict[int, tuple[Window, int]]:
    """For each partition's next position ``starts[p]`` (which the log holds): the time
    partition it belongs to, and the offset where that partition ends (the log end while
    no record at or after the partition's end has arrived).

    ``hints[p]`` is the time partition of the shard's last batch (from the ledger); without
    one the record's own timestamp places it. A window that ends at or before the position
    is left for the next one, or the record's window if that is later.
    """
    pending: dict[int, Window] = {}
    for partition, start in starts.items():
        hint = hints.get(partition)
        pending[partition] = (
            windows.window(hint)
            if hint
            else windows.at_ms(store.timestamp_at(topic, partition, start))
        )
    located: dict[int, tuple[Window, int]] = {}
    for _ in range(_MAX_WINDOW_STEPS):
        if not pending:
            return located
        by_end: dict[int, list[int]] = {}
        for partition, window in pending.items():
            by_end.setdefault(window.end_ms, []).append(partition)
        for end_ms, partitions in by_end.items():
            found = store.boundaries(
                topic,
                partitions,
                end_ms,
                floor={p: starts[p] for p in partitions},
                bounds=bounds,
            )
            for partition, boundary in found.items():
                window, start = pending[partition], starts[partition]
                if boundary is None or boundary > start:
                    located[partition] = (
                        window,
                        boundary if boundary is not None else bounds[partition].end,
                    )
                    del pending[partition]
                    continue
                own = windows.at_ms(store.timestamp_at(topic, partition, start))
                following = windows.next(window)
                pending[partition] = own if own.start > following.start else following
    raise EventStoreTimeoutError(
        f"{topic}: could not place offsets {dict(starts)} in time partitions within "
        f"{_MAX_WINDOW_STEPS} steps (broker timestamps far out of order?)"
    )
