"""Replay equivalence: re-derive what the EDW should hold from the log, and compare.

For each topic partition of a fact, the records the ledger says were loaded are read again
from the log and decoded with the same code; the distinct valid events (the first copy of
each ``event_id``) must be exactly the fact's rows for that partition, and the malformed
ones exactly its dead letters. Counts and an order-independent checksum are compared, so
the check says *how* they differ without shipping every row around.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass

import psycopg
from psycopg import sql

from kappa.decode import decode_batch
from kappa.event_store import EventStore
from kappa.ingest import TopicIngest
from kappa.warehouse import Schemas, read_heads

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
        return (
            f"[{self.start}, {self.end}): log gives {self.log_rows} rows and {self.log_dead_letters} "
            f"dead letters, the EDW holds {self.edw_rows} rows and {self.edw_dead_letters} dead letters"
            + ("" if self.log_checksum == self.edw_checksum else " (checksums differ)")
        )


def compare_with_log(
    store: EventStore, conn: psycopg.Connection, schemas: Schemas, spec: TopicIngest
) -> list[PartitionComparison]:
    """Compare each partition's loaded range, as the ledger records it, with the log."""
    meta = sql.Identifier(schemas.meta)
    fact = sql.Identifier(schemas.edw, spec.contract.table)
    comparisons = []
    for partition, head in sorted(read_heads(conn, schemas, spec.asset, spec.topic).items()):
        row = conn.execute(
            sql.SQL(
                "SELECT min(start_position) FROM {}.batch_ledger WHERE asset = %s AND source = %s AND shard = %s"
            ).format(meta),
            (spec.asset, spec.topic, partition),
        ).fetchone()
        start = row[0] if row is not None and row[0] is not None else head.end
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
        dead = conn.execute(
            sql.SQL(
                "SELECT count(*) FROM {}.dead_letter WHERE asset = %s AND source = %s AND shard = %s "
                "AND position >= %s AND position < %s"
            ).format(meta),
            (spec.asset, spec.topic, partition, start, head.end),
        ).fetchone()
        comparisons.append(
            PartitionComparison(
                partition=partition,
                start=start,
                end=head.end,
                log_rows=len(log_pairs),
                edw_rows=len(edw_pairs),
                log_checksum=checksum(log_pairs),
                edw_checksum=checksum(edw_pairs),
                log_dead_letters=len(decoded.dead_letters),
                edw_dead_letters=int(dead[0]) if dead else 0,
            )
        )
    return comparisons
