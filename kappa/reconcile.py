"""Reconciliation and replay equivalence: what the sources hold against what the EDW has.

Reconciliation: per shard, the ledger covers the source without gap or overlap, the
records (or changes) in the covered range are what the ledger received, and received =
loaded + dead-lettered + deduplicated.

Replay equivalence: re-derive what the EDW should hold from the log, and compare.

For each topic partition of a fact, the records the ledger says were loaded are read again
from the log and decoded with the same code; the distinct valid events (the first copy of
each ``event_id``) must be exactly the fact's rows for that partition, and the malformed
ones exactly its dead letters. Counts and an order-independent checksum are compared, so
the check says *how* they differ without shipping every row around.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from kappa.catalog.captures import CaptureSpec
from kappa.changes.target import written_by
from kappa.decode.batch import decode_batch
from kappa.edw.ledger import lock_head, read_heads
from kappa.edw.poison import REFUSED_PREFIX
from kappa.edw.types import Schemas
from kappa.ingest.capture import ChangeWindowLoader
from kappa.ingest.plan import TopicIngest
from kappa.ingest.reprocess import reprocess_window
from kappa.partitions import parse_key
from kappa.sources.base import ChangeSource, Source
from kappa.sources.pg_capture import ChangeTable
from kappa.sources.topic import EventStore, TopicPartitions

_MASK = (1 << 60) - 1


def checksum(items: Iterable[tuple[str, int]]) -> int:
    """Order-independent checksum of (event_id, offset) pairs: a sum of 60-bit hashes."""
    total = 0
    for event_id, offset in items:
        total = (
            total + int(hashlib.md5(f"{event_id}:{offset}".encode()).hexdigest()[:15], 16)
        ) & _MASK
    return total


@dataclass(frozen=True)
class PartitionComparison:
    """The log's and the EDW's account of one topic partition's loaded offsets."""

    partition: int
    start: int
    end: int
    #: The time partition these offsets belong to (None: loaded before partitions existed).
    window: str | None
    log_rows: int
    edw_rows: int
    log_checksum: int
    edw_checksum: int
    log_dead_letters: int
    edw_dead_letters: int

    @property
    def equal(self) -> bool:
        return (
            self.log_rows == self.edw_rows
            and self.log_checksum == self.edw_checksum
            and self.log_dead_letters == self.edw_dead_letters
        )

    def describe(self) -> str:
        where = f"{self.window} " if self.window else ""
        return (
            f"{where}[{self.start}, {self.end}): log gives {self.log_rows} rows and {self.log_dead_letters} "
            f"dead letters, the EDW holds {self.edw_rows} rows and {self.edw_dead_letters} dead letters"
            + ("" if self.log_checksum == self.edw_checksum else " (checksums differ)")
        )


@dataclass(frozen=True)
class LedgerWindow:
    """The positions the ledger's batches of one time partition cover in one shard."""

    key: str | None
    start: int
    end: int
    dead_lettered: int


def ledger_windows(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str, shard: int
) -> list[LedgerWindow]:
    """Per time partition of one shard (None: batches loaded before partitions existed), in
    position order: the first and last position its batches cover and their dead letters."""
    rows = conn.execute(
        sql.SQL(
            "SELECT partition_key, min(start_position), max(end_position), sum(dead_lettered) "
            "FROM {}.batch_ledger WHERE asset = %s AND source = %s AND shard = %s "
            "GROUP BY partition_key ORDER BY min(start_position)"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source, shard),
    ).fetchall()
    return [LedgerWindow(key, int(low), int(high), int(dead)) for key, low, high, dead in rows]


def compare(
    shard: int,
    window: str | None,
    start: int,
    end: int,
    *,
    derived: Sequence[tuple[str, int]],
    held: Sequence[tuple[str, int]],
    derived_dead_letters: int,
    held_dead_letters: int,
) -> PartitionComparison:
    """The comparison of what the source re-derives (``derived``: identity and position of
    each row) with what the EDW holds, for one time partition of one shard."""
    return PartitionComparison(
        partition=shard,
        start=start,
        end=end,
        window=window,
        log_rows=len(derived),
        edw_rows=len(held),
        log_checksum=checksum(derived),
        edw_checksum=checksum(held),
        log_dead_letters=derived_dead_letters,
        edw_dead_letters=held_dead_letters,
    )


def compare_with_log(
    store: EventStore, conn: psycopg.Connection, schemas: Schemas, spec: TopicIngest
) -> list[PartitionComparison]:
    """Compare what the ledger says was loaded with the log, per time partition and topic
    partition. Each topic partition's loaded range is decoded whole (the first copy of an
    event wins across time partitions too), then split at the time partitions' offsets."""
    meta = sql.Identifier(schemas.meta)
    fact = sql.Identifier(schemas.edw, spec.contract.table)
    comparisons = []
    for partition, head in sorted(read_heads(conn, schemas, spec.asset, spec.topic).items()):
        windows = [
            (w.key, w.start, w.end)
            for w in ledger_windows(conn, schemas, spec.asset, spec.topic, partition)
        ]
        start = windows[0][1] if windows else head.end
        decoded = decode_batch(store.fetch(spec.topic, partition, start, head.end), spec.contract)
        log_pairs = list(
            zip(
                decoded.rows["event_id"].astype(str),
                decoded.rows["kafka_offset"].astype(int),
                strict=True,
            )
        )
        edw_pairs = [
            (event_id, int(offset))
            for event_id, offset in conn.execute(
                sql.SQL(
                    "SELECT event_id::text, kafka_offset FROM {} WHERE topic = %s AND kafka_partition = %s "
                    "AND kafka_offset >= %s AND kafka_offset < %s"
                ).format(fact),
                (spec.topic, partition, start, head.end),
            ).fetchall()
        ]
        dead_rows = conn.execute(
            sql.SQL(
                "SELECT position, reason FROM {}.dead_letter WHERE asset = %s AND source = %s "
                "AND shard = %s AND position >= %s AND position < %s"
            ).format(meta),
            (spec.asset, spec.topic, partition, start, head.end),
        ).fetchall()
        edw_dead = [int(position) for position, _ in dead_rows]
        # Records the database refused at load (see kappa.edw.poison) decode as valid: the log's
        # account takes the database's word for them, recorded with their raw bytes.
        refused = {int(p) for p, reason in dead_rows if reason.startswith(REFUSED_PREFIX)}
        log_pairs = [pair for pair in log_pairs if pair[1] not in refused]
        log_dead = decoded.dead_letters["offset"].astype(int).tolist() + sorted(refused)
        for window, low, high in windows or [(None, start, head.end)]:
            log_in = [p for p in log_pairs if low <= p[1] < high]
            edw_in = [p for p in edw_pairs if low <= p[1] < high]
            comparisons.append(
                compare(
                    partition,
                    window,
                    low,
                    high,
                    derived=log_in,
                    held=edw_in,
                    derived_dead_letters=sum(low <= o < high for o in log_dead),
                    held_dead_letters=sum(low <= o < high for o in edw_dead),
                )
            )
    return comparisons


@dataclass(frozen=True)
class ShardReconciliation:
    """One shard's account: what the source holds, what the ledger covers, and the counts.

    ``lag`` is how many positions (records, or committed changes) the ledger is behind.
    ``source_count`` is the number of records (or changes) the source holds in the range the
    ledger covers; it must equal ``received``, and ``received`` must equal loaded +
    dead-lettered + deduplicated. ``gaps`` lists ledger holes or overlaps as (end, next start).
    """

    asset: str
    shard: str
    lag: int
    ledger_start: int
    ledger_end: int
    source_count: int
    received: int
    loaded: int
    dead_lettered: int
    deduplicated: int
    gaps: tuple[tuple[int, int], ...]
    head_end: int | None = None

    @property
    def problems(self) -> list[str]:
        found = [
            f"ledger ends at {end} but the next batch starts at {start}" for end, start in self.gaps
        ]
        if self.head_end is not None and self.head_end != self.ledger_end:
            found.append(
                f"ledger batches end at {self.ledger_end} but its head says {self.head_end}"
            )
        if self.source_count != self.received:
            found.append(
                f"the source holds {self.source_count} in [{self.ledger_start}, {self.ledger_end}), the ledger received {self.received}"
            )
        if self.received != self.loaded + self.dead_lettered + self.deduplicated:
            found.append(
                f"received {self.received} != loaded {self.loaded} + dead-lettered {self.dead_lettered} "
                f"+ deduplicated {self.deduplicated}"
            )
        return found


def _ledger_spans(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str, shard: int
) -> tuple[list[tuple[int, int, int, int, int, int]], int | None]:
    head = conn.execute(
        sql.SQL(
            "SELECT end_position FROM {}.ledger_head WHERE asset = %s AND source = %s AND shard = %s"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source, shard),
    ).fetchone()
    spans = conn.execute(
        sql.SQL(
            "SELECT start_position, end_position, received, loaded, dead_lettered, deduplicated "
            "FROM {}.batch_ledger WHERE asset = %s AND source = %s AND shard = %s ORDER BY start_position"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source, shard),
    ).fetchall()
    return spans, (head[0] if head else None)


def reconcile_source(
    source: Source, conn: psycopg.Connection, schemas: Schemas, asset: str
) -> list[ShardReconciliation]:
    """Per shard of ``source``: the records it holds over the ledger's range against the
    ledger's counts, and how far the ledger is behind it. The same accounting for every
    kind of source: only counting records and the lag are the source's."""
    shards = source.shards()
    bounds = source.bounds(shards)
    found = []
    for shard in shards:
        spans, head_end = _ledger_spans(conn, schemas, asset, source.name, shard)
        start = spans[0][0] if spans else 0
        end = spans[-1][1] if spans else 0
        found.append(
            ShardReconciliation(
                asset=asset,
                shard=source.shard_name(shard),
                lag=source.behind(shard, end, bounds[shard]),
                ledger_start=start,
                ledger_end=end,
                source_count=source.count(shard, start, end) if spans else 0,
                received=sum(s[2] for s in spans),
                loaded=sum(s[3] for s in spans),
                dead_lettered=sum(s[4] for s in spans),
                deduplicated=sum(s[5] for s in spans),
                gaps=tuple((a[1], b[0]) for a, b in itertools.pairwise(spans) if a[1] != b[0]),
                head_end=head_end,
            )
        )
    return found


def reconcile_topic(
    store: EventStore, conn: psycopg.Connection, schemas: Schemas, spec: TopicIngest
) -> list[ShardReconciliation]:
    """Per topic partition: records in the log over the ledger's range against its counts."""
    return reconcile_source(TopicPartitions(store, spec.topic), conn, schemas, spec.asset)


def reconcile_capture(
    oltp: psycopg.Connection, conn: psycopg.Connection, schemas: Schemas, spec: CaptureSpec
) -> ShardReconciliation:
    """For a change table: changes of the transactions the ledger covers against its counts."""
    (found,) = reconcile_source(ChangeTable(oltp, spec), conn, schemas, spec.asset)
    return found


def compare_capture_with_log(
    oltp: psycopg.Connection, conn: psycopg.Connection, schemas: Schemas, spec: CaptureSpec
) -> list[PartitionComparison]:
    """:func:`compare_changes_with_log` for a PostgreSQL change table."""
    return compare_changes_with_log(ChangeTable(oltp, spec), conn, schemas, spec)


def compare_changes_with_log(
    changes: ChangeSource, conn: psycopg.Connection, schemas: Schemas, spec: CaptureSpec
) -> list[PartitionComparison]:
    """Replay equivalence of a captured table, per time partition: the partition is
    re-derived from its change source as a backfill would do it, inside a transaction that is
    rolled back, and the rows its transactions wrote or closed are compared with what the EDW
    held (``log_*``: re-derived, ``edw_*``: held)."""
    source = str(spec.change_table)
    windows = [w for w in ledger_windows(conn, schemas, spec.asset, source, 0) if w.key is not None]
    rows_of = sql.SQL("SELECT t::text FROM {} t WHERE {}").format(
        sql.Identifier(schemas.edw, spec.target), written_by(spec)
    )
    comparisons = []
    for listed in windows:
        assert listed.key is not None
        with conn.transaction(force_rollback=True):
            # The head's lock keeps live batches out while the EDW's rows are read; the span
            # is read again under it (a live batch may have extended the partition).
            lock_head(conn, schemas, spec.asset, source, 0)
            (locked,) = [
                w
                for w in ledger_windows(conn, schemas, spec.asset, source, 0)
                if w.key == listed.key
            ]
            span = {"start": locked.start, "end": locked.end}
            held = [r[0] for r in conn.execute(rows_of, span)]
            window = parse_key(listed.key)
            assert window is not None, listed.key  # the ledger records partition keys only
            (replaced,) = reprocess_window(
                changes,
                conn,
                schemas,
                spec.asset,
                window,
                ChangeWindowLoader(changes, conn, schemas, spec),
                run_id="replay_equivalence",
            )
            derived = [r[0] for r in conn.execute(rows_of, span)]
        comparisons.append(
            compare(
                0,
                listed.key,
                replaced.start,
                replaced.end,
                # Rows are their own identity: a target row has no position of its own.
                derived=[(row, 0) for row in derived],
                held=[(row, 0) for row in held],
                derived_dead_letters=replaced.dead_lettered,
                held_dead_letters=listed.dead_lettered,
            )
        )
    return comparisons
