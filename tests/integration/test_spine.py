"""The spine against the real broker, real PostgreSQL and a real Dagster instance."""

from collections import Counter

import dagster as dg
import pytest
from dagster._core.test_utils import create_run_for_test

from kappa.exceptions import ConfigurationError
from tests.integration.harness import Pipeline, expected_event_ids

pytestmark = pytest.mark.integration


def ledger_by_shard(pipeline: Pipeline, asset: str) -> dict[int, list[tuple[int, int]]]:
    rows = pipeline.query(
        "SELECT shard, start_position, end_position FROM kappa.batch_ledger "
        "WHERE asset = %s ORDER BY shard, start_position",
        (asset,),
    )
    spans: dict[int, list[tuple[int, int]]] = {}
    for shard, start, end in rows:
        spans.setdefault(shard, []).append((start, end))
    return spans


def log_ends(pipeline: Pipeline, topic: str) -> dict[int, int]:
    from kappa.sources.topic import EventStore

    with EventStore(pipeline.env["KAFKA_BOOTSTRAP_SERVERS"]) as store:
        return {p: b.end for p, b in store.log_bounds(topic, store.partitions(topic)).items()}


@pytest.mark.parametrize(
    ("asset", "topic_key"),
    [("fact_order", "KAPPA_TOPIC_ORDERS"), ("fact_payment", "KAPPA_TOPIC_PAYMENTS")],
)
def test_produced_events_end_as_exactly_the_valid_distinct_events(
    pipeline: Pipeline, asset, topic_key
):
    topic = pipeline.env[topic_key]
    messages = pipeline.simulate(3000, duplicate_rate=0.06, invalid_rate=0.04)
    produced = Counter(m.kind for m in messages if m.topic == topic)
    assert produced["duplicate"] > 10 and produced["invalid"] > 10, produced

    runs = pipeline.drain(asset)
    assert len(runs) >= 2, "batches are bounded: the backlog takes several runs"

    loaded = {r[0] for r in pipeline.query(f"SELECT event_id::text FROM edw.{asset}")}
    assert loaded == expected_event_ids(messages, topic)
    [(dead,)] = pipeline.query("SELECT count(*) FROM kappa.dead_letter WHERE asset = %s", (asset,))
    assert dead == produced["invalid"]

    ends = log_ends(pipeline, topic)
    spans = ledger_by_shard(pipeline, asset)
    assert set(spans) == set(ends)
    for shard, shard_spans in spans.items():
        position = 0
        for start, end in shard_spans:
            assert start == position, f"gap or overlap in {topic}[{shard}] at {start}"
            position = end
        assert position == ends[shard]

    [(received, loaded_n, dead_n, dedup_n)] = pipeline.query(
        "SELECT sum(received), sum(loaded), sum(dead_lettered), sum(deduplicated) "
        "FROM kappa.batch_ledger WHERE asset = %s",
        (asset,),
    )
    assert received == sum(produced.values())
    assert (loaded_n, dead_n, dedup_n) == (len(loaded), produced["invalid"], produced["duplicate"])

    materialization = runs[0].asset_materializations_for_node(asset)[0]
    for key in (
        "rows_loaded",
        "rows_dead_lettered",
        "rows_deduplicated",
        "lag_after_batch",
        "offset_ranges",
        "ranges",
    ):
        assert key in materialization.metadata


def test_a_tick_evaluated_twice_asks_for_the_same_run(pipeline: Pipeline):
    """The daemon re-evaluates a tick after a crash before the cursor was saved: the run key
    repeats, so Dagster launches the batch once."""
    pipeline.simulate(200)
    pipeline.tick("fact_order")  # an earlier tick: the stored cursor now has a generation
    pipeline.simulate(200)
    stored = pipeline.cursors["fact_order"]
    keys = []
    for _ in range(2):
        pipeline.cursors["fact_order"] = stored
        keys.append([r.run_key for r in pipeline.tick("fact_order").run_requests])
    assert keys[0] and keys[0] == keys[1]


def test_partitions_with_a_batch_in_flight_are_skipped(pipeline: Pipeline):
    pipeline.simulate(400)
    [request] = pipeline.tick("fact_order").run_requests
    in_flight = request.tags["kappa/partitions"].split(",")
    create_run_for_test(
        pipeline.instance,
        job_name="__ASSET_JOB",
        tags=request.tags,
        status=dg.DagsterRunStatus.STARTED,
    )

    result = pipeline.tick("fact_order")
    assert not result.run_requests
    topic = pipeline.env["KAPPA_TOPIC_ORDERS"]
    assert result.skip_reason is not None
    assert result.skip_reason.skip_message.startswith("batch in flight for ")
    for partition in in_flight:
        assert f"{topic}[{partition}]" in result.skip_reason.skip_message


def test_a_run_repeated_or_retried_changes_nothing(pipeline: Pipeline):
    pipeline.simulate(600)
    [request] = pipeline.tick("fact_order").run_requests
    pipeline.execute(request)
    before = pipeline.query("SELECT * FROM edw.fact_order ORDER BY event_id")
    ledger_before = pipeline.query(
        "SELECT batch_id, start_position, end_position FROM kappa.batch_ledger"
    )

    repeated = pipeline.execute(request)
    assert repeated.success
    metadata = repeated.asset_materializations_for_node("fact_order")[0].metadata
    assert metadata["rows_loaded"].value == 0
    assert pipeline.query("SELECT * FROM edw.fact_order ORDER BY event_id") == before
    assert (
        pipeline.query("SELECT batch_id, start_position, end_position FROM kappa.batch_ledger")
        == ledger_before
    )


def test_a_materialisation_launched_by_hand_reprocesses_its_partition(pipeline: Pipeline):
    """The UI's "Materialize" on a partition (no offset ranges): the partition is replaced
    from the log, and holds exactly what the live micro-batches had loaded."""
    messages = pipeline.simulate(300)
    pipeline.drain("fact_order")
    table = (
        "SELECT event_id::text, customer_orders_before, kafka_offset FROM edw.fact_order ORDER BY 1"
    )
    live = pipeline.query(table)
    # The partitions the live batches appended to, from the ledger (not the clock: the
    # batches may have run on either side of midnight).
    keys = [
        r[0]
        for r in pipeline.query(
            "SELECT DISTINCT partition_key FROM kappa.batch_ledger WHERE asset = 'fact_order' "
            "ORDER BY 1"
        )
    ]
    assert keys
    job = pipeline.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey("fact_order")}, asset_check_selection=set()
    )
    removed = loaded_again = 0
    for key in keys:
        result = job.execute_in_process(instance=pipeline.instance, partition_key=key)
        metadata = result.asset_materializations_for_node("fact_order")[0].metadata
        assert metadata["mode"].value == "reprocess"
        removed += metadata["rows_removed"].value
        loaded_again += metadata["rows_loaded"].value
    assert removed == len(live) == loaded_again
    assert pipeline.query(table) == live
    loaded = {r[0] for r in live}
    assert loaded == expected_event_ids(messages, pipeline.env["KAPPA_TOPIC_ORDERS"])


def test_an_unknown_topic_names_its_setting(pipeline_env, instance, monkeypatch):
    monkeypatch.setenv("KAPPA_TOPIC_ORDERS", "no_such_topic_here")
    pipeline = Pipeline(
        env={**pipeline_env, "KAPPA_TOPIC_ORDERS": "no_such_topic_here"}, instance=instance
    )
    with pytest.raises(
        ConfigurationError, match="^KAPPA_TOPIC_ORDERS: topic 'no_such_topic_here' does not exist"
    ):
        pipeline.tick("fact_order")


def test_an_unreachable_broker_names_its_setting(pipeline_env, instance, monkeypatch):
    from kappa.local.processes import free_port

    address = f"127.0.0.1:{free_port()}"
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", address)
    monkeypatch.setenv("KAPPA_KAFKA_TIMEOUT_S", "1")
    pipeline = Pipeline(
        env={**pipeline_env, "KAFKA_BOOTSTRAP_SERVERS": address, "KAPPA_KAFKA_TIMEOUT_S": "1"},
        instance=instance,
    )
    with pytest.raises(
        ConfigurationError, match=f"^KAFKA_BOOTSTRAP_SERVERS: no broker answered at {address}"
    ):
        pipeline.tick("fact_order")


def test_a_bad_database_url_names_its_setting(pipeline: Pipeline, monkeypatch):
    from kappa.local.processes import free_port

    monkeypatch.setenv("KAPPA_EDW_URL", f"postgresql://etl:hunter2@127.0.0.1:{free_port()}/edw")
    pipeline.simulate(10)
    with pytest.raises(ConfigurationError) as caught:
        pipeline.tick("fact_order")
    assert str(caught.value).startswith(
        "KAPPA_EDW_URL: cannot connect to postgresql://etl:***@127.0.0.1:"
    )
    assert "hunter2" not in str(caught.value)


def test_a_failed_batch_is_requested_again_and_then_loads(pipeline: Pipeline):
    """A run that fails (here: the fact table is briefly gone) does not stall its partitions."""
    messages = pipeline.simulate(300)
    [request] = pipeline.tick("fact_order").run_requests
    pipeline.query("ALTER TABLE edw.fact_order RENAME TO fact_order_away")
    failed = pipeline.execute(request, raise_on_error=False)
    assert not failed.success
    assert pipeline.query("SELECT count(*) FROM kappa.batch_ledger") == [(0,)]
    pipeline.query("ALTER TABLE edw.fact_order_away RENAME TO fact_order")

    [again] = pipeline.tick("fact_order").run_requests
    assert again.run_key != request.run_key, "a reused run key would launch nothing"
    assert again.tags["kappa/ranges"] == request.tags["kappa/ranges"]
    pipeline.drain("fact_order")
    loaded = {r[0] for r in pipeline.query("SELECT event_id::text FROM edw.fact_order")}
    assert loaded == expected_event_ids(messages, pipeline.env["KAPPA_TOPIC_ORDERS"])


def test_replay_equivalence_check_passes_on_a_clean_load_and_names_a_difference(pipeline: Pipeline):
    pipeline.simulate(900, duplicate_rate=0.05, invalid_rate=0.04)
    pipeline.drain("fact_order")
    job = pipeline.defs.resolve_job_def("edw_checks")

    def evaluation(asset: str) -> dg.AssetCheckEvaluation:
        result = job.execute_in_process(instance=pipeline.instance, raise_on_error=False)
        [found] = [
            e
            for e in result.get_asset_check_evaluations()
            if e.asset_key == dg.AssetKey(asset) and e.check_name == "replay_equivalence"
        ]
        return found

    clean = evaluation("fact_order")
    assert clean.passed, clean.description
    table = clean.metadata["partitions"].value
    assert len(table.records) == 4 and all(
        r.data["log_rows"] == r.data["edw_rows"] for r in table.records
    )

    [(partition,)] = pipeline.query(
        "SELECT kafka_partition FROM edw.fact_order ORDER BY kafka_offset DESC LIMIT 1"
    )
    pipeline.query(
        "DELETE FROM edw.fact_order WHERE event_id = "
        "(SELECT event_id FROM edw.fact_order WHERE kafka_partition = %s LIMIT 1)",
        (partition,),
    )
    tampered = evaluation("fact_order")
    assert not tampered.passed
    topic = pipeline.env["KAPPA_TOPIC_ORDERS"]
    assert f"{topic}[{partition}] " in tampered.description
    assert "(checksums differ)" in tampered.description
    assert tampered.metadata["rows_differing"].value == 1
