"""Replaying an asset from the start of its log, or rewinding a topic asset: what is deleted and
where the ledger starts again.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from kappa.edw.types import Schemas


@dataclass(frozen=True)
class ReplayReset:
    """What :func:`reset_for_replay` removed."""

    rows: int
    dead_letters: int
    batches: int


def reset_for_replay(
    conn: psycopg.Connection,
    schemas: Schemas,
    table: str,
    asset: str,
    *,
    side_tables: Sequence[str] = (),
) -> ReplayReset:
    """Forget everything ``asset`` loaded, in one transaction, so it reloads from the log start.

    Rows, side-table rows (those of its events), state, dead letters and ledger go
    together: the EDW never holds rows or state the ledger does not account for.
    """
    meta = sql.Identifier(schemas.meta)
    fact = sql.Identifier(schemas.edw, table)
    with conn.transaction():
        # Stop batches of this asset from committing meanwhile: they wait on the heads, then
        # find them gone and give up (see _lock_head).
        conn.execute(
            sql.SQL("SELECT 1 FROM {}.ledger_head WHERE asset = %s FOR UPDATE").format(meta),
            (asset,),
        )
        for side in side_tables:
            conn.execute(
                sql.SQL(
                    "DELETE FROM {side} WHERE event_id IN (SELECT event_id FROM {fact})"
                ).format(side=sql.Identifier(schemas.edw, side), fact=fact)
            )
        rows = conn.execute(sql.SQL("DELETE FROM {}").format(fact)).rowcount
        conn.execute(
            sql.SQL("DELETE FROM {}.state WHERE store LIKE %s").format(meta), (f"{asset}/%",)
        )
        dead = conn.execute(
            sql.SQL("DELETE FROM {}.dead_letter WHERE asset = %s").format(meta), (asset,)
        ).rowcount
        batches = conn.execute(
            sql.SQL("DELETE FROM {}.batch_ledger WHERE asset = %s").format(meta), (asset,)
        ).rowcount
        conn.execute(sql.SQL("DELETE FROM {}.checkpoint WHERE asset = %s").format(meta), (asset,))
        conn.execute(sql.SQL("DELETE FROM {}.ledger_head WHERE asset = %s").format(meta), (asset,))
    return ReplayReset(rows=rows, dead_letters=dead, batches=batches)


def delete_positions(
    conn: psycopg.Connection,
    schemas: Schemas,
    table: str,
    asset: str,
    topic: str,
    shard: int,
    start: int,
    end: int | None,
    side_tables: Sequence[str],
) -> tuple[int, int]:
    """Delete what ``asset`` loaded from ``topic[shard]`` positions ``[start, end)`` (``end``
    None: to the end): rows, side-table rows, dead letters, ledger batches, and the state
    versions those batches wrote. Returns (rows, batches) removed."""
    meta = sql.Identifier(schemas.meta)
    fact = sql.Identifier(schemas.edw, table)
    upper = end if end is not None else 2**63 - 1
    in_range = sql.SQL(
        "topic = %s AND kafka_partition = %s AND kafka_offset >= %s AND kafka_offset < %s"
    )
    args = (topic, shard, start, upper)
    for side in side_tables:
        conn.execute(
            sql.SQL(
                "DELETE FROM {side} WHERE event_id IN (SELECT event_id FROM {fact} WHERE {cond})"
            ).format(side=sql.Identifier(schemas.edw, side), fact=fact, cond=in_range),
            args,
        )
    rows = conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(fact, in_range), args).rowcount
    conn.execute(
        sql.SQL(
            "DELETE FROM {}.dead_letter WHERE asset = %s AND source = %s AND shard = %s "
            "AND position >= %s AND position < %s"
        ).format(meta),
        (asset, topic, shard, start, upper),
    )
    batches = conn.execute(
        sql.SQL(
            "DELETE FROM {}.batch_ledger WHERE asset = %s AND source = %s AND shard = %s "
            "AND start_position >= %s AND start_position < %s"
        ).format(meta),
        (asset, topic, shard, start, upper),
    ).rowcount
    conn.execute(
        sql.SQL(
            "DELETE FROM {}.state WHERE store LIKE %s AND shard = %s AND position > %s "
            "AND position <= %s"
        ).format(meta),
        (f"{asset}/%", shard, start, upper),
    )
    return rows, batches


def rewind_topic_asset(
    conn: psycopg.Connection,
    schemas: Schemas,
    table: str,
    asset: str,
    topic: str,
    offsets: Mapping[int, int],
    *,
    side_tables: Sequence[str] = (),
) -> dict[int, int]:
    """Rewind ``asset`` so it reloads each partition from ``offsets`` on, in one transaction.

    Each partition restarts at the start of the ledger batch holding its offset (a batch
    boundary, where the state versions tell the state as it stood). Rows, side-table rows,
    dead letters, ledger batches, state versions and checkpoints after that point go;
    everything before stays. Returns the restart offset of each partition that moved.
    """
    meta = sql.Identifier(schemas.meta)
    restarts: dict[int, int] = {}
    with conn.transaction():
        heads = conn.execute(
            sql.SQL(
                "SELECT shard, end_position FROM {}.ledger_head WHERE asset = %s AND source = %s FOR UPDATE"
            ).format(meta),
            (asset, topic),
        ).fetchall()
        for shard, _ in heads:
            if shard not in offsets:
                continue
            row = conn.execute(
                sql.SQL(
                    "SELECT min(start_position) FROM {}.batch_ledger "
                    "WHERE asset = %s AND source = %s AND shard = %s AND end_position > %s"
                ).format(meta),
                (asset, topic, shard, offsets[shard]),
            ).fetchone()
            if row is None or row[0] is None:
                continue  # the ledger has not reached that offset: nothing to rewind
            start = int(row[0])
            delete_positions(conn, schemas, table, asset, topic, shard, start, None, side_tables)
            conn.execute(
                sql.SQL(
                    "DELETE FROM {}.checkpoint WHERE asset = %s AND source = %s AND shard = %s "
                    "AND position > %s"
                ).format(meta),
                (asset, topic, shard, start),
            )
            conn.execute(
                sql.SQL(
                    "UPDATE {meta}.ledger_head SET end_position = %s, updated_at = clock_timestamp(), "
                    "partition_key = (SELECT partition_key FROM {meta}.batch_ledger WHERE asset = %s "
                    "AND source = %s AND shard = %s AND end_position = %s) "
                    "WHERE asset = %s AND source = %s AND shard = %s"
                ).format(meta=meta),
                (start, asset, topic, shard, start, asset, topic, shard),
            )
            restarts[shard] = start
    return restarts
