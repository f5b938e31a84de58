"""CDC through Dagster: the sensor evaluated, runs executed, lag shown as metadata."""

import psycopg
import pytest

from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration


def test_an_idle_transaction_delays_cdc_loses_nothing_and_shows_in_the_metadata(pipeline: Pipeline):
    oltp = pipeline.env["KAPPA_OLTP_URL"]
    idle = psycopg.connect(oltp, autocommit=False, application_name="idle-writer")
    try:
        idle.execute("INSERT INTO customers VALUES ('c-1', 'Ada', 'retail', 'DE', 100)")
        [(idle_pid,)] = idle.execute("SELECT pg_backend_pid()").fetchall()
        with psycopg.connect(oltp) as other:
            other.execute("INSERT INTO customers VALUES ('c-2', 'Bob', 'smb', 'FR', 200)")

        held = pipeline.tick("dim_customer")
        assert not held.run_requests, "the committed change sits above the open transaction"
        assert held.skip_reason is not None
        # Only committed changes are visible: c-2 waits behind the open transaction.
        assert (
            "1 committed change(s) wait behind open transactions" in held.skip_reason.skip_message
        )
        assert f"pid {idle_pid}" in held.skip_reason.skip_message
        [observation] = held.asset_events
        metadata = observation.metadata
        assert metadata["pending_changes"].value == 1
        assert metadata["ready_changes"].value == 0
        holders = metadata["transactions_holding_horizon"].value
        assert any(h["pid"] == idle_pid and h["application"] == "idle-writer" for h in holders)

        idle.commit()
        runs = pipeline.drain("dim_customer")
        assert len(runs) == 1
        materialization = runs[0].asset_materializations_for_node("dim_customer")[0]
        assert materialization.metadata["rows_loaded"].value == 2
        assert materialization.metadata["pending_changes"].value == 0
        assert pipeline.query("SELECT customer_id FROM edw.dim_customer ORDER BY 1") == [
            ("c-1",),
            ("c-2",),
        ]
        [(start, end)] = pipeline.query(
            "SELECT start_position, end_position FROM kappa.batch_ledger WHERE asset = 'dim_customer'"
        )
        assert start == 0 and end > start
    finally:
        idle.close()


def test_call_centre_calls_flow_through_their_own_sensor(pipeline: Pipeline):
    oltp = pipeline.env["KAPPA_OLTP_URL"]
    with psycopg.connect(oltp) as conn:
        for n in range(5):
            conn.execute(
                "INSERT INTO call_center_calls VALUES (%s, 'c-1', 'billing', 'neutral', %s, now())",
                (f"k-{n}", 10 + n),
            )
    pipeline.drain("fact_call_center_call")
    assert pipeline.query("SELECT count(*) FROM edw.fact_call_center_call") == [(5,)]
    assert pipeline.tick("fact_call_center_call").skip_reason.skip_message.startswith(
        "no new committed changes"
    )
