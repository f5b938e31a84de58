"""The Dagster daemon killed in the middle of a stream and started again.

A real `dagster-daemon run` on the code location (Dagster storage in PostgreSQL, the run
queue and run monitoring as `kappa up` configures them) loads a stream of events through
its sensors; while events keep arriving, the daemon is SIGKILLed (its code server and any
runs in flight go with it, as when its machine or container dies), then started again.
Afterwards the EDW must equal the reference: nothing lost, nothing twice, no ledger gap.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg import sql

from kappa.local.dagster_instance import dagster_environment, write_dagster_yaml
from kappa.settings import Settings
from tests.chaos.conftest import full_only, record
from tests.chaos.reference import Anomalies, Record
from tests.chaos.streams import audit, produce, simulated
from tests.integration.harness import ROOT, Pipeline

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("KAPPA_CHAOS_SEED", "20261126"))


def _database(server_url: str) -> str:
    name = f"kappa_dagster_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{server_url}/{name}"


def _start_daemon(env: dict[str, str], log: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster-daemon"),
            "run",
            "-w",
            str(ROOT / "workspace.yaml"),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,  # type: ignore[arg-type]
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_tree(proc: subprocess.Popen[bytes]) -> list[str]:
    """SIGKILL the daemon and everything it started (code server, run workers); returns the
    command lines of the children it killed."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    killed = []
    for p in [psutil.Process(proc.pid), *children]:
        with contextlib.suppress(psutil.NoSuchProcess):
            command = " ".join(p.cmdline())
            p.kill()
            if p.pid != proc.pid:
                killed.append(command)
    proc.wait(30)
    return killed


def _wait(condition, *, timeout_s: float, what: str, log: Path):  # type: ignore[no-untyped-def]
    """Poll ``condition`` until it returns something true; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")


def _lag(pipeline: Pipeline, records: list[Record]) -> int:
    produced = {(r.topic, r.partition): r.offset + 1 for r in records}
    heads = {
        (source, shard): end
        for source, shard, end in pipeline.query(
            "SELECT source, shard, end_position FROM kappa.ledger_head "
            "WHERE asset IN ('fact_order', 'fact_payment')"
        )
    }
    return sum(max(0, end - heads.get(key, 0)) for key, end in produced.items())


@full_only
@pytest.mark.timeout(900)
def test_a_daemon_killed_mid_stream_and_restarted_loses_and_duplicates_nothing(
    chaos_env, chaos_pipeline: Pipeline, pg_server_url, tmp_path
):
    pipeline = chaos_pipeline
    env = {
        **chaos_env,
        "KAPPA_DAGSTER_PG_URL": _database(pg_server_url),
        "KAPPA_SENSOR_INTERVAL_S": "2",
        # Runs killed with the daemon stay STARTED: run monitoring fails them after this.
        "KAPPA_RUN_MAX_RUNTIME_S": "60",
        # Dagster's process-per-run launcher, killed with the daemon (no Celery workers here).
        "KAPPA_RUN_LAUNCHER": "process",
    }
    settings = Settings.from_env(env)
    home = tmp_path / "dagster_home"
    write_dagster_yaml(home, settings)
    daemon_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KAPPA_", "KAFKA_"))},
        **env,
        **dagster_environment(settings, home),
    }
    rng = random.Random(SEED)
    records: list[Record] = []
    stop = threading.Event()

    def stream() -> None:
        while not stop.is_set():
            records.extend(
                produce(
                    env["KAFKA_BOOTSTRAP_SERVERS"],
                    simulated(pipeline, rng.randint(100, 300), seed=rng.randrange(2**31)),
                )
            )
            time.sleep(1.0)

    log_path = tmp_path / "daemon.log"
    log = log_path.open("ab")
    daemon = _start_daemon(daemon_env, log)
    producer = threading.Thread(target=stream, name="stream", daemon=True)
    killed: list[str] = []
    try:
        producer.start()
        # Let the sensors launch runs, then kill the daemon while a run is executing.
        _wait(
            lambda: pipeline.query("SELECT 1 FROM kappa.batch_ledger LIMIT 1"),
            timeout_s=180,
            what="the sensors' first micro-batch in the ledger",
            log=log_path,
        )
        with psycopg.connect(env["KAPPA_DAGSTER_PG_URL"], autocommit=True) as dagster_db:
            in_flight = _wait(
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
        killed = _kill_tree(daemon)
        time.sleep(3)
        daemon = _start_daemon(daemon_env, log)
        time.sleep(15)
        stop.set()
        producer.join(60)
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and _lag(pipeline, records):
            time.sleep(3)
        lag = _lag(pipeline, records)
        with psycopg.connect(env["KAPPA_DAGSTER_PG_URL"], autocommit=True) as dagster_db:
            ended = dict(
                dagster_db.execute(
                    "SELECT run_id, status FROM runs WHERE run_id = ANY(%s)", (in_flight,)
                ).fetchall()
            )
    finally:
        stop.set()
        _kill_tree(daemon)
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
