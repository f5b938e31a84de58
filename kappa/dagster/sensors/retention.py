"""The retention sensor: keeps Dagster's run and event-log storage bounded.

Each tick summarises the closed time partitions of the micro-batch assets and deletes the
micro-batch runs the policy lets go (:mod:`kappa.dagster.retention`). It requests no run: the
work is a few indexed queries and at most ``deletes_per_tick`` run deletions, well inside a
sensor evaluation's time limit.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from kappa.dagster.resources.warehouse import WarehouseResource
from kappa.dagster.retention import RetentionPolicy, apply_retention
from kappa.dagster.sensors.micro_batch import SENSOR_STATEMENT_TIMEOUT_S
from kappa.partitions import TimeWindows

#: Seconds between ticks: at the default cadence a source adds about 12 runs a minute.
RETENTION_INTERVAL_S = 60


def build_retention_sensor(
    assets: Sequence[str], *, windows: TimeWindows, policy: RetentionPolicy
) -> dg.SensorDefinition:
    """The sensor that summarises closed partitions of ``assets`` and deletes their old
    micro-batch runs."""

    @dg.sensor(
        name="kappa_run_retention",
        minimum_interval_seconds=RETENTION_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Reports one summarising materialisation per closed time partition (totals from the "
            f"batch ledger), then deletes finished micro-batch runs: {policy.describe()}."
        ),
    )
    def kappa_run_retention(
        context: dg.SensorEvaluationContext, warehouse: WarehouseResource
    ) -> dg.SensorResult:
        with warehouse.connect(statement_timeout_s=SENSOR_STATEMENT_TIMEOUT_S) as conn:
            report = apply_retention(
                context.instance, conn, warehouse.schemas, assets, windows, policy
            )
        return dg.SensorResult(skip_reason=report.describe())

    return kappa_run_retention
