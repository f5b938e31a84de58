"""The record budget of a micro-batch run: batches loaded in parallel hold at most so many
records together (KAPPA_RUN_MEMORY_RECORDS), so a run's memory follows that bound."""

import threading
import time

import pytest

from kappa.ingest.budget import RecordBudget


def _load(budget: RecordBudget, sizes: list[int], hold_s: float = 0.02) -> list[int]:
    """Hold each size in a thread of its own, all started at once; returns what the
    threads saw held together (counted by the threads, not by the budget)."""
    lock = threading.Lock()
    together = [0]
    seen: list[int] = []
    start = threading.Barrier(len(sizes))

    def batch(size: int) -> None:
        start.wait()
        with budget.hold(size):
            with lock:
                together[0] += size
                seen.append(together[0])
            time.sleep(hold_s)
            with lock:
                together[0] -= size

    threads = [threading.Thread(target=batch, args=(s,)) for s in sizes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    return seen


def test_batches_within_the_bound_load_side_by_side():
    budget = RecordBudget(100)
    seen = _load(budget, [25, 25, 25, 25], hold_s=0.2)
    assert max(seen) == 100 == budget.peak
    assert budget.held == 0


def test_batches_at_the_bound_load_one_at_a_time():
    budget = RecordBudget(100)
    seen = _load(budget, [60, 60, 60, 60])
    assert seen == [60, 60, 60, 60]
    assert budget.peak == 60


def test_a_batch_larger_than_the_bound_goes_alone():
    budget = RecordBudget(100)
    seen = _load(budget, [150, 10, 10])
    assert max(seen) <= 150
    assert 150 in seen and budget.peak <= 150
    assert budget.held == 0


def test_what_a_failing_batch_held_is_given_back():
    budget = RecordBudget(10)
    with pytest.raises(RuntimeError), budget.hold(10):
        raise RuntimeError("the batch failed")
    assert budget.held == 0
    with budget.hold(10):
        assert budget.held == 10


def test_a_budget_holds_at_least_one_record():
    with pytest.raises(ValueError, match="at least 1"):
        RecordBudget(0)
