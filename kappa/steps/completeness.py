"""How far change capture is complete, per lookup key, and waiting for it.

A row's lookups are final once capture has loaded every change of its key values up to the
row's event time; otherwise they are ``provisional`` and a heal re-derives them later.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import pandas as pd

#: Change times are microseconds: "just before a change" is one microsecond before it.
JUST_BEFORE = pd.Timedelta(microseconds=1)


@dataclass(frozen=True)
class Completeness:
    """Up to when change capture has loaded every change: ``until`` for every key value but
    those in ``pending`` (by event field, then value), which have a committed change not
    loaded yet and are complete only up to just before their earliest such change."""

    until: pd.Timestamp
    pending: Mapping[str, Mapping[str, pd.Timestamp]] = field(default_factory=dict)

    def marks(self, keys: pd.DataFrame | pd.Series) -> pd.Series:
        """Per row of ``keys`` (row-aligned; a series is the field of its name), the time
        the row's key values are all complete up to."""
        frame = keys.to_frame() if isinstance(keys, pd.Series) else keys
        until = pd.Timestamp(self.until).tz_convert("UTC")
        marks = pd.Series(until, index=frame.index, dtype="datetime64[ns, UTC]")
        for column, waiting in self.pending.items():
            if waiting and column in frame:
                earliest = pd.to_datetime(frame[column].astype(str).map(waiting), utc=True)
                marks = earliest.where(earliest.notna() & (earliest < marks), marks)
        return marks


class Watermark(Protocol):
    def watermark(self, keys: Mapping[str, Sequence[str]] | None = None) -> Completeness | None:
        """Up to when every change is loaded (per value of ``keys``, by event field, when
        given); None when that is not known."""
        ...


class WaitBudget:
    """Time left to wait for change capture, shared by every batch that draws on it.

    A live batch has its own; a backfill has one for its whole window (every chunk of every
    topic partition), so a window whose events are newer than change capture pays the wait
    once, not once per chunk and partition.
    """

    def __init__(
        self,
        seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.clock = clock
        self.sleep = sleep
        self.deadline = clock() + max(0.0, seconds)
        #: Seconds waited so far: from a first look that found capture behind until the
        #: wait ended (shown per batch as ``capture_wait_s``).
        self.waited_s = 0.0

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - self.clock())


def key_values(rows: pd.DataFrame, keys: Sequence[str]) -> dict[str, list[str]]:
    """The distinct values of each key field present in ``rows``, sorted."""
    return {k: sorted(set(rows[k].astype(str))) for k in keys if k in rows}


def wait_for_capture(
    source: Watermark,
    rows: pd.DataFrame,
    keys: Sequence[str],
    *,
    max_wait_s: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    budget: WaitBudget | None = None,
) -> Completeness | None:
    """Wait (bounded by ``budget``, or ``max_wait_s`` from now) until change capture has
    loaded every change of the rows' ``keys`` values up to each row's event time."""
    budget = budget if budget is not None else WaitBudget(max_wait_s, sleep=sleep)
    present = [k for k in keys if k in rows]
    values = key_values(rows, present)
    started, waited = budget.clock(), False
    while True:
        completeness = source.watermark(values)
        if completeness is not None:
            marks = completeness.marks(rows[present])
            if bool((pd.to_datetime(rows["event_time"], utc=True) <= marks).all()):
                break
        left = budget.remaining()
        if left <= 0:
            break
        waited = True
        budget.sleep(min(0.5, left))
    if waited:
        budget.waited_s += budget.clock() - started
    return completeness
