"""How long a batch waited for change capture: counted from the first look that found it
behind until the wait ended, 0 when capture was complete at once."""

from __future__ import annotations

import pandas as pd

from kappa.steps.completeness import Completeness, WaitBudget, wait_for_capture

EVENT = pd.Timestamp("2026-12-03 10:00:05", tz="UTC")
ROWS = pd.DataFrame({"customer_id": ["c-1", "c-2"], "event_time": [EVENT, EVENT]})


class Capture:
    """Complete up to ``EVENT`` once it has been asked ``behind_for`` times; each look
    costs 0.2 s of the clock."""

    def __init__(self, clock: list[float], behind_for: int) -> None:
        self.clock, self.behind_for, self.asked = clock, behind_for, 0

    def watermark(self, keys=None):  # type: ignore[no-untyped-def]
        self.asked += 1
        self.clock[0] += 0.2
        if self.asked <= self.behind_for:
            return Completeness(EVENT, {"customer_id": {"c-2": EVENT - pd.Timedelta(1, "s")}})
        return Completeness(EVENT)


def budget(clock: list[float], seconds: float) -> WaitBudget:
    def sleep(s: float) -> None:
        clock[0] += s

    return WaitBudget(seconds, clock=lambda: clock[0], sleep=sleep)


def test_complete_at_once_is_no_wait():
    clock = [0.0]
    wait = budget(clock, 5.0)
    assert wait_for_capture(Capture(clock, 0), ROWS, ["customer_id"], budget=wait) is not None
    assert wait.waited_s == 0.0


def test_the_wait_counts_the_looks_and_the_sleeps_until_complete():
    clock = [0.0]
    wait = budget(clock, 5.0)
    capture = Capture(clock, 2)
    wait_for_capture(capture, ROWS, ["customer_id"], budget=wait)
    # three looks (0.2 s each) and two sleeps of 0.5 s
    assert capture.asked == 3
    assert abs(wait.waited_s - 1.6) < 1e-9


def test_a_wait_cut_short_by_the_budget_counts_all_of_it():
    clock = [0.0]
    wait = budget(clock, 1.0)
    completeness = wait_for_capture(Capture(clock, 100), ROWS, ["customer_id"], budget=wait)
    assert completeness is not None and completeness.pending
    assert 1.0 <= wait.waited_s <= 1.5
