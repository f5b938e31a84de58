"""A MariaDB table captured from its binlog beside the PostgreSQL captures, through Dagster:
the capture sensor plans micro-batches of whole GTID-numbered transactions, runs on a real
instance apply them exactly once, the checks (reconciliation, replay equivalence,
freshness) pass, and a partition backfill leaves the target as the live runs did."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import dagster as dg
import pytest
import yaml

from kappa.catalog.captures import load_captures
from kappa.dagster.definitions import build_definitions
from kappa.exceptions import ConfigurationError
from kappa.settings import Settings
from tests.demo import TEST_CATALOG
from tests.integration.harness import Pipeline
from tests.integration.mariadb import mysql

pytestmark = pytest.mark.integration

ASSET = "dim_call"

CALLS = {
    "name": "calls",
    "engine": "mariadb",
    "keys": ["call_id"],
    "columns": {
        "call_id": "text",
        "customer_id": "text",
        "reason": "text",
        "duration_s": "integer",
        "called_at": "timestamptz",
    },
    "target": ASSET,
    "mode": "scd2",
}

DDL = (
    "CREATE TABLE calls (call_id varchar(40) PRIMARY KEY, customer_id varchar(40) NOT NULL, "
    "reason varchar(40), duration_s int, called_at datetime(6) NOT NULL) ENGINE=InnoDB"
)


@pytest.fixture
def binlog_env(tmp_path: Path, pipeline_env, mariadb_db, mariadb_server, monkeypatch):
    """The shop catalogue with one more table, ``calls``, in MariaDB."""
    address, db = mariadb_db
    catalog = yaml.safe_load(TEST_CATALOG.read_text())
    catalog.pop("local", None)
    catalog["tables"].append({**CALLS, "source": f"{db}.calls"})
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    with mysql(address, db) as conn, conn.cursor() as cur:
        cur.execute(DDL)
    env = {**pipeline_env, "KAPPA_CATALOG": str(path), "KAPPA_MARIADB_URL": mariadb_server.url}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


class Writers:
    """Transactions on ``calls``, and the state every committed one leaves (the reference)."""

    def __init__(self, address, db: str) -> None:
        self.conn = mysql(address, db)
        self.rows: dict[str, tuple[str, str, int]] = {}
        self.versions = 0
        self.rng = random.Random(5)

    def transaction(self, size: int) -> None:
        with self.conn.cursor() as cur:
            for _ in range(size):
                key = f"call-{self.rng.randrange(30)}"
                if key in self.rows and self.rng.random() < 0.2:
                    cur.execute("DELETE FROM calls WHERE call_id = %s", (key,))
                    del self.rows[key]
                    continue
                row = (
                    f"c-{self.rng.randrange(5)}",
                    self.rng.choice(["billing", "fraud"]),
                    self.rng.randrange(900),
                )
                cur.execute(
                    "INSERT INTO calls VALUES (%s, %s, %s, %s, UTC_TIMESTAMP(6)) "
                    "ON DUPLICATE KEY UPDATE customer_id = VALUES(customer_id), "
                    "reason = VALUES(reason), duration_s = VALUES(duration_s)",
                    (key, *row),
                )
                if self.rows.get(key) != row:
                    self.versions += 1
                self.rows[key] = row
        self.conn.commit()


def current_rows(pipeline: Pipeline) -> dict[str, tuple[str, str, int]]:
    return {
        key: (customer, reason, duration)
        for key, customer, reason, duration in pipeline.query(
            f"SELECT call_id, customer_id, reason, duration_s FROM edw.{ASSET} WHERE is_current"
        )
    }


def run_check(pipeline: Pipeline, name: str) -> dg.AssetCheckEvaluation:
    job = pipeline.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_check_selection={dg.AssetCheckKey(dg.AssetKey(ASSET), name)}
    )
    (evaluation,) = job.execute_in_process(instance=pipeline.instance).get_asset_check_evaluations()
    return evaluation


def test_a_mariadb_table_is_captured_through_dagster_exactly_once(
    binlog_env, mariadb_db, instance
) -> None:
    pipeline = Pipeline(env=binlog_env, instance=instance)
    writers = Writers(*mariadb_db)
    pipeline.settings = Settings.from_env({**binlog_env, "KAPPA_BATCH_MAX_RECORDS": "7"})
    pipeline.defs = build_definitions(pipeline.settings)
    runs = []
    for round_ in range(4):
        for _ in range(3):
            writers.transaction(size=1 + round_ * 2)
        runs += pipeline.drain(ASSET)
    assert len(runs) >= 4 and all(r.success for r in runs)
    assert current_rows(pipeline) == writers.rows
    (versions,) = pipeline.query(f"SELECT count(*) FROM edw.{ASSET}")[0]
    assert versions == writers.versions
    # Gap-free, whole transactions, every batch a run of the sensor.
    ledger = pipeline.query(
        "SELECT start_position, end_position, run_id FROM kappa.batch_ledger WHERE asset = %s "
        "ORDER BY start_position",
        (ASSET,),
    )
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ledger))
    assert {r[2] for r in ledger} == {r.run_id for r in runs}
    # Nothing new: the sensor skips and says why.
    result = pipeline.tick(ASSET)
    assert not result.run_requests and "no new committed changes" in result.skip_reason.skip_message
    for check in ("reconciliation", "replay_equivalence", "freshness"):
        evaluation = run_check(pipeline, check)
        assert evaluation.passed, f"{check}: {evaluation.description}"

    # A backfill of the partition (a run without a planned range) replaces it from the binlog.
    (key,) = {
        k
        for (k,) in pipeline.query(
            "SELECT DISTINCT partition_key FROM kappa.batch_ledger WHERE asset = %s", (ASSET,)
        )
    }
    before = pipeline.query(f"SELECT t::text FROM edw.{ASSET} t ORDER BY 1")
    pipeline.query(f"UPDATE edw.{ASSET} SET reason = 'damaged'")
    job = pipeline.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={dg.AssetKey(ASSET)}
    )
    backfill = job.execute_in_process(instance=pipeline.instance, partition_key=key)
    assert backfill.success
    assert pipeline.query(f"SELECT t::text FROM edw.{ASSET} t ORDER BY 1") == before
    (batch,) = pipeline.query(
        "SELECT start_position, end_position, run_id FROM kappa.batch_ledger WHERE asset = %s",
        (ASSET,),
    )
    assert batch == (ledger[0][0], ledger[-1][1], backfill.run_id)


def test_a_mariadb_table_without_its_server_setting_fails_at_load_naming_it(
    binlog_env, monkeypatch
) -> None:
    env = {k: v for k, v in binlog_env.items() if k != "KAPPA_MARIADB_URL"}
    monkeypatch.delenv("KAPPA_MARIADB_URL")
    settings = Settings.from_env(env)
    assert any(spec.engine == "mariadb" for spec in load_captures(settings.catalog))
    with pytest.raises(ConfigurationError, match="^KAPPA_MARIADB_URL: the catalogue captures"):
        build_definitions(settings)
    monkeypatch.setenv("KAPPA_MARIADB_URL", "mysql://kappa:secret-pw@/")
    with pytest.raises(ConfigurationError, match="KAPPA_MARIADB_URL") as refused:
        build_definitions(settings)
    assert "secret-pw" not in str(refused.value)


def test_kappa_check_checks_the_mariadb_server_and_its_tables(
    binlog_env, monkeypatch, capsys
) -> None:
    from kappa import cli
    from kappa.local.processes import free_port

    monkeypatch.setenv("KAPPA_DAGSTER_PG_URL", binlog_env["KAPPA_EDW_URL"])
    assert cli.main(["check"]) == 0, capsys.readouterr().out
    assert "✓ KAPPA_MARIADB_URL: binlog settings and captured tables" in capsys.readouterr().out
    monkeypatch.setenv("KAPPA_MARIADB_URL", f"mysql://root:pw5678@127.0.0.1:{free_port()}/")
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "✗ KAPPA_MARIADB_URL: binlog settings and captured tables: KAPPA_MARIADB_URL: " in out
    assert "pw5678" not in out
