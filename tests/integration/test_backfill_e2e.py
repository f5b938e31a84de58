"""End to end: live micro-batches over two hourly partitions, then a partition backfill
launched as the UI launches it (GraphQL on the webserver, through `kappa backfill`) and run by
the Dagster daemon; the EDW ends exactly as the live runs left it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest
from kafka import KafkaProducer

from tests.integration.test_local_stack_e2e import (
    REPO_ROOT,
    LocalState,
    Ports,
    StackProcess,
    kill_leftovers,
)
from tests.integration.test_reprocess import HOUR_1, HOUR_2, produce_in_hour

pytestmark = [pytest.mark.integration, pytest.mark.e2e]


class HourlyState(LocalState):
    @property
    def env(self) -> dict[str, str]:
        return {
            **super().env,
            "KAPPA_PARTITIONS": "hourly",
            "KAPPA_PARTITIONS_START": (HOUR_1 - timedelta(days=1)).strftime("%Y-%m-%dT00:00"),
            "KAPPA_ENRICH_MAX_WAIT_S": "0",
            "KAPPA_BATCH_MAX_RECORDS": "200",
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
    "state": "SELECT md5(string_agg(v, ',' ORDER BY v)), count(*) FROM (SELECT DISTINCT ON "
    "(store, shard, key) store || shard || key || value::text AS v FROM kappa.state "
    "ORDER BY store, shard, key, position DESC) s",
}


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


@pytest.mark.timeout(600)
def test_a_backfill_launched_like_the_ui_reproduces_the_live_partitions(
    hourly_state: HourlyState,
) -> None:
    state = hourly_state
    stack = StackProcess(state, reset=True)
    stack.argv.append("--no-simulator")
    with stack:
        stack.wait_for_output("kappa-etl is running", timeout_s=240)
        settings = state.settings
        producer = KafkaProducer(bootstrap_servers=settings.local_broker, acks="all")
        try:
            sent = produce_in_hour(producer, settings, HOUR_1 + timedelta(minutes=50), 300, seed=11)
            sent += produce_in_hour(producer, settings, HOUR_2 + timedelta(minutes=5), 300, seed=12)
        finally:
            producer.close()
        stack.wait_until(
            "the sensors' micro-batches loading every produced message",
            lambda: loaded_to_log_end(state, sent),
            timeout_s=240,
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
        assert partitions == {windows.at(HOUR_1).key, windows.at(HOUR_2).key}
        live = checksums(state)
        assert live["fact_order"][1] > 0 and live["fraud_alert"][1] > 0

        for fact in ("fact_order", "fact_payment"):
            done = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "kappa.cli",
                    "backfill",
                    fact,
                    "--from",
                    HOUR_1.isoformat(),
                    "--to",
                    HOUR_2.isoformat(),
                    "--url",
                    state.ui,
                    "--wait",
                    "300",
                ],
                cwd=REPO_ROOT,
                env=state.env,
                capture_output=True,
                text=True,
                timeout=360,
            )
            assert done.returncode == 0, done.stdout + done.stderr + stack.diagnostics()
            assert "COMPLETED_SUCCESS" in done.stdout or "COMPLETED" in done.stdout, done.stdout
        with psycopg.connect(state.edw_url, autocommit=True) as conn:
            reprocessed = conn.execute(
                "SELECT count(DISTINCT run_id) FROM kappa.batch_ledger WHERE run_id IN "
                "(SELECT run_id FROM kappa.checkpoint)"
            ).fetchone()
        assert reprocessed is not None and reprocessed[0] >= 2
        assert checksums(state) == live
        assert stack.interrupt() == 0
