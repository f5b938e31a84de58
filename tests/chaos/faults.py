"""Fault injection helpers: a run worker killed at a random point, the servers restarted."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psycopg

from tests.integration.harness import Pipeline, wait_for

ROOT = Path(__file__).parents[2]


@dataclass
class WorkerExit:
    killed: bool
    returncode: int
    seconds: float
    max_rss_kb: int


def start_worker(pipeline: Pipeline, request: dg.RunRequest) -> tuple[subprocess.Popen[str], float]:
    """Start a run worker for ``request``; return it once it is about to run (and when)."""
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.chaos.worker",
            json.dumps(request.run_config),
            json.dumps(request.tags),
            *([request.partition_key] if request.partition_key else []),
        ],
        cwd=ROOT,
        env={**os.environ, **pipeline.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert worker.stdout is not None
    line = worker.stdout.readline()
    assert line.strip() == "ready", f"worker did not start: {line!r} (exit {worker.poll()})"
    return worker, time.monotonic()


def reap(worker: subprocess.Popen[str], started: float, *, kill_after: float | None) -> WorkerExit:
    """Wait for ``worker``; with ``kill_after``, SIGKILL it that many seconds after it started
    its run unless it has ended by then. Returns how it ended and its peak memory.

    The worker is reaped with ``wait4`` only (never ``poll``, which would reap it first and
    lose its resource usage when it ends before the deadline)."""
    deadline = started + kill_after if kill_after is not None else None
    while True:
        pid, status, usage = os.wait4(worker.pid, 0 if deadline is None else os.WNOHANG)
        if pid:
            break
        assert deadline is not None
        if time.monotonic() >= deadline:
            os.kill(worker.pid, signal.SIGKILL)  # a worker that has just ended is a zombie: no-op
            _, status, usage = os.wait4(worker.pid, 0)
            break
        time.sleep(min(0.01, max(0.0, deadline - time.monotonic())))
    return _exited(worker, started, status, usage)


def kill_when(
    worker: subprocess.Popen[str],
    started: float,
    condition: Callable[[], bool],
    *,
    what: str,
    timeout_s: float = 300.0,
) -> WorkerExit:
    """SIGKILL ``worker`` as soon as ``condition()`` holds (polled), unless it has ended
    first. A run that neither ends nor reaches ``what`` within ``timeout_s`` fails the test."""
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, usage = os.wait4(worker.pid, os.WNOHANG)
        if pid:
            break
        if condition():
            os.kill(worker.pid, signal.SIGKILL)
            _, status, usage = os.wait4(worker.pid, 0)
            break
        if time.monotonic() >= deadline:
            os.kill(worker.pid, signal.SIGKILL)
            os.wait4(worker.pid, 0)
            raise AssertionError(f"the run neither ended nor reached {what} in {timeout_s:.0f} s")
        time.sleep(0.005)
    return _exited(worker, started, status, usage)


def _exited(
    worker: subprocess.Popen[str], started: float, status: int, usage: resource.struct_rusage
) -> WorkerExit:
    worker.returncode = os.waitstatus_to_exitcode(status)
    if worker.stdout is not None:
        worker.stdout.close()
    killed = worker.returncode == -signal.SIGKILL
    return WorkerExit(killed, worker.returncode, time.monotonic() - started, int(usage.ru_maxrss))


def open_batch_transaction(conn: psycopg.Connection) -> bool:
    """A run's connection holds a transaction that has written (an xid) and not committed:
    a kill now lands before that batch's commit."""
    return bool(
        conn.execute(
            "SELECT 1 FROM pg_stat_activity WHERE application_name = 'kappa-etl' "
            "AND datname = current_database() AND backend_xid IS NOT NULL "
            "AND pid <> pg_backend_pid() LIMIT 1"
        ).fetchall()
    )


def wait_backends_gone(pipeline: Pipeline) -> None:
    """The server has noticed the killed worker's connections and rolled back its work."""
    wait_for(
        lambda: (
            not pipeline.query(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'kappa-etl' "
                "AND state <> 'idle' AND pid <> pg_backend_pid()"
            )
        ),
        timeout=60,
        what="the killed run's backends to go away",
    )


def ledger_end(pipeline: Pipeline, asset: str) -> int:
    [(total,)] = pipeline.query(
        "SELECT coalesce(sum(end_position), 0) FROM kappa.ledger_head WHERE asset = %s", (asset,)
    )
    return int(total)
