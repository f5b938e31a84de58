"""State of stateful steps: the value type and the protocols of its tiers (no database
client here, so steps and their tests import it without one).

State is sharded like the log (store, shard = topic partition, key), as in Kafka Streams:
one shard is only ever advanced by the one batch in flight for its partition. Writes go to
the durable tier inside the batch's ledger transaction, stamped with the batch's end
position, so state is never ahead of or behind the ledger.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import psycopg

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
