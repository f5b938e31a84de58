"""Checkpoints: where each time partition starts in a shard, and a digest of the state there
(restoring one is reading every state key as of that position).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import psycopg
from psycopg import sql

from kappa.edw.types import BatchRecord, Schemas

# -- state checkpoints ------------------------------------------------------------------------
#
# A checkpoint marks the state of one shard at the start of a time partition: the position
# where the partition starts in that shard, and a digest of the state there. The state itself
# is the versions in ``{meta}.state`` (each stamped with the position of the batch that wrote
# it), so "restore the checkpoint" is "read every key as of that position". A digest is a
# chain: the digest at the previous checkpoint, then the final value of every key written
# since. Reprocessing a partition recomputes the digest at its end; when it differs from the
# digest the next partition was processed with, that partition (and everything after it) no
# longer follows from its predecessor: it is marked stale until reprocessed.


@dataclass(frozen=True)
class Checkpoint:
    asset: str
    source: str
    shard: int
    partition_key: str
    position: int
    digest: str
    stale_reason: str | None


def read_checkpoints(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str | None = None
) -> list[Checkpoint]:
    """Checkpoints of ``asset`` (of one source, or all), by shard and position."""
    rows = conn.execute(
        sql.SQL(
            "SELECT asset, source, shard, partition_key, position, digest, stale_reason "
            "FROM {}.checkpoint WHERE asset = %s AND (%s::text IS NULL OR source = %s) "
            "ORDER BY source, shard, position, partition_key"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source, source),
    ).fetchall()
    return [Checkpoint(*row) for row in rows]


def state_digest_at(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str, shard: int, position: int
) -> str:
    """Digest of the shard's state at ``position``, chained from the checkpoint before it."""
    meta = sql.Identifier(schemas.meta)
    base = conn.execute(
        sql.SQL(
            "SELECT position, digest FROM {}.checkpoint WHERE asset = %s AND source = %s "
            "AND shard = %s AND position < %s ORDER BY position DESC LIMIT 1"
        ).format(meta),
        (asset, source, shard, position),
    ).fetchone()
    since, chained = (base[0], base[1]) if base is not None else (-1, "")
    row = conn.execute(
        sql.SQL(
            "SELECT md5(coalesce(string_agg(store || '/' || key || '=' || value::text, ',' "
            "ORDER BY store, key), '')) FROM (SELECT DISTINCT ON (store, key) store, key, value "
            "FROM {}.state WHERE store LIKE %s AND shard = %s AND position > %s AND position <= %s "
            "ORDER BY store, key, position DESC) AS finals"
        ).format(meta),
        (f"{asset}/%", shard, since, position),
    ).fetchone()
    assert row is not None
    return hashlib.sha256(f"{chained}|{row[0]}".encode()).hexdigest()


def write_checkpoint(
    conn: psycopg.Connection, schemas: Schemas, record: BatchRecord, position: int
) -> str:
    """Checkpoint the state at ``position``, where ``record``'s partition starts in its shard
    (processed now with the state as it stands, so not stale)."""
    assert record.partition_key is not None
    digest = state_digest_at(conn, schemas, record.asset, record.source, record.shard, position)
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.checkpoint (asset, source, shard, partition_key, position, digest, "
            "run_id) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (asset, source, shard, partition_key) DO UPDATE SET "
            "position = excluded.position, digest = excluded.digest, stale_reason = NULL, "
            "run_id = excluded.run_id, written_at = clock_timestamp()"
        ).format(sql.Identifier(schemas.meta)),
        (
            record.asset,
            record.source,
            record.shard,
            record.partition_key,
            position,
            digest,
            record.run_id,
        ),
    )
    return digest
