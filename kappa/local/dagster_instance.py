"""The local stack's Dagster instance: dagster.yaml and the environment of its processes."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy.engine import make_url

from kappa.settings import Settings

log = logging.getLogger(__name__)


#: The environment variable dagster.yaml reads Dagster's storage URL from (never written to disk).
DAGSTER_PG_URL_ENV = "KAPPA_DAGSTER_PG_URL"
#: The environment variables dagster.yaml reads the run workers' Celery URLs from.
CELERY_BROKER_URL_ENV = "KAPPA_CELERY_BROKER_URL"
CELERY_BACKEND_URL_ENV = "KAPPA_CELERY_BACKEND_URL"
#: Seconds between run monitoring's health checks of the started runs.
MONITOR_INTERVAL_S = 10


def code_location_modules(workspace: Path) -> list[str]:
    """The Python modules of workspace.yaml's code locations (the workers import them once)."""
    loaded = yaml.safe_load(Path(workspace).read_text(encoding="utf-8")) or {}
    return [
        entry["python_module"]["module_name"]
        for entry in loaded.get("load_from", [])
        if isinstance(entry, dict) and "python_module" in entry
    ]


def run_launcher_config(settings: Settings, workspace: Path | None) -> dict[str, Any] | None:
    """dagster.yaml's ``run_launcher`` (None: Dagster's default, a new process per run)."""
    if settings.run_launcher == "process":
        return None
    from kappa.dagster.celery import BACKFILL_QUEUE, HEARTBEAT_TIMEOUT_S, LIVE_QUEUE

    return {
        "module": "kappa.dagster.celery",
        "class": "KappaCeleryRunLauncher",
        "config": {
            "broker": {"env": CELERY_BROKER_URL_ENV},
            "backend": {"env": CELERY_BACKEND_URL_ENV},
            "default_queue": LIVE_QUEUE,
            "backfill_queue": BACKFILL_QUEUE,
            "heartbeat_timeout_seconds": HEARTBEAT_TIMEOUT_S,
            "include": code_location_modules(workspace) if workspace is not None else [],
            "config_source": {
                # One task per pool process at a time: a prefetched run would wait behind
                # the one running instead of going to an idle process.
                "worker_prefetch_multiplier": 1,
                # A worker takes a run from the broker only when a pool process is free: runs
                # wait in the broker, where any worker (on any machine) can take them, never
                # in the memory of a worker that may die with them.
                "worker_disable_prefetch": True,
                "broker_connection_retry_on_startup": True,
                "worker_hijack_root_logger": False,
                # Results of finished runs expire after a day (Redis drops them itself).
                "result_expires": 86400,
            },
        },
    }


def _tag_limits(settings: Settings) -> list[dict[str, Any]]:
    limits: list[dict[str, Any]] = [
        {"key": "kappa/asset", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
    ]
    if settings.run_launcher == "celery" and settings.backfill_workers:
        # No more backfill runs leave the queue than backfill workers can take: the rest of
        # KAPPA_MAX_CONCURRENT_RUNS stays free for live micro-batches.
        limits.append({"key": "dagster/backfill", "limit": settings.backfill_workers})
    return limits


def dagster_config(settings: Settings, workspace: Path | None = None) -> dict[str, Any]:
    """The content of dagster.yaml (no secrets: the storage and Celery URLs come from the
    environment); ``workspace``: the workspace.yaml whose code locations the workers import."""
    config: dict[str, Any] = {
        # dagster-postgres, without a schema reflection per run event (kappa.dagster.storage).
        "storage": {
            "custom": {
                "module": "kappa.dagster.storage",
                "class": "KappaPostgresStorage",
                "config": {"postgres_url": {"env": DAGSTER_PG_URL_ENV}},
            }
        },
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {
                "max_concurrent_runs": settings.max_concurrent_runs,
                # One micro-batch run in flight per asset (DESIGN §4.6): a run loads its
                # partitions in parallel, so one batch per (asset, partition) at most.
                "tag_concurrency_limits": _tag_limits(settings),
                # A micro-batch waits in the queue up to this long (Dagster's default is 5 s,
                # most of a short batch's latency).
                "dequeue_interval_seconds": 1,
            },
        },
        "run_retries": {"enabled": True, "max_retries": settings.run_retries},
        # Runs stuck starting or cancelling are failed (and so retried) instead of hanging.
        "run_monitoring": {
            "enabled": True,
            "start_timeout_seconds": 180,
            "cancel_timeout_seconds": 180,
            # Each pass checks the started runs' workers (Celery heartbeats) and the maximum
            # runtime (KAPPA_RUN_MAX_RUNTIME_S): a dead worker's run fails within this plus
            # the heartbeat timeout.
            "poll_interval_seconds": MONITOR_INTERVAL_S,
            # A run whose worker died is failed and retried, never resumed in place.
            "max_resume_run_attempts": 0,
        },
        "sensors": {"use_threads": True, "num_workers": 4},
        # Sensor ticks only (the retention sensor's skipped ticks go after a day): Dagster
        # prunes no runs, the kappa_run_retention sensor deletes old micro-batch runs.
        "retention": {
            "sensor": {"purge_after_days": {"skipped": 1, "failure": 7, "success": 7}},
        },
        "telemetry": {"enabled": False},
        # No "Join the Dagster community" sign-up dialog on a user's first visit to the UI.
        "nux": {"enabled": False},
        "code_servers": {"local_startup_timeout": 180},
    }
    launcher = run_launcher_config(settings, workspace)
    if launcher is not None:
        config["run_launcher"] = launcher
    return config


def write_dagster_yaml(
    dagster_home: Path, settings: Settings, workspace: Path | None = None
) -> Path:
    """Write ``dagster_home/dagster.yaml`` for dagster-postgres storage; return its path.

    The storage URL is read by Dagster from the environment variable ``KAPPA_DAGSTER_PG_URL``
    (see :func:`dagster_environment`), so no password is ever written to disk.
    """
    dagster_home = Path(dagster_home)
    dagster_home.mkdir(parents=True, exist_ok=True)
    target = dagster_home / "dagster.yaml"
    text = (
        "# Written by kappa-etl (kappa.local.dagster_instance.write_dagster_yaml); regenerated by `kappa up`.\n"
        f"# The storage URL comes from ${DAGSTER_PG_URL_ENV} at run time: no secret on disk.\n"
        + yaml.safe_dump(
            dagster_config(settings, workspace), sort_keys=False, default_flow_style=False
        )
    )
    tmp = target.with_name(f".dagster.yaml.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target


def dagster_environment(settings: Settings, dagster_home: Path) -> dict[str, str]:
    """The variables a Dagster process needs to load the written dagster.yaml."""
    env = {
        "DAGSTER_HOME": str(Path(dagster_home).absolute()),
        # dagster-postgres issues NOTIFY with bound parameters, which only psycopg2's
        # client-side binding supports; SQLAlchemy 2.1 would pick psycopg 3 for postgresql://.
        DAGSTER_PG_URL_ENV: make_url(settings.resolved_dagster_pg_url)
        .set(drivername="postgresql+psycopg2")
        .render_as_string(hide_password=False),
    }
    if settings.run_launcher == "celery":
        env[CELERY_BROKER_URL_ENV] = settings.resolved_celery_broker_url
        env[CELERY_BACKEND_URL_ENV] = settings.resolved_celery_backend_url
    return env


def worker_command(
    queue: str, concurrency: int, name: str, *, python: str | None = None
) -> list[str]:
    """The command line of a run worker serving ``queue`` with ``concurrency`` pool
    processes (run it from the repository root with :func:`dagster_environment`)."""
    import sys

    return [
        python or sys.executable,
        "-m",
        "celery",
        "-A",
        "kappa.dagster.celery_worker",
        "worker",
        "-Q",
        queue,
        "-c",
        str(concurrency),
        "-n",
        f"{name}@%h",
        "--pool",
        "prefork",
        "--loglevel",
        "INFO",
        # No gossip, mingle or events: workers never talk to each other, and the SQLAlchemy
        # transport has no broadcast.
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
