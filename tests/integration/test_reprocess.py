"""Time partitions and reprocessing, in process: live micro-batches over two hourly
partitions (broker timestamps injected by the producer), then each partition replaced from
the log by the run a backfill launches, with the same result; the safety refusals; state
staleness after a change; late events re-materialising their mart partition."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, time, timedelta
from itertools import islice

import dagster as dg
import pytest
from kafka import KafkaProducer
from kafka.admin import KafkaAdminClient

from examples.shop import simulator
from examples.shop import steps as stateful
from kappa.local.topics import ensure_topics
from kappa.settings import Settings
from kappa.sources.base import LogBounds
from kappa.sources.topic import EventStore
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration

FACTS = ("fact_order", "fact_payment")


def past_hours(now: datetime) -> tuple[datetime, datetime]:
    """Two consecutive hours, closed well before ``now``: the time partitions a test's
    records are stamped in (computed when the test starts, never when the module loads)."""
    first = now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
    return first, first + timedelta(hours=1)


@pytest.fixture
def hours() -> tuple[datetime, datetime]:
    return past_hours(datetime.now(UTC))


def hourly_env(first_hour: datetime) -> dict[str, str]:
    """Hourly partitions starting the day before ``first_hour``; the enrichment wait is the
    product's default."""
    return {
        "KAPPA_PARTITIONS": "hourly",
        "KAPPA_PARTITIONS_START": (first_hour - timedelta(days=1)).strftime("%Y-%m-%dT00:00"),
        "KAPPA_BATCH_MAX_RECORDS": "150",
    }


@pytest.fixture
def hourly(pipeline_env, hours, monkeypatch) -> dict[str, str]:
    env = {**pipeline_env, **hourly_env(hours[0])}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def pipeline(hourly, instance) -> Pipeline:
    return Pipeline(env=hourly, instance=instance)


def produce_in_hour(
    producer: KafkaProducer, settings: Settings, start: datetime, count: int, *, seed: int
) -> int:
    """``count`` simulated messages whose broker timestamps (and event times) start at
    ``start``, 1 s apart: the producer's clock is the test's. Returns how many were sent."""
    config = simulator.SimulatorConfig(
        topic_orders=settings.stream("fact_order").topic,
        topic_payments=settings.stream("fact_payment").topic,
        customers=30,
        seed=seed,
        duplicate_rate=0.05,
        late_rate=0.05,
        invalid_rate=0.03,
    )
    for i, message in enumerate(islice(simulator.generate(config, start=start, rate=1.0), count)):
        producer.send(
            message.topic,
            key=message.key,
            value=message.value,
            timestamp_ms=int((start + timedelta(seconds=i)).timestamp() * 1000),
        )
    producer.flush()
    return count


def produce_at(pipeline: Pipeline, start: datetime, count: int, *, seed: int) -> None:
    producer = KafkaProducer(bootstrap_servers=pipeline.env["KAFKA_BOOTSTRAP_SERVERS"], acks="all")
    try:
        produce_in_hour(producer, pipeline.settings, start, count, seed=seed)
    finally:
        producer.close()


def live(pipeline: Pipeline) -> None:
    for fact in FACTS:
        pipeline.drain(fact)


def reprocess(pipeline: Pipeline, fact: str, *keys: str, raise_on_error: bool = True):
    """What a backfill's run does: the fact's job over a partition range, no offset ranges."""
    job = pipeline.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection=set(pipeline.defs.resolve_assets_def(fact).keys),
        asset_check_selection=set(),
    )
    tags = (
        {
            "dagster/asset_partition_range_start": keys[0],
            "dagster/asset_partition_range_end": keys[-1],
        }
        if len(keys) > 1
        else {}
    )
    return job.execute_in_process(
        instance=pipeline.instance,
        partition_key=keys[0] if len(keys) == 1 else None,
        tags=tags,
        raise_on_error=raise_on_error,
    )


def digest(pipeline: Pipeline, statement: str) -> tuple[int, str]:
    rows = pipeline.query(statement)
    return len(rows), hashlib.sha256(repr(sorted(rows)).encode()).hexdigest()[:16]


def edw_checksums(pipeline: Pipeline) -> dict[str, tuple[int, str]]:
    """Counts and checksums of everything the facts own: rows (with enrichment and running
    statistics), fraud alerts, dead letters, state versions, ledger coverage."""
    return {
        "fact_order": digest(pipeline, "SELECT * FROM edw.fact_order"),
        "fact_payment": digest(pipeline, "SELECT * FROM edw.fact_payment"),
        "fraud_alert": digest(pipeline, "SELECT * FROM edw.fraud_alert"),
        "dead_letter": digest(
            pipeline, "SELECT asset, source, shard, position, reason FROM kappa.dead_letter"
        ),
        "state": digest(
            pipeline,
            "SELECT DISTINCT ON (store, shard, key) store, shard, key, value::text "
            "FROM kappa.state ORDER BY store, shard, key, position DESC",
        ),
        "ledger_partitions": digest(
            pipeline,
            "SELECT asset, shard, partition_key, min(start_position), max(end_position), "
            "sum(received), sum(loaded), sum(dead_lettered), sum(deduplicated) "
            "FROM kappa.batch_ledger GROUP BY 1, 2, 3",
        ),
    }


def keys(pipeline: Pipeline, hours: tuple[datetime, datetime]) -> tuple[str, str]:
    windows = pipeline.settings.windows
    return windows.at(hours[0]).key, windows.at(hours[1]).key


def test_live_batches_are_cut_at_partition_boundaries_and_a_reprocessed_partition_is_identical(
    pipeline: Pipeline,
    hours,
):
    hour_1, hour_2 = hours
    produce_at(pipeline, hour_1 + timedelta(minutes=50), 400, seed=1)
    produce_at(pipeline, hour_2 + timedelta(minutes=5), 400, seed=2)
    live(pipeline)
    first, second = keys(pipeline, hours)
    # No batch crosses the boundary: every batch holds records of one hour only.
    crossing = pipeline.query(
        "SELECT l.asset, l.shard, l.start_position, l.end_position FROM kappa.batch_ledger l "
        "JOIN edw.fact_order f ON f.kafka_partition = l.shard AND f.kafka_offset >= l.start_position "
        "AND f.kafka_offset < l.end_position WHERE l.asset = 'fact_order' "
        "GROUP BY 1, 2, 3, 4 HAVING count(DISTINCT l.partition_key) > 1"
    )
    assert crossing == []
    assert {
        r[0] for r in pipeline.query("SELECT DISTINCT partition_key FROM kappa.batch_ledger")
    } == {
        first,
        second,
    }
    checkpoints = pipeline.query(
        "SELECT asset, partition_key, count(*) FROM kappa.checkpoint GROUP BY 1, 2 ORDER BY 1, 2"
    )
    assert {(a, k) for a, k, _ in checkpoints} == {(f, k) for f in FACTS for k in (first, second)}
    before = edw_checksums(pipeline)
    assert before["fact_order"][0] > 0 and before["fraud_alert"][0] > 0

    for fact in FACTS:
        for key in (first, second):
            result = reprocess(pipeline, fact, key)
            metadata = result.asset_materializations_for_node(fact)[0].metadata
            assert metadata["mode"].value == "reprocess"
            assert metadata["rows_removed"].value == metadata["rows_loaded"].value > 0
            assert metadata["stale_from"].value == "none"
            assert result.dagster_run.tags.get("kappa/resolved_offsets", "").startswith(key)
    assert edw_checksums(pipeline) == before

    # Both partitions in one run (a backfill of a range): the same again.
    for fact in FACTS:
        reprocess(pipeline, fact, first, second)
    assert edw_checksums(pipeline) == before

    # Replay equivalence, per time partition and topic partition, re-derived from the log.
    check = pipeline.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_check_selection={dg.AssetCheckKey(dg.AssetKey("fact_order"), "replay_equivalence")}
    )
    evaluation = check.execute_in_process(instance=pipeline.instance).get_asset_check_evaluations()[
        0
    ]
    assert evaluation.passed, evaluation.description
    table = evaluation.metadata["partitions"].value
    assert {r.data["window"] for r in table.records} == {first, second}
    pipeline.query(
        "DELETE FROM edw.fact_order WHERE event_id = (SELECT event_id FROM edw.fact_order f "
        "JOIN kappa.batch_ledger l ON l.asset = 'fact_order' AND l.shard = f.kafka_partition "
        "AND f.kafka_offset >= l.start_position AND f.kafka_offset < l.end_position "
        "WHERE l.partition_key = %s LIMIT 1)",
        (second,),
    )
    evaluation = check.execute_in_process(instance=pipeline.instance).get_asset_check_evaluations()[
        0
    ]
    assert not evaluation.passed
    assert second in (evaluation.description or "") and first not in (evaluation.description or "")


def test_a_change_of_the_state_a_partition_ends_with_marks_the_next_one_stale(
    pipeline: Pipeline, hours, instance, monkeypatch
):
    hour_1, hour_2 = hours
    produce_at(pipeline, hour_1 + timedelta(minutes=30), 300, seed=3)
    produce_at(pipeline, hour_2 + timedelta(minutes=30), 300, seed=4)
    live(pipeline)
    first, second = keys(pipeline, hours)
    check = pipeline.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_check_selection={dg.AssetCheckKey(dg.AssetKey("fact_payment"), "state_continuity")}
    )

    def continuity() -> dg.AssetCheckEvaluation:
        result = check.execute_in_process(instance=instance)
        return result.get_asset_check_evaluations()[0]

    assert continuity().passed
    # "A code change": amounts enter the running statistics (the state) twice as large.
    to_cents = stateful.to_cents
    monkeypatch.setattr(stateful, "to_cents", lambda amounts: to_cents(amounts) * 2)
    changed = pipeline
    result = reprocess(changed, "fact_payment", first)
    assert (
        result.asset_materializations_for_node("fact_payment")[0].metadata["stale_from"].value
        == second
    )
    evaluation = continuity()
    assert not evaluation.passed
    assert f"stale from partition {second}" in (evaluation.description or "")
    # Reprocessing from the changed partition to now is one backfill (one run over the range).
    reprocess(changed, "fact_payment", first, second)
    assert continuity().passed


def test_a_reset_log_fails_the_backfill_and_leaves_the_edw_untouched(pipeline: Pipeline, hours):
    hour_1 = hours[0]
    produce_at(pipeline, hour_1 + timedelta(minutes=10), 200, seed=5)
    live(pipeline)
    first, _ = keys(pipeline, hours)
    before = edw_checksums(pipeline)
    topic = pipeline.settings.stream("fact_order").topic
    admin = KafkaAdminClient(bootstrap_servers=pipeline.env["KAFKA_BOOTSTRAP_SERVERS"])
    try:
        admin.delete_topics([topic])
    finally:
        admin.close()
    ensure_topics(pipeline.env["KAFKA_BOOTSTRAP_SERVERS"], {topic: 4}, timeout_s=15)

    result = reprocess(pipeline, "fact_order", first, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("fact_order")
    assert failure is not None
    message = str(failure.user_failure_data.description if failure.user_failure_data else failure)
    assert f"{topic}[" in message and "recreated" in message
    assert "no EDW rows were touched" in message
    assert edw_checksums(pipeline) == before


def test_a_missing_state_checkpoint_fails_the_backfill_and_leaves_the_edw_untouched(
    pipeline: Pipeline,
    hours,
):
    hour_1, hour_2 = hours
    produce_at(pipeline, hour_1 + timedelta(minutes=40), 300, seed=6)
    produce_at(pipeline, hour_2 + timedelta(minutes=10), 300, seed=7)
    live(pipeline)
    _, second = keys(pipeline, hours)
    shard, position = pipeline.query(
        "DELETE FROM kappa.checkpoint WHERE asset = 'fact_order' AND partition_key = %s "
        "AND shard = (SELECT min(shard) FROM kappa.checkpoint WHERE asset = 'fact_order' "
        "AND partition_key = %s AND position > 0) RETURNING shard, position",
        (second, second),
    )[0]
    before = edw_checksums(pipeline)

    result = reprocess(pipeline, "fact_order", second, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("fact_order")
    assert failure is not None and failure.user_failure_data is not None
    message = failure.user_failure_data.description or ""
    topic = pipeline.settings.stream("fact_order").topic
    assert f"partition {second}: {topic}[{shard}]" in message
    assert f"no state checkpoint at offset {position}" in message
    assert "Nothing in the EDW was changed" in message
    assert edw_checksums(pipeline) == before


def test_a_late_event_rematerialises_the_mart_partition_of_its_event_date(
    pipeline: Pipeline, hours
):
    hour_2 = hours[1]
    produce_at(pipeline, hour_2, 200, seed=8)
    live(pipeline)
    mart = pipeline.defs.get_sensor_def("mart_sensor")

    def tick_mart() -> list[dg.RunRequest]:
        with dg.build_sensor_context(
            instance=pipeline.instance,
            cursor=pipeline.cursors.get("mart"),
            resources=pipeline.defs.resources,
        ) as context:
            result = mart(context)
        assert isinstance(result, dg.SensorResult)
        pipeline.cursors["mart"] = result.cursor
        for request in result.run_requests or []:
            assert pipeline.execute(request).success
        return list(result.run_requests or [])

    # The event dates come from the data (simulated late events of a batch at 00:00 fall on
    # the day before): each is a mart partition, built with every order of that date.
    days = sorted(
        d
        for (d,) in pipeline.query(
            "SELECT DISTINCT (event_time AT TIME ZONE 'UTC')::date FROM edw.fact_order "
            "UNION SELECT DISTINCT (event_time AT TIME ZONE 'UTC')::date FROM edw.fact_payment"
        )
    )
    assert days
    assert {r.partition_key for r in tick_mart()} == {d.isoformat() for d in days}
    for day in days:
        assert pipeline.query(
            "SELECT coalesce(sum(orders), 0) FROM edw.mart_customer_daily WHERE activity_date = %s",
            (day,),
        ) == pipeline.query(
            "SELECT count(*) FROM edw.fact_order WHERE (event_time AT TIME ZONE 'UTC')::date = %s",
            (day,),
        )
    # A day before every event date (still a mart partition: partitions start the day
    # before the first hour) has no activity yet.
    late_day = days[0] - timedelta(days=1)
    assert pipeline.query(
        "SELECT count(*) FROM edw.mart_customer_daily WHERE activity_date = %s", (late_day,)
    ) == [(0,)]

    # An order that happened on that day arrives now (its event time a day or more before
    # its broker time): the mart partition of that day is built with it counted.
    late = simulator.SimulatorConfig(
        topic_orders=pipeline.settings.stream("fact_order").topic,
        topic_payments=pipeline.settings.stream("fact_payment").topic,
        customers=30,
        seed=9,
        duplicate_rate=0.0,
        late_rate=0.0,
        invalid_rate=0.0,
    )
    message = next(
        m
        for m in simulator.generate(
            late, start=datetime.combine(late_day, time(12), tzinfo=UTC), rate=1.0
        )
        if m.topic == pipeline.settings.stream("fact_order").topic and m.kind == "valid"
    )
    producer = KafkaProducer(bootstrap_servers=pipeline.env["KAFKA_BOOTSTRAP_SERVERS"], acks="all")
    producer.send(
        message.topic,
        key=message.key,
        value=message.value,
        timestamp_ms=int((hour_2 + timedelta(minutes=20)).timestamp() * 1000),
    )
    producer.flush()
    producer.close()
    live(pipeline)
    assert late_day.isoformat() in {r.partition_key for r in tick_mart()}
    assert pipeline.query(
        "SELECT sum(orders) FROM edw.mart_customer_daily WHERE activity_date = %s", (late_day,)
    ) == [(1,)]


def test_expired_offsets_fail_the_backfill_and_leave_the_edw_untouched(
    pipeline: Pipeline, hours, monkeypatch
):
    """Retention took the first offsets of a loaded partition (the local broker cannot expire
    records, so its log start is moved for the topic): nothing is deleted."""
    hour_1 = hours[0]
    produce_at(pipeline, hour_1 + timedelta(minutes=10), 200, seed=8)
    live(pipeline)
    first, _ = keys(pipeline, hours)
    before = edw_checksums(pipeline)
    topic = pipeline.settings.stream("fact_order").topic
    real = EventStore.log_bounds

    def retained(self: EventStore, name: str, partitions) -> dict[int, LogBounds]:
        bounds = real(self, name, partitions)
        if name != topic or 0 not in bounds:
            return bounds
        return {
            **bounds,
            0: LogBounds(start=min(bounds[0].end, bounds[0].start + 3), end=bounds[0].end),
        }

    monkeypatch.setattr(EventStore, "log_bounds", retained)
    result = reprocess(pipeline, "fact_order", first, raise_on_error=False)
    assert not result.success
    failure = result.failure_data_for_node("fact_order")
    assert failure is not None and failure.user_failure_data is not None
    message = failure.user_failure_data.description or ""
    assert f"partition {first}: {topic}[0]" in message
    assert "have expired (retention)" in message and "Nothing in the EDW was changed" in message
    assert edw_checksums(pipeline) == before


def test_records_stamped_ahead_of_the_clock_wait_for_their_partition(pipeline: Pipeline):
    """A producer clock hours ahead makes a time partition Dagster does not have yet: the
    shards holding such records wait (the tick says so), the others load."""
    ahead_at = datetime.now(UTC) + timedelta(hours=3)
    produce_at(pipeline, ahead_at, 40, seed=9)
    result = pipeline.tick("fact_order")
    assert not result.run_requests
    reason = result.skip_reason.skip_message if result.skip_reason else ""
    assert "stamped ahead of the clock" in (reason or "")
    ahead = pipeline.settings.windows.at(ahead_at).key
    assert f"-> {ahead}" in (reason or "")
    assert pipeline.query("SELECT count(*) FROM kappa.batch_ledger") == [(0,)]
