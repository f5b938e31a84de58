import dagster as dg
import pytest

from examples.shop.oltp import ensure_source_tables
from kappa.catalog.captures import load_captures
from kappa.changes.target import ensure_target
from kappa.edw.connection import connect
from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.sources import pg_capture
from tests.demo import DEMO, TEST_CATALOG
from tests.integration.harness import Pipeline
from tests.integration.mariadb import mariadb_db, mariadb_server  # noqa: F401  (fixtures)


@pytest.fixture
def pipeline_env(broker, database_url, topic_factory, monkeypatch) -> dict[str, str]:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAPPA_EDW_URL": database_url,
        "KAPPA_OLTP_URL": database_url,
        "KAPPA_CATALOG": str(TEST_CATALOG),
        "KAPPA_TOPIC_ORDERS": topic_factory("orders", 4),
        "KAPPA_TOPIC_PAYMENTS": topic_factory("payments", 2),
        "KAPPA_BATCH_MAX_RECORDS": "500",
        "KAPPA_RUN_MAX_RECORDS": "1200",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def pipeline(pipeline_env, instance) -> Pipeline:
    return Pipeline(env=pipeline_env, instance=instance)


@pytest.fixture
def captured(database_url: str) -> str:
    """A database that is both OLTP (captured tables, change tables) and EDW (default schemas)."""
    schemas = Schemas()
    with connect(database_url) as conn:
        ensure_schema(conn, schemas, DEMO.streams)
        ensure_source_tables(conn)
        for spec in load_captures(TEST_CATALOG):
            ensure_target(conn, schemas, spec)
            pg_capture.install_capture(conn, spec)
    return database_url
