"""A Dagster daemon (and Celery run workers) as separate processes of a chaos test: start,
SIGKILL with everything they started, wait, and how far the facts' ledger is behind."""

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
from psycopg import sql

from kappa.local.dagster_instance import dagster_environment, write_dagster_yaml
from kappa.settings import Settings
from tests.chaos.reference import Record
from tests.chaos.streams import produce, simulated
from tests.integration.harness import ROOT, Pipeline


def database(server_url: str) -> str:
    """A new database on ``server_url`` for a Dagster instance of its own; its URL."""
    name = f"kappa_dagster_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return f"{server_url}/{name}"


def start_daemon(env: dict[str, str], log: object) -> subprocess.Popen[bytes]:
    """``dagster-daemon run`` on the repository's workspace, in a session of its own."""
    daemon = str(Path(sys.executable).parent / "dagster-daemon")
    return start([daemon, "run", "-w", str(ROOT / "workspace.yaml")], env, log)


def start_worker(name: str, env: dict[str, str], log: object) -> subprocess.Popen[bytes]:
    """A Celery run worker of the live queue with one pool process, as `kappa up` starts
    them (the stand-in for a machine running runs)."""
    from kappa.dagster.celery import LIVE_QUEUE
    from kappa.local.dagster_instance import worker_command

    return start(worker_command(LIVE_QUEUE, 1, name), {**env, "PYTHONPATH": str(ROOT)}, log)


def start(command: list[str], env: dict[str, str], log: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=log,  # type: ignore[arg-type]
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def kill_tree(proc: subprocess.Popen[bytes]) -> list[str]:
    """SIGKILL a process and everything it started (a daemon's code server and run processes,
    a worker's pool); returns the command lines of the children it killed."""
    try:
        main = psutil.Process(proc.pid)
        family = [main, *main.children(recursive=True)]
    except psutil.NoSuchProcess:  # gone already (a worker that died by itself)
        family = []
    killed = []
    for p in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            command = " ".join(p.cmdline())
            p.kill()
            if p.pid != proc.pid:
                killed.append(command)
    proc.wait(30)
    return killed


def wait(condition, *, timeout_s: float, what: str, log: Path):  # type: ignore[no-untyped-def]
    """Poll ``condition`` until it returns something true; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{tail}")


def behind(pipeline: Pipeline, records: list[Record]) -> int:
    produced = {(r.topic, r.partition): r.offset + 1 for r in records}
    heads = {
        (source, shard): end
        for source, shard, end in pipeline.query(
            "SELECT source, shard, end_position FROM kappa.ledger_head "
            "WHERE asset IN ('fact_order', 'fact_payment')"
        )
    }
    return sum(max(0, end - heads.get(key, 0)) for key, end in produced.items())


def instance_env(env: dict[str, str], home: Path, workspace: Path | None = None) -> dict[str, str]:
    """Write the dagster.yaml of ``env``'s settings in ``home``; the environment of the
    processes that use it (of this process's own variables, no KAPPA_ or KAFKA_ one)."""
    settings = Settings.from_env(env)
    write_dagster_yaml(home, settings, workspace)
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KAPPA_", "KAFKA_"))},
        **env,
        **dagster_environment(settings, home),
    }


class Stream:
    """Simulated events produced in the background, 100 to 300 a second, until stopped; the
    records the broker acknowledged in ``records``."""

    def __init__(self, pipeline: Pipeline, bootstrap: str, seed: int) -> None:
        self.records: list[Record] = []
        self._stop = threading.Event()
        rng = random.Random(seed)

        def run() -> None:
            while not self._stop.is_set():
                batch = simulated(pipeline, rng.randint(100, 300), seed=rng.randrange(2**31))
                self.records.extend(produce(bootstrap, batch))
                time.sleep(1.0)

        self._thread = threading.Thread(target=run, name="stream", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(60)
