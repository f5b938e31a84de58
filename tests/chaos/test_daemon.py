"""The Dagster daemon killed in the middle of a stream and started again.

A real `dagster-daemon run` on the code location (Dagster storage in PostgreSQL, the run
queue and run monitoring as `kappa up` configures them) loads a stream of events through
its sensors; while events keep arriving, the daemon is SIGKILLed (its code server and any
runs in flight go with it, as when its machine or container dies), then started again.
Afterwards the EDW must equal the reference: nothing lost, nothing twice, no ledger gap.
"""

from __future__ import annotations

import os
import time

import psycopg
import pytest

from tests.chaos.conftest import full_only, record
from tests.chaos.processes import (
    Stream,
    behind,
    database,
    instance_env,
    kill_tree,
    start_daemon,
    wait,
)
from tests.chaos.reference import Anomalies
from tests.chaos.streams import audit
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("KAPPA_CHAOS_SEED", "20261126"))


@full_only
@pytest.mark.timeout(900)
def test_a_daemon_killed_mid_stream_and_restarted_loses_and_duplicates_nothing(
    chaos_env, chaos_pipeline: Pipeline, pg_server_url, tmp_path
):
    pipeline = chaos_pipeline
    env = {
        **chaos_env,
        "KAPPA_DAGSTER_PG_URL": database(pg_server_url),
        "KAPPA_SENSOR_INTERVAL_S": "2",
        # Runs killed with the daemon stay STARTED: run monitoring fails them after this.
        "KAPPA_RUN_MAX_RUNTIME_S": "60",
        # Dagster's process-per-run launcher, killed with the daemon (no Celery workers here).
        "KAPPA_RUN_LAUNCHER": "process",
    }
    daemon_env = instance_env(env, tmp_path / "dagster_home")
    stream = Stream(pipeline, env["KAFKA_BOOTSTRAP_SERVERS"], SEED)
    records = stream.records

    log_path = tmp_path / "daemon.log"
    log = log_path.open("ab")
    daemon = start_daemon(daemon_env, log)
    killed: list[str] = []
    try:
        stream.start()
        # Let the sensors launch runs, then kill the daemon while a run is executing.
        wait(
            lambda: pipeline.query("SELECT 1 FROM kappa.batch_ledger LIMIT 1"),
            timeout_s=180,
            what="the sensors' first micro-batch in the ledger",
            log=log_path,
        )
        with psycopg.connect(env["KAPPA_DAGSTER_PG_URL"], autocommit=True) as dagster_db:
            in_flight = wait(
                lambda: [
                    r[0]
                    for r in dagster_db.execute(
                        "SELECT run_id FROM runs WHERE status = 'STARTED'"
                    ).fetchall()
                ],
                timeout_s=120,
                what="a run to reach STARTED",
                log=log_path,
            )
        killed = kill_tree(daemon)
        time.sleep(3)
        daemon = start_daemon(daemon_env, log)
        time.sleep(15)
        stream.stop()
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and behind(pipeline, records):
            time.sleep(3)
        lag = behind(pipeline, records)
        with psycopg.connect(env["KAPPA_DAGSTER_PG_URL"], autocommit=True) as dagster_db:
            ended = dict(
                dagster_db.execute(
                    "SELECT run_id, status FROM runs WHERE run_id = ANY(%s)", (in_flight,)
                ).fetchall()
            )
    finally:
        stream.stop()
        kill_tree(daemon)
        log.close()
    # The code server (`dagster api grpc`) executes each run in a spawned child process.
    workers = [c for c in killed if "spawn_main" in c]
    found = audit(pipeline, records, complete=lag == 0)
    if lag:
        found += Anomalies(lost=lag)
    record(
        "Dagster daemon SIGKILLed mid-stream (with its code server and runs), restarted",
        1,
        f"{len(records):,} events produced across the restart; "
        f"{len(killed)} child processes killed ({len(workers)} run workers); "
        f"lag after recovery {lag}",
        found,
    )
    tail = log_path.read_text(errors="replace")[-3000:]
    # The kill landed: the code server and a run worker died with the daemon, and the runs
    # in flight then never succeeded (run monitoring failed them; their batches re-ran).
    assert any("api grpc" in c for c in killed), killed
    assert workers, f"no run worker was killed with the daemon: {killed}"
    assert all(status != "SUCCESS" for status in ended.values()), ended
    assert lag == 0, f"the pipeline did not catch up after the restart\n{tail}"
    assert found.total == 0, found.describe()
