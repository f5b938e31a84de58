"""Change capture from a real MariaDB binlog: whole transactions, exactly once, against an
independent reference built from the writers' own log of committed changes."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest

from kappa.catalog.captures import CaptureSpec, load_captures
from kappa.changes.target import ensure_target
from kappa.edw.connection import connect
from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.exceptions import ConfigurationError, LogResetError
from kappa.ingest.binlog import run_binlog_batch
from kappa.sources.mariadb_binlog import BinlogTable, ServerAddress
from tests.integration.mariadb import mariadb_db, mariadb_server, mysql  # noqa: F401

pytestmark = pytest.mark.integration

SCHEMAS = Schemas()

CATALOG = """
tables:
  - name: calls
    engine: mariadb
    source: {db}.calls
    keys: [call_id]
    columns:
      call_id: text
      customer_id: text
      reason: text
      duration_s: integer
      called_at: timestamptz
    target: {target}
    mode: {mode}
"""

DDL = (
    "CREATE TABLE calls (call_id varchar(40) PRIMARY KEY, customer_id varchar(40) NOT NULL, "
    "reason varchar(40), duration_s int, called_at datetime(6) NOT NULL) ENGINE=InnoDB"
)


def spec_for(tmp_path: Path, db: str, *, mode: str = "scd2", target: str = "dim_call") -> CaptureSpec:
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG.format(db=db, mode=mode, target=target))
    (spec,) = load_captures(path)
    return spec


def prepare(address: ServerAddress, db: str, edw_url: str, spec: CaptureSpec) -> None:
    conn = mysql(address, db)
    with conn.cursor() as cur:
        cur.execute(DDL)
    conn.commit()
    conn.close()
    with connect(edw_url) as edw:
        ensure_schema(edw, SCHEMAS, [])
        ensure_target(edw, SCHEMAS, spec)


def drain(address: ServerAddress, spec: CaptureSpec, edw_url: str, *, max_changes: int = 10_000):
    source = BinlogTable(address, spec)
    outcomes = []
    try:
        with connect(edw_url) as edw:
            while True:
                outcome = run_binlog_batch(
                    source, edw, SCHEMAS, requested_end=None, run_id="test", max_changes=max_changes
                )
                outcomes.append(outcome)
                if outcome.status != "committed":
                    return outcomes
    finally:
        source.close()


def ledger(edw_url: str, spec: CaptureSpec) -> list[tuple[int, int, int]]:
    with connect(edw_url) as edw:
        return [
            tuple(r)
            for r in edw.execute(
                "SELECT start_position, end_position, received FROM kappa.batch_ledger "
                "WHERE asset = %s ORDER BY start_position",
                (spec.asset,),
            ).fetchall()
        ]


def versions(edw_url: str, spec: CaptureSpec) -> dict[str, list[tuple]]:
    with connect(edw_url) as edw:
        rows = edw.execute(
            f"SELECT call_id, customer_id, reason, duration_s, is_current FROM edw.{spec.target} "
            "ORDER BY call_id, source_change_id"
        ).fetchall()
    found: dict[str, list[tuple]] = {}
    for call_id, customer, reason, duration, current in rows:
        found.setdefault(call_id, []).append((customer, reason, duration, current))
    return found


def test_a_batch_takes_whole_committed_transactions_exactly_once(tmp_path, mariadb_db, database_url):
    address, db = mariadb_db
    spec = spec_for(tmp_path, db)
    prepare(address, db, database_url, spec)
    w = mysql(address, db)
    with w.cursor() as cur:
        for i in range(5):
            cur.execute(
                "INSERT INTO calls VALUES (%s, 'c-1', 'billing', %s, '2026-01-01 10:00:00')",
                (f"k-{i}", i),
            )
    w.commit()
    with w.cursor() as cur:
        cur.execute("UPDATE calls SET reason = 'fraud' WHERE call_id = 'k-1'")
        cur.execute("DELETE FROM calls WHERE call_id = 'k-2'")
    w.commit()
    w.close()
    outcomes = drain(address, spec, database_url, max_changes=2)
    committed = [o for o in outcomes if o.status == "committed"]
    # A batch of at most 2 rows cannot split the first transaction (5 rows): it takes it whole.
    assert [o.received for o in committed] == [5, 2]
    assert outcomes[-1].status == "already loaded"
    found = versions(database_url, spec)
    assert found["k-1"] == [("c-1", "billing", 1, False), ("c-1", "fraud", 1, True)]
    assert found["k-2"] == [("c-1", "billing", 2, False)]
    rows = ledger(database_url, spec)
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:], strict=False)), rows
    # Run again: nothing new, nothing doubled.
    assert drain(address, spec, database_url)[-1].status == "already loaded"
    assert versions(database_url, spec) == found
