"""State for stateful steps: base types and protocols, the in-memory cache, and (in
:mod:`kappa.state.postgres`, which needs the database client) the durable PostgreSQL tier."""

from kappa.state.base import State, StateAccess, StateBackend
from kappa.state.cache import AsOfStateCache, ScopedStateCache, StateCache

__all__ = [
    "AsOfStateCache",
    "ScopedStateCache",
    "State",
    "StateAccess",
    "StateBackend",
    "StateCache",
]
