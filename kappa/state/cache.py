"""The in-memory tier of step state: a bounded LRU over a durable, versioned backend.

Reads are bulk (every key of a batch in one query); the in-memory tier learns saved values
only once the batch's transaction has committed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from kappa.state.base import State, StateBackend

if TYPE_CHECKING:
    import psycopg


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
