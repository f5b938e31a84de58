"""Replacing one time partition of an asset in one shard of any source (a backfill, or a heal of
its tail): the ledger's part, in one transaction, checked before anything is deleted. What the
asset's rows are and how they are re-derived is the source kind's
(:class:`kappa.ingest.reprocess.WindowLoader`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import psycopg
from psycopg import sql

from kappa.edw.checkpoints import state_digest_at, write_checkpoint
from kappa.edw.ledger import (
    lock_head,
)
from kappa.edw.types import BatchRecord, Schemas
from kappa.exceptions import (
    LogResetError,
    ReprocessError,
)


@dataclass
class WindowReplacement:
    """What :func:`replace_window` did to one shard."""

    #: Rows the kind's loader removed (it deletes what the asset held of the window).
    removed_rows: int = 0
    new_end: int = 0
    #: The ledger's end of the shard when the replacement began.
    head_end: int = 0
    #: Where what the asset holds of the replaced positions ends: ``[record.start, held_end)``
    #: is what the ledger loaded of them (the rest, up to ``record.end``, is new).
    held_end: int = 0
    #: The next partition whose starting state changed (it and those after it are stale).
    stale_from: str | None = None


@contextmanager
def replace_window(
    conn: psycopg.Connection,
    schemas: Schemas,
    *,
    record: BatchRecord,
    log_start: int,
    stateful: bool,
    checkpoints: bool = True,
    partition_start: int | None = None,
) -> Iterator[WindowReplacement]:
    """Replace what ``record.asset`` holds of one time partition in one shard, in one
    transaction: the partition is positions ``[record.start, record.end)``, or, with
    ``partition_start``, it starts there and only its part from ``record.start`` (where a
    ledger batch of it ends) is replaced: what precedes stays, the state is restored from
    the versions that batch wrote, and the checkpoint at the partition's start stays.

    Checks first, under the shard's ledger head lock, and lets the body run only if all
    pass: the ledger was written for this source (``record.epoch``); the ledger reaches the
    partition's start (its predecessor is loaded) or the partition is the shard's first; no
    ledger batch straddles a boundary; for a stateful asset the state checkpoint at the start
    exists. The body then deletes what the asset holds of positions
    ``[record.start, held_end)`` (rows, side rows, dead letters, ledger batches, state
    versions) and reloads them, ledger rows included; on the way out the head is brought up
    to date and, with ``checkpoints`` (a kind whose steps keep state), the checkpoint at the
    start and the staleness of the next partition.
    """
    meta = sql.Identifier(schemas.meta)
    asset, source, shard = record.asset, record.source, record.shard
    window, start, end = record.partition_key or "?", record.start, record.end

    def refuse(detail: str) -> ReprocessError:
        return ReprocessError(asset, source, shard, window, start, end, detail)

    result = WindowReplacement(new_end=end)
    partial = partition_start is not None and partition_start < start
    opening = partition_start if partition_start is not None and partial else start
    with conn.transaction():
        head = lock_head(conn, schemas, asset, source, shard)
        if head is not None and head.epoch != record.epoch:
            raise LogResetError(
                asset,
                source,
                shard,
                f"was recreated: the ledger was written for source id {head.epoch or '-'} "
                f"up to position {head.end}, the source now has id {record.epoch or '-'}.",
            )
        loaded_before = (head is not None) and _ledger_reaches_before(conn, schemas, record)
        if head is None:
            if start > log_start:
                raise refuse(
                    f"the ledger holds nothing of this shard and the partition starts after the "
                    f"log start ({log_start}): reprocess the earlier partitions first."
                )
        elif head.end < start:
            raise refuse(
                f"the partition before it is not loaded: the ledger ends at {head.end}. "
                "Reprocess the earlier partitions first (a backfill runs them in order)."
            )
        first = conn.execute(
            sql.SQL(
                "SELECT min(start_position) FROM {}.batch_ledger WHERE asset = %s AND source = %s "
                "AND shard = %s AND partition_key = %s"
            ).format(meta),
            (asset, source, shard, window),
        ).fetchone()
        if first is not None and first[0] is not None and first[0] < log_start:
            raise refuse(
                f"the log now starts at {log_start}: offsets [{first[0]}, {log_start}) of this "
                "partition have expired (retention) and cannot be read again."
            )
        cut = min(head.end, end) if head is not None else start
        straddling = conn.execute(
            sql.SQL(
                "SELECT start_position, end_position FROM {}.batch_ledger WHERE asset = %s "
                "AND source = %s AND shard = %s AND ((start_position < %s AND end_position > %s) "
                "OR (start_position < %s AND end_position > %s)) LIMIT 1"
            ).format(meta),
            (asset, source, shard, start, start, cut, cut),
        ).fetchone()
        if straddling is not None:
            raise refuse(
                f"ledger batch [{straddling[0]}, {straddling[1]}) straddles a boundary of the "
                "partition (loaded before partitions were cut): replay the asset from the beginning."
            )
        if first is not None and first[0] is not None and first[0] != opening:
            raise refuse(
                f"the ledger has this partition starting at offset {first[0]}, the log at "
                f"{opening}: the log is not the one the partition was loaded from."
            )
        if partial:
            boundary = conn.execute(
                sql.SQL(
                    "SELECT 1 FROM {}.batch_ledger WHERE asset = %s AND source = %s "
                    "AND shard = %s AND partition_key = %s AND end_position = %s"
                ).format(meta),
                (asset, source, shard, window, start),
            ).fetchone()
            if boundary is None:
                raise refuse(
                    f"no ledger batch of the partition ends at offset {start}: only a batch "
                    "boundary has its state in the state versions, so a part of the partition "
                    "is re-derived from one."
                )
        elif stateful and loaded_before:
            mark = conn.execute(
                sql.SQL(
                    "SELECT 1 FROM {}.checkpoint WHERE asset = %s AND source = %s AND shard = %s "
                    "AND position = %s"
                ).format(meta),
                (asset, source, shard, start),
            ).fetchone()
            if mark is None:
                raise refuse(
                    f"no state checkpoint at offset {start} (the partition's start): the state "
                    "the partition starts from cannot be restored. Reprocess from an earlier "
                    "partition that has one, or replay the asset from the beginning."
                )
        if head is None:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.ledger_head (asset, source, shard, epoch, end_position) "
                    "VALUES (%s, %s, %s, %s, %s)"
                ).format(meta),
                (asset, source, shard, record.epoch, start),
            )
        old_end = head.end if head is not None else start
        result.head_end, result.held_end = old_end, cut
        yield result
        result.new_end = max(old_end, end)
        conn.execute(
            sql.SQL(
                "UPDATE {meta}.ledger_head SET end_position = %s, updated_at = clock_timestamp(), "
                "partition_key = CASE WHEN %s THEN %s ELSE partition_key END, "
                "batches = (SELECT count(*) FROM {meta}.batch_ledger WHERE asset = %s "
                "AND source = %s AND shard = %s) WHERE asset = %s AND source = %s AND shard = %s"
            ).format(meta=meta),
            (result.new_end, end >= old_end, window, asset, source, shard, asset, source, shard),
        )
        if not checkpoints:
            return
        if end > start and not partial:
            write_checkpoint(conn, schemas, record, start)
        if end < old_end:
            result.stale_from = _mark_next_stale(conn, schemas, record)


def _ledger_reaches_before(conn: psycopg.Connection, schemas: Schemas, record: BatchRecord) -> bool:
    """Whether the ledger holds a batch before the partition's start (state matters there)."""
    row = conn.execute(
        sql.SQL(
            "SELECT 1 FROM {}.batch_ledger WHERE asset = %s AND source = %s AND shard = %s "
            "AND start_position < %s LIMIT 1"
        ).format(sql.Identifier(schemas.meta)),
        (record.asset, record.source, record.shard, record.start),
    ).fetchone()
    return row is not None


def _mark_next_stale(conn: psycopg.Connection, schemas: Schemas, record: BatchRecord) -> str | None:
    """After reprocessing ``record``'s partition, mark the next one stale if the state it was
    processed with is not the state the partition now ends with. Returns its key if so."""
    meta = sql.Identifier(schemas.meta)
    following = conn.execute(
        sql.SQL(
            "SELECT partition_key, digest FROM {}.checkpoint WHERE asset = %s AND source = %s "
            "AND shard = %s AND position >= %s AND partition_key > %s "
            "ORDER BY position, partition_key LIMIT 1"
        ).format(meta),
        (record.asset, record.source, record.shard, record.end, record.partition_key),
    ).fetchone()
    if following is None:
        return None
    digest = state_digest_at(conn, schemas, record.asset, record.source, record.shard, record.end)
    if digest == following[1]:
        return None
    conn.execute(
        sql.SQL(
            "UPDATE {}.checkpoint SET stale_reason = %s WHERE asset = %s AND source = %s "
            "AND shard = %s AND partition_key = %s"
        ).format(meta),
        (
            f"the state at its start changed when partition {record.partition_key} was "
            f"reprocessed (run {record.run_id})",
            record.asset,
            record.source,
            record.shard,
            following[0],
        ),
    )
    return str(following[0])


def ledger_span(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str, shard: int, window: str
) -> tuple[int, int]:
    """The positions ``[start, end)`` the ledger's batches of time partition ``window`` cover
    in one shard, read under the shard's head lock (a live batch may be extending the
    partition); ``(0, 0)`` when the ledger holds no batch of it.

    This is where a window lies in a source whose records carry no time it can search (a
    change table: a window is the visibility times the ledger recorded).
    """
    lock_head(conn, schemas, asset, source, shard)
    row = conn.execute(
        sql.SQL(
            "SELECT min(start_position), max(end_position) FROM {}.batch_ledger "
            "WHERE asset = %s AND source = %s AND shard = %s AND partition_key = %s"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source, shard, window),
    ).fetchone()
    if row is None or row[0] is None:
        return 0, 0
    return int(row[0]), int(row[1])
