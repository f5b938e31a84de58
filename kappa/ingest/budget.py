"""How many records the batches of one micro-batch run hold in memory together.

A batch is in memory whole while it is read, decoded, stepped and written, so the partitions
a run loads in parallel (:func:`kappa.run.run_micro_batches`) share a budget of records
(``KAPPA_RUN_MEMORY_RECORDS``): a run holds at most that, or one batch larger than it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

#: Records the batches of one run hold together (``KAPPA_RUN_MEMORY_RECORDS``'s default).
RUN_MEMORY_RECORDS = 20_000


class RecordBudget:
    """Records the batches of one run may hold in memory together: :meth:`hold` waits until
    the batches held leave room for another's, or none is held (a batch larger than the
    whole budget then goes alone)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a record budget must be at least 1, got {capacity}")
        self.capacity = capacity
        self.held = 0
        #: The most records held at once.
        self.peak = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, records: int) -> Iterator[None]:
        records = max(records, 0)
        with self._changed:
            self._changed.wait_for(lambda: self.held == 0 or self.held + records <= self.capacity)
            self.held += records
            self.peak = max(self.peak, self.held)
        try:
            yield
        finally:
            with self._changed:
                self.held -= records
                self._changed.notify_all()
