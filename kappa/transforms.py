"""Stateful transforms over a batch, as pure functions of (batch, prior state).

They depend only on the rows in log order and the state before the batch, never on where
a batch was cut, so the same offsets processed as one batch or as many give identical rows
and identical final state:

* running statistics keep exact integer sums of cents (count, sum, sum of squares), so the
  mean and deviation do not depend on the order floating-point sums were combined in;
* the velocity window is advanced payment by payment, in log order;
* enrichment joins the dimension version valid at each event's time.
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

from kappa.exact import round_half_even_div
from kappa.state import State


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


def enrich_as_of(
    events: pd.DataFrame, versions: pd.DataFrame, watermark: pd.Timestamp | pd.Series | None
) -> pd.DataFrame:
    """The dimension version valid at each event's time, row-aligned with ``events``.

    ``events`` has ``customer_id`` and ``event_time``; ``versions`` has ``customer_id``,
    ``customer_sk``, ``segment``, ``country``, ``valid_from``, ``valid_to``. ``watermark``:
    the time change capture is complete up to, for every row or per row (a row-aligned
    series). ``enrichment`` says ``as_of`` (the version valid then), ``provisional`` (the
    event is later than what change capture has loaded: the newest known version, which may
    change) or ``unknown_customer``.
    """
    left = pd.DataFrame(
        {
            "row": np.arange(len(events)),
            "customer_id": _key(events["customer_id"]),
            "event_time": _utc(events["event_time"]),
        }
    ).sort_values(["event_time", "row"], kind="stable")
    right = pd.DataFrame(
        {
            "customer_id": _key(versions["customer_id"]),
            "valid_from": _utc(versions["valid_from"]),
            "valid_to": _utc(versions["valid_to"]),
            "customer_sk": versions["customer_sk"].to_numpy(),
            "segment": versions["segment"].to_numpy(),
            "country": versions["country"].to_numpy(),
        }
    ).sort_values(["valid_from", "customer_sk"], kind="stable")
    if right.empty:
        joined = left.assign(
            customer_sk=pd.NA,
            segment=pd.NA,
            country=pd.NA,
            valid_to=pd.Series(pd.NaT, index=left.index, dtype="datetime64[ns, UTC]"),
        )
    else:
        joined = pd.merge_asof(
            left,
            right[["customer_id", "valid_from", "valid_to", "customer_sk", "segment", "country"]],
            left_on="event_time",
            right_on="valid_from",
            by="customer_id",
            direction="backward",
        )
    closed = joined["valid_to"].notna() & (joined["event_time"] >= joined["valid_to"])
    joined.loc[closed, ["customer_sk", "segment", "country"]] = pd.NA
    joined = joined.sort_values("row").reset_index(drop=True)
    found = joined["customer_sk"].notna().to_numpy()
    if watermark is None:
        late = np.ones(len(joined), dtype=bool)
    elif isinstance(watermark, pd.Series):
        # As datetime64 (UTC): without a dtype, zone-aware times become an object array of
        # Timestamps, which was most of this function's time.
        late = (
            joined["event_time"].to_numpy("datetime64[ns]")
            > _utc(watermark).to_numpy("datetime64[ns]")
        ) | watermark.isna().to_numpy()
    else:
        late = (joined["event_time"] > watermark).to_numpy()
    joined["enrichment"] = np.where(
        ~found, "unknown_customer", np.where(late, "provisional", "as_of")
    )
    return pd.DataFrame(
        {
            "customer_sk": joined["customer_sk"].astype("Int64"),
            "customer_segment": joined["segment"].astype("string"),
            "customer_country": joined["country"].astype("string"),
            "enrichment": joined["enrichment"].astype("string"),
        }
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
            "customer_id": _key(payments["customer_id"]),
            "event_time": _utc(payments["event_time"]),
        }
    ).sort_values(["event_time", "row"], kind="stable")
    if calls.empty:
        return pd.DataFrame(
            {"call_id": [None] * len(payments), "reason": None, "called_at": pd.NaT}
        )
    right = pd.DataFrame(
        {
            "customer_id": _key(calls["customer_id"]),
            "called_at": _utc(calls["called_at"]),
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


def _key(values: pd.Series) -> np.ndarray:
    """Join keys as plain Python strings, whatever string dtype pandas chose."""
    return np.asarray(values.to_numpy(dtype=object), dtype=object)


def _utc(times: pd.Series) -> pd.Series:
    """One time representation for joins: nanoseconds, UTC, index dropped."""
    return pd.to_datetime(times, utc=True).astype("datetime64[ns, UTC]").reset_index(drop=True)
