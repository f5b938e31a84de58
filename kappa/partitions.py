"""Time partitions of the ingestion assets: windows of arrival time, resolved to positions.

A topic partition's records belong to a time window by *position*, not by each record's own
timestamp: window ``[t0, t1)`` of a topic partition is the offsets ``[b(t0), b(t1))`` where
``b(t)`` is the earliest offset whose broker timestamp is at or after ``t`` (what
``offsets_for_times`` answers). With broker-assigned (log-append) timestamps the two
agree; with producer timestamps that go backwards the position rule still gives every
record exactly one window, and the same one every time the log is read, because a boundary
never moves once a record at or after it exists. Records older than the first window
belong to it (its start boundary is the log start).

Keys follow Dagster's time-window formats, so a window here is a Dagster partition there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

#: Grain -> (Dagster's key format, window length).
GRAINS: dict[str, tuple[str, timedelta]] = {
    "daily": ("%Y-%m-%d", timedelta(days=1)),
    "hourly": ("%Y-%m-%d-%H:%M", timedelta(hours=1)),
}


@dataclass(frozen=True)
class Window:
    """One time partition ``[start, end)``."""

    key: str
    start: datetime
    end: datetime

    @property
    def start_ms(self) -> int:
        return int(self.start.timestamp() * 1000)

    @property
    def end_ms(self) -> int:
        return int(self.end.timestamp() * 1000)


def parse_key(key: str) -> Window | None:
    """The window of a partition key of any grain (None: not a partition key)."""
    for fmt, length in GRAINS.values():
        try:
            start = datetime.strptime(key, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        return Window(key, start, start + length)
    return None


@dataclass(frozen=True)
class TimeWindows:
    """The partitioning of arrival time: ``grain`` windows from ``start`` on (UTC)."""

    grain: str
    start: datetime

    def __post_init__(self) -> None:
        if self.grain not in GRAINS:
            raise ValueError(f"unknown grain {self.grain!r}; one of {', '.join(GRAINS)}")
        if self.start.tzinfo is None:
            object.__setattr__(self, "start", self.start.replace(tzinfo=UTC))
        if self.start != self._floor(self.start):
            raise ValueError(f"{self.start.isoformat()} is not the start of a {self.grain} window")

    @property
    def fmt(self) -> str:
        return GRAINS[self.grain][0]

    @property
    def length(self) -> timedelta:
        return GRAINS[self.grain][1]

    def _floor(self, ts: datetime) -> datetime:
        ts = ts.astimezone(UTC)
        if self.grain == "daily":
            return ts.replace(hour=0, minute=0, second=0, microsecond=0)
        return ts.replace(minute=0, second=0, microsecond=0)

    def window(self, key: str) -> Window:
        try:
            start = datetime.strptime(key, self.fmt).replace(tzinfo=UTC)
        except ValueError:
            raise ValueError(f"{key!r} is not a {self.grain} partition key ({self.fmt})") from None
        return Window(key, start, start + self.length)

    def at(self, ts: datetime) -> Window:
        """The window holding ``ts`` (the first window for anything before it)."""
        start = max(self._floor(ts), self.start)
        return Window(start.strftime(self.fmt), start, start + self.length)

    def at_ms(self, ts_ms: int) -> Window:
        return self.at(datetime.fromtimestamp(ts_ms / 1000, UTC))

    def visible_at(self, now: datetime, last: str | None) -> Window:
        """The window of a change-table batch seen committed at ``now``: ``now``'s window, or
        the window of the shard's last batch (``last``) if the clock went back behind it, so
        visibility windows never go back. A ``last`` of another grain is ignored."""
        window = self.at(now)
        try:
            previous = self.window(last) if last else None
        except ValueError:
            previous = None
        return previous if previous is not None and previous.start > window.start else window

    def next(self, window: Window) -> Window:
        return self.at(window.end)

    def previous(self, window: Window) -> Window | None:
        if window.start <= self.start:
            return None
        return self.at(window.start - self.length)

    def is_first(self, window: Window) -> bool:
        return window.start <= self.start

    def span(self, first: str, last: str) -> Iterator[Window]:
        """The windows from ``first`` to ``last``, both included, oldest first."""
        window, stop = self.window(first), self.window(last)
        while window.start <= stop.start:
            yield window
            window = self.next(window)
