"""State for stateful transforms: an in-memory LRU over a durable, versioned tier.

State is sharded like the log (store, shard = topic partition, key), as in Kafka Streams:
one shard is only ever advanced by the one batch in flight for its partition. Reads are
bulk (every key of a batch in one query). Writes go to the durable tier inside the batch's
ledger transaction, stamped with the batch's end position, so state is never ahead of or
behind the ledger, and the state as of any batch boundary can be restored; the in-memory
tier learns them only once that transaction has committed.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import orjson
import psycopg
from psycopg import sql

from kappa.edw.types import Schemas

State = dict[str, Any]


class StateBackend(Protocol):
    """The durable tier. Implementations must write inside the caller's transaction."""

    def load(
        self,
        conn: psycopg.Connection,
        store: str,
        shard: int,
        keys: Sequence[str],
        *,
        as_of: int | None = None,
    ) -> dict[str, State]: ...

    def save(
        self,
        conn: psycopg.Connection,
        store: str,
        shard: int,
        position: int,
        values: Mapping[str, State],
    ) -> None: ...

    def rewind(self, conn: psycopg.Connection, store: str, shard: int, position: int) -> int: ...


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


class StateCache:
    """Bounded in-memory LRU over a :class:`StateBackend`.

    ``get_many`` answers hits from memory and loads all misses in one query; ``save``
    writes through to the backend inside the caller's transaction; ``remember`` puts the
    saved values in memory once that transaction has committed (a rolled-back batch leaves
    memory as it was).
    """

    def __init__(self, backend: StateBackend, *, max_keys: int = 200_000) -> None:
        self.backend = backend
        self.max_keys = max_keys
        self._entries: OrderedDict[tuple[str, int, str], State | None] = OrderedDict()
        # The partitions of a run load in threads; each shard is touched by one of them.
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_many(
        self, conn: psycopg.Connection, store: str, shard: int, keys: Iterable[str]
    ) -> dict[str, State]:
        wanted = list(dict.fromkeys(keys))
        found: dict[str, State] = {}
        missing: list[str] = []
        with self._lock:
            self._lookup(store, shard, wanted, found, missing)
        if missing:
            self.misses += len(missing)
            loaded = self.backend.load(conn, store, shard, missing)
            found.update(loaded)
            self._put(store, shard, {key: loaded.get(key) for key in missing})
        return found

    def _lookup(
        self, store: str, shard: int, wanted: list[str], found: dict[str, State], missing: list[str]
    ) -> None:
        for key in wanted:
            entry_key = (store, shard, key)
            if entry_key in self._entries:
                self._entries.move_to_end(entry_key)
                value = self._entries[entry_key]
                if value is not None:
                    found[key] = value
                self.hits += 1
            else:
                missing.append(key)

    def save(
        self,
        conn: psycopg.Connection,
        store: str,
        shard: int,
        position: int,
        values: Mapping[str, State],
    ) -> None:
        self.backend.save(conn, store, shard, position, values)

    def remember(self, store: str, shard: int, values: Mapping[str, State]) -> None:
        self._put(store, shard, values)

    def forget(self, store: str, shard: int) -> None:
        """Drop a shard from memory (after a rewind, or when its batch failed)."""
        with self._lock:
            for entry_key in [k for k in self._entries if k[0] == store and k[1] == shard]:
                del self._entries[entry_key]

    def _put(self, store: str, shard: int, values: Mapping[str, State | None]) -> None:
        with self._lock:
            for key, value in values.items():
                self._entries[(store, shard, key)] = value
                self._entries.move_to_end((store, shard, key))
            while len(self._entries) > self.max_keys:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class StateAccess(Protocol):
    """What a stateful step and the batch commit use of a cache."""

    def get_many(
        self, conn: psycopg.Connection, store: str, shard: int, keys: Iterable[str]
    ) -> dict[str, State]: ...

    def save(
        self,
        conn: psycopg.Connection,
        store: str,
        shard: int,
        position: int,
        values: Mapping[str, State],
    ) -> None: ...

    def remember(self, store: str, shard: int, values: Mapping[str, State]) -> None: ...


class ScopedStateCache:
    """The stores of one asset in a shared cache (``<asset>/<store>``), so replaying an
    asset can forget exactly its state."""

    def __init__(self, cache: StateCache, scope: str) -> None:
        self.cache = cache
        self.scope = scope

    def get_many(
        self, conn: psycopg.Connection, store: str, shard: int, keys: Iterable[str]
    ) -> dict[str, State]:
        return self.cache.get_many(conn, f"{self.scope}/{store}", shard, keys)

    def save(
        self,
        conn: psycopg.Connection,
        store: str,
        shard: int,
        position: int,
        values: Mapping[str, State],
    ) -> None:
        self.cache.save(conn, f"{self.scope}/{store}", shard, position, values)

    def remember(self, store: str, shard: int, values: Mapping[str, State]) -> None:
        self.cache.remember(f"{self.scope}/{store}", shard, values)


class AsOfStateCache:
    """The state of one asset as it stood at ``as_of``, then as a reprocessing run advances it.

    For reprocessing a time partition: keys not yet touched by the run are read as of the
    partition's start (later versions, from later partitions, stay in the backend and are
    not seen); values the run saves are remembered in memory at once, because the whole
    partition commits in one transaction and this object dies with it.
    """

    def __init__(self, backend: StateBackend, scope: str, as_of: int) -> None:
        self.backend = backend
        self.scope = scope
        self.as_of = as_of
        self._values: dict[tuple[str, int, str], State] = {}

    def get_many(
        self, conn: psycopg.Connection, store: str, shard: int, keys: Iterable[str]
    ) -> dict[str, State]:
        found: dict[str, State] = {}
        missing = []
        for key in dict.fromkeys(keys):
            value = self._values.get((store, shard, key))
            if value is not None:
                found[key] = value
            else:
                missing.append(key)
        if missing:
            loaded = self.backend.load(
                conn, f"{self.scope}/{store}", shard, missing, as_of=self.as_of
            )
            for key, value in loaded.items():
                self._values[(store, shard, key)] = value
            found.update(loaded)
        return found

    def save(
        self,
        conn: psycopg.Connection,
        store: str,
        shard: int,
        position: int,
        values: Mapping[str, State],
    ) -> None:
        self.backend.save(conn, f"{self.scope}/{store}", shard, position, values)

    def remember(self, store: str, shard: int, values: Mapping[str, State]) -> None:
        for key, value in values.items():
            self._values[(store, shard, key)] = value
