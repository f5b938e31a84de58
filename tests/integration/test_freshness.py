"""The freshness check and its sensor against a real broker and PostgreSQL."""

from __future__ import annotations

import time

import dagster as dg
import pytest

from kappa.dagster.assets.checks import FRESHNESS_CHECK, FRESHNESS_SENSOR
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration

ASSETS = {"fact_order", "fact_payment", "dim_customer", "fact_call_center_call"}


def evaluate(pipeline: Pipeline) -> dict[str, dg.AssetCheckEvaluation]:
    sensor = pipeline.defs.get_sensor_def(FRESHNESS_SENSOR)
    with dg.build_sensor_context(
        instance=pipeline.instance, resources=pipeline.defs.resources
    ) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    assert not result.run_requests, "the freshness sensor never launches runs"
    assert result.skip_reason is not None and "not evaluated" not in result.skip_reason.skip_message
    evaluations = {}
    for event in result.asset_events:
        assert isinstance(event, dg.AssetCheckEvaluation)
        assert event.check_name == FRESHNESS_CHECK
        evaluations[event.asset_key.to_user_string()] = event
    return evaluations


def test_the_sensor_evaluates_every_fact_and_captured_table(pipeline_env, instance):
    pipeline = Pipeline(env=pipeline_env, instance=instance)
    produced_from = time.time()
    pipeline.simulate(200)
    evaluations = evaluate(pipeline)
    evaluated_by = time.time()
    assert set(evaluations) == ASSETS
    order = evaluations["fact_order"]
    assert order.passed, order.description
    assert order.metadata["pending"].value > 0
    # The oldest pending record was stamped (producer time) after produced_from: its lag
    # is at most the time since then (the lag is rounded to 0.1 s).
    assert 0 <= order.metadata["lag_s"].value <= evaluated_by - produced_from + 0.1
    assert evaluations["dim_customer"].passed  # no OLTP writes: nothing pending

    # A tight bound: the pending records are older than it after a moment.
    strict = Pipeline(env={**pipeline_env, "KAPPA_FRESHNESS_MAX_LAG_S": "1"}, instance=instance)
    time.sleep(1.5)
    stale = evaluate(strict)["fact_order"]
    assert not stale.passed
    assert stale.severity == dg.AssetCheckSeverity.WARN
    assert f"{pipeline_env['KAPPA_TOPIC_ORDERS']}[" in (stale.description or "")
    assert "KAPPA_FRESHNESS_MAX_LAG_S" in (stale.description or "")

    # Loaded to the log end: nothing pending, fresh again under the same tight bound.
    strict.drain("fact_order")
    fresh = evaluate(strict)["fact_order"]
    assert fresh.passed, fresh.description
    assert fresh.metadata["pending"].value == 0


def test_the_check_runs_on_demand_and_its_result_is_stored(pipeline):
    pipeline.simulate(100)
    key = dg.AssetCheckKey(dg.AssetKey("fact_order"), FRESHNESS_CHECK)
    job = pipeline.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_check_selection={key}
    )
    result = job.execute_in_process(instance=pipeline.instance)
    assert result.success
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.passed and evaluation.metadata["pending"].value > 0
    latest = pipeline.instance.event_log_storage.get_latest_asset_check_execution_by_key([key])
    assert latest[key].status.value == "SUCCEEDED"


def test_fact_materialisations_carry_the_recent_batches(pipeline):
    """The capture asset records a table of its recent batches (CDC, applied by the sensor)."""
    from examples.shop.oltp import OltpConfig, seed_customers
    from examples.shop.settings import ShopSettings
    from kappa.edw.connection import connect

    with connect(pipeline.env["KAPPA_OLTP_URL"]) as conn:
        seed_customers(
            conn, OltpConfig.from_settings(ShopSettings.from_env(pipeline.settings.env)), count=5
        )
    pipeline.drain("dim_customer")
    with connect(pipeline.env["KAPPA_OLTP_URL"]) as conn:
        seed_customers(
            conn, OltpConfig.from_settings(ShopSettings.from_env(pipeline.settings.env)), count=8
        )
    pipeline.drain("dim_customer")
    latest = pipeline.instance.get_latest_materialization_event(dg.AssetKey("dim_customer"))
    assert latest is not None and latest.asset_materialization is not None
    metadata = latest.asset_materialization.metadata
    rows = [r.data for r in metadata["recent_batches"].value.records]
    assert len(rows) >= 2
    assert rows[0]["lag_after"] == 0 and rows[0]["received"] > 0
    assert "lag after each of the last" in metadata["lag_trend"].value
    assert metadata["rows_per_second"].value >= 0
