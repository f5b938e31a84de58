"""Regressions found by review, each reproduced first, kept so they stay fixed."""

import itertools
import time
from datetime import UTC, datetime

import pandas as pd
import psycopg
import pytest
from psycopg import sql

from examples.shop.steps import CUSTOMER
from kappa import cli
from kappa.catalog.captures import load_captures
from kappa.changes.target import ensure_target
from kappa.decode.batch import DecodedBatch
from kappa.edw.commit import commit_batch
from kappa.edw.connection import connect
from kappa.edw.copy import copy_frame
from kappa.edw.replay import reset_for_replay
from kappa.edw.schema import ensure_schema
from kappa.edw.types import BatchRecord, Schemas
from kappa.exceptions import BatchSupersededError
from kappa.ingest.capture import run_capture_batch
from kappa.steps.warehouse import WarehouseLookups
from tests.demo import ORDER_PLACED, TEST_CATALOG
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration
SPECS = {spec.name: spec for spec in load_captures(TEST_CATALOG)}
SCHEMAS = Schemas()


def drain(url: str, spec, *, max_changes: int = 1000) -> list:
    outcomes = []
    with connect(url) as oltp, connect(url) as edw:
        while True:
            outcome = run_capture_batch(
                oltp, edw, SCHEMAS, spec, requested_end=None, run_id="t", max_changes=max_changes
            )
            if outcome.status != "committed":
                return outcomes
            outcomes.append(outcome)


def test_a_transaction_larger_than_a_batch_is_loaded_whole(captured):
    with connect(captured) as conn, conn.transaction():
        for i in range(5):
            conn.execute("INSERT INTO customers VALUES (%s, 'n', 'retail', 'DE', 1)", (f"c-{i}",))
    outcomes = drain(captured, SPECS["customers"], max_changes=2)
    assert [o.loaded for o in outcomes] == [5]


def test_a_row_written_by_an_older_transaction_after_a_newer_one_ends_current(captured):
    """T_A holds the lower xid, T_B updates and commits, then T_A updates the same row."""
    with connect(captured) as conn:
        conn.execute("INSERT INTO customers VALUES ('c-1', 'n', 'retail', 'DE', 1)")
        conn.execute(
            "INSERT INTO call_center_calls VALUES ('k-1', 'c-1', 'billing', 'neutral', 10, now())"
        )
    drain(captured, SPECS["customers"])
    drain(captured, SPECS["call_center_calls"])
    older, newer = psycopg.connect(captured), psycopg.connect(captured, autocommit=True)
    try:
        older.execute("SELECT pg_current_xact_id()")
        newer.execute("UPDATE customers SET segment = 'B' WHERE customer_id = 'c-1'")
        newer.execute("UPDATE call_center_calls SET reason = 'B' WHERE call_id = 'k-1'")
        older.execute("UPDATE customers SET segment = 'A' WHERE customer_id = 'c-1'")
        older.execute("UPDATE call_center_calls SET reason = 'A' WHERE call_id = 'k-1'")
        older.commit()
    finally:
        older.close()
        newer.close()
    drain(captured, SPECS["customers"])
    drain(captured, SPECS["call_center_calls"])
    with connect(captured) as conn:
        assert conn.execute("SELECT segment FROM edw.dim_customer WHERE is_current").fetchall() == [
            ("A",)
        ]
        assert conn.execute("SELECT reason FROM edw.fact_call_center_call").fetchall() == [("A",)]
        history = conn.execute(
            "SELECT segment FROM edw.dim_customer ORDER BY source_change_id"
        ).fetchall()
    assert history == [("retail",), ("B",), ("A",)]


def test_a_batch_cut_short_does_not_claim_the_dimension_complete(captured):
    with connect(captured) as conn:
        for i in range(3):
            conn.execute("INSERT INTO customers VALUES (%s, 'n', 'retail', 'DE', 1)", (f"c-{i}",))
            time.sleep(0.05)
    with connect(captured) as oltp, connect(captured) as edw:
        outcome = run_capture_batch(
            oltp, edw, SCHEMAS, SPECS["customers"], requested_end=None, run_id="t", max_changes=1
        )
        assert outcome.loaded == 1
        mark = WarehouseLookups(
            edw,
            SCHEMAS,
            oltp=oltp,
            captures={SPECS["customers"].target: SPECS["customers"]},
            lookups=[CUSTOMER],
        ).watermark()
        [(second_change,)] = oltp.execute(
            "SELECT changed_at FROM cdc.customers_changes ORDER BY change_id OFFSET 1 LIMIT 1"
        ).fetchall()
    assert mark is None or mark.until <= second_change


def test_a_batch_planned_before_a_replay_reset_cannot_leave_a_gap(captured):
    record = BatchRecord(
        asset="fact_order",
        source="orders",
        shard=0,
        epoch="",
        start=0,
        end=3,
        run_id="a",
        partition_key=None,
        received=0,
        loaded=0,
        dead_lettered=0,
        deduplicated=0,
        fresh=True,
    )
    empty = DecodedBatch.empty(ORDER_PLACED)
    with connect(captured) as conn:
        commit_batch(conn, SCHEMAS, ORDER_PLACED, record, empty)
        reset_for_replay(conn, SCHEMAS, "fact_order", "fact_order")
        # A batch that had read the head at 3 before the reset must not commit [3, 6).
        late = BatchRecord(**{**record.__dict__, "start": 3, "end": 6, "fresh": False})
        with pytest.raises(BatchSupersededError, match="ledger was reset while this batch"):
            commit_batch(conn, SCHEMAS, ORDER_PLACED, late, empty)
        assert conn.execute("SELECT count(*) FROM kappa.ledger_head").fetchall() == [(0,)]


def test_replaying_a_stateful_fact_reproduces_the_live_result(pipeline: Pipeline, monkeypatch):
    with psycopg.connect(pipeline.env["KAPPA_OLTP_URL"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (customer_id, name, segment, country, credit_limit) "
            "SELECT 'c-' || lpad(i::text, 5, '0'), 'n', 'retail', 'DE', 100 FROM generate_series(0, 39) i"
        )
    pipeline.drain("dim_customer")
    pipeline.simulate(800, invalid_rate=0.02)
    pipeline.drain("fact_payment")

    def snapshot() -> list:
        return [
            pipeline.query("SELECT * FROM edw.fact_payment ORDER BY event_id"),
            pipeline.query("SELECT * FROM edw.fraud_alert ORDER BY event_id, rule"),
            pipeline.query(
                "SELECT DISTINCT ON (store, shard, key) store, shard, key, value FROM kappa.state "
                "ORDER BY store, shard, key, position DESC"
            ),
            pipeline.query("SELECT count(*) FROM kappa.dead_letter WHERE asset = 'fact_payment'"),
        ]

    live = snapshot()
    assert live[0] and live[2]
    assert cli.main(["replay", "fact_payment", "--yes"]) == 0
    assert pipeline.query("SELECT count(*) FROM edw.fraud_alert") == [(0,)]
    pipeline.drain("fact_payment")
    assert snapshot() == live


def test_an_older_transaction_s_write_in_an_earlier_batch_does_not_win_over_history(captured):
    """As above, but a batch boundary falls between the two transactions (batches of one
    change): the newer xid arrives in the later batch yet is the older write of the row."""
    with connect(captured) as conn:
        conn.execute("INSERT INTO customers VALUES ('c-1', 'n', 'retail', 'DE', 1)")
    drain(captured, SPECS["customers"])
    older, newer = psycopg.connect(captured), psycopg.connect(captured, autocommit=True)
    try:
        older.execute("SELECT pg_current_xact_id()")
        newer.execute("UPDATE customers SET segment = 'B' WHERE customer_id = 'c-1'")
        older.execute("UPDATE customers SET segment = 'A' WHERE customer_id = 'c-1'")
        older.commit()
    finally:
        older.close()
        newer.close()
    outcomes = drain(captured, SPECS["customers"], max_changes=1)
    assert [o.loaded for o in outcomes] == [1, 1], "the two transactions land in two batches"
    with connect(captured) as conn:
        live = conn.execute(
            "SELECT customer_sk, segment, valid_from, valid_to, is_current FROM edw.dim_customer ORDER BY customer_sk"
        ).fetchall()
    assert [(segment, current) for _, segment, _, _, current in live] == [
        ("retail", False),
        ("B", False),
        ("A", True),
    ]
    for (_, _, _, valid_to, _), (_, _, valid_from, _, _) in itertools.pairwise(live):
        assert valid_to == valid_from, "versions meet without gap or overlap"

    # Identical to a replay of the change table in one batch.
    replay = Schemas(edw="edw_replay", meta="kappa_replay")
    with connect(captured) as conn:
        ensure_schema(conn, replay, [])
        ensure_target(conn, replay, SPECS["customers"])
    with connect(captured) as oltp, connect(captured) as edw:
        run_capture_batch(
            oltp, edw, replay, SPECS["customers"], requested_end=None, run_id="r", max_changes=1000
        )
        assert (
            edw.execute(
                "SELECT customer_sk, segment, valid_from, valid_to, is_current FROM edw_replay.dim_customer ORDER BY customer_sk"
            ).fetchall()
            == live
        )


@pytest.mark.parametrize("max_changes", [1, 1000])
def test_a_lone_delete_does_not_move_later_versions_however_batches_are_cut(captured, max_changes):
    """A delete of a row captured before it existed in the dimension (no version) leaves no
    trace, so the next version's valid_from is the same whether or not they share a batch.

    The forged change time bites where change times are clock times (the PostgreSQL 15 run
    of CI); with track_commit_timestamp on, commit times order the two changes anyway."""
    with connect(captured) as conn:
        conn.execute(
            "INSERT INTO cdc.customers_changes (op, changed_at, before) VALUES "
            """('D', clock_timestamp() + interval '1 hour', '{"customer_id": "c-9", "name": "n", "segment": "s", "country": "DE", "credit_limit": 1}')"""
        )
        conn.execute("INSERT INTO customers VALUES ('c-9', 'n', 'retail', 'DE', 1)")
        [(inserted_at,)] = conn.execute(
            "SELECT max(changed_at) FROM cdc.customers_changes WHERE op = 'I'"
        ).fetchall()
    drain(captured, SPECS["customers"], max_changes=max_changes)
    with connect(captured) as conn:
        rows = conn.execute(
            "SELECT customer_id, valid_from, is_current FROM edw.dim_customer"
        ).fetchall()
    [(customer, valid_from, current)] = rows
    assert (customer, current) == ("c-9", True)
    assert valid_from <= inserted_at + __import__("datetime").timedelta(seconds=5), (
        "not pushed an hour ahead"
    )


def test_an_update_that_changes_the_key_closes_the_old_key_s_version(captured):
    with connect(captured) as conn:
        conn.execute("INSERT INTO customers VALUES ('c-1', 'n', 'retail', 'DE', 1)")
        conn.execute(
            "INSERT INTO call_center_calls VALUES ('k-1', 'c-1', 'billing', 'neutral', 10, now())"
        )
        conn.execute(
            "UPDATE customers SET customer_id = 'c-2', segment = 'smb' WHERE customer_id = 'c-1'"
        )
        conn.execute("UPDATE call_center_calls SET call_id = 'k-2' WHERE call_id = 'k-1'")
    [customers] = drain(captured, SPECS["customers"])
    [calls] = drain(captured, SPECS["call_center_calls"])
    assert (customers.received, customers.loaded, customers.dead_lettered) == (2, 2, 0)
    assert (calls.received, calls.loaded) == (2, 2)
    with connect(captured) as conn:
        dim = conn.execute(
            "SELECT customer_id, segment, is_current FROM edw.dim_customer ORDER BY customer_sk"
        ).fetchall()
        current = conn.execute("SELECT call_id FROM edw.fact_call_center_call").fetchall()
    assert dim == [("c-1", "retail", False), ("c-2", "smb", True)]
    assert current == [("k-2",)]


def test_replay_from_a_point_in_time_rewinds_rows_alerts_and_state_and_reloads_the_same(
    pipeline: Pipeline,
):
    from datetime import UTC, datetime

    with psycopg.connect(pipeline.env["KAPPA_OLTP_URL"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO customers (customer_id, name, segment, country, credit_limit) "
            "SELECT 'c-' || lpad(i::text, 5, '0'), 'n', 'retail', 'DE', 100 FROM generate_series(0, 39) i"
        )
    pipeline.drain("dim_customer")
    pipeline.simulate(500, seed=1, invalid_rate=0.02)
    pipeline.drain("fact_payment")
    [(first_round,)] = pipeline.query("SELECT count(*) FROM edw.fact_payment")
    time.sleep(0.05)
    since = datetime.now(UTC)
    time.sleep(0.05)
    pipeline.simulate(500, seed=2, invalid_rate=0.02)
    pipeline.drain("fact_payment")

    def snapshot() -> list:
        return [
            pipeline.query("SELECT * FROM edw.fact_payment ORDER BY event_id"),
            pipeline.query("SELECT * FROM edw.fraud_alert ORDER BY event_id, rule"),
            pipeline.query(
                "SELECT DISTINCT ON (store, shard, key) store, shard, key, value FROM kappa.state "
                "ORDER BY store, shard, key, position DESC"
            ),
            pipeline.query(
                "SELECT shard, end_position FROM kappa.ledger_head WHERE asset = 'fact_payment' ORDER BY 1"
            ),
            pipeline.query("SELECT count(*) FROM kappa.dead_letter WHERE asset = 'fact_payment'"),
        ]

    live = snapshot()
    assert cli.main(["replay", "fact_payment", "--from", since.isoformat()]) == 1, "asks first"
    assert cli.main(["replay", "fact_payment", "--from", since.isoformat(), "--yes"]) == 0
    assert pipeline.query("SELECT count(*) FROM edw.fact_payment") == [(first_round,)], (
        "the first round stays"
    )
    assert pipeline.query(
        "SELECT count(*) FROM edw.fact_payment WHERE broker_time >= %s", (since,)
    ) == [(0,)]
    pipeline.drain("fact_payment")
    assert snapshot() == live


def test_copy_writes_zoned_timestamps_as_the_instants_they_are(database_url):
    """COPY text is made by numpy for zone-aware columns: other zones, NaT and microseconds
    come back as the same instants, and text columns are untouched."""
    frame = pd.DataFrame(
        {
            "at": pd.to_datetime(
                ["2026-11-26T10:00:00.123456+02:00", None, "1999-12-31T23:59:59.000000+00:00"],
                utc=True,
                format="ISO8601",
            ).tz_convert("Europe/Berlin"),
            "note": ["a,b", "line\r\nbreak", None],
        }
    )
    with connect(database_url) as conn, conn.transaction():
        conn.execute("CREATE TEMP TABLE copied (at timestamptz, note text)")
        copy_frame(conn, sql.Identifier("copied"), frame)
        rows = conn.execute("SELECT at, note FROM copied ORDER BY note NULLS LAST").fetchall()
    assert rows == [
        (datetime(2026, 11, 26, 8, 0, 0, 123456, tzinfo=UTC), "a,b"),
        (None, "line\r\nbreak"),
        (datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC), None),
    ]
