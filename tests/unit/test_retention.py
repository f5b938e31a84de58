from datetime import UTC, datetime

import dagster as dg
import pytest

from kappa.dagster.retention import (
    RetentionPolicy,
    last_closed,
    policy_from,
    prunable,
    prune_runs,
)
from kappa.exceptions import ConfigurationError
from kappa.partitions import TimeWindows
from kappa.settings import Settings


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("KAPPA_RUN_RETENTION_HOURS", "two days", "expected a whole number"),
        ("KAPPA_RUN_RETENTION_HOURS", "-1", "outside [0, 87600]"),
        ("KAPPA_RUN_RETENTION_DELETES", "0", "outside [1, 10000]"),
    ],
)
def test_a_bad_retention_setting_fails_at_load_naming_it(name, value, fragment):
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({name: value})
    assert str(caught.value).startswith(name) and fragment in str(caught.value)


def test_the_default_policy_keeps_two_days_and_closes_a_partition_after_the_longest_run():
    policy = policy_from(Settings.from_env({}))
    assert (policy.keep_hours, policy.deletes_per_tick, policy.grace_s) == (48, 200, 605)
    assert policy.enabled and "48 h" in policy.describe()


def test_zero_hours_keeps_every_run():
    policy = policy_from(Settings.from_env({"KAPPA_RUN_RETENTION_HOURS": "0"}))
    assert not policy.enabled and "every run is kept" in policy.describe()


def test_a_partition_is_closed_only_once_its_grace_after_the_end_is_over():
    windows = TimeWindows("hourly", datetime(2026, 11, 1, tzinfo=UTC))
    assert last_closed(windows, datetime(2026, 11, 2, 10, 5, tzinfo=UTC), 600) == "2026-11-02-08:00"
    assert (
        last_closed(windows, datetime(2026, 11, 2, 10, 11, tzinfo=UTC), 600) == "2026-11-02-09:00"
    )
    assert last_closed(windows, datetime(2026, 11, 1, 0, 30, tzinfo=UTC), 600) is None


def _run(tags: dict[str, str]) -> dg.DagsterRun:
    return dg.DagsterRun(job_name="__ASSET_JOB", run_id="r1", tags=tags)


def test_only_micro_batches_outside_backfills_may_be_deleted():
    batch = {"kappa/asset": "fact_order", "kappa/ranges": "orders:0:0-10"}
    assert prunable(_run(batch))
    assert not prunable(_run({**batch, "dagster/backfill": "abc"}))
    assert not prunable(_run({"kappa/asset": "fact_order", "kappa/heal": "2026-11-02"}))
    assert not prunable(_run({}))


def test_a_policy_describes_what_it_never_deletes():
    text = RetentionPolicy(keep_hours=6, deletes_per_tick=50, grace_s=60).describe()
    assert "backfill, heal and check runs kept" in text and "50 deleted per tick" in text


def test_cursors_of_another_grain_neither_raise_nor_delete():
    windows = TimeWindows("hourly", datetime(2026, 11, 1, tzinfo=UTC))
    with dg.instance_for_test() as instance:
        instance.run_storage.set_cursor_values(
            {
                "kappa/retention/summarised/fact_order": "2026-11-03",
                "kappa/retention/pruned/fact_order": "2026-11-02",
            }
        )
        deleted = prune_runs(
            instance,
            "fact_order",
            windows,
            now=datetime(2026, 11, 10, tzinfo=UTC),
            keep_hours=1,
            limit=10,
        )
    assert deleted == []
