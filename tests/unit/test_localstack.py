"""Unit tests of kappa.local: dagster.yaml generation and the process supervisor."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from kappa.local.dagster_instance import DAGSTER_PG_URL_ENV, dagster_environment, write_dagster_yaml
from kappa.local.pg_admin import scrub
from kappa.local.processes import free_port, port_in_use
from kappa.local.supervisor import Supervisor, SupervisorExit
from kappa.settings import Settings

SECRET = "s3cr3t-Pa55"


def _settings(**env: str) -> Settings:
    return Settings.from_env(env)


# -- dagster.yaml -----------------------------------------------------------------------------


def test_dagster_yaml_has_every_section(tmp_path: Path) -> None:
    settings = _settings(KAPPA_MAX_CONCURRENT_RUNS="7", KAPPA_RUN_RETRIES="2")
    path = write_dagster_yaml(tmp_path / "dagster_home", settings)

    assert path == tmp_path / "dagster_home" / "dagster.yaml"
    config = yaml.safe_load(path.read_text())
    assert config["storage"] == {
        "custom": {
            "module": "kappa.dagster.storage",
            "class": "KappaPostgresStorage",
            "config": {"postgres_url": {"env": DAGSTER_PG_URL_ENV}},
        }
    }
    coordinator = config["run_coordinator"]
    assert coordinator["class"] == "QueuedRunCoordinator"
    assert coordinator["module"] == "dagster._core.run_coordinator"
    assert coordinator["config"]["max_concurrent_runs"] == 7
    assert coordinator["config"]["tag_concurrency_limits"] == [
        {"key": "kappa/asset", "value": {"applyLimitPerUniqueValue": True}, "limit": 1},
        # The Celery launcher's backfill pool (KAPPA_BACKFILL_WORKERS) bounds backfill runs.
        {"key": "dagster/backfill", "limit": 1},
    ]
    assert config["run_retries"] == {"enabled": True, "max_retries": 2}
    assert config["sensors"] == {"use_threads": True, "num_workers": 4}
    assert config["retention"]["sensor"]["purge_after_days"] == {
        "skipped": 1,
        "failure": 7,
        "success": 7,
    }
    assert config["telemetry"] == {"enabled": False}
    # Dagster's "new user experience" is the community sign-up dialog of a first visit.
    assert config["nux"] == {"enabled": False}
    assert config["code_servers"] == {"local_startup_timeout": 180}


def test_dagster_yaml_never_contains_the_password(tmp_path: Path) -> None:
    url = f"postgresql://kappa:{SECRET}@db.example.com:5432/dagster"
    settings = _settings(KAPPA_DAGSTER_PG_URL=url, KAPPA_EDW_URL=url)
    path = write_dagster_yaml(tmp_path, settings)

    text = path.read_text()
    assert SECRET not in text
    assert "db.example.com" not in text
    assert f"env: {DAGSTER_PG_URL_ENV}" in text
    # The environment for Dagster processes carries the URL instead.
    env = dagster_environment(settings, tmp_path)
    assert env == {
        "DAGSTER_HOME": str(tmp_path.absolute()),
        DAGSTER_PG_URL_ENV: url.replace("postgresql://", "postgresql+psycopg2://"),
        # The Celery broker and result backend default to the same database.
        "KAPPA_CELERY_BROKER_URL": url.replace("postgresql://", "sqla+postgresql+psycopg2://"),
        "KAPPA_CELERY_BACKEND_URL": url.replace("postgresql://", "db+postgresql+psycopg2://"),
    }


def test_dagster_yaml_is_rewritten_in_place(tmp_path: Path) -> None:
    write_dagster_yaml(tmp_path, _settings(KAPPA_MAX_CONCURRENT_RUNS="3"))
    path = write_dagster_yaml(tmp_path, _settings(KAPPA_MAX_CONCURRENT_RUNS="5"))
    assert yaml.safe_load(path.read_text())["run_coordinator"]["config"]["max_concurrent_runs"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dagster.yaml"]


def test_dagster_yaml_matches_the_dagster_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validated against the installed Dagster's instance schema (no server needed)."""
    from dagster._config import process_config
    from dagster._core.instance.config import dagster_instance_config_schema

    monkeypatch.setenv(DAGSTER_PG_URL_ENV, f"postgresql://kappa:{SECRET}@127.0.0.1:1/dagster")
    path = write_dagster_yaml(tmp_path, _settings())
    result = process_config(dagster_instance_config_schema(), yaml.safe_load(path.read_text()))
    assert result.success, [e.message for e in result.errors or []]
    assert result.value is not None
    # The storage's own config (what the instance validates when it builds the class).
    from kappa.dagster.storage import KappaPostgresStorage

    custom = result.value["storage"]["custom"]
    assert (custom["module"], custom["class"]) == ("kappa.dagster.storage", "KappaPostgresStorage")
    storage = process_config(KappaPostgresStorage.config_type(), custom["config"])
    assert storage.success, [e.message for e in storage.errors or []]
    assert storage.value is not None
    assert storage.value["postgres_url"].startswith("postgresql://kappa:")


# -- helpers ----------------------------------------------------------------------------------


def test_scrub_masks_raw_and_encoded_passwords() -> None:
    url = "postgresql://kappa:p%40ss%2Fw0rd@host:5432/db"
    text = "failed for p@ss/w0rd and p%40ss%2Fw0rd"
    assert "w0rd" not in scrub(text, url)


def test_free_port_is_free() -> None:
    port = free_port()
    assert 0 < port < 65536
    assert not port_in_use(port)


# -- supervisor -------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0): check its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_supervisor_stops_children_in_reverse_order(tmp_path: Path) -> None:
    sup = Supervisor(grace_s=5)
    first = sup.start("first", ["sleep", "300"], log_path=tmp_path / "first.log")
    second = sup.start("second", ["sleep", "300"], log_path=tmp_path / "second.log")
    assert sup.names == ["first", "second"]
    assert _alive(first) and _alive(second)
    # Each child leads its own process group (Ctrl-C reaches only the supervisor).
    assert os.getpgid(first) == first and os.getpgid(second) == second
    assert sup.exited() is None

    codes = sup.stop_all()

    assert list(codes) == ["second", "first"]
    assert codes == {"second": -signal.SIGTERM, "first": -signal.SIGTERM}
    assert not _alive(first) and not _alive(second)
    assert sup.names == []
    assert sup.stop_all() == {}


def test_supervisor_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    script = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ready', flush=True); time.sleep(300)"
    )
    sup = Supervisor()
    pid = sup.start("stubborn", [sys.executable, "-c", script], log_path=tmp_path / "s.log")
    deadline = time.monotonic() + 120
    while "ready" not in (tmp_path / "s.log").read_text():
        assert time.monotonic() < deadline, "the child did not install its SIGTERM handler"
        time.sleep(0.05)

    codes = sup.stop_all(grace_s=0.5)

    # It outlived SIGTERM and the grace period, so it had to be killed.
    assert codes == {"stubborn": -signal.SIGKILL}
    assert not _alive(pid)


def test_supervisor_wait_reports_the_child_that_exits(tmp_path: Path) -> None:
    sup = Supervisor(grace_s=5)
    sup.start("long", ["sleep", "300"])
    sup.start(
        "short",
        ["sh", "-c", "echo bye; exit 3"],
        log_path=tmp_path / "short.log",
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
    )
    try:
        result = sup.wait(timeout_s=30)
        assert result == SupervisorExit("child_exited", name="short", returncode=3)
        assert result.describe() == "short exited with code 3"
        assert (tmp_path / "short.log").read_text() == "bye\n"
    finally:
        codes = sup.stop_all()
    assert codes["short"] == 3
    assert codes["long"] == -signal.SIGTERM


def test_supervisor_wait_reports_a_killed_child() -> None:
    with Supervisor(grace_s=5) as sup:
        pid = sup.start("victim", ["sleep", "300"])
        os.kill(pid, signal.SIGKILL)
        result = sup.wait(timeout_s=30)
        assert result.name == "victim"
        assert result.returncode == -signal.SIGKILL
        assert result.describe() == "victim was killed by SIGKILL"


def test_supervisor_wait_returns_on_sigterm() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with Supervisor(grace_s=5) as sup:
        child = sup.start("long", ["sleep", "300"])
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
        timer.start()
        try:
            result = sup.wait(timeout_s=30)
        finally:
            timer.cancel()
        assert result == SupervisorExit("signal", signum=signal.SIGTERM)
        assert result.describe() == "received SIGTERM"
        # The child did not receive the signal: it is in its own process group.
        assert _alive(child)
    assert not _alive(child)
    # The previous handler is back.
    assert signal.getsignal(signal.SIGTERM) == before


def test_supervisor_wait_times_out() -> None:
    with Supervisor(grace_s=5) as sup:
        sup.start("long", ["sleep", "300"])
        assert sup.wait(timeout_s=0.3).reason == "timeout"


def test_supervisor_rejects_duplicate_names_and_bad_commands() -> None:
    with Supervisor(grace_s=5) as sup:
        sup.start("one", ["sleep", "300"])
        with pytest.raises(ValueError, match="already supervised"):
            sup.start("one", ["sleep", "300"])
        with pytest.raises(Exception, match="cannot start missing"):
            sup.start("missing", ["/nonexistent/kappa-binary"])
        assert sup.names == ["one"]


def test_a_storage_column_found_is_remembered_and_one_missing_is_asked_again() -> None:
    from kappa.dagster.storage import _Present

    present = _Present()
    answers = iter([False, False, True])
    asked = []

    def look() -> bool:
        asked.append(1)
        return next(answers)

    assert [present.check("c", look) for _ in range(5)] == [False, False, True, True, True]
    assert len(asked) == 3
