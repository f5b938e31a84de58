"""Freshness verdicts and the recent-batches metadata, without services."""

from __future__ import annotations

import dagster as dg

from kappa.dagster.assets.recent_batches import (
    RECENT_BATCHES,
    SUMMARY_MODE,
    TABLE_ROWS,
    recent_batches_metadata,
    sparkline,
)
from kappa.freshness import ShardFreshness, verdict


def test_a_shard_with_nothing_pending_is_fresh_however_old_its_last_batch():
    result = verdict("fact_order", [ShardFreshness("fact_order", "orders[0]", 0, None)], 60)
    assert result.passed and result.lag_s == 0.0
    assert result.describe() == "1 shard(s) loaded up to their source"


def test_the_oldest_pending_record_decides_and_stale_shards_are_named():
    shards = [
        ShardFreshness("fact_order", "orders[0]", 10, 12.0),
        ShardFreshness("fact_order", "orders[1]", 500, 75.5),
        ShardFreshness("fact_order", "orders[2]", 0, None),
    ]
    result = verdict("fact_order", shards, 60)
    assert not result.passed
    assert result.lag_s == 75.5 and result.pending == 510
    assert [s.shard for s in result.stale] == ["orders[1]"]
    assert "orders[1]: oldest of 500 pending is 76 s old (bound 60 s" in result.describe()
    assert "orders[0]" not in result.describe()
    relaxed = verdict("fact_order", shards, 120)
    assert relaxed.passed
    assert relaxed.describe() == "lag 76 s within 120 s (510 pending over 3 shard(s))"


def test_sparkline_scales_to_the_largest_value():
    assert sparkline([0, 0]) == "▁▁"
    assert sparkline([0, 50, 100]) == "▁▄█"
    assert sparkline([]) == ""


def _batch(received: int, lag: int, seconds: float) -> dict:
    return {
        "rows_received": received,
        "rows_loaded": received - 1,
        "lag_after_batch": lag,
        "batch_seconds": seconds,
    }


def test_recent_batches_reads_the_previous_materialisations_newest_first():
    with dg.instance_for_test() as instance:
        for received, lag in ((100, 900), (200, 400), (300, 0)):
            instance.report_runless_asset_event(
                dg.AssetMaterialization("fact_order", metadata=_batch(received, lag, 2.0))
            )
        instance.report_runless_asset_event(
            dg.AssetMaterialization("fact_payment", metadata=_batch(7, 7, 1.0))
        )
        metadata = recent_batches_metadata(
            instance, "fact_order", _batch(50, 10, 0.5), run_id="abcdef1234", limit=3
        )
    rows = [r.data for r in metadata["recent_batches"].value.records]  # type: ignore[attr-defined]
    assert [r["received"] for r in rows] == [50, 300, 200], "this batch, then newest first"
    assert rows[0]["run"] == "abcdef12" and rows[0]["rows_per_s"] == 100.0
    assert [r["lag_after"] for r in rows] == [10, 0, 400]
    assert metadata["rows_per_second"].value == 100.0
    trend = metadata["lag_trend"].value
    assert "`█▁▁`" in trend and "max 400, now 10" in trend  # type: ignore[operator]


def test_recent_batches_of_a_first_batch_is_just_that_batch():
    with dg.instance_for_test() as instance:
        metadata = recent_batches_metadata(instance, "dim_customer", {"rows_received": 3})
    rows = [r.data for r in metadata["recent_batches"].value.records]  # type: ignore[attr-defined]
    assert len(rows) == 1 and rows[0]["received"] == 3 and rows[0]["rows_per_s"] == 0.0


def test_recent_batches_skip_the_summaries_of_closed_partitions():
    with dg.instance_for_test() as instance:
        instance.report_runless_asset_event(
            dg.AssetMaterialization("fact_order", metadata=_batch(100, 0, 1.0))
        )
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                "fact_order", metadata={"mode": SUMMARY_MODE, "rows_received": 90_000}
            )
        )
        metadata = recent_batches_metadata(instance, "fact_order", _batch(5, 0, 1.0))
    rows = [r.data for r in metadata["recent_batches"].value.records]  # type: ignore[attr-defined]
    assert [r["received"] for r in rows] == [5, 100]


def test_the_recent_batches_table_is_shorter_than_the_trend():
    with dg.instance_for_test() as instance:
        for lag in range(RECENT_BATCHES + 5):
            instance.report_runless_asset_event(
                dg.AssetMaterialization("fact_order", metadata=_batch(10, lag, 1.0))
            )
        metadata = recent_batches_metadata(instance, "fact_order", _batch(10, 0, 1.0))
    rows = metadata["recent_batches"].value.records  # type: ignore[attr-defined]
    assert len(rows) == TABLE_ROWS < RECENT_BATCHES
    assert f"last {RECENT_BATCHES} batches" in metadata["lag_trend"].value  # type: ignore[operator]
