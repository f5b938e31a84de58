"""Integration tests of kappa.local against a real PostgreSQL and a real broker."""

from __future__ import annotations

import shutil
import socket
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from kafka.admin import KafkaAdminClient
from sqlalchemy.engine import make_url

from kappa.exceptions import ConfigurationError
from kappa.local.broker import LocalBroker
from kappa.local.dagster_instance import dagster_environment, write_dagster_yaml
from kappa.local.pg_admin import check_postgres, ensure_database
from kappa.local.postgres import EmbeddedPostgres
from kappa.local.processes import free_port
from kappa.local.topics import ensure_topics
from kappa.settings import Settings

pytestmark = pytest.mark.integration

SECRET = "n0t-The-Pa55word"


def _partitions(bootstrap_servers: str, topic: str) -> int:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap_servers, bootstrap_timeout_ms=10_000)
    try:
        (described,) = admin.describe_topics([topic])
        return len(described["partitions"])
    finally:
        admin.close()


def _with_database(url: str, database: str) -> str:
    return make_url(url).set(database=database).render_as_string(hide_password=False)


# -- EmbeddedPostgres -------------------------------------------------------------------------


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A directory outside pytest's basetemp (see the note in conftest.local_state_dir)."""
    path = Path(tempfile.mkdtemp(prefix="kappa-test-pg-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def embedded(scratch_dir: Path) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(scratch_dir / "data", free_port())
    try:
        yield server
    finally:
        server.stop()


def test_embedded_postgres_keeps_data_across_restarts(embedded: EmbeddedPostgres) -> None:
    assert not embedded.is_running()
    embedded.start()
    assert embedded.is_running()
    with psycopg.connect(embedded.url("postgres"), autocommit=True) as conn:
        conn.execute("create table kept (id int primary key, note text)")
        conn.execute("insert into kept values (1, 'survives a restart')")
        settings: dict[str, str] = dict(
            conn.execute(
                "select name, setting from pg_settings where name in "
                "('max_connections', 'fsync', 'track_commit_timestamp', 'listen_addresses')"
            ).fetchall()
        )
    assert settings == {
        "max_connections": "200",
        "fsync": "on",
        "track_commit_timestamp": "on",
        "listen_addresses": "127.0.0.1",
    }

    embedded.stop()
    assert not embedded.is_running()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(embedded.url("postgres"), connect_timeout=2)
    embedded.stop()  # stopping a stopped server is a no-op

    embedded.start()
    with psycopg.connect(embedded.url("postgres")) as conn:
        assert conn.execute("select note from kept").fetchall() == [("survives a restart",)]


def test_embedded_postgres_start_twice_reuses_the_server(embedded: EmbeddedPostgres) -> None:
    embedded.start()
    pid = (embedded.data_dir / "postmaster.pid").read_text().split()[0]

    again = EmbeddedPostgres(embedded.data_dir, embedded.port)
    again.start()
    embedded.start()

    assert (embedded.data_dir / "postmaster.pid").read_text().split()[0] == pid
    with psycopg.connect(again.url("postgres")) as conn:
        assert conn.execute("select 1").fetchone() == (1,)


def test_embedded_postgres_running_on_another_port_is_named(
    embedded: EmbeddedPostgres,
) -> None:
    embedded.start()
    with pytest.raises(ConfigurationError) as info:
        EmbeddedPostgres(embedded.data_dir, free_port()).start()
    assert info.value.setting == "KAPPA_PG_PORT"
    assert str(embedded.port) in str(info.value)


def test_embedded_postgres_refuses_a_port_in_use(scratch_dir: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = EmbeddedPostgres(scratch_dir / "data", port)
        with pytest.raises(ConfigurationError) as info:
            server.start()
    assert info.value.setting == "KAPPA_PG_PORT"
    assert str(port) in str(info.value)
    assert not server.is_running()


# -- databases --------------------------------------------------------------------------------


def test_ensure_database_is_idempotent(pg_server_url: str) -> None:
    name = f"kappa_test_{uuid.uuid4().hex[:12]}"
    try:
        assert ensure_database(pg_server_url, name) is True
        assert ensure_database(pg_server_url, name) is False
        # A URL naming another database works as well.
        assert ensure_database(_with_database(pg_server_url, "postgres"), name) is False
        with psycopg.connect(_with_database(pg_server_url, name)) as conn:
            assert conn.execute("select current_database()").fetchone() == (name,)
    finally:
        with psycopg.connect(_with_database(pg_server_url, "postgres"), autocommit=True) as conn:
            conn.execute(f'drop database if exists "{name}" with (force)')


def test_ensure_database_rejects_a_bad_name(pg_server_url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        ensure_database(pg_server_url, 'x"; drop database postgres; --', setting="KAPPA_EDW_URL")
    assert info.value.setting == "KAPPA_EDW_URL"


def test_database_url_fixture_is_a_fresh_database(database_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        name = conn.execute("select current_database()").fetchone()
        tables = conn.execute(
            "select count(*) from information_schema.tables where table_schema = 'public'"
        ).fetchone()
    assert name is not None and name[0].startswith("kappa_test_")
    assert tables == (0,)


def test_check_postgres_accepts_a_live_server(database_url: str) -> None:
    check_postgres("KAPPA_EDW_URL", database_url)


@pytest.mark.parametrize(
    "make_bad_url",
    [
        # Nobody listens on the port.
        lambda base: f"postgresql://kappa:{SECRET}@127.0.0.1:{free_port()}/edw",
        # The server answers, but the database does not exist.
        lambda base: _with_database(
            make_url(base).set(password=SECRET).render_as_string(hide_password=False),
            "kappa_no_such_database",
        ),
    ],
    ids=["closed-port", "missing-database"],
)
def test_check_postgres_names_the_setting_and_hides_the_password(
    pg_server_url: str, make_bad_url: Callable[[str], str]
) -> None:
    url = make_bad_url(pg_server_url)
    with pytest.raises(ConfigurationError) as info:
        check_postgres("KAPPA_EDW_URL", url, timeout_s=3)
    message = str(info.value)
    assert message.startswith("KAPPA_EDW_URL: ")
    assert info.value.setting == "KAPPA_EDW_URL"
    assert SECRET not in message
    assert "***" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


# -- broker -----------------------------------------------------------------------------------


def test_ensure_topics_is_idempotent(broker: str) -> None:
    suffix = uuid.uuid4().hex[:8]
    topics = {f"orders-{suffix}": 4, f"payments-{suffix}": 2}

    assert ensure_topics(broker, topics, timeout_s=10) == topics
    # Twice: nothing changes, and an existing topic is never altered.
    assert ensure_topics(broker, topics, timeout_s=10) == topics
    assert ensure_topics(broker, {f"orders-{suffix}": 8}, timeout_s=10) == {f"orders-{suffix}": 4}

    assert _partitions(broker, f"orders-{suffix}") == 4
    assert _partitions(broker, f"payments-{suffix}") == 2


def test_topic_factory_makes_unique_topics(broker: str, topic_factory: Callable[..., str]) -> None:
    first = topic_factory("events", 3)
    second = topic_factory("events", 3)
    assert first != second
    assert first.startswith("events-")
    assert _partitions(broker, first) == 3


def test_ensure_topics_against_a_closed_port_names_the_setting() -> None:
    servers = f"127.0.0.1:{free_port()}"
    with pytest.raises(ConfigurationError) as info:
        ensure_topics(servers, {"orders": 1}, timeout_s=2)
    assert info.value.setting == "KAFKA_BOOTSTRAP_SERVERS"
    assert servers in str(info.value)
    assert "within 2 s" in str(info.value)


def test_local_broker_lifecycle(scratch_dir: Path) -> None:
    local = LocalBroker(free_port(), scratch_dir / "broker.log")
    try:
        local.start()
        local.start()  # idempotent
        assert local.is_running()
        assert ensure_topics(local.bootstrap_servers, {"t": 2}, timeout_s=10) == {"t": 2}
        with pytest.raises(ConfigurationError) as info:
            LocalBroker(local.port, scratch_dir / "other.log").start()
        assert info.value.setting == "KAPPA_BROKER_PORT"
    finally:
        local.stop()
    assert not local.is_running()
    # Memory storage: a restarted broker knows no topics.
    try:
        local.start()
        admin = KafkaAdminClient(bootstrap_servers=local.bootstrap_servers)
        try:
            assert "t" not in admin.list_topics()
        finally:
            admin.close()
    finally:
        local.stop()


# -- Dagster instance -------------------------------------------------------------------------


def test_dagster_instance_loads_from_the_written_yaml(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dagster import DagsterInstance
    from dagster._core.definitions.run_request import InstigatorType
    from dagster._core.scheduler.instigation import TickStatus

    settings = Settings.from_env(
        {
            "KAPPA_DAGSTER_PG_URL": database_url,
            "KAPPA_MAX_CONCURRENT_RUNS": "6",
            "KAPPA_RUN_RETRIES": "2",
        }
    )
    write_dagster_yaml(tmp_path, settings)
    for name, value in dagster_environment(settings, tmp_path).items():
        if name != "DAGSTER_HOME":
            monkeypatch.setenv(name, value)

    instance = DagsterInstance.from_config(str(tmp_path))
    try:
        # dagster-postgres's storages, remembering the migrated columns they found.
        assert type(instance.run_storage).__name__ == "KappaPostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "KappaPostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "KappaPostgresScheduleStorage"
        # Runs go to the Celery workers, on the same database by default.
        assert type(instance.run_launcher).__name__ == "KappaCeleryRunLauncher"
        queue = instance.get_concurrency_config().run_queue_config
        assert queue is not None
        assert queue.max_concurrent_runs == 6
        assert queue.tag_concurrency_limits == [
            {"key": "kappa/asset", "value": {"applyLimitPerUniqueValue": True}, "limit": 1},
            {"key": "dagster/backfill", "limit": 1},
        ]
        assert instance.run_retries_enabled
        assert instance.run_retries_max_retries == 2
        retention = instance.get_tick_retention_settings(InstigatorType.SENSOR)
        assert retention[TickStatus.SKIPPED] == 1
        assert retention[TickStatus.SUCCESS] == 7
        assert retention[TickStatus.FAILURE] == 7
        assert instance.get_runs() == []
    finally:
        instance.dispose()

    # Dagster created its tables in the test database.
    with psycopg.connect(database_url) as conn:
        tables = {
            row[0]
            for row in conn.execute(
                "select table_name from information_schema.tables where table_schema = 'public'"
            )
        }
    assert {"runs", "event_logs", "instigators"} <= tables
