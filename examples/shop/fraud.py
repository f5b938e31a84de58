"""The shop's fraud rules over a batch of payments, as pure functions of (batch, prior state).

They depend only on the rows in log order and the state before the batch, never on where a
batch was cut: the velocity window is advanced payment by payment in log order, and the
amount rule reads the integer-exact running statistics of :func:`kappa.steps.running_stats`.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import numpy as np
import orjson
import pandas as pd

from kappa.steps import (
    RunningStats,
    State,
    StepConfig,
    join_key,
    round_half_even_div,
    utc_times,
)


@dataclass(frozen=True)
class FraudRules:
    """Thresholds of the fraud rules (configuration, see the README)."""

    velocity_max_payments: int = 3
    velocity_window: timedelta = timedelta(minutes=10)
    velocity_lateness: timedelta = timedelta(hours=1)
    amount_z: float = 3.0
    amount_min_history: int = 5
    geo_score: float = 0.5
    geo_after_call_score: float = 0.9
    geo_call_window: timedelta = timedelta(hours=48)

    @classmethod
    def from_catalog(cls, config: StepConfig) -> FraudRules:
        """The thresholds of the stream's ``config:`` (each optional, with these defaults:
        ``velocity_max`` 3 payments, ``velocity_window_s`` 60, ``amount_z`` 3.0,
        ``call_window_h`` 48)."""
        return cls(
            velocity_max_payments=config.integer("velocity_max", 3, minimum=1, maximum=10_000),
            velocity_window=config.seconds(
                "velocity_window_s", timedelta(seconds=60), maximum=timedelta(days=365)
            ),
            amount_z=config.number("amount_z", 3.0, minimum=0.1, maximum=1000),
            geo_call_window=timedelta(
                hours=config.integer("call_window_h", 48, minimum=1, maximum=8760)
            ),
        )


ALERT_COLUMNS = ["event_id", "rule", "score", "evidence", "customer_id", "event_time"]


_MILLI = Decimal("0.001")


def round_score(scores: np.ndarray) -> np.ndarray:
    """Scores to the 3 decimals of their numeric(4, 3) column, rounding each double's exact
    value half to even (``np.round`` scales by 1000 in floating point first, which can
    round a value the other way). Alerts are few: one Decimal per alert."""
    return np.array(
        [float(Decimal(float(s)).quantize(_MILLI, rounding=ROUND_HALF_EVEN)) for s in scores],
        dtype=float,
    )


def _alerts(frame: pd.DataFrame, rule: str, score: pd.Series, evidence: list[dict]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": frame["event_id"].to_numpy(),
            "rule": rule,
            "score": round_score(score.to_numpy(dtype=float)),
            "evidence": [
                orjson.dumps(e, option=orjson.OPT_SERIALIZE_NUMPY).decode() for e in evidence
            ],
            "customer_id": frame["customer_id"].to_numpy(),
            "event_time": frame["event_time"].to_numpy(),
        },
        columns=ALERT_COLUMNS,
    )


def velocity(
    payments: pd.DataFrame, prior: Mapping[str, State], rules: FraudRules
) -> tuple[np.ndarray, dict[str, State]]:
    """Payments of the same card within the window before each payment (itself included).

    Advanced payment by payment in log order; the state keeps, per card, the event times
    not older than the newest seen minus window and lateness.
    """
    window = int(rules.velocity_window.total_seconds() * 1000)
    keep = window + int(rules.velocity_lateness.total_seconds() * 1000)
    times_ms = payments["event_time"].to_numpy(dtype="datetime64[ms]").astype(np.int64)
    counts = np.zeros(len(payments), dtype=np.int64)
    cards: dict[str, State] = {}
    for position, (card, t) in enumerate(
        zip(payments["card_id"].to_numpy(dtype=object), times_ms, strict=True)
    ):
        state = cards.get(card)
        if state is None:
            previous = prior.get(card, {"times": [], "newest": None})
            state = cards[card] = {"times": sorted(previous["times"]), "newest": previous["newest"]}
        times: list[int] = state["times"]  # sorted, so the window is two binary searches
        at = int(t)
        bisect.insort(times, at)
        newest = at if state["newest"] is None else max(state["newest"], at)
        state["newest"] = newest
        if times[0] < newest - keep:
            del times[: bisect.bisect_left(times, newest - keep)]
        counts[position] = bisect.bisect_right(times, at) - bisect.bisect_left(times, at - window)
    return counts, cards


def fraud_alerts(
    payments: pd.DataFrame,
    *,
    enriched: pd.DataFrame,
    stats: RunningStats,
    velocity_counts: np.ndarray,
    calls: pd.DataFrame,
    rules: FraudRules,
) -> pd.DataFrame:
    """Alerts (rule, score, evidence) for a batch of valid payments.

    ``calls`` has ``customer_id``, ``call_id``, ``reason``, ``called_at`` for the batch's
    customers.
    """
    out = []
    fast = velocity_counts > rules.velocity_max_payments
    if fast.any():
        rows = payments[fast]
        out.append(
            _alerts(
                rows,
                "velocity",
                # n / (2 max) is rational: rounded exactly in integers, not as a double.
                pd.Series(
                    [
                        round_half_even_div(
                            min(int(n), 2 * rules.velocity_max_payments) * 1000,
                            2 * rules.velocity_max_payments,
                        )
                        / 1000
                        for n in velocity_counts[fast]
                    ],
                    dtype=float,
                ),
                [
                    {
                        "card_id": c,
                        "payments_in_window": int(n),
                        "window_s": rules.velocity_window.total_seconds(),
                    }
                    for c, n in zip(rows["card_id"], velocity_counts[fast], strict=True)
                ],
            )
        )
    amount = payments["amount"].to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = (amount - stats.mean_before) / stats.stddev_before
    unusual = (
        (stats.count_before >= rules.amount_min_history)
        & (stats.stddev_before > 0)
        & (z >= rules.amount_z)
    )
    if unusual.any():
        rows = payments[unusual]
        out.append(
            _alerts(
                rows,
                "amount_anomaly",
                pd.Series(np.minimum(1.0, z[unusual] / (3 * rules.amount_z))),
                [
                    {
                        "amount": a,
                        "mean_before": m,
                        "stddev_before": round(s, 2),
                        "z": round(zz, 2),
                        "payments_before": int(n),
                    }
                    for a, m, s, zz, n in zip(
                        amount[unusual],
                        stats.mean_cents_before[unusual],
                        stats.stddev_before[unusual],
                        z[unusual],
                        stats.count_before[unusual],
                        strict=True,
                    )
                ],
            )
        )
    country = enriched["customer_country"].astype(object).to_numpy()
    merchant = payments["merchant_country"].astype(object).to_numpy()
    known = ~pd.isna(country)
    mismatch = np.zeros(len(country), dtype=bool)
    mismatch[known] = country[known] != merchant[known]
    if mismatch.any():
        rows = payments[mismatch].reset_index(drop=True)
        recent = _latest_call_before(rows, calls, rules.geo_call_window)
        called = recent["call_id"].notna().to_numpy()
        score = np.where(called, rules.geo_after_call_score, rules.geo_score)
        evidence = []
        for merchant_country, home, call_id, reason, called_at in zip(
            rows["merchant_country"],
            country[mismatch],
            recent["call_id"],
            recent["reason"],
            recent["called_at"],
            strict=True,
        ):
            item: dict = {"merchant_country": merchant_country, "customer_country": home}
            if isinstance(call_id, str):
                item.update(
                    call_id=call_id,
                    call_reason=reason,
                    called_at=pd.Timestamp(called_at).isoformat(),
                )
            evidence.append(item)
        out.append(_alerts(rows, "geo_mismatch", pd.Series(score), evidence))
    if not out:
        return pd.DataFrame(columns=ALERT_COLUMNS)
    return pd.concat(out, ignore_index=True)


def _latest_call_before(
    payments: pd.DataFrame, calls: pd.DataFrame, window: timedelta
) -> pd.DataFrame:
    """For each payment, the customer's latest call in ``[event_time - window, event_time]``."""
    left = pd.DataFrame(
        {
            "row": np.arange(len(payments)),
            "customer_id": join_key(payments["customer_id"]),
            "event_time": utc_times(payments["event_time"]),
        }
    ).sort_values(["event_time", "row"], kind="stable")
    if calls.empty:
        return pd.DataFrame(
            {"call_id": [None] * len(payments), "reason": None, "called_at": pd.NaT}
        )
    right = pd.DataFrame(
        {
            "customer_id": join_key(calls["customer_id"]),
            "called_at": utc_times(calls["called_at"]),
            "call_id": calls["call_id"].to_numpy(),
            "reason": calls["reason"].to_numpy(),
        }
    ).sort_values(["called_at", "call_id"], kind="stable")
    joined = pd.merge_asof(
        left,
        right[["customer_id", "called_at", "call_id", "reason"]],
        left_on="event_time",
        right_on="called_at",
        by="customer_id",
        direction="backward",
        tolerance=pd.Timedelta(window),
    ).sort_values("row")
    return joined[["call_id", "reason", "called_at"]].reset_index(drop=True)
