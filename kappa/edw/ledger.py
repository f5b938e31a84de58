"""The batch ledger: one row per batch and a head per shard, read and locked (``FOR UPDATE``) so
that a batch commits only where the ledger ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import sql

from kappa.catalog.streams import EventContract
from kappa.edw.checkpoints import write_checkpoint
from kappa.edw.types import BatchCounts, BatchRecord, LedgerHead, Schemas
from kappa.exceptions import (
    BatchSupersededError,
    LogResetError,
)


def read_head(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str, shard: int
) -> LedgerHead | None:
    """The ledger head of one shard, or None before its first batch."""
    row = conn.execute(
        sql.SQL(
            "SELECT epoch, end_position, batches, watermark, partition_key FROM {}.ledger_head "
            "WHERE asset = %s AND source = %s AND shard = %s"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source, shard),
    ).fetchone()
    if row is None:
        return None
    return LedgerHead(asset, source, shard, row[0], row[1], row[2], row[3], row[4])


def read_heads(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str
) -> dict[int, LedgerHead]:
    """The ledger heads of every shard of ``source`` for ``asset``."""
    rows = conn.execute(
        sql.SQL(
            "SELECT shard, epoch, end_position, batches, watermark, partition_key "
            "FROM {}.ledger_head WHERE asset = %s AND source = %s"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source),
    ).fetchall()
    return {r[0]: LedgerHead(asset, source, *r) for r in rows}


_SELECT_HEAD_FOR_UPDATE = (
    "SELECT epoch, end_position, batches, watermark, partition_key FROM {}.ledger_head "
    "WHERE asset = %s AND source = %s AND shard = %s FOR UPDATE"
)


def lock_head(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str, shard: int
) -> LedgerHead | None:
    """The ledger head of one shard, locked until the transaction ends (None: no head)."""
    row = conn.execute(
        sql.SQL(_SELECT_HEAD_FOR_UPDATE).format(sql.Identifier(schemas.meta)),
        (asset, source, shard),
    ).fetchone()
    return LedgerHead(asset, source, shard, *row) if row is not None else None


def _lock_head(conn: psycopg.Connection, schemas: Schemas, record: BatchRecord) -> LedgerHead:
    """The shard's head, locked; created at the batch's start for a shard's first batch."""
    head = lock_head(conn, schemas, record.asset, record.source, record.shard)
    if head is not None:
        return head
    if not record.fresh:
        # The head this batch was planned from is gone: the ledger was reset (replay).
        raise BatchSupersededError(
            f"{record.asset}: {record.source}[{record.shard}] ledger was reset while this "
            f"batch [{record.start}, {record.end}) ran; the next batch starts afresh"
        )
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.ledger_head (asset, source, shard, epoch, end_position) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
        ).format(sql.Identifier(schemas.meta)),
        (record.asset, record.source, record.shard, record.epoch, record.start),
    )
    head = lock_head(conn, schemas, record.asset, record.source, record.shard)
    assert head is not None
    return head


@contextmanager
def ledger_transaction(
    conn: psycopg.Connection, schemas: Schemas, record: BatchRecord
) -> Iterator[BatchCounts]:
    """One transaction for a batch's output and its ledger row, or for nothing.

    Locks the shard's ledger head; the body writes the output and fills the counts; on the
    way out the ledger row and the new head are written in the same transaction. Raises
    :class:`BatchSupersededError` if the ledger no longer ends where the batch starts and
    :class:`LogResetError` if the ledger belongs to another incarnation of the source; in
    both cases nothing is written.
    """
    meta = sql.Identifier(schemas.meta)
    counts = BatchCounts()
    with conn.transaction():
        head = _lock_head(conn, schemas, record)
        if head.epoch != record.epoch:
            raise LogResetError(
                record.asset,
                record.source,
                record.shard,
                f"was recreated: the ledger was written for source id {head.epoch or '-'} "
                f"up to position {head.end}, the source now has id {record.epoch or '-'}.",
            )
        if head.end != record.start:
            raise BatchSupersededError(
                f"{record.asset}: {record.source}[{record.shard}] ledger ends at {head.end}, "
                f"batch starts at {record.start}; another run committed first"
            )
        if record.partition_key is not None and record.partition_key != head.partition_key:
            # The shard's first batch of a time partition: checkpoint the state it starts from.
            write_checkpoint(conn, schemas, record, record.start)
        yield counts
        insert_ledger_row(conn, schemas, record, counts)
        conn.execute(
            sql.SQL(
                "UPDATE {}.ledger_head SET end_position = %s, batches = batches + 1, "
                "watermark = %s, partition_key = coalesce(%s, partition_key), "
                "updated_at = clock_timestamp() WHERE asset = %s AND source = %s AND shard = %s"
            ).format(meta),
            (
                record.end,
                record.watermark,
                record.partition_key,
                record.asset,
                record.source,
                record.shard,
            ),
        )


def insert_ledger_row(
    conn: psycopg.Connection, schemas: Schemas, record: BatchRecord, counts: BatchCounts
) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.batch_ledger (asset, source, shard, epoch, start_position, "
            "end_position, run_id, partition_key, received, loaded, dead_lettered, deduplicated, "
            "watermark) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(sql.Identifier(schemas.meta)),
        (
            record.asset,
            record.source,
            record.shard,
            record.epoch,
            record.start,
            record.end,
            record.run_id,
            record.partition_key,
            counts.received,
            counts.loaded,
            counts.dead_lettered,
            counts.deduplicated,
            record.watermark,
        ),
    )


def existing_event_ids(
    conn: psycopg.Connection, schemas: Schemas, contract: EventContract, ids: list[str]
) -> set[str]:
    """Which of ``ids`` the fact table holds already (one query for the whole batch)."""
    if not ids:
        return set()
    rows = conn.execute(
        sql.SQL("SELECT event_id::text FROM {} WHERE event_id = ANY(%s::uuid[])").format(
            sql.Identifier(schemas.edw, contract.table)
        ),
        (ids,),
    ).fetchall()
    return {r[0] for r in rows}
