"""End to end: live micro-batches over two hourly partitions of the facts, and changes
captured from the OLTP database into the partition where they became visible; then partition
backfills launched as the UI launches them (GraphQL on the webserver, through `kappa
backfill`) and run by the Dagster daemon; the EDW ends exactly as the live runs left it."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaProducer

from kappa.backfill import SUCCEEDED, wait_for_backfill
from tests.demo import TEST_CATALOG
from tests.integration.test_local_stack_e2e import (
    REPO_ROOT,
    LocalState,
    Ports,
    StackProcess,
    kill_leftovers,
)
from tests.integration.test_reprocess import hourly_env, past_hours, produce_in_hour

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


@dataclass
class HourlyState(LocalState):
    """The stack with hourly partitions from the day before ``hours[0]``, and the product's
    default enrichment wait (``KAPPA_ENRICH_MAX_WAIT_S``), on the demo catalogue with its
    calls in PostgreSQL (the test writes them there)."""

    hours: tuple[datetime, datetime] = field(default_factory=lambda: past_hours(datetime.now(UTC)))

    @property
    def env(self) -> dict[str, str]:
        return {
            **super().env,
            **hourly_env(self.hours[0]),
            "KAPPA_BATCH_MAX_RECORDS": "200",
            "KAPPA_CATALOG": str(TEST_CATALOG),
        }


@pytest.fixture
def hourly_state() -> Iterator[HourlyState]:
    base = Path(tempfile.mkdtemp(prefix="kappa-backfill-"))
    state = HourlyState(home=base / "home", ports=Ports.pick())
    try:
        yield state
    finally:
        kill_leftovers(state)
        shutil.rmtree(base, ignore_errors=True)


CHECKSUMS = {
    "fact_order": "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)), count(*) FROM edw.fact_order t",
    "fact_payment": "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)), count(*) FROM edw.fact_payment t",
    "fraud_alert": "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)), count(*) FROM edw.fraud_alert t",
    "dim_customer": "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)), count(*) FROM edw.dim_customer t",
    "fact_call_center_call": "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)), count(*) "
    "FROM edw.fact_call_center_call t",
    "state": "SELECT md5(string_agg(v, ',' ORDER BY v)), count(*) FROM (SELECT DISTINCT ON "
    "(store, shard, key) store || shard || key || value::text AS v FROM kappa.state "
    "ORDER BY store, shard, key, position DESC) s",
}


FACTS = ("fact_order", "fact_payment")
CAPTURES = ("dim_customer", "fact_call_center_call")
#: A text column of each fact that a damaged row gets a wrong value in.
DAMAGE = {"fact_order": "customer_segment", "fact_payment": "customer_country"}


def ledger_runs(state: LocalState) -> dict[str, dict[str, set[str]]]:
    """Per asset and time partition, the run ids of its ledger batches."""
    with psycopg.connect(state.edw_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT asset, partition_key, array_agg(DISTINCT run_id) FROM kappa.batch_ledger "
            "GROUP BY asset, partition_key"
        ).fetchall()
    found: dict[str, dict[str, set[str]]] = {}
    for asset, key, run_ids in rows:
        found.setdefault(asset, {})[key] = set(run_ids)
    return found


def backfill_runs(state: LocalState, backfill_id: str) -> set[str]:
    """The ids of the runs Dagster launched for a backfill (its run storage's tags)."""
    with psycopg.connect(state.settings.resolved_dagster_pg_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT run_id FROM run_tags WHERE key = 'dagster/backfill' AND value = %s",
            (backfill_id,),
        ).fetchall()
    return {r[0] for r in rows}


def checksums(state: LocalState) -> dict[str, tuple[str, int]]:
    with psycopg.connect(state.edw_url, autocommit=True) as conn:
        return {name: tuple(conn.execute(q).fetchone()) for name, q in CHECKSUMS.items()}  # type: ignore[misc]


def loaded_to_log_end(state: LocalState, expected: int) -> bool:
    with psycopg.connect(state.edw_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(received), 0) FROM kappa.batch_ledger WHERE asset IN "
            "('fact_order', 'fact_payment')"
        ).fetchone()
    return row is not None and row[0] >= expected


def write_oltp(state: LocalState) -> int:
    """Customers and calls written, updated and deleted in the OLTP database, as several
    transactions; returns how many changes they captured."""
    statements = [
        *(
            f"INSERT INTO customers VALUES ('e2e-{i}', 'N{i}', 'retail', 'DE', {100 + i})"
            for i in range(40)
        ),
        *(
            f"INSERT INTO call_center_calls VALUES ('e2e-call-{i}', 'e2e-{i}', 'billing', "
            f"'neutral', {30 + i}, now())"
            for i in range(20)
        ),
        "UPDATE customers SET segment = 'smb' WHERE customer_id LIKE 'e2e-1%'",
        "UPDATE customers SET credit_limit = 5 WHERE customer_id LIKE 'e2e-2%'",
        "DELETE FROM customers WHERE customer_id = 'e2e-3'",
        "UPDATE call_center_calls SET duration_s = 1 WHERE call_id LIKE 'e2e-call-1%'",
    ]
    with psycopg.connect(state.settings.resolved_oltp_url, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)
        row = conn.execute(
            "SELECT (SELECT count(*) FROM cdc.customers_changes) "
            "+ (SELECT count(*) FROM cdc.call_center_calls_changes)"
        ).fetchone()
    assert row is not None
    return int(row[0])


def captured(state: LocalState) -> tuple[int, set[str]]:
    """Changes the ledger holds of both change tables, and the partitions they fell in."""
    with psycopg.connect(state.edw_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT partition_key, sum(received) FROM kappa.batch_ledger WHERE asset IN "
            "('dim_customer', 'fact_call_center_call') GROUP BY partition_key"
        ).fetchall()
    return sum(int(r[1]) for r in rows), {r[0] for r in rows}


def launch_backfill(state: LocalState, stack: StackProcess, asset: str, first, last) -> str:
    """`kappa backfill ASSET --from --to`, as a runbook would; returns the backfill id."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "kappa.cli",
            "backfill",
            asset,
            "--from",
            first.isoformat(),
            "--to",
            last.isoformat(),
            "--url",
            state.ui,
        ],
        cwd=REPO_ROOT,
        env=state.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr + stack.diagnostics()
    found = re.search(r"backfill (\w+) of \d+ partitions", done.stdout)
    assert found, done.stdout
    return found.group(1)


@pytest.mark.timeout(1500)
def test_a_backfill_launched_like_the_ui_reproduces_the_live_partitions(
    hourly_state: HourlyState,
) -> None:
    state = hourly_state
    hour_1, hour_2 = state.hours
    stack = StackProcess(state, reset=True)
    stack.argv.append("--no-simulator")
    with stack:
        stack.wait_for_output("kappa-etl is running", timeout_s=240)
        settings = state.settings
        producer = KafkaProducer(bootstrap_servers=settings.local_broker, acks="all")
        try:
            sent = produce_in_hour(producer, settings, hour_1 + timedelta(minutes=50), 300, seed=11)
            sent += produce_in_hour(producer, settings, hour_2 + timedelta(minutes=5), 300, seed=12)
        finally:
            producer.close()
        changes = write_oltp(state)
        stack.wait_until(
            "the sensors' micro-batches loading every produced message",
            lambda: loaded_to_log_end(state, sent),
            timeout_s=480,
        )
        stack.wait_until(
            "the capture sensors' micro-batches applying every change",
            lambda: captured(state)[0] >= changes,
            timeout_s=480,
        )
        with psycopg.connect(state.edw_url, autocommit=True) as conn:
            partitions = {
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT partition_key FROM kappa.batch_ledger "
                    "WHERE asset IN ('fact_order', 'fact_payment')"
                )
            }
        windows = settings.windows
        assert partitions == {windows.at(hour_1).key, windows.at(hour_2).key}
        live = checksums(state)
        assert live["fact_order"][1] > 0 and live["fraud_alert"][1] > 0

        # Partitions of arrival (facts) and of visibility (change tables): the change tables'
        # are the hours in which the sensors saw the changes committed, i.e. now.
        visible = sorted(captured(state)[1], key=lambda key: windows.window(key).start)
        assert visible and windows.window(visible[-1]).start <= windows.at(datetime.now(UTC)).start
        assert live["dim_customer"][1] > 0 and live["fact_call_center_call"][1] > 0

        live_runs = ledger_runs(state)
        assert set(FACTS) | set(CAPTURES) <= set(live_runs)
        # Damage one row of each fact (a wrong value, as a bug would leave it): a backfill
        # that really replaces its partition repairs it.
        with psycopg.connect(state.edw_url, autocommit=True) as conn:
            for table, column in DAMAGE.items():
                damaged = conn.execute(
                    f"UPDATE edw.{table} SET {column} = 'damaged' WHERE event_id = "
                    f"(SELECT event_id FROM edw.{table} ORDER BY event_id LIMIT 1) RETURNING event_id"
                ).fetchall()
                assert len(damaged) == 1, table
        assert checksums(state) != live

        # Every backfill at once, as several users would launch them from the UI.
        launched = {fact: launch_backfill(state, stack, fact, hour_1, hour_2) for fact in FACTS}
        for table in CAPTURES:
            launched[table] = launch_backfill(
                state,
                stack,
                table,
                windows.window(visible[0]).start,
                windows.window(visible[-1]).start,
            )
        for asset, backfill_id in launched.items():
            status = wait_for_backfill(state.ui, backfill_id, timeout_s=300)
            assert status in SUCCEEDED, (
                f"{asset} backfill {backfill_id}: {status}\n{stack.diagnostics()}"
            )
        # Each backfilled partition's ledger batches are now the backfill's own: no batch of
        # a live run is left in it (a backfill that replaced nothing leaves them all).
        after = ledger_runs(state)
        for asset, backfill_id in launched.items():
            runs = backfill_runs(state, backfill_id)
            assert runs, f"{asset} backfill {backfill_id} launched no run"
            assert set(after[asset]) == set(live_runs[asset]), asset
            for key, run_ids in after[asset].items():
                assert run_ids <= runs, (
                    f"{asset} partition {key}: ledger batches of runs {sorted(run_ids - runs)} "
                    f"are not the backfill's ({sorted(runs)})"
                )
                assert not run_ids & live_runs[asset][key], (asset, key)
        with psycopg.connect(state.edw_url, autocommit=True) as conn:
            replaced = conn.execute(
                "SELECT asset, count(*), count(DISTINCT partition_key) FROM kappa.batch_ledger "
                "WHERE asset IN ('dim_customer', 'fact_call_center_call') GROUP BY asset"
            ).fetchall()
        # A replaced partition of a change table is one ledger batch.
        assert len(replaced) == 2 and all(batches == keys for _, batches, keys in replaced)
        # The same rows as the live runs left, the damaged ones repaired.
        assert checksums(state) == live
        assert stack.interrupt() == 0
