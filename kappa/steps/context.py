"""What a step sees of the engine for one batch: its state, its lookups, completeness."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import pandas as pd

from kappa.state.base import State, StateAccess
from kappa.steps.api import AsOf, Lookup, Range, lookup_for
from kappa.steps.asof import enrich_as_of
from kappa.steps.completeness import Completeness

if TYPE_CHECKING:
    import psycopg


class Lookups(Protocol):
    """Where lookups are answered from, in bulk: the EDW's capture targets in the engine,
    frames in memory in tests (:class:`kappa.steps.testing.MemoryLookups`)."""

    def watermark(self, keys: Mapping[str, Sequence[str]] | None = None) -> Completeness | None: ...

    def surrogate(self, lookup: AsOf) -> str:
        """The surrogate key column of the lookup's target."""
        ...

    def versions(self, lookup: AsOf, keys: list[str]) -> pd.DataFrame:
        """Every version of the target whose business key is one of ``keys``: the lookup's
        key column (named as the event field), surrogate, columns, valid_from, valid_to."""
        ...

    def range(
        self, lookup: Range, keys: list[str], since: pd.Timestamp, until: pd.Timestamp
    ) -> pd.DataFrame:
        """Rows of the target matching ``keys`` (as the event field) with ``time`` in
        [since, until]: the key column, the time column and the lookup's columns."""
        ...


class StepContext:
    """One batch of one shard: typed access to the step's state and lookups."""

    def __init__(
        self,
        *,
        conn: psycopg.Connection | None,
        state: StateAccess,
        shard: int,
        lookups: Lookups,
        declared: tuple[Lookup, ...],
        completeness: Completeness | None,
    ) -> None:
        self._conn: Any = conn
        self._state = state
        self.shard = shard
        self._lookups = lookups
        self._declared = declared
        self.completeness = completeness

    def get_many(self, store: str, keys: Iterable[str]) -> dict[str, State]:
        """The state of ``keys`` in ``store`` for this shard, as before the batch (keys
        without state are absent). Save new values through :class:`StepOutput.state`."""
        return self._state.get_many(self._conn, store, self.shard, keys)

    def marks(self, rows: pd.DataFrame) -> pd.Series | None:
        """Per row, the time change capture is complete up to for its lookup keys (None:
        unknown, every row is provisional)."""
        if self.completeness is None:
            return None
        keys = [lookup.key for lookup in self._declared if lookup.key in rows]
        return self.completeness.marks(rows[list(dict.fromkeys(keys))])

    def as_of(self, target: str, rows: pd.DataFrame) -> pd.DataFrame:
        """For each row (row-aligned, index reset), the version of ``target`` valid at its
        event time: the surrogate key, the lookup's columns and ``enrichment``."""
        lookup = lookup_for(self._declared, target, AsOf)
        assert isinstance(lookup, AsOf)
        keys = sorted(set(rows[lookup.key].astype(object).tolist()))
        versions = self._lookups.versions(lookup, keys)
        return enrich_as_of(
            rows,
            versions,
            self.marks(rows),
            key=lookup.key,
            surrogate=self._lookups.surrogate(lookup),
            columns=lookup.columns,
            unknown=lookup.unknown,
        )

    def range(
        self, target: str, rows: pd.DataFrame, since: pd.Timestamp, until: pd.Timestamp
    ) -> pd.DataFrame:
        """Rows of ``target`` for the rows' key values with their time in [since, until]."""
        lookup = lookup_for(self._declared, target, Range)
        assert isinstance(lookup, Range)
        keys = sorted(set(rows[lookup.key].astype(object).tolist()))
        if not keys:
            return pd.DataFrame(columns=[lookup.key, *lookup.columns, lookup.time])
        return self._lookups.range(lookup, keys, since, until)
