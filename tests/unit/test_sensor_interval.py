"""The offset and capture sensors tick every KAPPA_SENSOR_INTERVAL_S under Dagster's daemon,
not every other daemon loop."""

from __future__ import annotations

import os
from itertools import pairwise

import pytest
from dagster._daemon.sensor import MIN_INTERVAL_LOOP_TIME

from kappa.dagster.sensors.micro_batch import minimum_interval
from kappa.settings import Settings
from pipelines.definitions import build_definitions


def daemon_tick_gaps(declared: int, loops: int = 40, start_delay_s: float = 0.004) -> set[float]:
    """The gaps between the ticks Dagster's sensor daemon makes of a sensor declaring
    ``declared`` as its minimum interval: a loop every ``MIN_INTERVAL_LOOP_TIME`` seconds,
    each evaluation starting ``start_delay_s`` into its loop, and a sensor skipped while less
    than its minimum interval passed since its last evaluation started (the daemon's
    ``is_under_min_interval``)."""
    starts: list[float] = []
    for loop in range(loops):
        now = loop * MIN_INTERVAL_LOOP_TIME
        if starts and now - starts[-1] < declared:
            continue
        starts.append(now + start_delay_s)
    return {round(b - a, 1) for a, b in pairwise(starts)}


@pytest.mark.parametrize("interval_s", [5, 10, 30])
def test_the_declared_minimum_lets_every_due_loop_tick(interval_s: int) -> None:
    assert daemon_tick_gaps(minimum_interval(interval_s)) == {float(interval_s)}


def test_a_minimum_equal_to_the_loop_skips_every_other_loop() -> None:
    # What the offset sensors declared before: 5 s sensors ticked every 10 s.
    assert daemon_tick_gaps(5) == {10.0}


def test_the_stream_and_capture_sensors_declare_it() -> None:
    # The session's catalogue (tests/conftest.py): the demo's, every table on PostgreSQL.
    settings = Settings.from_env({**os.environ, "KAPPA_SENSOR_INTERVAL_S": "5"})
    sensors = {s.name: s for s in build_definitions(settings).sensors or []}
    # Two topics' offset sensors and a captured table's change sensor.
    streams = {"fact_order_sensor", "fact_payment_sensor", "dim_customer_sensor"}
    assert streams <= sensors.keys(), sorted(sensors)
    for name in streams:
        assert sensors[name].minimum_interval_seconds == 4, name
