"""A shard that cannot load says so everywhere: `kappa status`, the freshness check, the sensors.

Against the real broker, PostgreSQL and a Dagster instance: a topic recreated under a loaded
ledger, and an asset whose last runs were refused by the EDW.
"""

from __future__ import annotations

import re

import dagster as dg
import pytest
from kafka.admin import KafkaAdminClient

from kappa import cli
from kappa.dagster.assets.checks import FRESHNESS_CHECK, FRESHNESS_SENSOR
from kappa.exceptions import LogResetError
from kappa.local.topics import ensure_topics
from tests.integration.harness import Pipeline, wait_for

pytestmark = pytest.mark.integration


def _lag_rows(text: str, asset: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines() if line.startswith(f"{asset} ")]


def _freshness_by_sensor(pipeline: Pipeline) -> tuple[dict[str, dg.AssetCheckEvaluation], str]:
    sensor = pipeline.defs.get_sensor_def(FRESHNESS_SENSOR)
    with dg.build_sensor_context(
        instance=pipeline.instance, resources=pipeline.defs.resources
    ) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult) and result.skip_reason is not None
    evaluations = {}
    for event in result.asset_events:
        assert isinstance(event, dg.AssetCheckEvaluation)
        evaluations[event.asset_key.to_user_string()] = event
    return evaluations, result.skip_reason.skip_message or ""


def _freshness_on_demand(pipeline: Pipeline, asset: str) -> dg.AssetCheckEvaluation:
    key = dg.AssetCheckKey(dg.AssetKey(asset), FRESHNESS_CHECK)
    job = pipeline.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_check_selection={key}
    )
    result = job.execute_in_process(instance=pipeline.instance)
    [evaluation] = result.get_asset_check_evaluations()
    return evaluation


def test_a_recreated_topic_shows_as_stopped_with_the_reason(pipeline, capsys, monkeypatch):
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("KAPPA_HOME", "/nonexistent/kappa-home")  # no instance: runs not read
    pipeline.simulate(300, invalid_rate=0.0)
    pipeline.drain("fact_order")
    topic = pipeline.settings.stream("fact_order").topic
    assert cli.main(["status", "--batches", "0"]) == 0, capsys.readouterr().out
    capsys.readouterr()

    # The log is lost: the topic is deleted and created again, and new events arrive.
    admin = KafkaAdminClient(bootstrap_servers=pipeline.env["KAFKA_BOOTSTRAP_SERVERS"])
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()
    ensure_topics(pipeline.env["KAFKA_BOOTSTRAP_SERVERS"], {topic: 4}, timeout_s=15)
    pipeline.simulate(40, seed=99, invalid_rate=0.0)
    before = pipeline.query("SELECT count(*) FROM edw.fact_order")

    # The sensor's tick fails, naming the partition and why.
    with pytest.raises(LogResetError) as caught:
        pipeline.tick("fact_order")
    reason = str(caught.value)
    assert reason.startswith(f"fact_order: {topic}[0] ") and "was recreated" in reason

    # `kappa status`: stopped, the same reason, never a negative lag, and a non-zero exit.
    assert cli.main(["status", "--batches", "0"]) == 1
    text = capsys.readouterr().out
    orders = _lag_rows(text, "fact_order")
    assert len(orders) == 4 and all(cells[4] == "stopped" for cells in orders), text
    table = text.split("\n\n")[0]  # the lag table
    assert not re.search(r"\s-\d", table), "no negative number anywhere in the lag table"
    assert "4 shard(s) stopped" in text
    assert f"  fact_order {topic}[0]: {reason}" in text
    assert all(cells[4] != "stopped" for cells in _lag_rows(text, "fact_payment")), text

    # The freshness check, on demand and as the sensor records it: failed, the same reason.
    on_demand = _freshness_on_demand(pipeline, "fact_order")
    assert not on_demand.passed and on_demand.severity == dg.AssetCheckSeverity.ERROR
    assert f"{topic}[0]: stopped: {reason}" in (on_demand.description or "")
    evaluations, summary = _freshness_by_sensor(pipeline)
    order = evaluations["fact_order"]
    assert not order.passed and reason in (order.description or "")
    assert "fact_order STOPPED" in summary and "fact_order ok" not in summary
    assert evaluations["fact_payment"].passed, evaluations["fact_payment"].description
    assert pipeline.query("SELECT count(*) FROM edw.fact_order") == before


def test_an_asset_whose_last_runs_failed_shows_as_stopped(pipeline_env, capsys, monkeypatch):
    monkeypatch.setenv("KAPPA_RUN_RETRIES", "1")  # stopped after 2 failed runs in a row
    with dg.instance_for_test() as instance:  # sets DAGSTER_HOME: `kappa status` reads it
        pipeline = Pipeline(env={**pipeline_env, "KAPPA_RUN_RETRIES": "1"}, instance=instance)
        pipeline.simulate(100, invalid_rate=0.0)
        # The EDW refuses every batch of fact_order (as a broken migration would).
        pipeline.query(
            "ALTER TABLE edw.fact_order ADD CONSTRAINT refuse_all CHECK (false) NOT VALID"
        )
        requests = []
        for _ in range(2):
            result = pipeline.tick("fact_order")
            assert result.run_requests, result.skip_reason
            for request in result.run_requests:
                assert not pipeline.execute(request, raise_on_error=False).success
                requests.append(request)

        # The sensor holds the stopped partitions and says why.
        held = pipeline.tick("fact_order")
        assert not held.run_requests
        skip = held.skip_reason.skip_message if held.skip_reason else ""
        assert "stopped: its last 2 runs failed" in skip and "refuse_all" in skip, skip

        assert cli.main(["status", "--batches", "0"]) == 1
        text = capsys.readouterr().out
        orders = _lag_rows(text, "fact_order")
        assert orders and all(cells[4] == "stopped" for cells in orders), text
        topic = pipeline.settings.stream("fact_order").topic
        line = next(x for x in text.splitlines() if x.startswith(f"  fact_order {topic}[0]: "))
        assert "its last 2 runs failed" in line and 'violates check constraint "refuse_all"' in line
        assert "failed runs: read from the Dagster instance" in text

        evaluation = _freshness_on_demand(pipeline, "fact_order")
        assert not evaluation.passed
        assert line.split(": ", 1)[1] in (evaluation.description or "")

        # The cause fixed, the operator re-executes the failed run: it succeeds, the stop ends.
        pipeline.query("ALTER TABLE edw.fact_order DROP CONSTRAINT refuse_all")
        assert pipeline.execute(requests[-1]).success
        pipeline.drain("fact_order")
        assert _freshness_on_demand(pipeline, "fact_order").passed  # as its sensor re-evaluates
        assert cli.main(["status", "--batches", "0"]) == 0
        text = capsys.readouterr().out
        assert all(cells[4] == "0" for cells in _lag_rows(text, "fact_order")), text


_LOG_BOUNDS = re.compile(r"\(log \d+\.\.\d+\)")


def _without_bounds(text: str) -> str:
    """``text`` with every ``(log START..END)`` written as ``(log ..)``."""
    return _LOG_BOUNDS.sub("(log ..)", text)


def test_a_recreated_change_table_shows_as_stopped_with_the_reason(pipeline, capsys, monkeypatch):
    from examples.shop.oltp import OltpConfig, seed_customers
    from examples.shop.settings import ShopSettings
    from kappa.catalog.captures import load_captures
    from kappa.edw.connection import connect
    from kappa.sources.pg_capture import install_capture

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("KAPPA_HOME", "/nonexistent/kappa-home")
    [spec] = [c for c in load_captures(pipeline.settings.catalog) if c.name == "customers"]
    with connect(pipeline.env["KAPPA_OLTP_URL"]) as conn:
        seed_customers(
            conn, OltpConfig.from_settings(ShopSettings.from_env(pipeline.settings.env)), count=5
        )
    # Transactions of other sessions may hold the snapshot horizon back for a moment.
    wait_for(
        lambda: pipeline.drain("dim_customer"),
        timeout=120,
        what="the seeded customers to be loaded into dim_customer",
    )
    with connect(pipeline.env["KAPPA_OLTP_URL"]) as conn:  # dropped and created again
        conn.execute(f"DROP TABLE {spec.change_table}")
        install_capture(conn, spec)
        seed_customers(
            conn, OltpConfig.from_settings(ShopSettings.from_env(pipeline.settings.env)), count=3
        )

    with pytest.raises(LogResetError) as caught:
        pipeline.tick("dim_customer")
    reason = str(caught.value)
    assert reason.startswith(f"dim_customer: {spec.change_table}[0] was recreated")
    assert _LOG_BOUNDS.search(reason), reason

    # The reason is judged again where it is shown, against the log as it is then: the
    # database's transaction counter (the log end) moves with any other session's work in
    # between, so the bounds are compared as a shape, everything else word for word.
    assert cli.main(["status", "--batches", "0"]) == 1
    text = capsys.readouterr().out
    [row] = _lag_rows(text, "dim_customer")
    assert row[5] == "stopped", text  # the log end column is "xid N": two cells
    assert _without_bounds(f"  dim_customer {spec.change_table}[0]: {reason}") in _without_bounds(
        text
    )

    evaluation = _freshness_on_demand(pipeline, "dim_customer")
    assert not evaluation.passed
    assert _without_bounds(reason) in _without_bounds(evaluation.description or "")
