"""Self-healing provisional enrichment, and a backfill that waits for change capture at most
once per window: against the real broker, PostgreSQL and a Dagster instance (sensors
evaluated and runs executed through Dagster, as the daemon does)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from decimal import Decimal

import dagster as dg
import psycopg
import pytest
from dagster._core.test_utils import create_run_for_test

from kappa.catalog.ingests import topic_ingests
from kappa.dagster.sensors.heal import HEAL_KEY_TAG, HEAL_TAG
from kappa.dagster.sensors.micro_batch import ASSET_TAG, PARTITIONS_TAG
from kappa.edw.connection import connect
from kappa.ingest.reprocess import reprocess_window
from kappa.ingest.topic_window import EventWindowLoader
from kappa.run import FactServices
from kappa.sources.topic import EventStore, TopicPartitions
from kappa.steps import WaitBudget
from kappa.steps.warehouse import WarehouseLookups
from tests.integration.harness import Pipeline
from tests.integration.test_stateful import oltp, order, payment

pytestmark = pytest.mark.integration


def heal_tick(pipeline: Pipeline, asset: str) -> dg.SensorResult:
    sensor = pipeline.defs.get_sensor_def(f"{asset}_heal_sensor")
    with dg.build_sensor_context(
        instance=pipeline.instance, resources=pipeline.defs.resources
    ) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult)
    return result


def reason(result: dg.SensorResult) -> str:
    skip = result.skip_reason
    return (skip.skip_message or "") if skip is not None else ""


def replay_checks(pipeline: Pipeline) -> dict[str, dg.AssetCheckEvaluation]:
    result = pipeline.defs.resolve_job_def("edw_checks").execute_in_process(
        instance=pipeline.instance, raise_on_error=False
    )
    return {
        e.asset_key.path[-1]: e
        for e in result.get_asset_check_evaluations()
        if e.check_name == "replay_equivalence"
    }


def test_rows_enriched_before_a_held_customer_change_are_healed_without_an_operator(
    pipeline_env, instance
):
    pipeline = Pipeline(env={**pipeline_env, "KAPPA_ENRICH_MAX_WAIT_S": "1"}, instance=instance)
    oltp(
        pipeline,
        "INSERT INTO customers (customer_id, name, segment, country, credit_limit) VALUES "
        "('c-1', 'Ada', 'retail', 'DE', 100)",
    )
    pipeline.drain("dim_customer")
    [(retail_sk,)] = pipeline.query("SELECT customer_sk FROM edw.dim_customer")
    # An OLTP transaction holds c-1's change open past the batches' wait.
    held = psycopg.connect(pipeline.env["KAPPA_OLTP_URL"], autocommit=False)
    try:
        held.execute(
            "UPDATE customers SET segment = 'smb', country = 'FR' WHERE customer_id = 'c-1'"
        )
        # An order while the change is open: which version is valid at its event time
        # depends on the change's time (its commit time where track_commit_timestamp is on),
        # so it is read from the dimension below; what matters is that it is not final yet.
        during = datetime.now(UTC)
        pipeline.produce([order(pipeline, "c-1", 10.00, during)])
        pipeline.drain("fact_order")
        assert pipeline.query("SELECT enrichment FROM edw.fact_order") == [("provisional",)]
        waiting = heal_tick(pipeline, "fact_order")
        assert not waiting.run_requests
        assert "wait for change capture" in reason(waiting), reason(waiting)
        held.commit()
    finally:
        held.rollback()
        held.close()
    # After the commit, before change capture loads it: the new version is the one valid at
    # these events, but the EDW still has only the old one.
    after = datetime.now(UTC)
    pipeline.produce(
        [
            order(pipeline, "c-1", 20.00, after),
            payment(pipeline, "c-1", 30.00, after, card="k-1", country="FR"),
        ]
    )
    pipeline.drain("fact_order")
    pipeline.drain("fact_payment")
    loaded_at = time.monotonic()
    assert pipeline.query(
        "SELECT customer_sk, customer_segment, customer_country, enrichment FROM edw.fact_order "
        "WHERE amount = 20.00"
    ) == [(retail_sk, "retail", "DE", "provisional")]
    # Provisionally DE, the merchant FR: a geo alert the real version would not raise.
    assert pipeline.query("SELECT rule FROM edw.fraud_alert") == [("geo_mismatch",)]
    # Committed but not captured yet: c-1 is complete only up to just before its change.
    waiting = heal_tick(pipeline, "fact_order")
    assert not waiting.run_requests and "customer c-1" in reason(waiting), reason(waiting)

    pipeline.drain("dim_customer")
    captured_at = time.monotonic()
    [(smb_sk,)] = pipeline.query(
        "SELECT customer_sk FROM edw.dim_customer WHERE segment = 'smb' AND valid_to IS NULL"
    )
    [valid_during] = pipeline.query(
        "SELECT customer_sk, segment, country FROM edw.dim_customer WHERE valid_from <= %s "
        "AND (valid_to IS NULL OR valid_to > %s)",
        (during, during),
    )
    for asset in ("fact_order", "fact_payment"):
        tick = heal_tick(pipeline, asset)
        [request] = tick.run_requests
        shards = "0,1,2,3" if asset == "fact_order" else "0,1"
        assert request.tags[ASSET_TAG] == asset and request.tags[PARTITIONS_TAG] == shards
        assert request.tags[HEAL_TAG] == request.partition_key
        assert not request.run_config  # no offset ranges: the backfill path
        assert pipeline.execute(request).success
    healed_at = time.monotonic()

    assert pipeline.query(
        "SELECT amount, customer_sk, customer_segment, customer_country, enrichment "
        "FROM edw.fact_order ORDER BY amount"
    ) == [
        (Decimal("10.00"), *valid_during, "as_of"),
        (Decimal("20.00"), smb_sk, "smb", "FR", "as_of"),
    ]
    assert pipeline.query(
        "SELECT customer_sk, customer_country, enrichment FROM edw.fact_payment"
    ) == [(smb_sk, "FR", "as_of")]
    assert pipeline.query("SELECT rule FROM edw.fraud_alert") == []
    for asset in ("fact_order", "fact_payment"):
        done = heal_tick(pipeline, asset)
        assert not done.run_requests and reason(done) == f"no provisional rows in {asset}"
    checks = replay_checks(pipeline)
    assert checks["fact_order"].passed and checks["fact_payment"].passed, checks
    print(
        f"\nprovisional for {healed_at - loaded_at:.2f} s in all, of which "
        f"{healed_at - captured_at:.2f} s after change capture covered the rows "
        "(sensor ticks driven by the test, not the daemon's interval)"
    )


def test_a_heal_waits_for_its_asset_s_heal_in_flight_and_holds_the_live_sensor(
    pipeline_env, instance
):
    pipeline = Pipeline(env={**pipeline_env, "KAPPA_ENRICH_MAX_WAIT_S": "0"}, instance=instance)
    oltp(
        pipeline,
        "INSERT INTO customers (customer_id, name, segment, country, credit_limit) VALUES "
        "('c-1', 'Ada', 'retail', 'DE', 100)",
    )
    pipeline.drain("dim_customer")
    held = psycopg.connect(pipeline.env["KAPPA_OLTP_URL"], autocommit=False)
    try:
        held.execute("UPDATE customers SET segment = 'smb' WHERE customer_id = 'c-1'")
        held.commit()
    finally:
        held.rollback()
        held.close()
    # After the change's commit (its version is the one valid at the order), before change
    # capture loads it: provisional.
    pipeline.produce([order(pipeline, "c-1", 10.00, datetime.now(UTC))])
    pipeline.drain("fact_order")
    pipeline.drain("dim_customer")
    [request] = heal_tick(pipeline, "fact_order").run_requests
    # Queued behind a live run or running, it holds every shard of the asset.
    queued = create_run_for_test(
        pipeline.instance,
        job_name="__ASSET_JOB",
        status=dg.DagsterRunStatus.STARTED,
        tags=request.tags,
    )
    again = heal_tick(pipeline, "fact_order")
    assert not again.run_requests
    assert reason(again) == (
        f"heal run {queued.run_id[:8]} of fact_order partition {request.partition_key} is started"
    )
    pipeline.produce([order(pipeline, "c-1", 11.00, datetime.now(UTC))])
    live = pipeline.tick("fact_order")
    assert not live.run_requests and "batch in flight" in reason(live)

    # A failed heal is not asked for again until the partition changes.
    pipeline.instance.report_run_failed(queued)
    again = heal_tick(pipeline, "fact_order")
    assert not again.run_requests and "did not succeed" in reason(again)
    assert queued.tags[HEAL_KEY_TAG] == request.tags[HEAL_KEY_TAG]
    pipeline.drain("fact_order")  # a batch of the partition commits: the heal is planned anew
    [retry] = heal_tick(pipeline, "fact_order").run_requests
    assert retry.run_key != request.run_key and retry.partition_key == request.partition_key
    assert pipeline.execute(retry).success
    assert pipeline.query("SELECT customer_segment, enrichment FROM edw.fact_order") == [
        ("smb", "as_of"),
        ("smb", "as_of"),
    ]


def test_a_backfill_waits_for_change_capture_once_per_window_not_per_chunk_and_shard(
    pipeline_env, instance
):
    """Events newer than change capture (a held OLTP transaction), reprocessed in 4 topic
    partitions x 4 chunks with a 10 s wait: the clock is the test's, so the wait is counted,
    not timed."""
    pipeline = Pipeline(env={**pipeline_env, "KAPPA_ENRICH_MAX_WAIT_S": "0"}, instance=instance)
    oltp(
        pipeline,
        "INSERT INTO customers (customer_id, name, segment, country, credit_limit) VALUES "
        + ", ".join(f"('c-{i}', 'N', 'retail', 'DE', 100)" for i in range(8)),
    )
    pipeline.drain("dim_customer")
    held = psycopg.connect(pipeline.env["KAPPA_OLTP_URL"], autocommit=False)
    try:
        held.execute("UPDATE customers SET segment = 'smb' WHERE customer_id = 'c-0'")
        at = datetime.now(UTC)
        pipeline.produce([order(pipeline, f"c-{i % 8}", 1.0 + i, at) for i in range(160)])
        pipeline.drain("fact_order")
        now = [0.0]
        slept: list[float] = []

        def sleep(seconds: float) -> None:
            slept.append(seconds)
            now[0] += seconds

        spec = next(s for s, _ in topic_ingests(pipeline.settings) if s.asset == "fact_order")
        services = FactServices.from_settings(pipeline.settings)
        store = EventStore(pipeline.env["KAFKA_BOOTSTRAP_SERVERS"])
        try:
            with connect(pipeline.edw_url) as conn, connect(pipeline.env["KAPPA_OLTP_URL"]) as src:
                assert spec.step is not None
                dims = WarehouseLookups(
                    conn,
                    pipeline.schemas,
                    oltp=src,
                    captures=services.captures,
                    lookups=spec.step.lookups,
                )
                windows = pipeline.settings.windows
                source = TopicPartitions(store, spec.topic)
                outcomes = reprocess_window(
                    source,
                    conn,
                    pipeline.schemas,
                    spec.asset,
                    windows.at(at),
                    EventWindowLoader(
                        source,
                        conn,
                        pipeline.schemas,
                        spec,
                        max_batch=10,
                        dimensions=dims,
                        budget=WaitBudget(10.0, clock=lambda: now[0], sleep=sleep),
                    ),
                    run_id="test-backfill",
                    is_first=windows.is_first(windows.at(at)),
                )
        finally:
            store.close()
    finally:
        held.rollback()
        held.close()
    assert sum(o.batches for o in outcomes) == 16 and len(outcomes) == 4
    # Before: up to 10 s for each of the 16 chunks (160 s); now 10 s for the window.
    assert 0 < sum(slept) <= 10.0
    assert pipeline.query(
        "SELECT count(*) FILTER (WHERE enrichment = 'provisional'), count(*) FROM edw.fact_order"
    ) == [(160, 160)]


FACT_ROWS = "SELECT * FROM edw.fact_order ORDER BY event_id"
LEDGER = (
    "SELECT shard, start_position, end_position, batch_id, run_id, received "
    "FROM kappa.batch_ledger WHERE asset = 'fact_order' AND partition_key = %s "
    "ORDER BY shard, start_position"
)


def test_a_heal_re_derives_only_from_the_first_provisional_batch_and_equals_a_full_backfill(
    pipeline_env, instance
):
    """Three waves of orders for eight customers in batches of at most 20 records: the
    second and third hold orders of c-0 after a change of c-0 that change capture has not
    loaded yet (provisional). The heal keeps the first wave's batches and the shards
    without c-0, and its rows equal those a backfill of the whole partition gives."""
    from tests.integration.test_reprocess import reprocess

    env = {**pipeline_env, "KAPPA_ENRICH_MAX_WAIT_S": "0", "KAPPA_BATCH_MAX_RECORDS": "20"}
    pipeline = Pipeline(env=env, instance=instance)
    oltp(
        pipeline,
        "INSERT INTO customers (customer_id, name, segment, country, credit_limit) VALUES "
        + ", ".join(f"('c-{i}', 'N', 'retail', 'DE', 100)" for i in range(8)),
    )
    pipeline.drain("dim_customer")
    pipeline.produce(
        [order(pipeline, f"c-{i % 8}", 1.0 + i, datetime.now(UTC)) for i in range(160)]
    )
    pipeline.drain("fact_order")
    oltp(pipeline, "UPDATE customers SET segment = 'smb' WHERE customer_id = 'c-0'")
    for wave in (2, 3):  # after the change's commit, before change capture loads it
        pipeline.produce(
            [order(pipeline, f"c-{i % 8}", wave * 1000.0 + i, datetime.now(UTC)) for i in range(40)]
        )
        pipeline.drain("fact_order")
    [(shard, first_provisional)] = pipeline.query(
        "SELECT kafka_partition, min(kafka_offset) FROM edw.fact_order "
        "WHERE enrichment = 'provisional' GROUP BY 1"
    )
    assert pipeline.query(
        "SELECT count(*) FROM edw.fact_order WHERE enrichment = 'provisional'"
    ) == [(10,)]
    pipeline.drain("dim_customer")

    [request] = heal_tick(pipeline, "fact_order").run_requests
    key = request.partition_key
    before = pipeline.query(LEDGER, (key,))
    result = pipeline.execute(request)
    assert result.success
    after = pipeline.query(LEDGER, (key,))
    healed = [b for b in after if b[4] == result.run_id]
    # Re-derived from the start of the batch holding the first provisional row, in its
    # shard alone: every batch before it, and every other shard's, is the one loaded live.
    [restart] = [b[1] for b in before if b[0] == shard and b[1] <= first_provisional < b[2]]
    assert restart > min(b[1] for b in before if b[0] == shard)
    assert {b[0] for b in healed} == {shard} and min(b[1] for b in healed) == restart
    assert [b for b in after if b[4] != result.run_id] == [
        b for b in before if b[0] != shard or b[2] <= restart
    ]
    [(rederived,)] = pipeline.query(
        "SELECT count(*) FROM edw.fact_order WHERE kafka_partition = %s AND kafka_offset >= %s",
        (shard, restart),
    )
    assert sum(b[5] for b in healed) == rederived < 240
    assert pipeline.query(
        "SELECT count(*) FROM edw.fact_order WHERE enrichment = 'provisional'"
    ) == [(0,)]
    [(smb_sk,)] = pipeline.query(
        "SELECT customer_sk FROM edw.dim_customer WHERE customer_id = 'c-0' AND segment = 'smb'"
    )
    assert pipeline.query(
        "SELECT DISTINCT customer_sk, customer_segment FROM edw.fact_order "
        "WHERE customer_id = 'c-0' AND amount >= 2000"
    ) == [(smb_sk, "smb")]
    heal_rows = pipeline.query(FACT_ROWS)

    backfill = reprocess(pipeline, "fact_order", key)
    assert backfill.success
    backfill_rows = pipeline.query(FACT_ROWS)
    # The backfill re-derived every shard from the partition's start.
    assert {b[4] for b in pipeline.query(LEDGER, (key,))} == {backfill.run_id}
    assert len(heal_rows) == len(backfill_rows) == 240
    for healed_row, backfilled in zip(heal_rows, backfill_rows, strict=True):
        assert healed_row == backfilled
