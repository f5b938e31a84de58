"""What the shop's OLTP writers did: committed row changes per table, for reconciliation."""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields

from examples.shop.oltp.plans import CALLS_TABLE, CUSTOMERS_TABLE


@dataclass(frozen=True)
class OltpStats:
    """What the writers did. Row counts are rows changed by *committed* transactions.

    ``aborted`` counts transactions PostgreSQL rolled back itself (deadlock, serialization
    failure); ``skipped`` counts plans with nothing to do; ``missed`` counts operations in
    committed transactions that found no customer (deleted meanwhile, or none yet).
    Each counted row change is exactly one row-level trigger firing, so
    :attr:`changes_by_table` is what change capture must account for.
    """

    committed: int = 0
    rolled_back: int = 0
    aborted: int = 0
    skipped: int = 0
    customers_inserted: int = 0
    customers_updated: int = 0
    customers_deleted: int = 0
    calls_inserted: int = 0
    missed: int = 0

    def __add__(self, other: OltpStats) -> OltpStats:
        return OltpStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    @property
    def transactions(self) -> int:
        return self.committed + self.rolled_back + self.aborted + self.skipped

    @property
    def changes_by_table(self) -> dict[str, int]:
        """Committed row changes per source table (``schema.table``)."""
        return {
            CUSTOMERS_TABLE: self.customers_inserted
            + self.customers_updated
            + self.customers_deleted,
            CALLS_TABLE: self.calls_inserted,
        }


class Tally:
    """The writers' shared running total."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = OltpStats()

    def add(self, stats: OltpStats) -> None:
        with self._lock:
            self._stats += stats

    def snapshot(self) -> OltpStats:
        with self._lock:
            return self._stats
