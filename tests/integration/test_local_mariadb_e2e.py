"""End to end: `kappa up` with a catalogue that captures a MariaDB table.

No ``KAPPA_MARIADB_URL`` is given, so the stack starts its own ``mariadbd`` (binlog on) in
KAPPA_HOME, the catalogue's ``local.prepare`` creates the source table there, and the
capture sensor, run by the real Dagster daemon, applies what writers commit to the binlog:
inserts, updates and deletes of whole transactions, exactly once. Without a server binary
the same catalogue starts with that table turned off (:func:`test_without_a_server_...`).
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import psycopg
import pymysql
import pytest

from kappa.dagster.definitions import build_definitions
from kappa.local import mariadb as local_mariadb_module
from kappa.local.mariadb import find_mariadbd, local_mariadb
from kappa.settings import Settings
from tests.integration.test_local_stack_e2e import (
    REPO_ROOT,
    SENSOR_TAG,
    LocalState,
    Ports,
    StackProcess,
    assert_nothing_left,
    kill_leftovers,
    open_instance,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CATALOG = """
streams:
  - name: fact_ping
    topic: pings
    key_field: ping_id
    event_types: [ping]
    schema_versions: [1]
    fields:
      ping_id: text
tables:
  - name: tickets
    engine: mariadb
    source: support.tickets
    keys: [ticket_id]
    columns:
      ticket_id: text
      status: text
      minutes: integer
    target: fact_ticket
    mode: current
local:
  prepare: support_tables:prepare
"""

#: The catalogue's ``local.prepare``: the support system's table, in the stack's MariaDB.
PREPARE = """
import pymysql
from urllib.parse import urlsplit


def prepare(settings, conn):
    url = urlsplit(settings.env["KAPPA_MARIADB_URL"])
    with pymysql.connect(host=url.hostname, port=url.port, user=url.username or "root",
                         autocommit=True) as server, server.cursor() as cur:
        cur.execute("CREATE DATABASE IF NOT EXISTS support")
        cur.execute(
            "CREATE TABLE IF NOT EXISTS support.tickets (ticket_id varchar(20) PRIMARY KEY, "
            "status varchar(20) NOT NULL, minutes int NOT NULL) ENGINE=InnoDB"
        )
    return ["support.tickets ready in MariaDB"]
"""


@dataclass
class MariadbState(LocalState):
    """The stack's state, with its own catalogue in ``home``'s parent."""

    @property
    def catalog(self) -> Path:
        return self.home.parent / "catalog" / "catalog.yaml"

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env.update(KAPPA_CATALOG=str(self.catalog))
        return env


@pytest.fixture
def state() -> Iterator[MariadbState]:
    base = Path(tempfile.mkdtemp(prefix="kappa-e2e-mariadb-"))
    state = MariadbState(home=base / "home", ports=Ports.pick())
    state.catalog.parent.mkdir(parents=True)
    state.catalog.write_text(CATALOG)
    (state.catalog.parent / "support_tables.py").write_text(PREPARE)
    try:
        yield state
    finally:
        kill_leftovers(state)
        shutil.rmtree(base, ignore_errors=True)


def target_rows(state: MariadbState) -> dict[str, tuple[str, int]]:
    with psycopg.connect(state.edw_url, connect_timeout=5, autocommit=True) as conn:
        rows = conn.execute("SELECT ticket_id, status, minutes FROM edw.fact_ticket").fetchall()
    return {key: (status, minutes) for key, status, minutes in rows}


@pytest.mark.timeout(420)
def test_kappa_up_starts_mariadb_and_captures_its_binlog(
    state: MariadbState, monkeypatch: pytest.MonkeyPatch
) -> None:
    if find_mariadbd() is None:
        pytest.skip("no mariadbd binary is installed (Debian: apt-get install mariadb-server)")
    with StackProcess(state, reset=True) as stack:
        stack.argv.append("--no-simulator")
        stack.wait_for_output("kappa-etl is running", timeout_s=240)
        output = stack.output
        assert f"local MariaDB (binlog on) on 127.0.0.1:{state.ports.mariadb}" in output, output
        assert "support.tickets ready in MariaDB" in output, output
        assert "OLTP mariadb" in output and "(captured: support.tickets)" in output, output

        reference: dict[str, tuple[str, int]] = {}
        writer = pymysql.connect(
            host="127.0.0.1", port=state.ports.mariadb, user="root", database="support"
        )
        with writer, writer.cursor() as cur:
            # Three transactions: inserts; an update of one key twice and an insert; a delete
            # beside an update. Only what each commits counts.
            cur.executemany(
                "INSERT INTO tickets VALUES (%s, %s, %s)",
                [("t-1", "open", 0), ("t-2", "open", 0), ("t-3", "open", 0)],
            )
            writer.commit()
            cur.execute(
                "UPDATE tickets SET status = 'working', minutes = 5 WHERE ticket_id = 't-1'"
            )
            cur.execute(
                "UPDATE tickets SET status = 'solved', minutes = 12 WHERE ticket_id = 't-1'"
            )
            cur.execute("INSERT INTO tickets VALUES ('t-4', 'open', 0)")
            writer.commit()
            cur.execute("INSERT INTO tickets VALUES ('t-5', 'open', 0)")
            writer.rollback()
            cur.execute("DELETE FROM tickets WHERE ticket_id = 't-2'")
            cur.execute("UPDATE tickets SET minutes = 3 WHERE ticket_id = 't-3'")
            writer.commit()
        reference = {"t-1": ("solved", 12), "t-3": ("open", 3), "t-4": ("open", 0)}

        stack.wait_until(
            "edw.fact_ticket equal to what the writers committed",
            lambda: target_rows(state) == reference or None,
            timeout_s=120,
        )
        with open_instance(state, monkeypatch) as instance:
            runs = instance.get_runs(filters=dg.RunsFilter(tags={"kappa/asset": "fact_ticket"}))
            assert runs and all(r.tags.get(SENSOR_TAG) == "fact_ticket_sensor" for r in runs), [
                r.tags for r in runs
            ]
        with psycopg.connect(state.edw_url, autocommit=True) as conn:
            batches = conn.execute(
                "SELECT start_position, end_position, loaded FROM kappa.batch_ledger "
                "WHERE asset = 'fact_ticket' ORDER BY start_position"
            ).fetchall()
        # Gap-free, and every change of the three transactions applied once (2 + 2 + 2 rows
        # and the insert of the first: 3 + 3 + 2 = 8 row changes).
        assert batches, batches
        assert all(a[1] == b[0] for a, b in itertools.pairwise(batches)), batches
        assert sum(loaded for _, _, loaded in batches) == 8, batches
        # `kappa status` from another shell (no KAPPA_MARIADB_URL there) finds the stack's
        # own server and shows the table's binlog end.
        status = subprocess.run(
            [sys.executable, "-m", "kappa.cli", "status"],
            cwd=REPO_ROOT,
            env=state.env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        lines = status.stdout.splitlines()
        [line] = [row for row in lines if row.startswith("fact_ticket") and "gtid" in row]
        assert "support.tickets[0]" in line, status.stdout
        code = stack.interrupt(timeout_s=60)
        output = stack.output
    assert code == 0, f"`kappa up` exited with {code} after SIGINT:\n{output[-3000:]}"
    assert_nothing_left(state)


def test_without_a_server_the_mariadb_tables_are_off_and_the_rest_loads(
    state: MariadbState, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(local_mariadb_module, "find_mariadbd", lambda: None)
    settings = Settings.from_env(state.env)
    local = local_mariadb(settings, state.home / "mariadb")
    assert local.server is None
    assert local.env == {"KAPPA_CAPTURES_OFF": "tickets"}
    assert local.message is not None and "tickets: MariaDB source off" in local.message
    assert "KAPPA_MARIADB_URL is not set" in local.message
    # The definitions load without KAPPA_MARIADB_URL: no asset, sensor or check of tickets.
    off = Settings.from_env({**state.env, **local.env})
    defs = build_definitions(off)
    keys = {key.to_user_string() for key in defs.resolve_all_asset_keys()}
    assert "fact_ping" in keys and "fact_ticket" not in keys, keys
    assert all(s.name != "fact_ticket_sensor" for s in defs.sensors or ()), defs.sensors
