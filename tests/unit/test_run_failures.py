"""Which shards failed runs stop, read from a Dagster run storage (SQLite, no services).

The runs are written through the instance API, tagged as the sensors tag them, with their
final status set directly (nothing executes). The shard that keeps failing is followed by many
runs of its neighbours, as on a topic whose other partitions keep loading while one of them is
refused: its failures must count however many runs came after them (the check used to read the
asset's last 100 finished runs only, so a refused shard looked healthy again, and retention
took its partition for closed, once its neighbours had run 100 times).
"""

from __future__ import annotations

from collections.abc import Iterator

import dagster as dg
import pytest
from dagster._core.storage.dagster_run import DagsterRun
from dagster._core.utils import make_new_run_id

from kappa.dagster.retention import in_flight_partitions
from kappa.health import ASSET_TAG, recent_failures, shard_tags

ASSET = "fact_order"
FAILURE = dg.DagsterRunStatus.FAILURE
SUCCESS = dg.DagsterRunStatus.SUCCESS
#: More than any fixed window of recent runs the check could read.
NEIGHBOUR_RUNS = 150


@pytest.fixture
def instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as test_instance:
        yield test_instance


def add_run(
    instance: dg.DagsterInstance,
    shards: list[int],
    status: dg.DagsterRunStatus,
    *,
    asset: str = ASSET,
    partition: str = "2026-01-01",
) -> str:
    run_id = make_new_run_id()
    instance.add_run(
        DagsterRun(
            job_name="__ASSET_JOB",
            run_id=run_id,
            status=status,
            tags={ASSET_TAG: asset, "dagster/partition": partition, **shard_tags(asset, shards)},
        )
    )
    return run_id


def test_a_shard_whose_last_runs_failed_stays_stopped_behind_any_number_of_other_runs(
    instance: dg.DagsterInstance,
) -> None:
    add_run(instance, [0, 1], SUCCESS)
    failed = [add_run(instance, [0], FAILURE) for _ in range(3)]
    for _ in range(NEIGHBOUR_RUNS):
        add_run(instance, [1, 2, 3], SUCCESS)
    assert instance.get_runs_count(dg.RunsFilter(tags={ASSET_TAG: ASSET})) > 100

    found = recent_failures(instance, ASSET, threshold=2)
    assert set(found) == {0}
    assert found[0].run_id == failed[-1]
    assert found[0].failed == 3
    assert "its last 3 runs failed" in found[0].describe()
    # Three failures in a row do not stop a shard that four stop.
    assert recent_failures(instance, ASSET, threshold=4) == {}


def test_a_success_or_cancellation_ends_a_streak_and_runs_in_flight_do_not_count(
    instance: dg.DagsterInstance,
) -> None:
    for _ in range(2):
        add_run(instance, [0], FAILURE)
    add_run(instance, [0, 1], SUCCESS)  # ends shard 0's streak
    add_run(instance, [1], FAILURE)
    add_run(instance, [1], dg.DagsterRunStatus.CANCELED)  # the operator stopped it
    streak = [add_run(instance, [2], FAILURE) for _ in range(2)]
    add_run(instance, [2], dg.DagsterRunStatus.STARTED)  # may still succeed: not counted
    for _ in range(3):
        add_run(instance, [0], FAILURE, asset="fact_payment")  # another asset's shard 0

    found = recent_failures(instance, ASSET, threshold=2)
    assert set(found) == {2}
    assert found[2].run_id == streak[-1] and found[2].failed == 2
    assert set(recent_failures(instance, "fact_payment", threshold=3)) == {0}


def test_retention_keeps_the_partition_a_shard_failed_in_open_behind_other_runs(
    instance: dg.DagsterInstance,
) -> None:
    add_run(instance, [0], FAILURE, partition="2026-01-01")
    for _ in range(NEIGHBOUR_RUNS):
        add_run(instance, [1, 2], SUCCESS, partition="2026-01-02")
    # The shard's latest run failed in 2026-01-01: it loads there next, its partition is open.
    assert in_flight_partitions(instance, ASSET) == {"2026-01-01"}
