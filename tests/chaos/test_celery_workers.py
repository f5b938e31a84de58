"""Two Celery run workers (the stand-in for two machines) SIGKILLed while they run batches.

A real `dagster-daemon run` with the Celery run launcher (broker and result backend on the
Dagster database, as `kappa up` configures them by default) loads a stream of events through
its sensors into both facts; the runs execute in two workers of the live queue, one pool
process each. While events keep arriving:

1. worker A is SIGKILLed with its pool while it runs a batch (its machine died); worker B
   goes on alone; A is started again, as its supervisor would;
2. worker B is SIGKILLed the same way while it runs a batch; A goes on;
3. the daemon is SIGKILLed together with every worker, and all are started again.

Each time, the run of the dead worker must be seen failed through the launcher's health
check (heartbeats) and retried, long before ``KAPPA_RUN_MAX_RUNTIME_S`` (600 s here); the
row records how long each shard of the facts took to move again after the kill. At the end
the EDW must equal the independent reference: nothing lost, nothing twice, no ledger gap.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import psutil
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
    start_worker,
    wait,
)
from tests.chaos.reference import Anomalies
from tests.chaos.streams import audit
from tests.integration.harness import ROOT, Pipeline

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("KAPPA_CHAOS_SEED", "20261203"))
STARTED_PID = re.compile(r"Started process for run \(pid: (\d+)\)")
#: A shard must move again within this after a kill: the heartbeat timeout (30 s), run
#: monitoring's pass (10 s), the retry's queue and run, on a loaded machine.
MOVE_LIMIT_S = 150

Shard = tuple[str, str, int]


def _heads(pipeline: Pipeline) -> dict[Shard, int]:
    return {
        (asset, source, shard): end
        for asset, source, shard, end in pipeline.query(
            "SELECT asset, source, shard, end_position FROM kappa.ledger_head "
            "WHERE asset IN ('fact_order', 'fact_payment')"
        )
    }


def _pool(worker: subprocess.Popen[bytes]) -> set[int]:
    try:
        return {p.pid for p in psutil.Process(worker.pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def _running_in(dagster_url: str, pids: set[int]) -> str | None:
    """A run executing now in one of ``pids`` (its "Started process" event names the pid)."""
    with psycopg.connect(dagster_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT r.run_id, e.event FROM runs r JOIN event_logs e ON e.run_id = r.run_id "
            "WHERE r.status = 'STARTED' AND e.dagster_event_type = 'ENGINE_EVENT'"
        ).fetchall()
    for run_id, event in rows:
        found = STARTED_PID.search(event)
        if found and int(found.group(1)) in pids:
            return str(run_id)
    return None


def _status(dagster_url: str, run_id: str) -> str:
    with psycopg.connect(dagster_url, autocommit=True) as conn:
        row = conn.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,)).fetchone()
    return str(row[0]) if row else "missing"


def _moved_again(
    pipeline: Pipeline, before: dict[Shard, int], killed_at: float, log: Path
) -> dict[Shard, float]:
    """Seconds from ``killed_at`` until each shard's ledger head passed where it stood."""
    moved: dict[Shard, float] = {}
    deadline = killed_at + MOVE_LIMIT_S
    while len(moved) < len(before) and time.monotonic() < deadline:
        for shard, end in _heads(pipeline).items():
            if shard in before and shard not in moved and end > before[shard]:
                moved[shard] = time.monotonic() - killed_at
        time.sleep(0.25)
    if len(moved) < len(before):
        stuck = sorted(set(before) - set(moved))
        tail = log.read_text(errors="replace")[-3000:]
        raise AssertionError(f"shards {stuck} did not move within {MOVE_LIMIT_S} s\n{tail}")
    return moved


def _describe(moved: dict[Shard, float]) -> str:
    by_asset: dict[str, list[float]] = {}
    for (asset, _, _), seconds in moved.items():
        by_asset.setdefault(asset, []).append(seconds)
    return "; ".join(
        f"{asset} shards moved again after {', '.join(f'{s:.0f}' for s in sorted(v))} s"
        for asset, v in sorted(by_asset.items())
    )


@full_only
@pytest.mark.timeout(1200)
def test_two_workers_killed_one_after_the_other_then_with_the_daemon_lose_nothing(
    chaos_env, chaos_pipeline: Pipeline, pg_server_url, tmp_path
):
    pipeline = chaos_pipeline
    env = {
        **chaos_env,
        "KAPPA_DAGSTER_PG_URL": database(pg_server_url),
        "KAPPA_SENSOR_INTERVAL_S": "2",
        "KAPPA_RUN_LAUNCHER": "celery",
        # Far above what detection takes: a run of a dead worker must be failed by the
        # heartbeat check, not by the runtime bound.
        "KAPPA_RUN_MAX_RUNTIME_S": "600",
    }
    proc_env = instance_env(env, tmp_path / "dagster_home", ROOT / "workspace.yaml")
    dagster_url = env["KAPPA_DAGSTER_PG_URL"]
    stream = Stream(pipeline, env["KAFKA_BOOTSTRAP_SERVERS"], SEED)
    records = stream.records

    log_path = tmp_path / "stack.log"
    log = log_path.open("ab")
    daemon = start_daemon(proc_env, log)
    workers = {name: start_worker(name, proc_env, log) for name in ("worker-a", "worker-b")}
    rows: list[tuple[str, str]] = []
    dead_runs: list[str] = []

    def busy(names: list[str]) -> tuple[str, str] | None:
        """(worker, run) for a run executing now in one of the workers ``names``."""
        for name in names:
            run_id = _running_in(dagster_url, _pool(workers[name]))
            if run_id is not None:
                return name, run_id
        return None

    def kill_during_a_batch(
        names: list[str], then: Callable[[str], None]
    ) -> tuple[str, dict[Shard, float]]:
        """SIGKILL whichever of the workers ``names`` runs a batch first, with its pool;
        call ``then`` with its name (a restart); time each shard until it moves again."""
        name, run_id = wait(
            lambda: busy(names),
            timeout_s=180,
            what=f"a run executing in {' or '.join(names)}",
            log=log_path,
        )
        killed = kill_tree(workers[name])
        killed_at = time.monotonic()
        before = _heads(pipeline)
        assert killed, f"{name} had no pool process to kill"
        dead_runs.append(run_id)
        then(name)
        moved = _moved_again(pipeline, before, killed_at, log_path)
        wait(
            lambda: _status(dagster_url, run_id) in ("FAILURE", "CANCELED"),
            timeout_s=MOVE_LIMIT_S,
            what=f"run {run_id} of the killed {name} seen failed",
            log=log_path,
        )
        return name, moved

    def restart(name: str) -> None:
        workers[name] = start_worker(name, proc_env, log)

    try:
        stream.start()
        wait(
            lambda: pipeline.query("SELECT 1 FROM kappa.batch_ledger LIMIT 1"),
            timeout_s=240,
            what="the sensors' first micro-batch in the ledger",
            log=log_path,
        )
        # 1. Whichever worker runs a batch first; the other goes on alone while it restarts.
        first, moved = kill_during_a_batch(list(workers), restart)
        rows.append(
            (
                f"Celery {first} SIGKILLed with its pool mid-batch, the other goes on",
                _describe(moved),
            )
        )
        # 2. The other one, while the first (restarted) goes on.
        (other,) = [name for name in workers if name != first]
        _, moved = kill_during_a_batch([other], lambda _: None)
        rows.append((f"then {other} SIGKILLed the same way, {first} goes on", _describe(moved)))
        restart(other)

        # The daemon with every worker, while a batch runs (as when their one machine dies).
        busy_worker, run_id = wait(
            lambda: busy(list(workers)),
            timeout_s=180,
            what="a run executing in a worker",
            log=log_path,
        )
        killed = kill_tree(daemon) + [c for w in workers.values() for c in kill_tree(w)]
        killed_at = time.monotonic()
        before = _heads(pipeline)
        dead_runs.append(run_id)
        time.sleep(3)
        daemon = start_daemon(proc_env, log)
        workers = {name: start_worker(name, proc_env, log) for name in workers}
        moved = _moved_again(pipeline, before, killed_at, log_path)
        rows.append(
            (
                "Dagster daemon SIGKILLed with both Celery workers mid-batch, all restarted",
                f"{len(killed)} child processes killed ({busy_worker} mid-batch); {_describe(moved)}",
            )
        )
        time.sleep(10)
        stream.stop()
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline and behind(pipeline, records):
            time.sleep(3)
        lag = behind(pipeline, records)
        statuses = {run_id: _status(dagster_url, run_id) for run_id in dead_runs}
    finally:
        stream.stop()
        for proc in (daemon, *workers.values()):
            kill_tree(proc)
        log.close()
    found = audit(pipeline, records, complete=lag == 0)
    if lag:
        found += Anomalies(lost=lag)
    for fault, outcome in rows[:-1]:
        record(fault, 1, outcome, Anomalies())
    fault, outcome = rows[-1]
    record(
        fault,
        1,
        f"{outcome}; {len(records):,} events produced across the three kills, lag after "
        f"recovery {lag}; audit of the whole stream",
        found,
    )
    tail = log_path.read_text(errors="replace")[-3000:]
    # The dead workers' runs never succeeded: the health check failed them (run retries ran
    # their batches again).
    assert all(status != "SUCCESS" for status in statuses.values()), statuses
    assert lag == 0, f"the pipeline did not catch up after the kills\n{tail}"
    assert found.total == 0, found.describe()
