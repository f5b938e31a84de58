"""The state cache of stateful steps as a Dagster resource."""

import dagster as dg
from pydantic import Field, PrivateAttr

from kappa.edw.types import Schemas
from kappa.state import StateCache
from kappa.state.postgres import PostgresStateBackend


class StateCacheResource(dg.ConfigurableResource):
    """An in-memory LRU (one per run) over the durable state in the EDW's PostgreSQL.

    Usage::

        cache = state_cache.cache(warehouse.schemas)
        prior = cache.get_many(conn, "running_totals", partition, keys)
    """

    max_keys: int = Field(
        default=200_000, description="Keys held in memory (KAPPA_STATE_CACHE_KEYS)."
    )
    _cache: StateCache | None = PrivateAttr(default=None)

    def cache(self, schemas: Schemas) -> StateCache:
        """The run's cache (created on first use, shared by the partitions of the run)."""
        if self._cache is None:
            self._cache = StateCache(PostgresStateBackend(schemas), max_keys=self.max_keys)
        return self._cache
