"""Fault injection helpers: a run worker killed at a random point, the servers restarted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

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
    worker.returncode = os.waitstatus_to_exitcode(status)
    if worker.stdout is not None:
        worker.stdout.close()
    killed = worker.returncode == -signal.SIGKILL
    return WorkerExit(killed, worker.returncode, time.monotonic() - started, int(usage.ru_maxrss))


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
