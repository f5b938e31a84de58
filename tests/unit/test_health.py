"""The rules that decide a shard is stopped, without services."""

from __future__ import annotations

from kappa.edw.types import LedgerHead
from kappa.freshness import ShardFreshness, verdict
from kappa.health import (
    RETRY_STOPPED_AFTER_S,
    RunFailures,
    failure_threshold,
    held,
    shard_stop,
)
from kappa.sources.base import TRANSACTIONS, LogBounds


def _head(end: int, epoch: str = "t1") -> LedgerHead:
    return LedgerHead("fact_order", "orders", 0, epoch, end, batches=3)


def _failures(at: float, count: int = 4) -> RunFailures:
    return RunFailures(count, "psycopg.errors.CheckViolation: refused", "abcdef0123", at)


def test_a_log_that_continues_the_ledger_is_not_stopped():
    assert shard_stop("fact_order", "orders", 0, _head(500), LogBounds(0, 900), "t1") is None
    assert shard_stop("fact_order", "orders", 0, None, LogBounds(40, 900), "t1") is None


def test_a_lost_recreated_or_expired_log_is_stopped_with_the_continuity_error():
    lost = shard_stop("fact_order", "orders", 0, _head(500), LogBounds(0, 9), "t1")
    assert lost is not None and "the log now ends at 9" in lost and "kappa replay" in lost
    recreated = shard_stop("fact_order", "orders", 0, _head(500), LogBounds(0, 900), "t2")
    assert recreated is not None and "was recreated" in recreated
    expired = shard_stop("fact_order", "orders", 0, _head(500), LogBounds(600, 900), "t1")
    assert expired is not None and "expired offsets [500, 600)" in expired


def test_a_recreated_change_table_is_stopped_in_transactions_and_its_bounds_are_not_checked():
    head = LedgerHead("dim_customer", "cdc.c_changes", 0, "5:100", 812, batches=2)
    same = shard_stop(
        "dim_customer", "cdc.c_changes", 0, head, LogBounds(0, 9), "5:100", positions=TRANSACTIONS
    )
    assert same is None
    recreated = shard_stop(
        "dim_customer", "cdc.c_changes", 0, head, None, "5:200", positions=TRANSACTIONS
    )
    assert recreated is not None
    assert "the ledger loaded transactions up to 812 of change table 5:100" in recreated


def test_failing_runs_stop_a_shard_whose_log_is_fine_and_the_log_error_comes_first():
    failures = _failures(at=1000.0)
    why = shard_stop("fact_order", "orders", 0, _head(500), LogBounds(0, 900), "t1", failures)
    assert why is not None
    assert why.startswith("its last 4 runs failed (run abcdef01: psycopg.errors.CheckViolation")
    lost = shard_stop("fact_order", "orders", 0, _head(500), LogBounds(0, 9), "t1", failures)
    assert lost is not None and "the log now ends at 9" in lost
    assert failure_threshold(3) == 4 and failure_threshold(0) == 1


def test_a_stopped_shard_fails_freshness_whatever_its_lag():
    shards = [
        ShardFreshness("fact_order", "orders[0]", 0, None, stopped="the log now ends at 0"),
        ShardFreshness("fact_order", "orders[1]", 3, 1.0),
    ]
    result = verdict("fact_order", shards, 300)
    assert not result.passed and [s.shard for s in result.stopped] == ["orders[0]"]
    assert result.describe() == "orders[0]: stopped: the log now ends at 0"


def test_the_sensor_holds_a_stopped_shard_until_its_newest_failure_is_old_enough():
    failures = {0: _failures(at=1000.0), 1: _failures(at=1000.0 - RETRY_STOPPED_AFTER_S)}
    assert set(held(failures, now_s=1000.0)) == {0}
    assert set(held(failures, now_s=1000.0 + RETRY_STOPPED_AFTER_S)) == set()
