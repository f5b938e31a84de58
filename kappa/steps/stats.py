"""Integer-exact running statistics over a batch in log order.

Sums are Python integers of cents (count, sum, sum of squares), so the mean and deviation do
not depend on the order floating-point sums were combined in, nor on where the log was cut.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from kappa.exact import round_half_even_div
from kappa.state.base import State


def to_cents(amount: pd.Series) -> np.ndarray:
    """Amounts (2 decimals) as exact integer cents."""
    return np.rint(amount.to_numpy(dtype=float) * 100).astype(np.int64)


@dataclass
class RunningStats:
    """Per-row statistics as they stood before each row, and the state after the batch."""

    count_before: np.ndarray
    mean_before: np.ndarray
    #: The mean before each row in cents, exactly rounded half to even (NaN: no history),
    #: divided by 100: what a numeric(p, 2) column stores, with no float rounding on the way.
    mean_cents_before: np.ndarray
    stddev_before: np.ndarray
    after: dict[str, State]


def running_stats(keys: pd.Series, cents: np.ndarray, prior: Mapping[str, State]) -> RunningStats:
    """Count, mean and sample deviation of each key's amounts before each row (log order).

    Sums are Python integers of cents (exact, no overflow); each row's mean and variance
    are one division of exact integers, so the same inputs give the same bits however the
    log was cut into batches.
    """
    totals: dict[str, list[int]] = {}
    size = len(cents)
    count = np.zeros(size, dtype=np.int64)
    mean = np.full(size, np.nan)
    mean_cents = np.full(size, np.nan)
    variance = np.full(size, np.nan)
    for i, (key, c) in enumerate(zip(keys.to_numpy(dtype=object), cents.tolist(), strict=True)):
        acc = totals.get(key)
        if acc is None:
            state = prior.get(key) or {}
            acc = totals[key] = [state.get("n", 0), state.get("sum", 0), state.get("sumsq", 0)]
        n, total, squares = acc
        count[i] = n
        if n > 0:
            mean[i] = total / n / 100.0
            mean_cents[i] = round_half_even_div(total, n)
        if n > 1:
            variance[i] = (n * squares - total * total) / (n * (n - 1))
        acc[0], acc[1], acc[2] = n + 1, total + c, squares + c * c
    stddev = np.sqrt(np.maximum(variance, 0.0)) / 100.0
    after = {
        key: {"n": n, "sum": total, "sumsq": squares} for key, (n, total, squares) in totals.items()
    }
    return RunningStats(
        count_before=count,
        mean_before=mean,
        mean_cents_before=mean_cents / 100.0,
        stddev_before=stddev,
        after=after,
    )
