"""Benchmark: change capture throughput, MariaDB's binlog against PostgreSQL's trigger capture.

The same table (five columns, key ``call_id``) lives in both engines; the same writes go to
both (transactions of ``--per-transaction`` rows: inserts of new keys, then updates of
existing ones); then each source is drained into its own ``current``-mode target by
:func:`kappa.ingest.changes.run_change_batch`, the function a capture run of Dagster calls,
with the same batch bound (``--batch``, default the product's ``KAPPA_BATCH_MAX_RECORDS``
default). Only the drain is timed (writing is the OLTP side's cost, not the capture's). The
two targets must end with the same rows. Figures are changes applied per second.

Usage::

    python -m bench.capture [--changes N] [--batch B] [--pg-url URL]

PostgreSQL: an embedded server started in a temporary directory (or ``--pg-url``); MariaDB: a
``mariadbd`` of its own on a free port (Debian's ``mariadb-server``; without one the MariaDB
side is reported as not measured). Figures go to ``bench/results/capture.json`` and are
merged into ``bench/results/latest.json`` (keys ``capture_*``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import pymysql
from psycopg import sql

from bench.common import bench_database, machine_facts
from kappa.catalog.captures import CaptureSpec, load_captures
from kappa.changes.target import ensure_target
from kappa.edw.connection import connect
from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.ingest.changes import run_change_batch
from kappa.local.mariadb import find_mariadbd, start_mariadb
from kappa.settings import Settings
from kappa.sources.base import ChangeSource
from kappa.sources.mariadb_binlog import BinlogTable
from kappa.sources.mariadb_server import ServerAddress
from kappa.sources.pg_capture import ChangeTable, install_capture

RESULTS = Path(__file__).parent / "results"
SCHEMAS = Schemas()
COLUMNS = (
    "call_id: text, customer_id: text, reason: text, duration_s: integer, called_at: timestamptz"
)

CATALOG = """
tables:
  - name: pg_calls
    source: public.bench_calls
    keys: [call_id]
    columns: {{{columns}}}
    change_table: cdc.bench_calls_changes
    target: bench_pg_calls
    mode: current
  - name: mariadb_calls
    engine: mariadb
    source: kappa_bench.bench_calls
    keys: [call_id]
    columns: {{{columns}}}
    target: bench_mariadb_calls
    mode: current
"""

PG_DDL = (
    "CREATE TABLE public.bench_calls (call_id text PRIMARY KEY, customer_id text NOT NULL, "
    "reason text, duration_s integer, called_at timestamptz NOT NULL)"
)
MARIADB_DDL = (
    "CREATE TABLE bench_calls (call_id varchar(40) PRIMARY KEY, customer_id varchar(40) NOT "
    "NULL, reason varchar(40), duration_s int, called_at datetime(6) NOT NULL) ENGINE=InnoDB"
)


def transactions(changes: int, per_transaction: int) -> list[list[tuple[str, str, str, int]]]:
    """The writes: the first half inserts new keys, the second half updates them."""
    rows = []
    inserts = changes // 2
    for i in range(inserts):
        rows.append((f"call-{i:08d}", f"c-{i % 97}", "billing", i % 900))
    for i in range(changes - inserts):
        rows.append((f"call-{i % max(inserts, 1):08d}", f"c-{i % 89}", "fraud", (i * 7) % 900))
    return [rows[i : i + per_transaction] for i in range(0, len(rows), per_transaction)]


def write_pg(url: str, batches: list[list[tuple[str, str, str, int]]]) -> None:
    with psycopg.connect(url) as conn:
        for batch in batches:
            with conn.transaction(), conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO public.bench_calls VALUES (%s, %s, %s, %s, now()) "
                    "ON CONFLICT (call_id) DO UPDATE SET customer_id = excluded.customer_id, "
                    "reason = excluded.reason, duration_s = excluded.duration_s",
                    batch,
                )


def write_mariadb(address: ServerAddress, batches: list[list[tuple[str, str, str, int]]]) -> None:
    conn = pymysql.connect(**address.settings(), database="kappa_bench", autocommit=False)
    try:
        with conn.cursor() as cur:
            for batch in batches:
                cur.executemany(
                    "INSERT INTO bench_calls VALUES (%s, %s, %s, %s, UTC_TIMESTAMP(6)) "
                    "ON DUPLICATE KEY UPDATE customer_id = VALUES(customer_id), "
                    "reason = VALUES(reason), duration_s = VALUES(duration_s)",
                    batch,
                )
                conn.commit()
    finally:
        conn.close()


def drain(source: ChangeSource, edw: psycopg.Connection, batch: int) -> dict[str, Any]:
    """Micro-batches until nothing is left, timed; the figures of the drain."""
    started = time.perf_counter()
    batches = applied = 0
    while True:
        outcome = run_change_batch(
            source, edw, SCHEMAS, requested_end=None, run_id="bench", max_changes=batch
        )
        if outcome.status != "committed":
            break
        batches += 1
        applied += outcome.received
    seconds = time.perf_counter() - started
    return {
        "changes": applied,
        "batches": batches,
        "seconds": round(seconds, 3),
        "changes_per_s": round(applied / seconds, 1) if seconds else None,
    }


def target_rows(edw: psycopg.Connection, spec: CaptureSpec) -> list[tuple]:
    query = sql.SQL("SELECT call_id, customer_id, reason, duration_s FROM {} ORDER BY 1")
    return edw.execute(query.format(sql.Identifier(SCHEMAS.edw, spec.target))).fetchall()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--changes", type=int, default=20_000)
    parser.add_argument("--per-transaction", type=int, default=10)
    parser.add_argument("--batch", type=int, default=Settings.from_env({}).batch_max_records)
    parser.add_argument("--pg-url", default=None)
    parser.add_argument("--output", type=Path, default=RESULTS / "capture.json")
    parser.add_argument("--latest", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)

    state = Path(tempfile.mkdtemp(prefix="kappa-bench-capture-"))
    catalog = state / "catalog.yaml"
    catalog.write_text(CATALOG.format(columns=COLUMNS), encoding="utf-8")
    pg_spec, maria_spec = load_captures(catalog)
    writes = transactions(args.changes, args.per_transaction)
    figures: dict[str, Any] = {
        "capture_changes": args.changes,
        "capture_batch": args.batch,
        "capture_rows_per_transaction": args.per_transaction,
    }
    server = None
    try:
        with bench_database(args.pg_url) as (url, where):
            with connect(url) as conn:
                conn.execute(PG_DDL)
                ensure_schema(conn, SCHEMAS, [])
                install_capture(conn, pg_spec)
                ensure_target(conn, SCHEMAS, pg_spec)
                ensure_target(conn, SCHEMAS, maria_spec)
            write_pg(url, writes)
            with connect(url) as oltp, connect(url) as edw:
                figures["capture_pg_trigger"] = drain(ChangeTable(oltp, pg_spec), edw, args.batch)
                pg_rows = target_rows(edw, pg_spec)
            if find_mariadbd() is None:
                figures["capture_mariadb_binlog"] = {"not measured": "no mariadbd installed"}
            else:
                server = start_mariadb(state / "mariadb")
                address = ServerAddress.parse(server.url)
                with address.connect() as conn, conn.cursor() as cur:
                    cur.execute("CREATE DATABASE kappa_bench")
                    cur.execute("USE kappa_bench")
                    cur.execute(MARIADB_DDL)
                write_mariadb(address, writes)
                source = BinlogTable(address, maria_spec)
                try:
                    with connect(url) as edw:
                        figures["capture_mariadb_binlog"] = drain(source, edw, args.batch)
                        maria_rows = target_rows(edw, maria_spec)
                finally:
                    source.close()
                figures["capture_targets_equal"] = maria_rows == pg_rows
                pg_rate = figures["capture_pg_trigger"]["changes_per_s"]
                maria_rate = figures["capture_mariadb_binlog"]["changes_per_s"]
                figures["capture_binlog_to_trigger_ratio"] = (
                    round(maria_rate / pg_rate, 2) if pg_rate and maria_rate else None
                )
            figures["capture_postgres"] = where
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(state, ignore_errors=True)
    figures["capture_machine"] = machine_facts()

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    latest = json.loads(args.latest.read_text(encoding="utf-8")) if args.latest.exists() else {}
    latest.update({k: v for k, v in figures.items() if k != "capture_machine"})
    args.latest.write_text(json.dumps(latest, indent=2) + "\n", encoding="utf-8")
    for engine in ("capture_pg_trigger", "capture_mariadb_binlog"):
        print(f"{engine:24} {figures[engine]}")
    print(
        f"binlog/trigger: {figures.get('capture_binlog_to_trigger_ratio')}, "
        f"targets equal: {figures.get('capture_targets_equal')}"
    )
    return 0 if figures.get("capture_targets_equal", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
