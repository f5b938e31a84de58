"""Batch-boundary invariance of the stateful steps (DESIGN.md §4.3).

The same log processed as one batch or cut anywhere into many gives identical rows,
identical fraud alerts and identical final state, also when a tiny LRU forces state to be
reloaded from the durable tier between batches, and when processing resumes from the state
saved at a batch boundary (replay of a partition). The runs go through
:mod:`kappa.steps.testing`, the helper any step's own invariance test uses.

The input is a fixed, seeded log of decoded order and payment events (several customers
and cards, out-of-order event times, dimension versions that change mid-stream, a deleted
and an unknown customer, bursts on one card, outliers, trips abroad after a call); the cut
points come from hypothesis. The durable tier is an in-memory, versioned backend that
stores values as JSON, as the PostgreSQL one does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache

import orjson
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pandas.testing import assert_frame_equal

from examples.shop.fraud import FraudRules
from examples.shop.steps import OrderEnrichment, PaymentFraud
from kappa.catalog.streams import EventContract
from kappa.decode.batch import decode_batch
from kappa.sources.base import RawBatch
from kappa.state import State, StateCache
from kappa.steps.testing import (
    MemoryLookups,
    MemoryStateBackend,
    batch_differences,
    run_in_batches,
)
from tests.demo import ORDER_PLACED, PAYMENT_ATTEMPTED

T0 = datetime(2024, 5, 1, 8, 0, tzinfo=UTC)
SHARD = 0
FAR_FUTURE = pd.Timestamp("2100-01-01T00:00:00Z")
MID_STREAM = pd.Timestamp(T0 + timedelta(hours=2))
N_ORDERS = 90
N_PAYMENTS = 110
#: The data below is shaped for these (bursts 20 s apart, trips abroad within 48 h of a call).
RULES = FraudRules(
    velocity_max_payments=3,
    velocity_window=timedelta(minutes=10),
    velocity_lateness=timedelta(hours=1),
    amount_z=3.0,
    amount_min_history=5,
    geo_call_window=timedelta(hours=48),
)


# --- the durable tier and the dimensions, in memory ------------------------------------------


MemoryBackend = MemoryStateBackend


VERSION_COLUMNS = ["customer_id", "customer_sk", "segment", "country", "valid_from", "valid_to"]


def _times(values: Sequence[datetime | None]) -> pd.Series:
    return pd.Series(pd.to_datetime(list(values), utc=True)).astype("datetime64[us, UTC]")


@dataclass
class StaticDimensions:
    """A fixed set of customer versions and call-centre calls (as the EDW returns them)."""

    mark: pd.Timestamp
    versions: pd.DataFrame = field(init=False)
    call_rows: pd.DataFrame = field(init=False)

    def __post_init__(self) -> None:
        day = timedelta(days=1)
        versions = pd.DataFrame(
            [
                ("c-1", 101, "retail", "DE", T0 - 30 * day, T0 + timedelta(hours=2)),
                ("c-1", 102, "smb", "DE", T0 + timedelta(hours=2), None),
                ("c-2", 201, "retail", "FR", T0 - 30 * day, None),
                ("c-3", 301, "smb", "DE", T0 - 30 * day, T0 + timedelta(hours=1)),
                ("c-3", 302, "enterprise", "NL", T0 + timedelta(hours=1), None),
                ("c-4", 401, "retail", "US", T0 - 30 * day, T0 + timedelta(hours=3)),  # deleted
                ("c-6", 601, "retail", "DE", T0 + timedelta(minutes=30), None),  # new mid-stream
                # c-5 has no versions: an unknown customer.
            ],
            columns=VERSION_COLUMNS,
        )
        versions["valid_from"] = _times(versions["valid_from"].tolist())
        versions["valid_to"] = _times(versions["valid_to"].tolist())
        self.versions = versions
        calls = pd.DataFrame(
            [
                ("c-1", "call-1", "travel notice", T0 + timedelta(minutes=30)),
                ("c-2", "call-2", "address change", T0 + timedelta(hours=3)),
                ("c-3", "call-3", "lost card", T0 - timedelta(hours=10)),
                ("c-4", "call-4", "travel notice", T0 - timedelta(days=3)),
                ("c-6", "call-6", "travel notice", T0 + timedelta(hours=1)),
            ],
            columns=["customer_id", "call_id", "reason", "called_at"],
        )
        calls["called_at"] = _times(calls["called_at"].tolist())
        self.call_rows = calls

    def lookups(self) -> MemoryLookups:
        return MemoryLookups(
            versions={"dim_customer": self.versions},
            ranges={"fact_call_center_call": self.call_rows},
            mark=self.mark,
        )


# --- the log ---------------------------------------------------------------------------------

HOME = {"c-1": "DE", "c-2": "FR", "c-3": "DE", "c-4": "US", "c-5": "DE", "c-6": "DE"}
CARDS = {c: [f"k-{c[2:]}a", f"k-{c[2:]}b"] for c in HOME}


def _event_times(rng: random.Random, n: int) -> list[datetime]:
    """Mostly increasing over about four hours; about one in six is late by up to 40 min."""
    clock = T0 - timedelta(minutes=5)
    times = []
    for _ in range(n):
        clock += timedelta(seconds=rng.randint(0, 200), milliseconds=rng.choice([0, 0, 250]))
        late = rng.random() < 0.16
        times.append(clock - timedelta(minutes=rng.randint(1, 40)) if late else clock)
    return times


def _amount(rng: random.Random) -> float:
    if rng.random() < 0.07:
        return rng.randint(40_000, 200_000) / 100  # an outlier
    return rng.randint(500, 8_000) / 100


def _envelope(event_id: str, event_type: str, at: datetime, payload: dict) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "event_type": event_type,
            "event_time": at.isoformat().replace("+00:00", "Z"),
            "source": "test",
            "schema_version": 1,
            "payload": payload,
        }
    )


def _decode(topic: str, contract: EventContract, messages: list[tuple[str, bytes]]) -> pd.DataFrame:
    n = len(messages)
    broker_ms = int((T0 + timedelta(hours=6)).timestamp() * 1000)
    raw = RawBatch(
        topic=topic,
        partition=SHARD,
        start=0,
        end=n,
        offsets=list(range(n)),
        timestamps=[broker_ms] * n,
        keys=[key.encode() for key, _ in messages],
        values=[value for _, value in messages],
    )
    decoded = decode_batch(raw, contract)
    assert decoded.dead_letters.empty and decoded.duplicates_in_batch == 0
    assert decoded.rows["kafka_offset"].tolist() == list(range(n))
    return decoded.rows


@cache
def order_rows() -> pd.DataFrame:
    rng = random.Random(20240501)
    messages = []
    for i, at in enumerate(_event_times(rng, N_ORDERS)):
        customer = rng.choice(list(HOME))
        payload = {
            "order_id": f"o-{i}",
            "customer_id": customer,
            "amount": _amount(rng),
            "currency": "EUR",
            "item_count": rng.randint(1, 4),
            "channel": rng.choice(["web", "app"]),
        }
        event_id = f"00000000-0000-4000-8000-{i:012d}"
        messages.append((customer, _envelope(event_id, "order_placed", at, payload)))
    return _decode("orders", ORDER_PLACED, messages)


@cache
def payment_rows() -> pd.DataFrame:
    rng = random.Random(20240502)
    times = _event_times(rng, N_PAYMENTS)
    messages = []
    i = 0
    while i < N_PAYMENTS:
        customer = rng.choice(list(HOME))
        card = rng.choice(CARDS[customer])
        # now and then a burst on one card: several payments seconds apart
        burst = rng.randint(3, 5) if rng.random() < 0.12 else 1
        start = times[i]
        for j in range(min(burst, N_PAYMENTS - i)):
            at = start + timedelta(seconds=20 * j) if burst > 1 else start
            abroad = rng.random() < 0.2
            payload = {
                "payment_id": f"p-{i}",
                "order_id": f"o-{i}",
                "customer_id": customer,
                "card_id": card,
                "amount": _amount(rng),
                "currency": "EUR",
                "merchant_country": rng.choice(["US", "BR", "GB", "NL"])
                if abroad
                else HOME[customer],
                "status": rng.choice(["approved", "approved", "declined"]),
            }
            event_id = f"00000000-0000-4000-9000-{i:012d}"
            messages.append((customer, _envelope(event_id, "payment_attempted", at, payload)))
            i += 1
    return _decode("payments", PAYMENT_ATTEMPTED, messages)


# --- processing as the warehouse does -------------------------------------------------------


@dataclass
class Result:
    orders: pd.DataFrame
    payments: pd.DataFrame
    alerts: pd.DataFrame
    state: dict[tuple[str, int, str], State]
    cache: StateCache
    backend: MemoryBackend


def process(
    order_cuts: Sequence[int] = (),
    payment_cuts: Sequence[int] = (),
    *,
    mark: pd.Timestamp = FAR_FUTURE,
    max_keys: int = 200_000,
    backend: MemoryBackend | None = None,
    order_start: int = 0,
    payment_start: int = 0,
) -> Result:
    """Process the log from the given offsets in batches cut at ``*_cuts`` (absolute
    offsets), both steps on one cache, saving and remembering each batch's state like
    ``commit_batch`` does."""
    backend = backend if backend is not None else MemoryBackend()
    cache_ = StateCache(backend, max_keys=max_keys)
    lookups = StaticDimensions(mark).lookups()
    orders = run_in_batches(
        OrderEnrichment(),
        order_rows(),
        lookups,
        order_cuts,
        start=order_start,
        shard=SHARD,
        backend=backend,
        cache=cache_,
    )
    payments = run_in_batches(
        PaymentFraud(RULES),
        payment_rows(),
        lookups,
        payment_cuts,
        start=payment_start,
        shard=SHARD,
        backend=backend,
        cache=cache_,
    )
    return Result(
        orders=orders.rows,
        payments=payments.rows,
        alerts=payments.side_tables["fraud_alert"],
        state=backend.latest(),
        cache=cache_,
        backend=backend,
    )


@cache
def one_batch(mark: pd.Timestamp) -> Result:
    return process(mark=mark)


def assert_same(result: Result, reference: Result) -> None:
    assert_frame_equal(result.orders, reference.orders)
    assert_frame_equal(result.payments, reference.payments)
    assert_frame_equal(result.alerts, reference.alerts)
    assert result.state == reference.state


# --- the properties --------------------------------------------------------------------------

order_cuts = st.lists(st.integers(min_value=0, max_value=N_ORDERS), max_size=12).map(sorted)
payment_cuts = st.lists(st.integers(min_value=0, max_value=N_PAYMENTS), max_size=12).map(sorted)
marks = st.sampled_from([FAR_FUTURE, MID_STREAM])


@settings(max_examples=60, deadline=None)
@given(order_cuts=order_cuts, payment_cuts=payment_cuts, mark=marks)
def test_any_cut_of_the_log_gives_the_rows_alerts_and_state_of_one_batch(
    order_cuts: list[int], payment_cuts: list[int], mark: pd.Timestamp
):
    # Repeated cut points make empty batches (every event already loaded), as in ingest.
    lookups = StaticDimensions(mark).lookups()
    assert batch_differences(OrderEnrichment(), order_rows(), lookups, order_cuts) == []
    assert batch_differences(PaymentFraud(RULES), payment_rows(), lookups, payment_cuts) == []
    assert_same(process(order_cuts, payment_cuts, mark=mark), one_batch(mark))


@settings(max_examples=60, deadline=None)
@given(order_cuts=order_cuts, payment_cuts=payment_cuts)
def test_a_tiny_lru_reloading_state_from_the_backend_changes_nothing(
    order_cuts: list[int], payment_cuts: list[int]
):
    assert_same(process(order_cuts, payment_cuts, max_keys=2), one_batch(FAR_FUTURE))


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_replaying_from_a_batch_boundary_restores_the_state_saved_there(data: st.DataObject):
    """Rewind the durable tier to a boundary, drop memory, and process the rest of the log
    as one batch: the rows from there on and the final state are those of the live run."""
    cuts_o = data.draw(order_cuts, label="order_cuts")
    cuts_p = data.draw(payment_cuts, label="payment_cuts")
    live = process(cuts_o, cuts_p, max_keys=data.draw(st.sampled_from([2, 200_000])))
    from_o = data.draw(st.sampled_from([0, *cuts_o]), label="replay orders from")
    from_p = data.draw(st.sampled_from([0, *cuts_p]), label="replay payments from")
    backend = live.backend
    backend.rewind(None, "order_stats", SHARD, from_o)
    backend.rewind(None, "payment_stats", SHARD, from_p)
    backend.rewind(None, "card_velocity", SHARD, from_p)
    replay = process(
        backend=backend, order_start=from_o, payment_start=from_p, max_keys=2
    )  # a fresh cache: nothing in memory survives the rewind
    reference = one_batch(FAR_FUTURE)
    assert_frame_equal(replay.orders, reference.orders.iloc[from_o:].reset_index(drop=True))
    assert_frame_equal(replay.payments, reference.payments.iloc[from_p:].reset_index(drop=True))
    replayed_ids = set(payment_rows()["event_id"].iloc[from_p:])
    expected_alerts = reference.alerts[reference.alerts["event_id"].isin(replayed_ids)]
    if expected_alerts.empty:  # (an empty frame's dtypes are those of no batch at all)
        assert replay.alerts.empty
        assert list(replay.alerts.columns) == list(expected_alerts.columns)
    else:
        assert_frame_equal(replay.alerts, expected_alerts.reset_index(drop=True))
    assert replay.state == reference.state


# --- the input is not vacuous ---------------------------------------------------------------


def test_the_log_exercises_every_rule_and_every_enrichment_outcome():
    far, mid = one_batch(FAR_FUTURE), one_batch(MID_STREAM)
    payments = payment_rows()
    assert (payments["event_time"].diff().dt.total_seconds() < 0).sum() >= 10  # out of order
    assert set(far.alerts["rule"]) == {"velocity", "amount_anomaly", "geo_mismatch"}
    geo = far.alerts[far.alerts["rule"] == "geo_mismatch"]
    assert set(geo["score"]) == {0.5, 0.9}  # abroad with and without a recent call
    for frame in (far.orders, far.payments):
        assert set(frame["enrichment"]) == {"as_of", "unknown_customer"}
        assert frame["customer_sk"].nunique() >= 6  # versions change mid-stream
    assert set(mid.orders["enrichment"]) == {"as_of", "provisional", "unknown_customer"}
    assert set(far.state) >= {
        ("order_stats", SHARD, "c-1"),
        ("payment_stats", SHARD, "c-5"),
        ("card_velocity", SHARD, "k-1a"),
    }


def test_evictions_do_force_reloads_from_the_backend():
    cuts = list(range(7, N_ORDERS, 7))
    result = process(cuts, list(range(5, N_PAYMENTS, 5)), max_keys=2)
    assert_same(result, one_batch(FAR_FUTURE))
    distinct = len(result.state)
    assert result.cache.misses > 2 * distinct  # the same keys were loaded again and again
    assert len(result.cache) <= 2


@pytest.mark.parametrize("max_keys", [2, 200_000])
def test_the_backend_holds_one_version_per_batch_that_touched_a_key(max_keys: int):
    result = process([30, 60], [40, 80], max_keys=max_keys)
    for (store, _, key), versions in result.backend.versions.items():
        rows = order_rows() if store == "order_stats" else payment_rows()
        column = "card_id" if store == "card_velocity" else "customer_id"
        offsets = rows.loc[rows[column] == key, "kafka_offset"]
        bounds = [30, 60, N_ORDERS] if store == "order_stats" else [40, 80, N_PAYMENTS]
        touched = {next(b for b in bounds if o < b) for o in offsets}
        assert set(versions) == touched
