"""The OLTP simulator without a database: plans, their mix and determinism, configuration."""

from __future__ import annotations

import random
import threading
from collections import Counter
from decimal import Decimal

import pytest

from examples.shop.oltp import (
    CALLS_TABLE,
    CUSTOMERS_TABLE,
    OPERATION_MIX,
    DeleteCustomer,
    InsertCall,
    InsertCustomer,
    OltpConfig,
    OltpStats,
    OltpWriters,
    OpKind,
    TransactionPlan,
    UpdateCustomer,
    WriterState,
    customer_id,
    customer_row,
    plan_transaction,
    writer_rng,
)
from examples.shop.settings import ShopSettings
from examples.shop.simulator import COUNTRIES, customer_profile
from kappa.exceptions import ConfigurationError

CONFIG = OltpConfig(customers=500, seed=7, writers=4)
BIG = OltpConfig(customers=1_000_000, seed=7, writers=4)
"""A pool that no run of plans here exhausts, so the steady-state mix shows undisturbed."""
STEADY = WriterState(customers=300, free_indexes=(1, 5, 9), next_call=0)


def plans(config: OltpConfig, writer: int, count: int, customers: int) -> list[TransactionPlan]:
    """``count`` plans of one writer starting with ``customers`` existing customers and all of
    its own ids free, its state advanced as if every plan committed (as the writer does)."""
    rng = writer_rng(config.seed, writer)
    own = list(range(writer, config.customers, config.writers))
    next_call = 0
    out: list[TransactionPlan] = []
    for _ in range(count):
        state = WriterState(customers, tuple(own[:3]), next_call)
        plan = plan_transaction(rng, state, config)
        out.append(plan)
        for op in plan.operations:
            if isinstance(op, InsertCustomer):
                own.remove(int(op.row.customer_id.removeprefix("c-")))
                customers += 1
            elif isinstance(op, DeleteCustomer):
                customers -= 1
            elif isinstance(op, InsertCall):
                next_call += 1
    return out


# -- determinism --------------------------------------------------------------------------------


def test_same_seed_and_writer_plan_the_same_transactions():
    assert plans(CONFIG, 2, 300, 300) == plans(CONFIG, 2, 300, 300)


def test_writers_and_seeds_plan_differently():
    assert plans(CONFIG, 0, 50, 300) != plans(CONFIG, 1, 50, 300)
    other_seed = OltpConfig(customers=500, seed=8, writers=4)
    assert plans(CONFIG, 0, 50, 300) != plans(other_seed, 0, 50, 300)


def test_plan_is_a_pure_function_of_rng_state_and_config():
    rng_a, rng_b = random.Random(3), random.Random(3)
    assert plan_transaction(rng_a, STEADY, CONFIG) == plan_transaction(rng_b, STEADY, CONFIG)
    assert rng_a.getstate() == rng_b.getstate()


# -- the mix ------------------------------------------------------------------------------------


def test_steady_state_mix_follows_the_configured_shares():
    sample = plans(BIG, 0, 6000, 300)
    kinds = Counter(kind for plan in sample for kind in plan.kinds)
    total = kinds.total()
    for kind, weight in OPERATION_MIX.items():
        assert kinds[kind] / total == pytest.approx(weight / 100, abs=0.02), kind
    sizes = Counter(len(plan.operations) for plan in sample)
    assert set(sizes) <= {1, 2, 3}
    assert sizes[1] > sizes[2] > sizes[3] > 0


def test_rollbacks_and_holds_follow_the_config():
    config = OltpConfig(customers=1_000_000, seed=7, writers=4, rollback_rate=0.1, max_hold_s=0.5)
    sample = plans(config, 1, 5000, 300)
    assert sum(p.rollback for p in sample) / len(sample) == pytest.approx(0.1, abs=0.02)
    holds = [p.hold_s for p in sample]
    assert all(0 <= h <= 0.5 * 5 for h in holds)
    long_share = sum(h > 0.5 for h in holds) / len(holds)
    assert 0.005 < long_share < 0.04  # a small share holds longer than max_hold_s
    assert not any(p.rollback for p in plans(OltpConfig(10, 1, 1, 0.0), 0, 500, 5))
    assert all(p.rollback for p in plans(OltpConfig(10, 1, 1, 1.0), 0, 200, 5))
    assert all(p.hold_s == 0 for p in plans(OltpConfig(10, 1, 1, max_hold_s=0.0), 0, 200, 5))


def test_several_updates_of_the_same_customer_in_one_transaction_happen():
    sample = plans(BIG, 3, 2000, 300)
    multi = [p for p in sample if p.kinds.count(OpKind.UPDATE_CUSTOMER) >= 2]
    assert len(multi) > 20
    # All operations on existing customers share the plan's single target.
    assert all(p.target is not None and p.target.startswith("c-") for p in multi)


def test_a_delete_is_always_the_last_operation():
    sample = plans(BIG, 0, 6000, 300)
    with_delete = [p for p in sample if OpKind.DELETE_CUSTOMER in p.kinds]
    assert with_delete
    assert all(p.kinds.index(OpKind.DELETE_CUSTOMER) == len(p.kinds) - 1 for p in with_delete)


def test_targets_are_customer_ids_only_when_an_existing_customer_is_touched():
    for plan in plans(BIG, 0, 2000, 300):
        if all(kind is OpKind.INSERT_CUSTOMER for kind in plan.kinds):
            assert plan.target is None
        else:
            assert plan.target is not None
            assert 0 <= int(plan.target.removeprefix("c-")) < BIG.customers


def test_targets_fall_among_the_customers_that_exist():
    # Ids fill lowest first, so with 40 customers the targets are drawn from the first 40 ids
    # (plus any the plan itself inserts), not from the whole pool, where they would wrap.
    rng = writer_rng(CONFIG.seed, 0)
    state = WriterState(customers=40, free_indexes=(40, 44, 48))
    targets = [plan_transaction(rng, state, CONFIG).target for _ in range(2000)]
    indexes = [int(t.removeprefix("c-")) for t in targets if t is not None]
    assert max(indexes) < 43 and len(set(indexes)) > 35


def test_empty_table_bootstraps_with_inserts_only():
    empty = WriterState(customers=0, free_indexes=(2, 6, 10))
    rng = writer_rng(CONFIG.seed, 2)
    for _ in range(200):
        plan = plan_transaction(rng, empty, CONFIG)
        assert plan.operations
        assert plan.kinds[0] is OpKind.INSERT_CUSTOMER
        assert plan.operations[0] == InsertCustomer(customer_row(CONFIG, 2))


def test_few_customers_lean_to_inserts_then_the_mix_settles():
    sample = plans(CONFIG, 0, 400, 0)
    first = Counter(kind for plan in sample[:10] for kind in plan.kinds)
    assert first[OpKind.INSERT_CUSTOMER] / first.total() > 0.5
    assert first[OpKind.DELETE_CUSTOMER] == 0
    late = Counter(kind for plan in sample[200:] for kind in plan.kinds)
    assert late[OpKind.INSERT_CUSTOMER] / late.total() < 0.3


def test_inserts_use_the_writers_own_free_ids_in_order():
    sample = plans(CONFIG, 3, 500, 0)
    inserted = [
        int(op.row.customer_id.removeprefix("c-"))
        for plan in sample
        for op in plan.operations
        if isinstance(op, InsertCustomer)
    ]
    assert inserted
    assert all(i % CONFIG.writers == 3 for i in inserted)
    assert inserted == sorted(inserted) and len(set(inserted)) == len(inserted)


def test_no_free_ids_means_no_inserts_and_nothing_to_do_means_an_empty_plan():
    full = WriterState(customers=300, free_indexes=())
    rng = writer_rng(1, 0)
    assert all(
        OpKind.INSERT_CUSTOMER not in plan_transaction(rng, full, CONFIG).kinds for _ in range(500)
    )
    nothing = plan_transaction(rng, WriterState(customers=0, free_indexes=()), CONFIG)
    assert nothing.operations == () and nothing.target is None


def test_call_numbers_continue_from_the_writer_state():
    rng = writer_rng(5, 0)
    numbers = []
    state = WriterState(customers=300, free_indexes=(0,), next_call=40)
    for _ in range(200):
        plan = plan_transaction(rng, state, CONFIG)
        calls = [op for op in plan.operations if isinstance(op, InsertCall)]
        numbers += [c.number for c in calls]
        state = WriterState(state.customers, state.free_indexes, state.next_call + len(calls))
    assert numbers == list(range(40, 40 + len(numbers)))


def test_operation_values_are_in_their_domains():
    for plan in plans(BIG, 1, 3000, 300):
        for op in plan.operations:
            if isinstance(op, InsertCall):
                assert op.reason in BIG.reasons and op.sentiment in BIG.sentiments
                assert 10 <= op.duration_s <= 3600
            elif isinstance(op, UpdateCustomer):
                assert (op.segment, op.country, op.credit_limit) != (None, None, None)
                assert op.segment is None or op.segment in BIG.segments
                assert op.country is None or op.country in COUNTRIES
                assert op.credit_limit is None or _fits_numeric_12_2(op.credit_limit)


def _fits_numeric_12_2(value: Decimal) -> bool:
    return value == value.quantize(Decimal("0.01")) and Decimal(0) < value < Decimal(10) ** 10


# -- customers ----------------------------------------------------------------------------------


def test_customer_rows_describe_the_event_simulators_people():
    for index in (0, 1, 42, 499):
        row = customer_row(CONFIG, index)
        assert row == customer_row(OltpConfig(customers=500, seed=7, writers=1), index)
        assert row.customer_id == customer_id(index) == customer_profile(7, index).customer_id
        assert row.country == customer_profile(7, index).home_country
        assert row.segment in CONFIG.segments
        assert row.name and _fits_numeric_12_2(row.credit_limit)
    segments = Counter(customer_row(CONFIG, i).segment for i in range(500))
    assert segments["retail"] > segments["smb"] > segments["enterprise"] > 0


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"customers": 0}, "customers must be at least 1"),
        ({"seed": -1}, "seed must not be negative"),
        ({"writers": 0}, "writers must be at least 1"),
        ({"customers": 3, "writers": 4}, "must not exceed customers"),
        ({"rollback_rate": 1.5}, "rollback_rate"),
        ({"rollback_rate": -0.1}, "rollback_rate"),
        ({"max_hold_s": -1.0}, "max_hold_s"),
        ({"max_hold_s": float("inf")}, "max_hold_s"),
        ({"segments": ()}, "segments must not be empty"),
        ({"reasons": ("billing", "billing")}, "duplicates"),
        ({"sentiments": ("ok", " ")}, "non-empty strings"),
    ],
)
def test_config_rejects_bad_values(kwargs, fragment):
    values = {"customers": 100, "seed": 1, "writers": 2, **kwargs}
    with pytest.raises(ValueError, match=fragment):
        OltpConfig(**values)


def test_config_from_settings():
    shop = ShopSettings.from_env(
        {"KAPPA_SIM_CUSTOMERS": "120", "KAPPA_SIM_SEED": "9", "KAPPA_OLTP_WRITERS": "5"}
    )
    config = OltpConfig.from_settings(shop)
    assert (config.customers, config.seed, config.writers) == (120, 9, 5)
    assert (config.rollback_rate, config.max_hold_s) == (0.05, 0.2)
    assert config.segments == ("retail", "smb", "enterprise")
    assert config.bootstrap_customers == 12


def test_the_shop_settings_name_the_setting_when_writers_outnumber_customers():
    with pytest.raises(ConfigurationError, match=r"^KAPPA_OLTP_WRITERS: 3 writers"):
        ShopSettings.from_env({"KAPPA_SIM_CUSTOMERS": "2", "KAPPA_OLTP_WRITERS": "3"})


# -- stats and the writers' front door ----------------------------------------------------------


def test_stats_add_up():
    a = OltpStats(committed=2, rolled_back=1, customers_inserted=3, calls_inserted=1)
    b = OltpStats(committed=1, aborted=1, skipped=1, customers_updated=2, customers_deleted=1)
    total = a + b
    assert total.transactions == 6
    assert total.changes_by_table == {CUSTOMERS_TABLE: 6, CALLS_TABLE: 1}


@pytest.mark.parametrize("rate", [-1.0, float("nan"), float("inf")])
def test_writers_reject_a_bad_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        OltpWriters("postgresql://nobody@127.0.0.1:1/none", CONFIG, rate=rate)


def test_rate_zero_idles_without_connecting_until_stopped():
    stop = threading.Event()
    threading.Timer(0.2, stop.set).start()
    writers = OltpWriters("postgresql://nobody@127.0.0.1:1/none", CONFIG, rate=0)
    assert writers.run(stop) == OltpStats()
