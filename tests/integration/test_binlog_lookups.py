"""The shipped demo's fraud step joining call-centre calls captured from MariaDB's binlog.

The catalogue is the repository's own (calls ``engine: mariadb``), its calls table in a
fresh database of the test server. A payment abroad after a call scores higher, with the
call as evidence; a payment whose customer may have called (a call committed to the binlog,
not loaded yet) waits for the capture and is loaded ``provisional`` when the wait ends.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import dagster as dg
import psycopg
import pytest
import yaml

from examples.shop.calls import calls_capture, ensure_calls_table
from kappa.settings import REPO_ROOT, Settings
from tests.integration.harness import Pipeline
from tests.integration.mariadb import mysql
from tests.integration.test_stateful import payment

pytestmark = pytest.mark.integration


@pytest.fixture
def shop_env(tmp_path: Path, pipeline_env, mariadb_db, mariadb_server, monkeypatch):
    """catalog.yaml as shipped, its MariaDB calls table in the test's database."""
    address, db = mariadb_db
    catalog = yaml.safe_load((REPO_ROOT / "catalog.yaml").read_text())
    catalog.pop("local", None)
    for table in catalog["tables"]:
        if table.get("engine") == "mariadb":
            table["source"] = f"{db}.{table['source'].split('.')[-1]}"
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(catalog, sort_keys=False))
    env = {
        **pipeline_env,
        "KAPPA_CATALOG": str(path),
        "KAPPA_MARIADB_URL": mariadb_server.url,
        "KAPPA_ENRICH_MAX_WAIT_S": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    spec = calls_capture(Settings.from_env(env))
    assert spec is not None and spec.engine == "mariadb"
    ensure_calls_table(address, spec)
    return env


def call(address, db: str, call_id: str, customer: str, at: datetime) -> None:
    with mysql(address, db) as conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO call_center_calls VALUES (%s, %s, 'card_lost', 'negative', 60, %s)",
            (call_id, customer, at.astimezone(UTC).replace(tzinfo=None)),
        )
        conn.commit()


def test_the_fraud_step_joins_calls_captured_from_mariadb(shop_env, mariadb_db, instance):
    pipeline = Pipeline(env=shop_env, instance=instance)
    address, db = mariadb_db
    with psycopg.connect(shop_env["KAPPA_OLTP_URL"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (customer_id, name, segment, country, credit_limit) VALUES "
            "('c-1', 'Ada', 'retail', 'DE', 100), ('c-2', 'Bob', 'retail', 'DE', 100), "
            "('c-3', 'Cy', 'retail', 'DE', 100)"
        )
    now = datetime.now(UTC).replace(microsecond=0)
    call(address, db, "k-1", "c-2", now - timedelta(hours=2))
    pipeline.drain("dim_customer")
    assert all(r.success for r in pipeline.drain("fact_call_center_call"))
    assert pipeline.query("SELECT call_id, customer_id FROM edw.fact_call_center_call") == [
        ("k-1", "c-2")
    ]
    [(t,)] = pipeline.query("SELECT clock_timestamp()")
    pipeline.produce(
        [
            payment(pipeline, "c-1", 15.00, t, card="card-g", country="NL"),
            payment(pipeline, "c-2", 15.00, t, card="card-h", country="NL"),
        ]
    )
    assert all(r.success for r in pipeline.drain("fact_payment"))
    alerts = pipeline.query(
        "SELECT p.customer_id, a.score, a.evidence ->> 'call_id', p.enrichment "
        "FROM edw.fraud_alert a JOIN edw.fact_payment p USING (event_id) "
        "WHERE a.rule = 'geo_mismatch' ORDER BY 1"
    )
    assert alerts == [
        ("c-1", Decimal("0.500"), None, "as_of"),
        ("c-2", Decimal("0.900"), "k-1", "as_of"),
    ]

    # c-3 calls; the call is in the binlog, not loaded: c-3's payment waits for the capture
    # (1 s here) and is loaded provisional, since the call could change its score.
    # c-1's payment in the same batch does not wait for c-3's call: completeness is per
    # customer (the binlog read past the ledger tells whose changes wait).
    call(address, db, "k-2", "c-3", datetime.now(UTC) - timedelta(minutes=5))
    [(t,)] = pipeline.query("SELECT clock_timestamp()")
    pipeline.produce(
        [
            payment(pipeline, "c-3", 15.00, t, card="card-k", country="NL"),
            payment(pipeline, "c-1", 16.00, t, card="card-m", country="DE"),
        ]
    )
    results = pipeline.drain("fact_payment")
    assert all(r.success for r in results)
    # The run says how long its batch waited for the calls' capture (the whole 1 s here).
    waits = [
        event.materialization.metadata["capture_wait_s"].value
        for result in results
        for event in result.get_asset_materialization_events()
        if event.asset_key == dg.AssetKey("fact_payment")
    ]
    assert waits and 0.9 <= max(waits) <= 3.0, waits
    assert pipeline.query(
        "SELECT customer_id, enrichment FROM edw.fact_payment WHERE card_id IN "
        "('card-k', 'card-m') ORDER BY 1"
    ) == [("c-1", "as_of"), ("c-3", "provisional")]
