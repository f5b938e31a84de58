"""Runs in warm Celery workers under `kappa up`, and workers SIGKILLed while they run a batch.

The stack runs as a user starts it (`python -m kappa.cli up --reset`, the Celery run
launcher, two live worker processes), once with kombu's SQLAlchemy transport and Celery's
database result backend on the embedded PostgreSQL (the default), once on Redis. The test checks that the sensors' micro-batch runs
execute inside the supervised worker's pool processes (the same process runs several of
them: it imported the code location once), then kills a pool process in the middle of a run,
then a whole worker (its main process and every pool process, as when its machine dies):
each time the run is seen failed by the launcher's health check well before the 600 s runtime
bound, retried, and the stream goes on with nothing lost and nothing twice in the ledger.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.integration.test_local_stack_e2e import (
    LocalState,
    Ports,
    StackProcess,
    assert_nothing_left,
    kill_leftovers,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

STARTED_PID = re.compile(r"Started process for run \(pid: (\d+)\)")
#: How long a run of a dead worker may stay STARTED: heartbeat timeout (30 s) plus run
#: monitoring's interval (10 s) plus a margin for a loaded machine, far below 600 s.
DETECTION_LIMIT_S = 90


@dataclass
class CeleryState(LocalState):
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, **self.extra}

    @property
    def dagster_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.ports.pg}/kappa_dagster"


#: The second Celery target: the Redis server of the development machines.
REDIS = os.environ.get("KAPPA_TEST_REDIS", "127.0.0.1:6379")


def _redis_answers() -> bool:
    host, _, port = REDIS.partition(":")
    with socket.socket() as sock:
        sock.settimeout(2)
        try:
            sock.connect((host, int(port or 6379)))
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False


#: The Celery transports to test: the default one (kombu's SQLAlchemy transport on the
#: embedded PostgreSQL) and Redis. Each variant brings a whole stack up and waits for dead
#: workers to be noticed, so the test runs in its own target (`make test-slow`, run by CI);
#: the default run's `kappa up` test covers the default launcher and transport.
TRANSPORTS = [
    name.strip()
    for name in os.environ.get("KAPPA_TEST_CELERY_TRANSPORTS", "postgresql,redis").split(",")
    if name.strip()
]


@pytest.fixture(params=TRANSPORTS)
def celery_state(request: pytest.FixtureRequest) -> Iterator[CeleryState]:
    extra = {"KAPPA_RUN_LAUNCHER": "celery", "KAPPA_WORKERS": "2"}
    if request.param not in ("postgresql", "redis"):
        raise pytest.UsageError(
            f"KAPPA_TEST_CELERY_TRANSPORTS: unknown transport {request.param!r} (postgresql, redis)"
        )
    if request.param == "redis":
        if not _redis_answers():
            pytest.skip(f"no Redis server answers at {REDIS} (KAPPA_TEST_REDIS)")
        # A database of its own, picked at random: the server may be shared.
        db = random.randint(4, 15)
        extra["KAPPA_CELERY_BROKER_URL"] = f"redis://{REDIS}/{db}"
        extra["KAPPA_CELERY_BACKEND_URL"] = f"redis://{REDIS}/{db}"
    home = Path(tempfile.mkdtemp(prefix="kappa-celery-")) / "home"
    state = CeleryState(home, Ports.pick(), sim_rate="100", extra=extra)
    yield state
    kill_leftovers(state)


def _runs(state: CeleryState, status: str | None = None) -> list[tuple[str, str, dict[str, str]]]:
    """(run_id, status, tags) of the fact_order micro-batch runs, oldest first."""
    with psycopg.connect(state.dagster_url, connect_timeout=5, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT r.run_id, r.status, json_object_agg(t.key, t.value) FROM runs r "
            "JOIN run_tags t ON t.run_id = r.run_id "
            "WHERE r.run_id IN (SELECT run_id FROM run_tags "
            "                   WHERE key = 'kappa/asset' AND value = 'fact_order') "
            "AND (%s::text IS NULL OR r.status = %s) "
            "GROUP BY r.run_id, r.status, r.create_timestamp ORDER BY r.create_timestamp",
            (status, status),
        ).fetchall()
    return [(run_id, run_status, dict(tags)) for run_id, run_status, tags in rows]


def _run_pid(state: CeleryState, run_id: str) -> int | None:
    """The pid of the process that executes ``run_id`` (its "Started process" event)."""
    with psycopg.connect(state.dagster_url, connect_timeout=5, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT event FROM event_logs WHERE run_id = %s AND dagster_event_type = "
            "'ENGINE_EVENT' ORDER BY id",
            (run_id,),
        ).fetchall()
    for (event,) in rows:
        found = STARTED_PID.search(event)
        if found:
            return int(found.group(1))
    return None


def _status(state: CeleryState, run_id: str) -> str:
    with psycopg.connect(state.dagster_url, connect_timeout=5, autocommit=True) as conn:
        row = conn.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,)).fetchone()
    assert row is not None
    return str(row[0])


def _retry_of(state: CeleryState, run_id: str) -> str | None:
    for retry_id, status, tags in _runs(state):
        if tags.get("dagster/parent_run_id") == run_id and status == "SUCCESS":
            return retry_id
    return None


def _live_worker(state: CeleryState) -> psutil.Process:
    """The main process of the supervised live worker of this stack."""
    for proc in psutil.process_iter(["cmdline", "environ"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            env = proc.info["environ"] or {}
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if (
            "kappa.dagster.celery_worker" in cmdline
            and "kappa-live" in cmdline
            and env.get("KAPPA_HOME") == str(state.home)
            and proc.parent() is not None
            and "kappa.dagster.celery_worker" not in " ".join(proc.parent().cmdline())
        ):
            return proc
    raise AssertionError("no live Celery worker of this stack is running")


def _started_run_in(state: CeleryState, pids: set[int]) -> tuple[str, int] | None:
    """A fact_order run executing now in one of ``pids``, with its pid."""
    for run_id, _, _ in _runs(state, "STARTED"):
        pid = _run_pid(state, run_id)
        if pid in pids:
            return run_id, pid
    return None


def _duplicates(state: CeleryState) -> int:
    """fact_order rows loaded more than once (the table keeps every event_id it loads)."""
    with psycopg.connect(state.edw_url, connect_timeout=5, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) - count(DISTINCT event_id) FROM edw.fact_order"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _heads(state: CeleryState) -> dict[tuple[str, int], int]:
    with psycopg.connect(state.edw_url, connect_timeout=5, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT source, shard, end_position FROM kappa.ledger_head WHERE asset = 'fact_order'"
        ).fetchall()
    return {(source, shard): end for source, shard, end in rows}


@pytest.mark.timeout(900)
def test_runs_execute_in_warm_celery_workers_and_a_dead_worker_fails_and_retries(
    celery_state: CeleryState,
) -> None:
    state = celery_state
    with StackProcess(state, reset=True) as stack:
        stack.wait_for_output("kappa-etl is running", timeout_s=300)
        assert "run workers worker-live (2 processes, Celery queue kappa-live)" in stack.output

        # 1. The sensors' runs execute in the worker's pool processes, each warm for many.
        succeeded = stack.wait_until(
            "four fact_order runs succeeded",
            lambda: (lambda runs: runs if len(runs) >= 4 else None)(_runs(state, "SUCCESS")),
            timeout_s=300,
        )
        worker = _live_worker(state)
        pool = {p.pid for p in worker.children()}
        assert len(pool) == 2, f"worker {worker.pid} has pool processes {pool}"
        pids = [_run_pid(state, run_id) for run_id, _, _ in succeeded]
        assert set(pids) <= pool, f"runs executed in {pids}, not in the pool {pool}"
        assert len(set(pids)) < len(pids), f"no pool process ran two runs: {pids}"
        for _, _, tags in succeeded:
            assert tags["dagster-celery/queue"] == "kappa-live", tags
            assert "dagster-celery/task_id" in tags, tags

        # 2. One pool process SIGKILLed while it runs a batch: its worker reports the task
        #    failed, the health check fails the run, run retries launch it again. (On Redis
        #    the whole worker only, below: the same worker code, a shorter test.)
        pool_detected_s = 0.0
        if "KAPPA_CELERY_BROKER_URL" not in state.extra:
            run_id, pid = stack.wait_until(
                "a fact_order run executing in a pool process",
                lambda: _started_run_in(state, pool),
                timeout_s=180,
                poll_s=0.5,
            )
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            stack.wait_until(
                f"run {run_id} (its pool process {pid} killed) seen failed",
                lambda: _status(state, run_id) == "FAILURE",
                timeout_s=DETECTION_LIMIT_S,
                poll_s=1,
            )
            pool_detected_s = time.monotonic() - killed_at
            stack.wait_until(
                f"a retry of {run_id} succeeded", lambda: _retry_of(state, run_id), timeout_s=180
            )

        # 3. The whole worker SIGKILLed (main process and pool, as with its machine): its
        #    task stays STARTED, the heartbeats stop, the health check fails the run; `kappa
        #    up` starts the worker again and the retry runs there.
        worker = _live_worker(state)
        pool = {p.pid for p in worker.children()}
        run_id, _ = stack.wait_until(
            "a fact_order run executing in the worker",
            lambda: _started_run_in(state, pool),
            timeout_s=180,
            poll_s=0.5,
        )
        heads_at_kill = _heads(state)
        for proc in [worker, *worker.children(recursive=True)]:
            proc.kill()
        killed_at = time.monotonic()
        stack.wait_until(
            f"run {run_id} (its whole worker killed) seen failed",
            lambda: _status(state, run_id) == "FAILURE",
            timeout_s=DETECTION_LIMIT_S,
            poll_s=1,
        )
        worker_detected_s = time.monotonic() - killed_at
        stack.wait_until(
            "the live worker started again", lambda: _live_worker(state).pid != worker.pid, 60
        )
        stack.wait_until(
            f"a retry of {run_id} succeeded", lambda: _retry_of(state, run_id), timeout_s=180
        )
        print(
            f"run of a killed pool process failed after {pool_detected_s:.1f} s, "
            f"of a killed worker after {worker_detected_s:.1f} s"
        )
        # Every shard moved on past where it stood at the second kill, nothing twice.
        heads = _heads(state)
        stack.wait_until(
            "every fact_order shard moved on after the kills",
            lambda: (
                all(end > heads_at_kill.get(key, -1) for key, end in _heads(state).items())
                and len(_heads(state)) == len(heads_at_kill)
            ),
            timeout_s=120,
        )
        assert heads, "no ledger head"
        assert _duplicates(state) == 0
        assert stack.interrupt() == 0
    assert_nothing_left(state)
