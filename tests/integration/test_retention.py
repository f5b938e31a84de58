"""Bounded Dagster storage on a real PostgreSQL instance: a compressed day of micro-batch runs
over closed hourly partitions, what Dagster reports once a partition's runs are deleted, and
the retention that summarises closed partitions before it deletes their runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
import pytest
import sqlalchemy as sa
from dagster._core.storage.partition_status_cache import get_and_update_asset_status_cache_value
from dagster_shared.serdes import serialize_value
from sqlalchemy.engine import make_url

from kappa.dagster.assets.partitions import arrival_partitions
from kappa.dagster.retention import (
    SUMMARY_MODE,
    RetentionPolicy,
    apply_retention,
    storage_report,
    storage_sizes,
)
from kappa.edw.connection import connect
from tests.integration.harness import Pipeline
from tests.integration.test_reprocess import FACTS, edw_checksums, produce_at, reprocess

pytestmark = pytest.mark.integration

HOURS = 3
ROUNDS_PER_HOUR = 6
MESSAGES_PER_ROUND = 60


@pytest.fixture
def hour_starts() -> list[datetime]:
    first = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(
        hours=HOURS + 1
    )
    return [first + timedelta(hours=i) for i in range(HOURS)]


@pytest.fixture
def instance(database_url):
    """A Dagster instance on PostgreSQL (as the local stack runs it): the partition status
    cache and the run deletion behave as in a deployment, not as on SQLite."""
    url = make_url(database_url).set(drivername="postgresql+psycopg2")
    overrides = {
        "storage": {"postgres": {"postgres_url": url.render_as_string(hide_password=False)}}
    }
    with dg.instance_for_test(overrides=overrides) as test_instance:
        yield test_instance


@pytest.fixture
def pipeline(pipeline_env, hour_starts, instance, monkeypatch) -> Pipeline:
    env = {
        **pipeline_env,
        "KAPPA_PARTITIONS": "hourly",
        "KAPPA_PARTITIONS_START": (hour_starts[0] - timedelta(days=1)).strftime("%Y-%m-%dT00:00"),
        # Small runs: many micro-batches per partition, as a day at the 5 s cadence makes.
        "KAPPA_BATCH_MAX_RECORDS": "12",
        "KAPPA_RUN_MAX_RECORDS": "24",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Pipeline(env=env, instance=instance)


def storage_figures(instance: dg.DagsterInstance) -> dict[str, int]:
    """Exact rows and live bytes of Dagster's run and event-log tables."""
    engine = sa.create_engine(instance.event_log_storage.postgres_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            runs = conn.execute(
                sa.text("SELECT count(*), coalesce(sum(pg_column_size(r.*)), 0) FROM runs r")
            ).one()
            events = conn.execute(
                sa.text("SELECT count(*), coalesce(sum(pg_column_size(e.*)), 0) FROM event_logs e")
            ).one()
            tags = conn.execute(sa.text("SELECT count(*) FROM run_tags")).one()
            by_type = conn.execute(
                sa.text(
                    "SELECT coalesce(dagster_event_type, 'log line'), count(*), "
                    "sum(pg_column_size(e.*)) FROM event_logs e GROUP BY 1 ORDER BY 3 DESC"
                )
            ).fetchall()
    finally:
        engine.dispose()
    return {
        "runs": runs[0],
        "run_bytes": runs[1],
        "run_tags": tags[0],
        "events": events[0],
        "event_bytes": events[1],
        **{f"{kind} ({count})": size for kind, count, size in by_type},
    }


def ui_materialised(
    instance: dg.DagsterInstance, pipeline: Pipeline, asset: str, *, fresh_cache: bool
) -> set[str]:
    """The partitions the UI shows as materialised: the instance's partition status cache, or
    (``fresh_cache``) that cache rebuilt from the event log, as after a partitions change."""
    partitions = arrival_partitions(pipeline.settings.windows)
    key = dg.AssetKey(asset)
    if fresh_cache:
        record = next(iter(instance.get_asset_records([key])))
        instance.update_asset_cached_status_data(
            key, record.asset_entry.cached_status._replace(partitions_def_id="rebuilt")
        )
    value = get_and_update_asset_status_cache_value(instance, key, partitions)
    assert value is not None
    return set(value.deserialize_materialized_partition_subsets(partitions).get_partition_keys())


def latest(instance: dg.DagsterInstance, asset: str, key: str) -> dg.EventLogRecord | None:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=1
    ).records
    return records[0] if records else None


def run_check(pipeline: Pipeline, asset: str, name: str) -> dg.AssetCheckEvaluation:
    job = pipeline.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_check_selection={dg.AssetCheckKey(dg.AssetKey(asset), name)}
    )
    return job.execute_in_process(instance=pipeline.instance).get_asset_check_evaluations()[0]


def test_retention_deletes_old_micro_batch_runs_and_every_closed_partition_stays_materialised(
    pipeline: Pipeline, hour_starts: list[datetime]
) -> None:
    instance = pipeline.instance
    keys = [start.strftime(pipeline.settings.windows.fmt) for start in hour_starts]
    for i, start in enumerate(hour_starts):
        # A few rounds per hour: each round is drained before the next arrives, as live.
        for round_ in range(ROUNDS_PER_HOUR):
            produce_at(
                pipeline,
                start + timedelta(minutes=60 * round_ / ROUNDS_PER_HOUR),
                MESSAGES_PER_ROUND,
                seed=100 * i + round_,
            )
            for fact in FACTS:
                pipeline.drain(fact)
    edw_before = edw_checksums(pipeline)
    before = storage_figures(instance)
    tables_before = storage_sizes(instance)
    newest = instance.get_latest_materialization_event(dg.AssetKey("fact_order"))
    assert newest is not None and newest.asset_materialization is not None
    print(
        "\nmetadata bytes:",
        {k: len(serialize_value(v)) for k, v in newest.asset_materialization.metadata.items()},
    )
    print("tables:", tables_before)
    micro_batches = instance.get_runs_count(dg.RunsFilter(tags={"kappa/asset": "fact_order"})) + (
        instance.get_runs_count(dg.RunsFilter(tags={"kappa/asset": "fact_payment"}))
    )
    print(
        f"\nbefore: {before}, micro-batch runs {micro_batches}, "
        f"event bytes per run {before['event_bytes'] // max(before['runs'], 1)}"
    )
    assert micro_batches == before["runs"] > 3 * HOURS * len(FACTS)
    for fact in FACTS:
        assert set(keys) <= ui_materialised(instance, pipeline, fact, fresh_cache=False)

    # What Dagster itself reports once a partition's runs are deleted without a summary.
    gone = keys[0]
    by_hand = instance.get_runs(
        filters=dg.RunsFilter(tags={"kappa/asset": "fact_payment", "dagster/partition": gone})
    )
    assert by_hand
    for run in by_hand:
        instance.delete_run(run.run_id)
    assert gone not in instance.get_materialized_partitions(dg.AssetKey("fact_payment"))
    assert latest(instance, "fact_payment", gone) is None
    # The cached status still says materialised, until the cache is rebuilt from the log.
    assert gone in ui_materialised(instance, pipeline, "fact_payment", fresh_cache=False)
    assert gone not in ui_materialised(instance, pipeline, "fact_payment", fresh_cache=True)

    # The sensor as the daemon evaluates it (the settings' policy, 48 h): the closed partitions
    # are summarised, nothing is deleted (every run is minutes old).
    sensor = pipeline.defs.get_sensor_def("kappa_run_retention")
    with dg.build_sensor_context(instance=instance, resources=pipeline.defs.resources) as context:
        result = sensor(context)
    assert isinstance(result, dg.SensorResult) and result.skip_reason is not None
    assert result.skip_reason.skip_message == "; ".join(
        f"{fact}: summarised {', '.join(keys)}" for fact in FACTS
    ), result.skip_reason
    assert storage_figures(instance)["runs"] == before["runs"] - len(by_hand)
    assert gone in instance.get_materialized_partitions(dg.AssetKey("fact_payment"))

    now = datetime.now(UTC)
    policy = RetentionPolicy(keep_hours=1, deletes_per_tick=25, grace_s=605)
    schemas = pipeline.schemas
    with connect(pipeline.edw_url) as conn:
        # Every run is younger than the window (1 h here): nothing deleted, nothing summarised
        # twice.
        report = apply_retention(
            instance, conn, schemas, FACTS, pipeline.settings.windows, policy, now=now
        )
        assert not any(report.summarised.values()) and not any(report.deleted.values())
        assert storage_figures(instance)["runs"] == before["runs"] - len(by_hand)
        ticks = 0
        later = now + timedelta(hours=2)
        while True:
            report = apply_retention(
                instance, conn, schemas, FACTS, pipeline.settings.windows, policy, now=later
            )
            deleted = sum(len(ids) for ids in report.deleted.values())
            assert deleted <= policy.deletes_per_tick
            assert not any(report.summarised.values())  # each partition is summarised once
            if not deleted:
                break
            ticks += 1
    after = storage_figures(instance)
    print(f"after {ticks} ticks: {after}")
    print("tables:", storage_sizes(instance))
    assert after["runs"] == 0
    assert after["events"] < before["events"] / 20

    for fact in FACTS:
        for fresh in (False, True):
            assert set(keys) <= ui_materialised(instance, pipeline, fact, fresh_cache=fresh)
        for key in keys:
            record = latest(instance, fact, key)
            assert record is not None and record.asset_materialization is not None
            metadata = record.asset_materialization.metadata
            assert metadata["mode"].value == SUMMARY_MODE
            (loaded,) = pipeline.query(
                "SELECT sum(loaded) FROM kappa.batch_ledger WHERE asset = %s AND partition_key = %s",
                (fact, key),
            )[0]
            assert metadata["rows_loaded"].value == loaded > 0
    assert "event_logs" in "\n".join(storage_report(instance, policy))

    # A backfill of a pruned partition still works, and its run is kept by the retention.
    result = reprocess(pipeline, "fact_order", keys[1])
    assert result.success
    assert edw_checksums(pipeline) == edw_before
    with connect(pipeline.edw_url) as conn:
        apply_retention(
            instance,
            conn,
            schemas,
            FACTS,
            pipeline.settings.windows,
            policy,
            now=now + timedelta(days=30),
        )
    assert instance.get_run_by_id(result.run_id) is not None
    assert latest(instance, "fact_order", keys[1]).run_id == result.run_id
    for fact in FACTS:
        for check in ("replay_equivalence", "reconciliation"):
            evaluation = run_check(pipeline, fact, check)
            assert evaluation.passed, f"{fact} {check}: {evaluation.description}"


def fail_next_batch(pipeline: Pipeline, fact: str) -> list[str]:
    """Tick ``fact``'s sensor and run what it requests while the fact table is gone (a broken
    migration, say): the runs really fail. Returns their run ids."""
    requests = pipeline.tick(fact).run_requests
    assert requests
    pipeline.query(f"ALTER TABLE edw.{fact} RENAME TO {fact}_away")
    try:
        results = [pipeline.execute(r, raise_on_error=False) for r in requests]
    finally:
        pipeline.query(f"ALTER TABLE edw.{fact}_away RENAME TO {fact}")
    assert not any(r.success for r in results)
    return [r.run_id for r in results]


def test_failed_runs_are_kept_within_the_window_and_while_their_shard_loads_there_next(
    pipeline: Pipeline, hour_starts: list[datetime]
) -> None:
    instance = pipeline.instance
    fact = "fact_order"
    first, second = (s.strftime(pipeline.settings.windows.fmt) for s in hour_starts[:2])
    # First hour: a batch fails, the sensor requests it again and the retry loads it.
    produce_at(pipeline, hour_starts[0], 120, seed=1)
    retried = fail_next_batch(pipeline, fact)
    pipeline.drain(fact)
    # Second hour: one round loads, the next one fails and nothing retried it yet, so its
    # shards load in that partition next.
    produce_at(pipeline, hour_starts[1], 60, seed=2)
    pipeline.drain(fact)
    produce_at(pipeline, hour_starts[1] + timedelta(minutes=30), 60, seed=3)
    pending = fail_next_batch(pipeline, fact)
    for run_id in retried + pending:
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    backfill = reprocess(pipeline, fact, first)
    assert backfill.success
    # As the daemon launches it, a backfill's run carries its backfill id; with the asset's tag
    # too, the retention's query of the partition's runs finds it (and must keep it).
    instance.add_run_tags(
        backfill.run_id, {"dagster/backfill": "retention-test", "kappa/asset": fact}
    )

    now = datetime.now(UTC)
    policy = RetentionPolicy(keep_hours=1, deletes_per_tick=500, grace_s=605)
    windows = pipeline.settings.windows

    def tick(at: datetime):
        with connect(pipeline.edw_url) as conn:
            return apply_retention(
                instance, conn, pipeline.schemas, [fact], windows, policy, now=at
            )

    def runs_of(key: str) -> list[dg.DagsterRun]:
        return instance.get_runs(
            filters=dg.RunsFilter(tags={"kappa/asset": fact, "dagster/partition": key})
        )

    # Every run is younger than the window: the failures are kept. The first hour closes;
    # the second does not (a shard's latest run failed in it).
    report = tick(now)
    assert report.summarised == {fact: [first]} and report.deleted == {fact: []}
    assert all(instance.get_run_by_id(r) is not None for r in retried + pending)

    # Two hours on, past the window: the first hour's micro-batch runs go, the retried
    # failure with them; its backfill run stays. The second hour keeps every run.
    second_runs = {r.run_id for r in runs_of(second)}
    report = tick(now + timedelta(hours=2))
    assert not report.summarised[fact]
    assert set(retried) <= set(report.deleted[fact])
    assert [r.run_id for r in runs_of(first)] == [backfill.run_id]
    assert {r.run_id for r in runs_of(second)} == second_runs
    assert all(instance.get_run_by_id(r) is not None for r in pending)

    # The operator's fix: the retry loads, the second hour closes with every batch in its
    # summary, and its failed run goes with the others once past the window.
    pipeline.drain(fact)
    later = datetime.now(UTC) + timedelta(hours=2)
    report = tick(later)
    assert report.summarised == {fact: [second]}
    assert set(pending) <= set(report.deleted[fact])
    assert runs_of(second) == []
    (loaded,) = pipeline.query(
        "SELECT sum(loaded) FROM kappa.batch_ledger WHERE asset = %s AND partition_key = %s",
        (fact, second),
    )[0]
    summary = latest(instance, fact, second)
    assert summary is not None and summary.asset_materialization is not None
    assert summary.asset_materialization.metadata["rows_loaded"].value == loaded > 0
    # Backfill runs are never touched, however old.
    tick(later + timedelta(days=30))
    assert instance.get_run_by_id(backfill.run_id) is not None
    for check in ("replay_equivalence", "reconciliation"):
        evaluation = run_check(pipeline, fact, check)
        assert evaluation.passed, f"{fact} {check}: {evaluation.description}"


RUNS_MEASURED = 8


def run_bytes(instance: dg.DagsterInstance, run_ids: list[str]) -> dict[str, int]:
    """Event-log bytes (live rows, ``pg_column_size``) of ``run_ids`` by kind of event."""
    engine = sa.create_engine(instance.event_log_storage.postgres_url, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT coalesce(dagster_event_type, 'log line'), sum(pg_column_size(e.*)) "
                    "FROM event_logs e WHERE run_id = ANY(:ids) GROUP BY 1"
                ),
                {"ids": run_ids},
            ).fetchall()
    finally:
        engine.dispose()
    return {kind: int(size) for kind, size in rows}


def total_bytes(instance: dg.DagsterInstance) -> int:
    sizes = storage_sizes(instance)
    assert sizes is not None
    return sum(size for _, size in sizes.values())


def test_bytes_per_micro_batch_run_of_a_topic_and_of_a_capture(pipeline: Pipeline) -> None:
    """What one micro-batch run adds to Dagster's storage, a topic's and a capture's, measured
    over a known number of real runs; no per-batch log line, and what the UI reads is there."""
    instance = pipeline.instance
    measured: dict[str, list[str]] = {"fact_order": [], "dim_customer": []}
    grown: dict[str, int] = {}
    for asset in measured:
        before = total_bytes(instance)
        for n in range(RUNS_MEASURED):
            if asset == "fact_order":
                pipeline.simulate(40, seed=n)
            else:
                with psycopg.connect(pipeline.env["KAPPA_OLTP_URL"]) as conn:
                    for i in range(5):
                        conn.execute(
                            "INSERT INTO customers VALUES (%s, 'Ada', 'retail', 'DE', 100)",
                            (f"c-{n}-{i}",),
                        )
            runs = pipeline.drain(asset)
            assert runs and all(r.success for r in runs)
            measured[asset] += [r.run_id for r in runs]
        grown[asset] = total_bytes(instance) - before
    for asset, run_ids in measured.items():
        kinds = run_bytes(instance, run_ids)
        per_run = {kind: size // len(run_ids) for kind, size in sorted(kinds.items())}
        print(
            f"\n{asset}: {len(run_ids)} runs, event log {sum(kinds.values()) // len(run_ids)} "
            f"bytes per run (live rows), {grown[asset] // len(run_ids)} bytes per run in the "
            f"four tables with indexes (pg_total_relation_size); by kind {per_run}"
        )
        assert "log line" not in kinds, f"{asset} runs write per-batch log lines"
        newest = instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert newest is not None and newest.asset_materialization is not None
        metadata = newest.asset_materialization.metadata
        print(
            f"{asset} metadata bytes:",
            {k: len(serialize_value(v)) for k, v in metadata.items()},
        )
        for key in ("rows_loaded", "lag_after_batch", "rows_per_second", "recent_batches"):
            assert key in metadata, key
