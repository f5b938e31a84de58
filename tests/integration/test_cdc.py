"""Change data capture on real PostgreSQL: gap-free reading, SCD2, exactly once."""

import itertools
import threading
import time
from datetime import UTC, datetime
from decimal import Decimal

import psycopg
import pytest

from kappa.catalog.captures import load_captures
from kappa.changes.target import ensure_target
from kappa.edw.connection import connect
from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.ingest.capture import run_capture_batch
from tests.demo import TEST_CATALOG

pytestmark = pytest.mark.integration

SPECS = {spec.name: spec for spec in load_captures(TEST_CATALOG)}
CUSTOMERS = SPECS["customers"]
CALLS = SPECS["call_center_calls"]
SCHEMAS = Schemas()


def batch(url: str, spec=CUSTOMERS, *, max_changes: int = 10_000):
    with connect(url) as oltp, connect(url) as edw:
        return run_capture_batch(
            oltp, edw, SCHEMAS, spec, requested_end=None, run_id="test", max_changes=max_changes
        )


def writer(url: str) -> psycopg.Connection:
    return psycopg.connect(url, autocommit=False)


def dim_rows(url: str, schema: str = "edw") -> list[tuple]:
    with connect(url) as conn:
        return conn.execute(
            f"SELECT customer_sk, customer_id, segment, valid_from, valid_to, is_current, source_change_id, closed_by_xid, closed_by_change_id "
            f"FROM {schema}.dim_customer ORDER BY customer_sk"
        ).fetchall()


def test_an_open_transaction_is_picked_up_later_never_skipped(captured):
    t1, t2 = writer(captured), writer(captured)
    try:
        t1.execute(
            "INSERT INTO customers VALUES ('c-1', 'Ada', 'retail', 'DE', 100)"
        )  # change k, T1 open
        t2.execute("INSERT INTO customers VALUES ('c-2', 'Bob', 'smb', 'FR', 200)")  # change k+1
        t2.commit()

        first = batch(captured)
        assert (first.loaded, [r[1] for r in dim_rows(captured)]) == (0, []), (
            "T1 is open and older than T2: the horizon stays below T1, so nothing is final yet"
        )
        t1.commit()
        second = batch(captured)
        assert second.loaded == 2
        rows = dim_rows(captured)
        assert [r[1] for r in rows] == ["c-1", "c-2"]
        assert batch(captured).status == "already loaded"
    finally:
        t1.close()
        t2.close()


def test_a_later_transaction_is_loaded_while_an_older_one_is_open_only_once_it_ends(captured):
    """The issue's interleaving where the open transaction is the newer one: k+1 loads first."""
    t1 = writer(captured)
    t2 = writer(captured)
    try:
        t2.execute("SELECT pg_current_xact_id()")  # T2 takes the older xid ...
        t1.execute("INSERT INTO customers VALUES ('c-1', 'Ada', 'retail', 'DE', 100)")
        t1.commit()  # ... T1 (newer xid) writes change k and commits
        t2.rollback()
        t3 = writer(captured)
        t3.execute("INSERT INTO customers VALUES ('c-3', 'Cy', 'retail', 'NL', 50)")  # stays open
        assert batch(captured).loaded == 1
        assert [r[1] for r in dim_rows(captured)] == ["c-1"]
        t3.commit()
        t3.close()
        assert batch(captured).loaded == 1
        assert [r[1] for r in dim_rows(captured)] == ["c-1", "c-3"]
    finally:
        t1.close()
        t2.close()


def test_scd2_keeps_every_version_in_order_and_a_delete_closes_the_current_one(captured):
    with writer(captured) as conn:
        conn.execute("INSERT INTO customers VALUES ('c-1', 'Ada', 'retail', 'DE', 100)")
        conn.commit()
        # Several changes of one key in one transaction and one batch: every version kept.
        conn.execute("UPDATE customers SET segment = 'smb' WHERE customer_id = 'c-1'")
        conn.execute(
            "UPDATE customers SET segment = 'enterprise', credit_limit = 900 WHERE customer_id = 'c-1'"
        )
        conn.commit()
    batch(captured)
    with writer(captured) as conn:
        conn.execute("DELETE FROM customers WHERE customer_id = 'c-1'")
        conn.commit()
        conn.execute("INSERT INTO customers VALUES ('c-1', 'Ada', 'retail', 'GB', 10)")
        conn.commit()
    batch(captured)

    rows = dim_rows(captured)
    assert [(r[2], r[5]) for r in rows] == [
        ("retail", False),
        ("smb", False),
        ("enterprise", False),
        ("retail", True),
    ]
    for earlier, later in itertools.pairwise(rows):
        assert earlier[4] is not None and earlier[4] <= later[3], "versions never overlap"
    assert rows[-1][4] is None
    with connect(captured) as conn:
        [(limit,)] = conn.execute(
            "SELECT credit_limit FROM edw.dim_customer WHERE customer_sk = %s", (rows[2][0],)
        ).fetchall()
        [(closed_by,)] = conn.execute(
            "SELECT count(*) FROM edw.dim_customer WHERE customer_id = 'c-1' AND is_current"
        ).fetchall()
    assert limit == Decimal("900.00") and closed_by == 1


def test_concurrent_writers_each_change_lands_exactly_once(captured):
    """Writers whose transactions sleep, commit or roll back while batches run."""
    import random

    errors: list[BaseException] = []

    def write(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(captured) as conn:
                for n in range(40):
                    key = f"c-{seed}-{rng.randrange(8)}"
                    conn.execute(
                        "INSERT INTO customers VALUES (%s, 'x', %s, 'DE', %s) "
                        "ON CONFLICT (customer_id) DO UPDATE SET segment = EXCLUDED.segment, credit_limit = EXCLUDED.credit_limit",
                        (key, rng.choice(["retail", "smb", "enterprise"]), n),
                    )
                    if rng.random() < 0.1:
                        conn.execute(
                            "DELETE FROM customers WHERE customer_id = %s",
                            (f"c-{seed}-{rng.randrange(8)}",),
                        )
                    time.sleep(rng.random() * 0.02)
                    if rng.random() < 0.2:
                        conn.rollback()
                    else:
                        conn.commit()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    while any(t.is_alive() for t in threads):
        batch(captured, max_changes=25)
        time.sleep(0.01)
    for thread in threads:
        thread.join()
    assert not errors
    while batch(captured, max_changes=25).status != "already loaded":
        pass

    with connect(captured) as conn:
        committed = conn.execute(
            "SELECT change_id FROM cdc.customers_changes WHERE op <> 'D' ORDER BY change_id"
        ).fetchall()
        versions = conn.execute(
            "SELECT source_change_id FROM edw.dim_customer ORDER BY source_change_id"
        ).fetchall()
        assert versions == committed, "every committed insert/update is one version, exactly once"
        current = conn.execute(
            "SELECT customer_id, segment, credit_limit FROM edw.dim_customer WHERE is_current ORDER BY customer_id"
        ).fetchall()
        source = conn.execute(
            "SELECT customer_id, segment, credit_limit FROM customers ORDER BY customer_id"
        ).fetchall()
        assert current == source, "the current versions are the OLTP table as committed"
        ledger = conn.execute(
            "SELECT start_position, end_position FROM kappa.batch_ledger ORDER BY start_position"
        ).fetchall()
    for (_, end), (start, _) in itertools.pairwise(ledger):
        assert start == end, "the ledger has no gap and no overlap"


def test_replaying_the_change_table_rebuilds_the_same_dimension(captured):
    with writer(captured) as conn:
        for n in range(30):
            conn.execute(
                "INSERT INTO customers VALUES (%s, 'n', 'retail', 'DE', %s) "
                "ON CONFLICT (customer_id) DO UPDATE SET credit_limit = EXCLUDED.credit_limit, segment = 'smb'",
                (f"c-{n % 7}", n),
            )
            if n % 5 == 0:
                conn.commit()
        conn.execute("DELETE FROM customers WHERE customer_id = 'c-3'")
        conn.commit()
    while batch(captured, max_changes=4).status != "already loaded":
        pass
    live = dim_rows(captured)

    replay_schemas = Schemas(edw="edw_replay", meta="kappa_replay")
    with connect(captured) as conn:
        ensure_schema(conn, replay_schemas, [])
        ensure_target(conn, replay_schemas, CUSTOMERS)
    with connect(captured) as oltp, connect(captured) as edw:
        run_capture_batch(
            oltp,
            edw,
            replay_schemas,
            CUSTOMERS,
            requested_end=None,
            run_id="replay",
            max_changes=1_000_000,
        )
    assert dim_rows(captured, "edw_replay") == live


def test_call_centre_facts_follow_the_current_state(captured):
    with writer(captured) as conn:
        now = datetime.now(UTC)
        conn.execute(
            "INSERT INTO call_center_calls VALUES ('k-1', 'c-1', 'billing', 'neutral', 60, %s)",
            (now,),
        )
        conn.execute(
            "INSERT INTO call_center_calls VALUES ('k-2', 'c-1', 'fraud_report', 'negative', 30, %s)",
            (now,),
        )
        conn.execute("UPDATE call_center_calls SET duration_s = 90 WHERE call_id = 'k-1'")
        conn.execute("DELETE FROM call_center_calls WHERE call_id = 'k-2'")
        conn.commit()
    assert batch(captured, CALLS).loaded == 4
    with connect(captured) as conn:
        rows = conn.execute(
            "SELECT call_id, duration_s, reason FROM edw.fact_call_center_call"
        ).fetchall()
    assert rows == [("k-1", 90, "billing")]


def test_malformed_change_rows_are_dead_lettered_and_the_table_moves_on(captured):
    with writer(captured) as conn:
        conn.execute("INSERT INTO customers VALUES ('c-1', 'Ada', 'retail', 'DE', 100)")
        conn.execute("INSERT INTO cdc.customers_changes (op, after) VALUES ('X', '{}')")
        conn.execute(
            """INSERT INTO cdc.customers_changes (op, after) VALUES ('U', '{"customer_id": "c-9"}')"""
        )
        conn.execute("""INSERT INTO cdc.customers_changes (op, after) VALUES ('I', '[1]')""")
        conn.execute(
            """INSERT INTO cdc.customers_changes (op, after) VALUES ('U', '{"customer_id": "c-8", "name": "n", "segment": "s", "country": "DE", "credit_limit": "lots"}')"""
        )
        conn.commit()
    outcome = batch(captured)
    assert (outcome.received, outcome.loaded, outcome.dead_lettered) == (5, 1, 4)
    with connect(captured) as conn:
        reasons = [
            r[0]
            for r in conn.execute(
                "SELECT reason FROM kappa.dead_letter ORDER BY position"
            ).fetchall()
        ]
    assert reasons == [
        "unknown operation 'X'",
        "row image lacks column 'name'",
        "after image is missing or not a JSON object",
        "'credit_limit' is not a valid numeric(12,2)",
    ]


def test_the_oltp_simulator_s_concurrent_writers_land_exactly_once(captured):
    """The simulator's writers (holds, rollbacks, deletes) race the CDC batches."""
    from examples.shop.oltp import OltpConfig, run_transactions

    config = OltpConfig(customers=60, seed=11, writers=4, rollback_rate=0.15, max_hold_s=0.05)
    done = threading.Event()
    stats = []

    def write() -> None:
        try:
            stats.append(run_transactions(captured, config, transactions=240))
        finally:
            done.set()

    thread = threading.Thread(target=write)
    thread.start()
    while not done.is_set():
        batch(captured, max_changes=40)
        batch(captured, CALLS, max_changes=40)
    thread.join()
    while batch(captured, max_changes=40).status != "already loaded":
        pass
    while batch(captured, CALLS, max_changes=40).status != "already loaded":
        pass
    [run] = stats
    assert run.rolled_back > 0 and run.committed > 0

    with connect(captured) as conn:
        committed = conn.execute(
            "SELECT change_id FROM cdc.customers_changes WHERE op <> 'D' ORDER BY 1"
        ).fetchall()
        versions = conn.execute(
            "SELECT source_change_id FROM edw.dim_customer ORDER BY 1"
        ).fetchall()
        assert versions == committed
        assert (
            conn.execute(
                "SELECT customer_id, segment, country, credit_limit FROM edw.dim_customer WHERE is_current ORDER BY 1"
            ).fetchall()
            == conn.execute(
                "SELECT customer_id, segment, country, credit_limit FROM customers ORDER BY 1"
            ).fetchall()
        )
        assert (
            conn.execute(
                "SELECT call_id, customer_id, reason, sentiment, duration_s, called_at FROM edw.fact_call_center_call ORDER BY 1"
            ).fetchall()
            == conn.execute(
                "SELECT call_id, customer_id, reason, sentiment, duration_s, called_at FROM call_center_calls ORDER BY 1"
            ).fetchall()
        )
        [(dead,)] = conn.execute("SELECT count(*) FROM kappa.dead_letter").fetchall()
        assert dead == 0
