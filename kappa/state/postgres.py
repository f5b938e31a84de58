"""The durable state tier in PostgreSQL: versions in ``{meta}.state``."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import orjson
import psycopg
from psycopg import sql

from kappa.edw.types import Schemas
from kappa.state.base import State


class PostgresStateBackend:
    """Versions in ``{meta}.state`` (created with the EDW schema): one row per
    (store, shard, key, position)."""

    def __init__(self, schemas: Schemas) -> None:
        self.table = sql.Identifier(schemas.meta, "state")

    def load(
        self,
        conn: psycopg.Connection,
        store: str,
        shard: int,
        keys: Sequence[str],
        *,
        as_of: int | None = None,
    ) -> dict[str, State]:
        """The newest version of each key, or the one in force at position ``as_of`` (the
        state as it stood when the batch ending there committed)."""
        if not keys:
            return {}
        rows = conn.execute(
            sql.SQL(
                "SELECT DISTINCT ON (key) key, value FROM {} WHERE store = %s AND shard = %s "
                "AND key = ANY(%s) AND position <= %s ORDER BY key, position DESC"
            ).format(self.table),
            (store, shard, list(keys), as_of if as_of is not None else 2**63 - 1),
        ).fetchall()
        return {key: value for key, value in rows}

    def keys(self, conn: psycopg.Connection, store: str, shard: int) -> list[str]:
        """Every key the store has a version of in this shard."""
        rows = conn.execute(
            sql.SQL(
                "SELECT DISTINCT key FROM {} WHERE store = %s AND shard = %s ORDER BY key"
            ).format(self.table),
            (store, shard),
        ).fetchall()
        return [r[0] for r in rows]

    def save(
        self,
        conn: psycopg.Connection,
        store: str,
        shard: int,
        position: int,
        values: Mapping[str, State],
    ) -> None:
        if not values:
            return
        with conn.cursor().copy(
            sql.SQL("COPY {} (store, shard, key, position, value) FROM STDIN").format(self.table)
        ) as copy:
            for key, value in values.items():
                copy.write_row((store, shard, key, position, _json(value)))

    def rewind(self, conn: psycopg.Connection, store: str, shard: int, position: int) -> int:
        """Forget versions written after ``position``: the state as it stood there."""
        return conn.execute(
            sql.SQL("DELETE FROM {} WHERE store = %s AND shard = %s AND position > %s").format(
                self.table
            ),
            (store, shard, position),
        ).rowcount


def _json(value: State) -> str:
    """JSON of a state value; exact integers beyond 64 bits (sums of squares) included."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value)
