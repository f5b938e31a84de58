"""What every source hands the engine, whatever it is read from: positions, bounds, raw records,
the :class:`Source` protocol a kind of source implements, and the continuity rule every kind obeys.

Adding a kind of source (a MariaDB binlog, say) is three small pieces, none of them in the
engine's shared code:

1. a :class:`Source`: its ledger name, how its positions are named (a :class:`Positions`),
   its shards, epoch, bounds, ``read`` of a position range and the counts reconciliation
   and lag need; and :class:`TimeIndexed` ``locate`` if its records carry times it can
   search (then a time partition is positions by those times; otherwise the positions the
   ledger's batches of the partition cover, i.e. arrival as the ledger recorded it);
2. a batch loader (:class:`kappa.ingest.batch.Loader`: admit, ready end, lag, and ``load``,
   which reads, transforms and writes one planned range with its ledger row);
3. a window loader (:class:`kappa.ingest.reprocess.WindowLoader`: ``reload`` of one shard's
   positions of a time partition, inside the replacement's transaction).

The engine gives each kind, unchanged: the ledger (heads, batches, gap and overlap checks),
:func:`check_continuity` (recreated, reset or expired logs stop with a message in the kind's
own words), the trimming of a requested range to the ledger and the exactly-once record
(:func:`kappa.ingest.batch.run_source_batch`), the one-transaction replacement of a time
partition with its refusals, head, checkpoints and staleness
(:func:`kappa.ingest.reprocess.reprocess_window`, :func:`kappa.edw.window.replace_window`),
and reconciliation (:func:`kappa.reconcile.reconcile_source`).

No client library here (neither kafka-python nor psycopg), so decoding and the steps can be
imported and tested without either.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

from kappa.edw.types import LedgerHead
from kappa.exceptions import LogResetError

#: The timestamp of a record that carries none.
NO_TIMESTAMP = -1


@dataclass(frozen=True)
class LogBounds:
    """The positions a topic partition holds: ``start`` (first retained) to ``end`` (exclusive)."""

    start: int
    end: int


@dataclass
class RawBatch:
    """The records of one topic partition with offsets in ``[start, end)``, as read.

    Offsets are sparse (transaction markers, compaction): ``len(offsets)`` may be less than
    ``end - start``, never more.
    """

    topic: str
    partition: int
    start: int
    end: int
    offsets: list[int] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets)


@dataclass(frozen=True)
class Positions:
    """How a kind of source names its positions and its identity, for errors and metadata.

    ``name``: what a position is ("offsets"); ``epoch``: what identifies the log ("topic
    id"); ``holder``: what serves it now, as a message says it ("the broker now serves").
    """

    name: str
    epoch: str
    holder: str
    #: Whether the source's bounds are checked against the ledger (a change table keeps
    #: every change: only its identity can betray a reset).
    bounded: bool = True


#: Topic partitions of a Kafka-API event store.
OFFSETS = Positions("offsets", "topic id", "the broker now serves topic id")
#: Change tables filled by capture triggers: positions are transaction ids.
TRANSACTIONS = Positions("transactions", "change table", "the OLTP database now has", bounded=False)


@runtime_checkable
class Source(Protocol):
    """A log the engine loads from, one shard at a time, by positions ``[start, end)``.

    The ledger is keyed by (asset, ``name``, shard) and remembers ``epoch()``: a source whose
    epoch changed is another log, whatever its positions say.

    What the engine relies on: positions are integers that only grow along a shard, and a
    range ``[start, end)`` below the shard's ``bounds().end`` reads the same records every
    time it is read while ``bounds().start <= start`` (a ``bounded`` kind) or always (a kind
    that keeps everything). A batch never splits what the kind must apply whole (the batch
    loader's ``ready_end`` says where a batch may end). Shards load in parallel, each in
    position order; ``read``'s result is whatever the kind's loaders take.
    """

    #: The ledger's name of the source (a topic, a change table).
    name: str
    positions: Positions

    def shards(self) -> list[int]:
        """The shard ids (topic partitions; a change table is shard 0)."""
        ...

    def shard_name(self, shard: int) -> str:
        """How errors and reports name one shard."""
        ...

    def epoch(self) -> str:
        """The identity of the log ("" where the source has none)."""
        ...

    def bounds(self, shards: Iterable[int]) -> dict[int, LogBounds]:
        """The positions each shard holds now."""
        ...

    def read(self, shard: int, start: int, end: int) -> Any:
        """The raw records of positions ``[start, end)`` (a kind's own type)."""
        ...

    def count(self, shard: int, start: int, end: int) -> int:
        """How many records positions ``[start, end)`` hold."""
        ...

    def behind(self, shard: int, end: int, bounds: LogBounds) -> int:
        """How many records past position ``end`` are not loaded yet."""
        ...


@runtime_checkable
class ChangeSource(Source, Protocol):
    """A source of row changes of one captured table (a PostgreSQL change table, a MariaDB
    binlog): ``read`` gives the change frame of whole transactions, and reprocessing a time
    partition rebuilds every key its transactions touched from that key's history."""

    def key_history(self, keys: list[tuple[str, ...]], end: int) -> Any:
        """Every change of ``keys`` (compared as text) by transactions below position
        ``end``, in change order (the same frame as ``read``)."""
        ...

    def plan_end(self, start: int, *, max_changes: int) -> int:
        """Where a batch from ``start`` ends: whole committed transactions, at most
        ``max_changes`` changes unless one transaction alone holds more; ``start`` when
        nothing is ready."""
        ...

    def lag(self, loaded_until: int) -> Any:
        """How far a target loaded up to ``loaded_until`` is behind, and which open
        transactions delay it (a :class:`kappa.sources.pg_capture.CaptureLag`)."""
        ...

    def complete_until(self) -> datetime:
        """A time before which every change still to come lies (read it before planning:
        what commits later carries no earlier change time)."""
        ...

    def pending_since(
        self, loaded_until: int, column: str, values: list[str]
    ) -> dict[str, datetime] | None:
        """For each of ``values`` with a committed change past ``loaded_until`` that has it
        as ``column`` in an image: the earliest such change's time. None: the source cannot
        tell by value (then any change waiting holds every value back)."""
        ...


@runtime_checkable
class TimeIndexed(Protocol):
    """A source whose records carry times the source itself can search (a topic's broker
    timestamps): a time window maps to positions there. A change table's windows are the
    visibility times the ledger recorded, so it has no such map."""

    def locate(
        self,
        shards: Iterable[int],
        ts_ms: int,
        *,
        floor: Mapping[int, int] | None = None,
        bounds: Mapping[int, LogBounds] | None = None,
    ) -> dict[int, int | None]:
        """The first position of each shard whose record's time is >= ``ts_ms`` (None: none
        arrived yet); ``floor``: positions known to be at or below the answer."""
        ...


def check_continuity(
    asset: str,
    source: str,
    shard: int,
    head: LedgerHead | None,
    bounds: LogBounds | None,
    epoch: str,
    *,
    positions: Positions = OFFSETS,
) -> None:
    """Raise :class:`LogResetError` when the source cannot continue where the ledger ends.

    That is: the log was recreated (its epoch changed), the log ends before the ledger
    (reset or truncated), or the log starts after the ledger (expired by retention before
    it was loaded). Each case would otherwise skip or re-load data silently. A ledger that
    recorded no epoch (a broker without topic ids) checks none; a ledger that recorded one
    refuses a source that reports none now: a recreated log grown past the ledger's end
    could not be told from the one it loaded. Bounds are checked only for a bounded kind of
    source (``positions.bounded``) and when given.
    """
    if head is None:
        return
    if head.epoch and not epoch:
        where = f" (log {bounds.start}..{bounds.end})" if bounds is not None else ""
        raise LogResetError(
            asset,
            source,
            shard,
            f"cannot be confirmed as the one the ledger loaded: the ledger loaded "
            f"{positions.name} up to {head.end} of {positions.epoch} {head.epoch}, and no "
            f"{positions.epoch} is reported now{where}.",
        )
    if head.epoch and epoch and head.epoch != epoch:
        where = f" (log {bounds.start}..{bounds.end})" if bounds is not None else ""
        raise LogResetError(
            asset,
            source,
            shard,
            f"was recreated: the ledger loaded {positions.name} up to {head.end} of "
            f"{positions.epoch} {head.epoch}, {positions.holder} {epoch}{where}.",
        )
    if bounds is None or not positions.bounded:
        return
    if head.end > bounds.end:
        raise LogResetError(
            asset,
            source,
            shard,
            f"holds less than was loaded: the ledger has loaded {positions.name} up to "
            f"{head.end}, the log now ends at {bounds.end}. The broker lost or reset this "
            "partition (a local broker keeps nothing across restarts).",
        )
    if head.end < bounds.start:
        raise LogResetError(
            asset,
            source,
            shard,
            f"expired {positions.name} [{head.end}, {bounds.start}) before they were loaded: "
            f"the log now starts at {bounds.start} (retention).",
        )
