"""Faults on the spine: a run killed mid-batch, a broker that lost its log."""

import pytest

from kappa.exceptions import LogResetError
from tests.integration.harness import Pipeline, expected_event_ids, kill_mid_batch

pytestmark = pytest.mark.integration


def edw_snapshot(pipeline: Pipeline, edw: str, meta: str) -> dict[str, list[tuple]]:
    return {
        "fact_order": pipeline.query(f"SELECT * FROM {edw}.fact_order ORDER BY event_id"),
        "dead_letter": pipeline.query(
            f"SELECT source, shard, position, raw_key, raw_value, reason FROM {meta}.dead_letter ORDER BY shard, position"
        ),
        "ledger_end": pipeline.query(
            f"SELECT shard, end_position FROM {meta}.ledger_head ORDER BY shard"
        ),
    }


def test_a_run_killed_mid_batch_then_run_again_equals_a_clean_single_pass(
    pipeline: Pipeline, pipeline_env, instance
):
    messages = pipeline.simulate(1500, duplicate_rate=0.05, invalid_rate=0.03)
    [request] = pipeline.tick("fact_order").run_requests

    # Hold the fact table so the run stops inside its transaction: ledger head locked and
    # moved, dead letters copied, the COPY into the fact waiting.
    kill_mid_batch(pipeline, request, lock_table="edw.fact_order", blocked_query="COPY%fact_order%")

    # The killed batch left nothing behind: the server rolled its transaction back.
    assert pipeline.query("SELECT count(*) FROM edw.fact_order") == [(0,)]
    assert pipeline.query("SELECT count(*) FROM kappa.batch_ledger") == [(0,)]
    assert pipeline.query("SELECT count(*) FROM kappa.dead_letter") == [(0,)]

    pipeline.drain("fact_order")

    clean = Pipeline(
        env={**pipeline_env, "KAPPA_EDW_SCHEMA": "edw_clean", "KAPPA_META_SCHEMA": "kappa_clean"},
        instance=instance,
    )
    clean.drain("fact_order")
    recovered = edw_snapshot(pipeline, "edw", "kappa")
    assert recovered == edw_snapshot(clean, "edw_clean", "kappa_clean")
    assert {r[0] for r in recovered["fact_order"]} == {
        __import__("uuid").UUID(e)
        for e in expected_event_ids(messages, pipeline_env["KAPPA_TOPIC_ORDERS"])
    }


def test_a_broker_that_lost_its_log_stops_the_asset_in_plain_words(
    database_url, topic_factory, tmp_path, monkeypatch, instance
):
    from kappa.local.broker import LocalBroker
    from kappa.local.processes import free_port
    from kappa.local.topics import ensure_topics

    port = free_port()
    broker = LocalBroker(port=port, log_path=tmp_path / "broker.log")
    broker.start()
    try:
        env = {
            "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
            "KAPPA_EDW_URL": database_url,
            "KAPPA_OLTP_URL": database_url,
            "KAPPA_TOPIC_ORDERS": "orders",
            "KAPPA_TOPIC_PAYMENTS": "payments",
        }
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        ensure_topics(broker.bootstrap_servers, {"orders": 1, "payments": 1}, timeout_s=10)
        pipeline = Pipeline(env=env, instance=instance)
        pipeline.simulate(300, invalid_rate=0.0)
        pipeline.drain("fact_order")
        before = pipeline.query("SELECT * FROM edw.fact_order ORDER BY event_id")
        assert before

        broker.stop()  # the local broker keeps nothing: it comes back empty
        broker.start()
        ensure_topics(broker.bootstrap_servers, {"orders": 1, "payments": 1}, timeout_s=10)
        after_reset = pipeline.simulate(20, seed=99, invalid_rate=0.0)

        with pytest.raises(LogResetError) as caught:
            pipeline.tick("fact_order")
        message = str(caught.value)
        assert message.startswith("fact_order: orders[0] ")
        assert "Nothing was skipped or re-loaded" in message
        assert "was recreated" in message or "the log now ends at" in message
        assert "kappa replay fact_order" in message
        assert pipeline.query("SELECT * FROM edw.fact_order ORDER BY event_id") == before

        # The operator's decision: reload the asset from the log as it is now.
        from kappa import cli

        assert cli.main(["replay", "fact_order"]) == 1, "without --yes nothing is deleted"
        assert pipeline.query("SELECT * FROM edw.fact_order ORDER BY event_id") == before
        assert cli.main(["replay", "fact_order", "--yes"]) == 0
        pipeline.drain("fact_order")
        loaded = {str(r[0]) for r in pipeline.query("SELECT event_id FROM edw.fact_order")}
        assert loaded == expected_event_ids(after_reset, "orders")
    finally:
        broker.stop()
