"""Unit tests of the Celery run launcher's settings, dagster.yaml, routing and health check,
and of the supervisor restarting a dead worker. The real workers are in
tests/integration/test_celery_workers.py."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster import DagsterRun
from dagster._core.launcher import WorkerStatus

from kappa.dagster.celery import BACKFILL_QUEUE, LIVE_QUEUE, KappaCeleryRunLauncher
from kappa.exceptions import ConfigurationError
from kappa.local.dagster_instance import dagster_environment, write_dagster_yaml
from kappa.local.supervisor import Supervisor
from kappa.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-Pa55"


def test_defaults_use_celery_on_the_dagster_database() -> None:
    settings = Settings.from_env({"KAPPA_DAGSTER_PG_URL": f"postgresql://u:{SECRET}@db:5432/dg"})
    assert settings.run_launcher == "celery"
    assert settings.resolved_celery_broker_url == (
        f"sqla+postgresql+psycopg2://u:{SECRET}@db:5432/dg"
    )
    assert settings.resolved_celery_backend_url == f"db+postgresql+psycopg2://u:{SECRET}@db:5432/dg"
    assert settings.workers >= 2
    assert settings.backfill_workers == 1


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("KAPPA_RUN_LAUNCHER", "threads"),
        ("KAPPA_CELERY_BROKER_URL", "http://127.0.0.1:6379"),
        ("KAPPA_CELERY_BROKER_URL", "127.0.0.1:6379"),
        ("KAPPA_CELERY_BACKEND_URL", "rpc://"),
        ("KAPPA_WORKERS", "0"),
        ("KAPPA_BACKFILL_WORKERS", "-1"),
    ],
)
def test_bad_values_fail_at_load_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({name: value})
    assert str(caught.value).startswith(name)


def test_a_refused_url_is_redacted_in_the_message() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({"KAPPA_CELERY_BROKER_URL": f"http://u:{SECRET}@host/0"})
    assert SECRET not in str(caught.value)


def test_dagster_yaml_names_the_launcher_and_keeps_urls_in_the_environment(
    tmp_path: Path,
) -> None:
    settings = Settings.from_env(
        {
            "KAPPA_DAGSTER_PG_URL": f"postgresql://u:{SECRET}@db:5432/dg",
            "KAPPA_CELERY_BROKER_URL": f"redis://:{SECRET}@redis:6379/0",
            "KAPPA_BACKFILL_WORKERS": "2",
        }
    )
    path = write_dagster_yaml(tmp_path, settings, ROOT / "workspace.yaml")
    text = path.read_text()
    assert SECRET not in text
    config = yaml.safe_load(text)
    launcher = config["run_launcher"]
    assert launcher["class"] == "KappaCeleryRunLauncher"
    assert launcher["config"]["broker"] == {"env": "KAPPA_CELERY_BROKER_URL"}
    assert launcher["config"]["backend"] == {"env": "KAPPA_CELERY_BACKEND_URL"}
    assert launcher["config"]["include"] == ["pipelines.definitions"]
    limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert {"key": "dagster/backfill", "limit": 2} in limits
    assert config["run_monitoring"]["max_resume_run_attempts"] == 0
    env = dagster_environment(settings, tmp_path)
    assert env["KAPPA_CELERY_BROKER_URL"] == f"redis://:{SECRET}@redis:6379/0"
    assert env["KAPPA_CELERY_BACKEND_URL"].startswith("db+postgresql+psycopg2://")


def test_the_process_launcher_writes_no_run_launcher(tmp_path: Path) -> None:
    settings = Settings.from_env({"KAPPA_RUN_LAUNCHER": "process"})
    config = yaml.safe_load(write_dagster_yaml(tmp_path, settings).read_text())
    assert "run_launcher" not in config
    limits = config["run_coordinator"]["config"]["tag_concurrency_limits"]
    assert all(limit["key"] != "dagster/backfill" for limit in limits)
    assert "KAPPA_CELERY_BROKER_URL" not in dagster_environment(settings, tmp_path)


class FakeBackend:
    def __init__(self, meta: dict[str, Any]) -> None:
        self.meta = meta

    def get_task_meta(self, task_id: str) -> dict[str, Any]:
        return self.meta


def _launcher() -> KappaCeleryRunLauncher:
    return KappaCeleryRunLauncher(broker="memory://", backend="cache+memory://")


def _run(**tags: str) -> DagsterRun:
    return DagsterRun(job_name="j", run_id="r1", tags=tags)


def test_backfill_runs_go_to_the_backfill_queue_and_a_queue_tag_wins() -> None:
    launcher = _launcher()
    assert launcher.queue_for(_run(**{"kappa/asset": "fact_order"})) == LIVE_QUEUE
    assert launcher.queue_for(_run(**{"kappa/heal": "x"})) == LIVE_QUEUE
    assert launcher.queue_for(_run(**{"dagster/backfill": "b1"})) == BACKFILL_QUEUE
    assert launcher.queue_for(_run(**{"dagster-celery/queue": "mine"})) == "mine"


@pytest.mark.parametrize(
    ("meta", "expected"),
    [
        # Heartbeats as ages in seconds, turned into times when the test runs (collection
        # may come minutes before).
        ({"status": "STARTED", "result": {"heartbeat": -2}}, WorkerStatus.RUNNING),
        ({"status": "STARTED", "result": {"heartbeat": -120}}, WorkerStatus.FAILED),
        ({"status": "STARTED", "result": {"pid": 1}}, WorkerStatus.RUNNING),
        ({"status": "FAILURE", "result": "WorkerLostError"}, WorkerStatus.FAILED),
        ({"status": "SUCCESS", "result": 0}, WorkerStatus.SUCCESS),
        ({"status": "PENDING", "result": None}, WorkerStatus.UNKNOWN),
    ],
)
def test_the_health_check_reads_state_and_heartbeat_once(
    meta: dict[str, Any], expected: WorkerStatus, monkeypatch: pytest.MonkeyPatch
) -> None:
    result_meta = meta.get("result")
    if isinstance(result_meta, dict) and "heartbeat" in result_meta:
        meta = {**meta, "result": {"heartbeat": time.time() + result_meta["heartbeat"]}}
    launcher = _launcher()
    monkeypatch.setattr(type(launcher.celery), "backend", FakeBackend(meta), raising=False)
    result = launcher.check_run_worker_health(_run(**{"dagster-celery/task_id": "t1"}))
    assert result.status == expected, result.msg


def test_the_supervisor_restarts_a_dead_worker_and_not_others(tmp_path: Path) -> None:
    supervisor = Supervisor(grace_s=2)
    supervisor.RESTART_BACKOFF_S = 0.2
    try:
        supervisor.start(
            "worker", [sys.executable, "-c", "pass"], log_path=tmp_path / "w.log", restart=True
        )
        supervisor.start(
            "other", [sys.executable, "-c", "import time; time.sleep(30)"], log_path=None
        )
        deadline = time.monotonic() + 20
        while supervisor.restarts("worker") < 2 and time.monotonic() < deadline:
            assert supervisor.exited() is None  # a restartable child never ends the stack
            supervisor.restart_dead()
            time.sleep(0.1)
        assert supervisor.restarts("worker") >= 2
    finally:
        supervisor.stop_all()


def test_the_launcher_cleans_the_celery_tables_at_most_every_ten_minutes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kappa.dagster import celery as launcher_module

    calls: list[float] = []
    clock = [1000.0]
    monkeypatch.setattr(launcher_module.time, "monotonic", lambda: clock[0])
    from kappa.dagster.celery_storage import Cleaned

    def clean(app: object) -> Cleaned:
        calls.append(clock[0])
        return Cleaned(delivered_messages=0, expired_results=True)

    monkeypatch.setattr(launcher_module, "clean_celery_storage", clean)
    launcher = _launcher()
    for step in (0.0, 10.0, 599.0, 1.0, 300.0):
        clock[0] += step
        launcher._clean_storage()
    assert calls == [1000.0, 1609.0]

    def broken(app: object) -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(launcher_module, "clean_celery_storage", broken)
    clock[0] += 601.0
    launcher._clean_storage()  # logged, never raised into a launch


def test_the_sqlalchemy_broker_is_polled_five_times_a_second_and_redis_untouched() -> None:
    from kombu import Connection

    from kappa.dagster.celery_transport import POLLING_INTERVAL_S, Transport

    url = Settings.from_env({"KAPPA_DAGSTER_PG_URL": "postgresql://u@db:5432/dg"})
    with Connection(url.resolved_celery_broker_url) as broker:  # no connection is opened
        assert isinstance(broker.transport, Transport)
        assert broker.transport.polling_interval == POLLING_INTERVAL_S < 1.0
    with Connection("redis://127.0.0.1:6379/0") as redis:
        assert not isinstance(redis.transport, Transport)
