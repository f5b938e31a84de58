"""How far behind its sources the EDW is, in time: the freshness of each shard.

The lag of a shard is the age of the oldest record (topic partition) or change (change
table) that the ledger has not loaded yet; a shard with nothing pending has no lag, however
long ago its last batch was. Ages are measured on the source's clock where it has one: the
broker timestamp of the record, the change time of the change row.

A shard that cannot load (see :mod:`kappa.health`: a lost or recreated log, expired
offsets, a change table recreated, runs that keep failing) is *stopped*: it fails the bound
whatever its lag, and says why.

No Dagster here: the asset checks, their sensor and ``kappa status`` share these functions;
the callers read the runs that failed (:func:`kappa.health.recent_failures`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psycopg

from kappa.catalog.captures import CaptureSpec
from kappa.edw.ledger import read_head, read_heads
from kappa.edw.types import Schemas
from kappa.health import RunFailures, shard_stop
from kappa.ingest.plan import TopicIngest
from kappa.sources.base import ChangeSource
from kappa.sources.topic import EventStore

#: Offsets read past the ledger head to find the first pending record (offsets are sparse).
_PROBE_WINDOW = 16


@dataclass(frozen=True)
class ShardFreshness:
    """One shard: what is pending and how old the oldest of it is."""

    asset: str
    shard: str
    pending: int
    lag_s: float | None  # None: nothing pending (or no timestamp could be read)
    stopped: str | None = None  # why the shard cannot load; None while it can

    def within(self, max_lag_s: float) -> bool:
        if self.stopped is not None:
            return False
        return self.lag_s is None or self.lag_s <= max_lag_s


@dataclass(frozen=True)
class FreshnessVerdict:
    """The freshness of one asset over all its shards, against the configured bound."""

    asset: str
    max_lag_s: float
    shards: list[ShardFreshness]

    @property
    def lag_s(self) -> float:
        return max((s.lag_s for s in self.shards if s.lag_s is not None), default=0.0)

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.shards)

    @property
    def stale(self) -> list[ShardFreshness]:
        return [s for s in self.shards if not s.within(self.max_lag_s)]

    @property
    def stopped(self) -> list[ShardFreshness]:
        return [s for s in self.shards if s.stopped is not None]

    @property
    def passed(self) -> bool:
        return not self.stale

    def describe(self) -> str:
        if self.stale:
            return "; ".join(
                f"{s.shard}: stopped: {s.stopped}"
                if s.stopped is not None
                else f"{s.shard}: oldest of {s.pending} pending is {s.lag_s:.0f} s old "
                f"(bound {self.max_lag_s:g} s, KAPPA_FRESHNESS_MAX_LAG_S)"
                for s in self.stale
            )
        if not self.pending:
            return f"{len(self.shards)} shard(s) loaded up to their source"
        return (
            f"lag {self.lag_s:.0f} s within {self.max_lag_s:g} s "
            f"({self.pending} pending over {len(self.shards)} shard(s))"
        )


def topic_freshness(
    store: EventStore,
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: TopicIngest,
    *,
    now_s: float | None = None,
    failures: Mapping[int, RunFailures] | None = None,
) -> list[ShardFreshness]:
    """Per partition of ``spec.topic``: records past the ledger head, the age of the first,
    and why the partition is stopped (``failures``: its runs failing in a row)."""
    now = time.time() if now_s is None else now_s
    bounds = store.log_bounds(spec.topic, store.partitions(spec.topic))
    epoch = store.topic_id(spec.topic) or ""
    heads = read_heads(conn, schemas, spec.asset, spec.topic)
    shards: list[ShardFreshness] = []
    for partition, bound in sorted(bounds.items()):
        head = heads.get(partition)
        broken = shard_stop(spec.asset, spec.topic, partition, head, bound, epoch)
        start = max(head.end if head else bound.start, bound.start)
        pending = max(bound.end - start, 0)
        lag: float | None = None
        if pending and broken is None:  # a broken log has no next record to age
            probe = store.fetch(spec.topic, partition, start, min(bound.end, start + _PROBE_WINDOW))
            if probe.timestamps:
                lag = round(max(now - probe.timestamps[0] / 1000.0, 0.0), 1)
        failed = (failures or {}).get(partition)
        stopped = broken or (failed.describe() if failed is not None else None)
        shards.append(
            ShardFreshness(spec.asset, f"{spec.topic}[{partition}]", pending, lag, stopped)
        )
    return shards


def capture_freshness(
    changes: ChangeSource,
    edw: psycopg.Connection,
    schemas: Schemas,
    spec: CaptureSpec,
    *,
    failures: Mapping[int, RunFailures] | None = None,
) -> ShardFreshness:
    """The change source (a change table, a binlog): changes past the ledger head, the age of
    the oldest of them, and why it is stopped (recreated, purged past the ledger, or
    ``failures``: its runs failing in a row)."""
    head = read_head(edw, schemas, spec.asset, str(spec.change_table), 0)
    bounds = changes.bounds([0])[0]
    lag = changes.lag(head.end if head else bounds.start)
    return ShardFreshness(
        spec.asset,
        str(spec.change_table),
        lag.pending_changes,
        lag.oldest_pending_age_s if lag.pending_changes else None,
        shard_stop(
            spec.asset,
            str(spec.change_table),
            0,
            head,
            bounds,
            changes.epoch(),
            (failures or {}).get(0),
            positions=changes.positions,
        ),
    )


def verdict(asset: str, shards: Sequence[ShardFreshness], max_lag_s: float) -> FreshnessVerdict:
    return FreshnessVerdict(asset, max_lag_s, list(shards))
