"""A MariaDB server of the test session with the binlog on (own data directory, free port),
and a fresh database per test. Skipped, with the reason, only where no ``mariadbd`` exists.

The machine's service on 3306 is never used: its binlog is off.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from kappa.local.mariadb import MariaDBServer, find_mariadbd, start_mariadb
from kappa.sources.mariadb_server import ServerAddress


@pytest.fixture(scope="session")
def mariadb_server(local_state_dir: Path) -> Iterator[MariaDBServer]:
    if find_mariadbd() is None:
        pytest.skip("no mariadbd binary is installed (Debian: apt-get install mariadb-server)")
    server = start_mariadb(local_state_dir / "mariadb")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def mariadb_db(mariadb_server: MariaDBServer) -> Iterator[tuple[ServerAddress, str]]:
    """The server's address and a brand-new database on it, dropped after the test."""
    address = ServerAddress.parse(mariadb_server.url)
    name = f"kt_{uuid.uuid4().hex[:12]}"
    with address.connect() as conn, conn.cursor() as cur:
        # A binlog of its own: a source reads from the oldest retained transaction, so the
        # transactions of earlier tests (other databases) would make every read longer.
        cur.execute("RESET MASTER")
        cur.execute(f"CREATE DATABASE `{name}`")
    try:
        yield address, name
    finally:
        with address.connect() as conn, conn.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")


def mysql(address: ServerAddress, database: str) -> pymysql.connections.Connection:
    """A writer's connection (explicit transactions)."""
    return pymysql.connect(**address.settings(), database=database, autocommit=False)
