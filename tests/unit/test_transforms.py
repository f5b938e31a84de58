"""Stateful transforms: running statistics, as-of enrichment, card velocity, fraud rules.

Every expectation is worked out by hand in the test (the arithmetic is in the comments);
none is produced by the code under test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from datetime import timedelta
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pandas.testing import assert_frame_equal

from examples.shop.fraud import ALERT_COLUMNS, FraudRules, fraud_alerts, velocity
from examples.shop.steps import PaymentFraud
from examples.shop.steps import customer_as_of as enrich_as_of
from kappa.state import State, StateCache
from kappa.steps import Completeness, RunningStats, running_stats, to_cents
from kappa.steps.engine import apply_step
from kappa.steps.testing import MemoryLookups

VERSION_COLUMNS = ["customer_id", "customer_sk", "segment", "country", "valid_from", "valid_to"]
CALL_COLUMNS = ["customer_id", "call_id", "reason", "called_at"]


def utc(*texts: str | None) -> pd.Series:
    """Times as the decoder produces them: ``datetime64[us, UTC]``."""
    times = pd.to_datetime(pd.Series(list(texts), dtype="string"), utc=True, format="ISO8601")
    return times.astype("datetime64[us, UTC]")


def ms(text: str) -> int:
    """Epoch milliseconds of an ISO time."""
    return int(pd.Timestamp(text).timestamp() * 1000)


def strings(*values: Any) -> pd.Series:
    return pd.Series(list(values), dtype="string")


def versions_frame(rows: Sequence[tuple]) -> pd.DataFrame:
    """Dimension versions as ``WarehouseDimensions.customer_versions`` returns them."""
    frame = pd.DataFrame(list(rows), columns=VERSION_COLUMNS)
    frame["customer_sk"] = frame["customer_sk"].astype("int64")
    frame["valid_from"] = utc(*frame["valid_from"])
    frame["valid_to"] = utc(*frame["valid_to"])
    return frame


def calls_frame(rows: Sequence[tuple]) -> pd.DataFrame:
    frame = pd.DataFrame(list(rows), columns=CALL_COLUMNS)
    frame["called_at"] = utc(*frame["called_at"])
    return frame


def expected_enrichment(
    sk: list[int | None], segment: list[str | None], country: list[str | None], how: list[str]
) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "customer_sk": pd.array(sk, dtype="Int64"),
            "customer_segment": pd.array(segment, dtype="string"),
            "customer_country": pd.array(country, dtype="string"),
            "enrichment": pd.array(how, dtype="string"),
        }
    )


# --- cents -----------------------------------------------------------------------------------


def test_amounts_become_exact_integer_cents():
    # 0.29 * 100 is 28.999999999999996 in binary floating point: rounded, not truncated.
    cents = to_cents(pd.Series([0.29, 19.99, 0.07, 12345678.91, 1.1]))
    assert cents.dtype == np.int64
    assert cents.tolist() == [29, 1999, 7, 1234567891, 110]


# --- running statistics ----------------------------------------------------------------------


def test_running_stats_before_each_row_continue_the_prior_state():
    # Customer A had one order of 5.00 before the batch: n=1, sum=500, sumsq=500**2=250000.
    # Batch (log order): A 10.00, B 7.00, A 20.00, B 9.00, A 30.00 (B is new).
    keys = strings("A", "B", "A", "B", "A")
    keys.index = [40, 7, 12, 3, 99]  # the decoder's index after filtering is not 0..n-1
    cents = np.array([1000, 700, 2000, 900, 3000], dtype=np.int64)
    stats = running_stats(keys, cents, {"A": {"n": 1, "sum": 500, "sumsq": 250000}})

    assert stats.count_before.tolist() == [1, 0, 2, 1, 3]

    # A: before 10.00 -> {5}: mean 5.00; before 20.00 -> {5, 10}: mean 7.50;
    #    before 30.00 -> {5, 10, 20}: mean 35/3 = 11.666...
    # B: before 7.00 -> nothing: NaN; before 9.00 -> {7}: mean 7.00
    mean = stats.mean_before
    assert mean[0] == pytest.approx(5.00)
    assert math.isnan(mean[1])
    assert mean[2] == pytest.approx(7.50)
    assert mean[3] == pytest.approx(7.00)
    assert mean[4] == pytest.approx(11.67, abs=0.005)
    # The column's value: exact cents, half to even (35/3 = 11.666... -> 11.67).
    assert stats.mean_cents_before[[0, 2, 3, 4]].tolist() == [5.00, 7.50, 7.00, 11.67]

    # Sample deviation (n - 1), only from two values on:
    # {5, 10}: deviations -2.5, +2.5 -> (6.25 + 6.25) / 1 = 12.5 -> sqrt 3.5355339
    # {5, 10, 20}: mean 11.6667, deviations -6.6667, -1.6667, 8.3333
    #   -> (44.4444 + 2.7778 + 69.4444) / 2 = 58.3333 -> sqrt 7.6376262
    sd = stats.stddev_before
    assert math.isnan(sd[0]) and math.isnan(sd[1]) and math.isnan(sd[3])
    assert sd[2] == pytest.approx(3.5355339, abs=1e-6)
    assert sd[4] == pytest.approx(7.6376262, abs=1e-6)

    # After: A {5, 10, 20, 30} -> n 4, sum 6500, sumsq 250000+1000000+4000000+9000000
    #        B {7, 9}          -> n 2, sum 1600, sumsq 490000+810000
    assert stats.after == {
        "A": {"n": 4, "sum": 6500, "sumsq": 14_250_000},
        "B": {"n": 2, "sum": 1600, "sumsq": 1_300_000},
    }
    for state in stats.after.values():
        assert all(type(v) is int for v in state.values())  # JSON-able, exact


def test_a_new_customers_first_order_has_no_history():
    stats = running_stats(strings("Z"), np.array([4250], dtype=np.int64), {})
    assert stats.count_before.tolist() == [0]
    assert math.isnan(stats.mean_before[0]) and math.isnan(stats.stddev_before[0])
    assert stats.after == {"Z": {"n": 1, "sum": 4250, "sumsq": 4250 * 4250}}


def test_running_stats_of_an_empty_batch_change_nothing():
    stats = running_stats(strings(), np.array([], dtype=np.int64), {"A": {"n": 1}})
    assert len(stats.count_before) == 0
    assert stats.after == {}


# --- as-of enrichment ------------------------------------------------------------------------

# c-1: retail in [10:00, 11:00), smb from 11:00 on.
# c-2: retail in [09:00, 10:40), then deleted (the version was closed, nothing follows).
VERSIONS = [
    ("c-1", 11, "retail", "DE", "2024-03-01T10:00:00Z", "2024-03-01T11:00:00Z"),
    ("c-1", 12, "smb", "DE", "2024-03-01T11:00:00Z", None),
    ("c-2", 21, "retail", "FR", "2024-03-01T09:00:00Z", "2024-03-01T10:40:00Z"),
]


def test_each_event_gets_the_version_valid_at_its_time_in_input_order():
    events = pd.DataFrame(
        {
            "customer_id": strings("c-1", "c-1", "c-1", "c-2", "c-2", "c-2", "c-3"),
            "event_time": utc(
                "2024-03-01T11:00:00Z",  # exactly at the change: the new version (smb)
                "2024-03-01T10:30:00Z",  # retail
                "2024-03-01T09:00:00Z",  # before the first version
                "2024-03-01T10:39:59Z",  # just before the deletion
                "2024-03-01T10:40:00Z",  # at the deletion (valid_to is exclusive)
                "2024-03-01T13:00:00Z",  # after the deletion
                "2024-03-01T10:00:00Z",  # no versions at all
            ),
        }
    ).set_axis([5, 1, 9, 2, 8, 3, 0])  # the decoder's index after filtering is not 0..n-1
    watermark = pd.Timestamp("2024-03-01T10:45:00Z")
    enriched = enrich_as_of(events, versions_frame(VERSIONS), watermark)
    assert_frame_equal(
        enriched,
        expected_enrichment(
            [12, 11, None, 21, None, None, None],
            ["smb", "retail", None, "retail", None, None, None],
            ["DE", "DE", None, "FR", None, None, None],
            # 11:00 is after the 10:45 watermark: the newest known version, may change.
            [
                "provisional",
                "as_of",
                "unknown_customer",
                "as_of",
                "unknown_customer",
                "unknown_customer",
                "unknown_customer",
            ],
        ),
    )


def test_an_event_at_the_watermark_is_as_of_and_no_watermark_makes_all_provisional():
    events = pd.DataFrame(
        {
            "customer_id": strings("c-1", "c-1"),
            "event_time": utc("2024-03-01T10:45:00Z", "2024-03-01T10:45:00.000001Z"),
        }
    )
    versions = versions_frame(VERSIONS)
    at = enrich_as_of(events, versions, pd.Timestamp("2024-03-01T10:45:00Z"))
    assert at["enrichment"].tolist() == ["as_of", "provisional"]
    unknown_mark = enrich_as_of(events, versions, None)
    assert unknown_mark["enrichment"].tolist() == ["provisional", "provisional"]
    assert unknown_mark["customer_sk"].tolist() == [11, 11]


def test_a_customer_with_a_change_not_loaded_yet_is_complete_only_up_to_just_before_it():
    """Per-customer completeness: c-1 has a change waiting (at 10:50), c-2 has none; change
    capture is complete up to 11:30 otherwise."""
    events = pd.DataFrame(
        {
            "customer_id": strings("c-1", "c-1", "c-2", "c-1"),
            "event_time": utc(
                "2024-03-01T10:49:59.999999Z",  # before c-1's waiting change: final
                "2024-03-01T10:50:00Z",  # at it: the waiting change may be its version
                "2024-03-01T10:30:00Z",  # c-2 waits for nothing: final up to 11:30
                "2024-03-01T11:40:00Z",  # after everything known
            ),
        }
    ).set_axis([3, 1, 2, 0])
    completeness = Completeness(
        pd.Timestamp("2024-03-01T11:30:00Z"),
        {
            "customer_id": {
                "c-1": pd.Timestamp("2024-03-01T10:50:00Z") - pd.Timedelta(microseconds=1)
            }
        },
    )
    marks = completeness.marks(events["customer_id"])
    assert marks.index.tolist() == [3, 1, 2, 0], "row-aligned with the events"
    enriched = enrich_as_of(events, versions_frame(VERSIONS), marks)
    assert enriched["enrichment"].tolist() == ["as_of", "provisional", "as_of", "provisional"]
    assert (
        Completeness(pd.Timestamp("2024-03-01T11:30:00Z"))
        .marks(events["customer_id"])
        .eq(pd.Timestamp("2024-03-01T11:30:00Z"))
        .all()
    )


def test_without_versions_every_event_is_an_unknown_customer():
    events = pd.DataFrame(
        {
            "customer_id": strings("c-1", "c-9"),
            "event_time": utc("2024-03-01T10:30:00Z", "2024-03-01T08:00:00Z"),
        }
    )
    enriched = enrich_as_of(
        events, pd.DataFrame(columns=VERSION_COLUMNS), pd.Timestamp("2030-01-01T00:00:00Z")
    )
    assert_frame_equal(
        enriched,
        expected_enrichment(
            [None, None], [None, None], [None, None], ["unknown_customer", "unknown_customer"]
        ),
    )


def test_enrichment_accepts_event_times_with_nanoseconds():
    # The decoder accepts up to 9 fractional digits; such a batch's event_time column is
    # datetime64[ns, UTC] while the dimension's validity times are microseconds.
    events = pd.DataFrame(
        {
            "customer_id": strings("c-1"),
            "event_time": pd.to_datetime(
                pd.Series(["2024-03-01T10:30:00.123456789Z"], dtype="string"),
                utc=True,
                format="ISO8601",
            ),
        }
    )
    assert str(events["event_time"].dtype) == "datetime64[ns, UTC]"
    enriched = enrich_as_of(events, versions_frame(VERSIONS), pd.Timestamp("2024-03-01T12:00Z"))
    assert enriched["customer_sk"].tolist() == [11]
    assert enriched["enrichment"].tolist() == ["as_of"]


# --- velocity --------------------------------------------------------------------------------

# Written out, so the hand-computed numbers do not follow the defaults.
RULES = FraudRules(
    velocity_max_payments=3,
    velocity_window=timedelta(minutes=10),
    velocity_lateness=timedelta(hours=1),
    amount_z=3.0,
    amount_min_history=5,
    geo_score=0.5,
    geo_after_call_score=0.9,
    geo_call_window=timedelta(hours=48),
)


def payments_frame(rows: Sequence[tuple]) -> pd.DataFrame:
    """(event_id, customer_id, card_id, amount, merchant_country, event_time) rows."""
    columns = ["event_id", "customer_id", "card_id", "amount", "merchant_country", "event_time"]
    frame = pd.DataFrame(list(rows), columns=columns)
    for column in ("event_id", "customer_id", "card_id", "merchant_country"):
        frame[column] = frame[column].astype("string")
    frame["amount"] = frame["amount"].astype(float)
    frame["event_time"] = utc(*frame["event_time"])
    return frame


def test_velocity_counts_a_cards_payments_in_the_window_before_each():
    # k-1 at t, t+1m, t+2m, t+3m, t+20m; k-2 interleaved once.
    payments = payments_frame(
        [
            ("e1", "c-1", "k-1", 1, "DE", "2024-03-01T12:00:00Z"),
            ("e2", "c-1", "k-1", 1, "DE", "2024-03-01T12:01:00Z"),
            ("e3", "c-2", "k-2", 1, "DE", "2024-03-01T12:01:30Z"),
            ("e4", "c-1", "k-1", 1, "DE", "2024-03-01T12:02:00Z"),
            ("e5", "c-1", "k-1", 1, "DE", "2024-03-01T12:03:00Z"),
            ("e6", "c-1", "k-1", 1, "DE", "2024-03-01T12:20:00Z"),
        ]
    )
    counts, cards = velocity(payments, {}, RULES)
    # 12:20's window [12:10, 12:20] holds only itself.
    assert counts.tolist() == [1, 2, 1, 3, 4, 1]
    assert (counts > RULES.velocity_max_payments).tolist() == [
        False,
        False,
        False,
        False,
        True,
        False,
    ]
    # Kept: everything not older than newest (12:20) - 10 min - 1 h = 11:10.
    assert cards == {
        "k-1": {
            "times": [
                ms("2024-03-01T12:00:00Z"),
                ms("2024-03-01T12:01:00Z"),
                ms("2024-03-01T12:02:00Z"),
                ms("2024-03-01T12:03:00Z"),
                ms("2024-03-01T12:20:00Z"),
            ],
            "newest": ms("2024-03-01T12:20:00Z"),
        },
        "k-2": {"times": [ms("2024-03-01T12:01:30Z")], "newest": ms("2024-03-01T12:01:30Z")},
    }


def test_a_late_payment_counts_the_earlier_ones_and_is_counted_by_later_ones():
    payments = payments_frame(
        [
            ("e1", "c-1", "k-1", 1, "DE", "2024-03-01T12:00:00Z"),
            ("e2", "c-1", "k-1", 1, "DE", "2024-03-01T12:08:00Z"),
            ("e3", "c-1", "k-1", 1, "DE", "2024-03-01T12:03:00Z"),  # arrives late
            ("e4", "c-1", "k-1", 1, "DE", "2024-03-01T12:12:00Z"),
        ]
    )
    counts, cards = velocity(payments, {}, RULES)
    # 12:03 -> [11:53, 12:03]: 12:00 and itself (12:08 is after it) = 2
    # 12:12 -> [12:02, 12:12]: 12:08, 12:03, itself = 3
    assert counts.tolist() == [1, 2, 2, 3]
    assert cards["k-1"]["newest"] == ms("2024-03-01T12:12:00Z")
    # The state keeps the times sorted (the window is then two binary searches).
    assert cards["k-1"]["times"] == [
        ms("2024-03-01T12:00:00Z"),
        ms("2024-03-01T12:03:00Z"),
        ms("2024-03-01T12:08:00Z"),
        ms("2024-03-01T12:12:00Z"),
    ]


def test_velocity_continues_from_the_prior_state_and_forgets_old_times():
    prior = {
        "k-1": {
            "times": [
                ms("2024-03-01T10:00:00Z"),  # older than 12:04 - 70 min = 10:54: dropped
                ms("2024-03-01T11:55:00Z"),
                ms("2024-03-01T11:58:00Z"),
            ],
            "newest": ms("2024-03-01T11:58:00Z"),
        }
    }
    untouched = orjson.loads(orjson.dumps(prior))
    payments = payments_frame(
        [
            ("e1", "c-1", "k-1", 1, "DE", "2024-03-01T12:00:00Z"),
            ("e2", "c-1", "k-1", 1, "DE", "2024-03-01T12:04:00Z"),
        ]
    )
    counts, cards = velocity(payments, prior, RULES)
    # 12:00 -> [11:50, 12:00]: 11:55, 11:58, itself = 3
    # 12:04 -> [11:54, 12:04]: 11:55, 11:58, 12:00, itself = 4
    assert counts.tolist() == [3, 4]
    assert cards == {
        "k-1": {
            "times": [
                ms("2024-03-01T11:55:00Z"),
                ms("2024-03-01T11:58:00Z"),
                ms("2024-03-01T12:00:00Z"),
                ms("2024-03-01T12:04:00Z"),
            ],
            "newest": ms("2024-03-01T12:04:00Z"),
        }
    }
    assert prior == untouched  # the cached prior state is not mutated


# --- fraud alerts ----------------------------------------------------------------------------


def no_stats(n: int) -> RunningStats:
    return RunningStats(
        count_before=np.zeros(n, dtype=np.int64),
        mean_before=np.full(n, np.nan),
        mean_cents_before=np.full(n, np.nan),
        stddev_before=np.full(n, np.nan),
        after={},
    )


def home(*countries: str | None) -> pd.DataFrame:
    return pd.DataFrame({"customer_country": pd.array(list(countries), dtype="string")})


def no_calls() -> pd.DataFrame:
    return pd.DataFrame(columns=CALL_COLUMNS)


def by_rule(alerts: pd.DataFrame) -> list[tuple[str, str, float, dict]]:
    ordered = alerts.sort_values(["event_id", "rule"])
    return [
        (e, r, s, orjson.loads(ev))
        for e, r, s, ev in zip(
            ordered["event_id"], ordered["rule"], ordered["score"], ordered["evidence"], strict=True
        )
    ]


def test_amount_anomaly_needs_z_of_3_over_5_payments_of_history():
    payments = payments_frame(
        [
            ("p0", "c-1", "k-1", 16.00, "DE", "2024-03-01T12:00:00Z"),
            ("p1", "c-1", "k-1", 15.99, "DE", "2024-03-01T12:00:00Z"),
            ("p2", "c-1", "k-1", 100.00, "DE", "2024-03-01T12:00:00Z"),
            ("p3", "c-1", "k-1", 100.00, "DE", "2024-03-01T12:00:00Z"),
            ("p4", "c-1", "k-1", 100.00, "DE", "2024-03-01T12:00:00Z"),
        ]
    )
    stats = RunningStats(
        count_before=np.array([5, 5, 4, 6, 5]),
        mean_before=np.array([10.0, 10.0, 10.0, 10.0, 10.0]),
        mean_cents_before=np.array([10.0, 10.0, 10.0, 10.0, 10.0]),
        stddev_before=np.array([2.0, 2.0, 2.0, 0.0, 2.0]),
        after={},
    )
    alerts = fraud_alerts(
        payments,
        enriched=home("DE", "DE", "DE", "DE", "DE"),
        stats=stats,
        velocity_counts=np.ones(5, dtype=np.int64),
        calls=no_calls(),
        rules=RULES,
    )
    # p0: (16 - 10) / 2 = 3.0 >= 3 -> score 3 / 9 = 0.333
    # p1: 5.99 / 2 = 2.995 < 3; p2: only 4 payments before; p3: no deviation (all equal)
    # p4: 90 / 2 = 45 -> score min(1, 45 / 9) = 1.0
    assert list(alerts.columns) == ALERT_COLUMNS
    assert by_rule(alerts) == [
        (
            "p0",
            "amount_anomaly",
            0.333,
            {
                "amount": 16.0,
                "mean_before": 10.0,
                "stddev_before": 2.0,
                "z": 3.0,
                "payments_before": 5,
            },
        ),
        (
            "p4",
            "amount_anomaly",
            1.0,
            {
                "amount": 100.0,
                "mean_before": 10.0,
                "stddev_before": 2.0,
                "z": 45.0,
                "payments_before": 5,
            },
        ),
    ]
    assert alerts["customer_id"].tolist() == ["c-1", "c-1"]
    assert alerts["event_time"].tolist() == [pd.Timestamp("2024-03-01T12:00:00Z")] * 2


def test_geo_mismatch_scores_higher_after_a_recent_call():
    at = "2024-03-10T12:00:00Z"
    payments = payments_frame(
        [
            ("g0", "A", "k-a", 10, "US", at),  # called 24 h before -> 0.9 (latest call)
            ("g1", "B", "k-b", 10, "US", at),  # called an hour after -> 0.5
            ("g2", "C", "k-c", 10, "US", at),  # called 48 h 1 min before -> 0.5
            ("g3", "D", "k-d", 10, "DE", at),  # home country -> no alert
            ("g4", "E", "k-e", 10, "US", at),  # unknown customer -> no alert
            ("g5", "F", "k-f", 10, "BR", at),  # called exactly 48 h before -> 0.9
            ("g6", "G", "k-g", 10, "US", at),  # no calls -> 0.5
        ]
    )
    calls = calls_frame(
        [
            ("A", "call-a1", "lost card", "2024-03-08T20:00:00Z"),
            ("A", "call-a2", "travel notice", "2024-03-09T12:00:00Z"),
            ("B", "call-b", "travel notice", "2024-03-10T13:00:00Z"),
            ("C", "call-c", "travel notice", "2024-03-08T11:59:00Z"),
            ("F", "call-f", "address change", "2024-03-08T12:00:00Z"),
        ]
    )
    alerts = fraud_alerts(
        payments,
        enriched=home("DE", "DE", "DE", "DE", None, "DE", "FR"),
        stats=no_stats(7),
        velocity_counts=np.ones(7, dtype=np.int64),
        calls=calls,
        rules=RULES,
    )
    assert by_rule(alerts) == [
        (
            "g0",
            "geo_mismatch",
            0.9,
            {
                "merchant_country": "US",
                "customer_country": "DE",
                "call_id": "call-a2",
                "call_reason": "travel notice",
                "called_at": "2024-03-09T12:00:00+00:00",
            },
        ),
        ("g1", "geo_mismatch", 0.5, {"merchant_country": "US", "customer_country": "DE"}),
        ("g2", "geo_mismatch", 0.5, {"merchant_country": "US", "customer_country": "DE"}),
        (
            "g5",
            "geo_mismatch",
            0.9,
            {
                "merchant_country": "BR",
                "customer_country": "DE",
                "call_id": "call-f",
                "call_reason": "address change",
                "called_at": "2024-03-08T12:00:00+00:00",
            },
        ),
        ("g6", "geo_mismatch", 0.5, {"merchant_country": "US", "customer_country": "FR"}),
    ]
    assert dict(zip(alerts["event_id"], alerts["customer_id"], strict=True)) == {
        "g0": "A",
        "g1": "B",
        "g2": "C",
        "g5": "F",
        "g6": "G",
    }


def test_geo_mismatch_without_any_calls_scores_the_base():
    payments = payments_frame([("g0", "A", "k-a", 10, "US", "2024-03-10T12:00:00Z")])
    alerts = fraud_alerts(
        payments,
        enriched=home("DE"),
        stats=no_stats(1),
        velocity_counts=np.ones(1, dtype=np.int64),
        calls=no_calls(),
        rules=RULES,
    )
    assert by_rule(alerts) == [
        ("g0", "geo_mismatch", 0.5, {"merchant_country": "US", "customer_country": "DE"})
    ]


def test_velocity_alerts_name_the_card_and_the_count():
    payments = payments_frame(
        [
            ("v0", "c-1", "k-1", 1, "DE", "2024-03-01T12:00:00Z"),
            ("v1", "c-1", "k-1", 1, "DE", "2024-03-01T12:01:00Z"),
            ("v2", "c-2", "k-2", 1, "DE", "2024-03-01T12:02:00Z"),
        ]
    )
    alerts = fraud_alerts(
        payments,
        enriched=home("DE", "DE", "DE"),
        stats=no_stats(3),
        velocity_counts=np.array([4, 3, 7]),
        calls=no_calls(),
        rules=RULES,
    )
    # score = min(1, count / (2 * 3)): 4 / 6 = 0.667, 7 / 6 -> 1.0; 3 is not above 3.
    assert by_rule(alerts) == [
        ("v0", "velocity", 0.667, {"card_id": "k-1", "payments_in_window": 4, "window_s": 600.0}),
        ("v2", "velocity", 1.0, {"card_id": "k-2", "payments_in_window": 7, "window_s": 600.0}),
    ]


def test_no_alerts_is_an_empty_frame_with_the_alert_columns():
    payments = payments_frame([("n0", "c-1", "k-1", 12.5, "DE", "2024-03-01T12:00:00Z")])
    alerts = fraud_alerts(
        payments,
        enriched=home("DE"),
        stats=no_stats(1),
        velocity_counts=np.array([1]),
        calls=no_calls(),
        rules=RULES,
    )
    assert alerts.empty
    assert list(alerts.columns) == ALERT_COLUMNS


# --- the payment step end to end ------------------------------------------------------------


class DictBackend:
    """The durable tier in memory: the latest value per (store, shard, key)."""

    def __init__(self) -> None:
        self.values: dict[tuple[str, int, str], State] = {}

    def load(self, conn: Any, store: str, shard: int, keys: Sequence[str]) -> dict[str, State]:
        return {k: self.values[(store, shard, k)] for k in keys if (store, shard, k) in self.values}

    def save(
        self, conn: Any, store: str, shard: int, position: int, values: Mapping[str, State]
    ) -> None:
        for key, value in values.items():
            self.values[(store, shard, key)] = orjson.loads(orjson.dumps(value))

    def rewind(self, conn: Any, store: str, shard: int, position: int) -> int:
        raise NotImplementedError


class StaticDimensions(MemoryLookups):
    def __init__(self, versions: pd.DataFrame, calls: pd.DataFrame, mark: pd.Timestamp) -> None:
        super().__init__(
            versions={"dim_customer": versions},
            ranges={"fact_call_center_call": calls},
            mark=mark,
        )


def run_payments(dims: MemoryLookups, shard: int, rows: pd.DataFrame, completeness: Any) -> Any:
    """The payment step over ``rows`` as the engine calls it (in-memory state)."""
    return apply_step(
        PaymentFraud(RULES),
        rows,
        conn=None,  # the in-memory backend needs no connection
        state=StateCache(DictBackend()),
        shard=shard,
        lookups=dims,
        completeness=completeness,
    )


def test_payment_step_scores_each_payment_by_its_highest_alert():
    # c-1 lives in DE; four payments on k-1 within 3 minutes, the 4th abroad an hour after a
    # call: velocity (4 / 6 = 0.667) and geo after a call (0.9) -> fraud_score 0.9.
    rows = payments_frame(
        [
            ("f0", "c-1", "k-1", 10.00, "DE", "2024-03-10T12:00:00Z"),
            ("f1", "c-1", "k-1", 10.00, "DE", "2024-03-10T12:01:00Z"),
            ("f2", "c-1", "k-1", 10.00, "DE", "2024-03-10T12:02:00Z"),
            ("f3", "c-1", "k-1", 10.00, "US", "2024-03-10T12:03:00Z"),
        ]
    ).assign(topic="payments", kafka_partition=2, kafka_offset=[70, 71, 72, 73])
    rows.index = [4, 5, 6, 7]
    dims = StaticDimensions(
        versions_frame([("c-1", 11, "retail", "DE", "2024-03-01T00:00:00Z", None)]),
        calls_frame([("c-1", "call-1", "travel notice", "2024-03-10T11:03:00Z")]),
        pd.Timestamp("2030-01-01T00:00:00Z"),
    )
    out = run_payments(dims, 2, rows, dims.watermark())
    assert out.rows["event_id"].tolist() == ["f0", "f1", "f2", "f3"]
    assert out.rows["customer_sk"].tolist() == [11, 11, 11, 11]
    assert out.rows["enrichment"].tolist() == ["as_of"] * 4
    assert out.rows["fraud_score"].tolist()[3] == 0.9
    assert out.rows["fraud_score"].iloc[:3].isna().all()

    alerts = out.side_tables["fraud_alert"].sort_values("rule").reset_index(drop=True)
    assert list(alerts.columns) == [*ALERT_COLUMNS, "topic", "kafka_partition", "kafka_offset"]
    assert alerts[
        ["event_id", "rule", "score", "topic", "kafka_partition", "kafka_offset"]
    ].to_dict("records") == [
        {
            "event_id": "f3",
            "rule": "geo_mismatch",
            "score": 0.9,
            "topic": "payments",
            "kafka_partition": 2,
            "kafka_offset": 73,
        },
        {
            "event_id": "f3",
            "rule": "velocity",
            "score": 0.667,
            "topic": "payments",
            "kafka_partition": 2,
            "kafka_offset": 73,
        },
    ]
    assert out.state == {
        "payment_stats": {"c-1": {"n": 4, "sum": 4000, "sumsq": 4_000_000}},
        "card_velocity": {
            "k-1": {
                "times": [
                    ms("2024-03-10T12:00:00Z"),
                    ms("2024-03-10T12:01:00Z"),
                    ms("2024-03-10T12:02:00Z"),
                    ms("2024-03-10T12:03:00Z"),
                ],
                "newest": ms("2024-03-10T12:03:00Z"),
            }
        },
    }


def test_the_payment_step_asks_for_calls_in_the_window_of_the_batch():
    asked: list[tuple[list[str], pd.Timestamp, pd.Timestamp]] = []

    class Recording(StaticDimensions):
        def range(
            self, lookup: Any, keys: list[str], since: pd.Timestamp, until: pd.Timestamp
        ) -> pd.DataFrame:
            asked.append((keys, since, until))
            return super().range(lookup, keys, since, until)

    rows = payments_frame(
        [
            ("f0", "c-2", "k-2", 10.00, "DE", "2024-03-10T12:30:00Z"),
            ("f1", "c-1", "k-1", 10.00, "DE", "2024-03-10T12:00:00Z"),
        ]
    ).assign(topic="payments", kafka_partition=0, kafka_offset=[0, 1])
    dims = Recording(versions_frame([]), calls_frame([]), pd.Timestamp("2030-01-01T00:00:00Z"))
    run_payments(dims, 0, rows, None)
    # once per batch, distinct sorted customers, [earliest - 48 h, latest]
    assert asked == [
        (
            ["c-1", "c-2"],
            pd.Timestamp("2024-03-08T12:00:00Z"),
            pd.Timestamp("2024-03-10T12:30:00Z"),
        )
    ]


def test_state_of_a_very_large_amount_survives_the_round_trip_to_json():
    """Sums of squared cents pass 2**64 with one amount of ~43 million: still exact."""
    import json

    from kappa.state.postgres import _json

    stats = running_stats(
        pd.Series(["c-1"], dtype="string"), to_cents(pd.Series([50_000_000.00])), {}
    )
    assert stats.after["c-1"] == {"n": 1, "sum": 5_000_000_000, "sumsq": 25_000_000_000_000_000_000}
    assert json.loads(_json(stats.after["c-1"])) == stats.after["c-1"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["A", "B", "C"]), st.integers(1, 10**14 - 1)),
        min_size=1,
        max_size=40,
    )
)
def test_the_running_mean_column_is_the_exact_mean_rounded_half_to_even(orders):
    """customer_avg_amount_before (numeric(14, 2)) equals the Decimal mean of the cents
    before each row, rounded half to even: no float division or float rounding on the way."""
    keys = strings(*(k for k, _ in orders))
    cents = np.array([c for _, c in orders], dtype=np.int64)
    stats = running_stats(keys, cents, {})
    seen: dict[str, list[int]] = {}
    for i, (key, c) in enumerate(orders):
        before = seen.setdefault(key, [])
        if before:
            with localcontext() as ctx:
                ctx.prec = 50
                exact = (Decimal(sum(before)) / len(before) / 100).quantize(
                    Decimal("0.01"), rounding=ROUND_HALF_EVEN
                )
            assert Decimal(repr(float(stats.mean_cents_before[i]))) == exact
        else:
            assert math.isnan(stats.mean_cents_before[i])
        before.append(c)


def test_half_cent_means_round_to_even_cents():
    # 0.01 and 0.02 -> 0.015 -> 0.02; 0.02 and 0.03 -> 0.025 -> 0.02 (float division gives
    # 0.025000000000000001 and np.round 0.03 for some such values).
    stats = running_stats(strings("A", "A", "A", "B", "B", "B"), np.array([1, 2, 0, 2, 3, 0]), {})
    assert stats.mean_cents_before[[2, 5]].tolist() == [0.02, 0.02]


def test_scores_round_exactly_half_to_even():
    from examples.shop.fraud import round_score

    # 0.0625 is a double exactly: a true tie, to even. 0.0005 as a double is a hair above.
    assert round_score(np.array([0.0625, 0.6666666, 1.0, 0.0005])).tolist() == [
        0.062,
        0.667,
        1.0,
        0.001,
    ]
