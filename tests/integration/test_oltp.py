"""The OLTP simulator against a real PostgreSQL: DDL, concurrent writers, rollbacks, stopping."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from examples.shop.oltp import (
    APPLICATION_NAME,
    OltpConfig,
    OltpStats,
    OltpWriters,
    customer_row,
    ensure_source_tables,
    run_transactions,
    seed_customers,
)
from examples.shop.simulator import customer_profile
from kappa.exceptions import KappaError

pytestmark = pytest.mark.integration

# Short holds keep the tests quick; the share of long holds and rollbacks stays as configured.
CONFIG = OltpConfig(customers=500, seed=11, writers=4, max_hold_s=0.05)


def connect(url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(url, autocommit=True)


def table_rows(
    conn: psycopg.Connection[Any],
) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    customers = conn.execute("SELECT * FROM public.customers ORDER BY customer_id").fetchall()
    calls = conn.execute("SELECT * FROM public.call_center_calls ORDER BY call_id").fetchall()
    return customers, calls


def counts(conn: psycopg.Connection[Any]) -> tuple[int, int]:
    customers, calls = table_rows(conn)
    return len(customers), len(calls)


def simulator_connections(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE application_name = %s AND datname = current_database()",
        (APPLICATION_NAME,),
    ).fetchone()
    assert row is not None
    return int(row[0])


def test_ensure_source_tables_is_idempotent(database_url):
    with connect(database_url) as conn:
        ensure_source_tables(conn)
        seed_customers(conn, CONFIG, 3)
        ensure_source_tables(conn)
        assert counts(conn) == (3, 0)
        columns = conn.execute(
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        ).fetchall()
    assert columns == [
        ("call_center_calls", "call_id"),
        ("call_center_calls", "customer_id"),
        ("call_center_calls", "reason"),
        ("call_center_calls", "sentiment"),
        ("call_center_calls", "duration_s"),
        ("call_center_calls", "called_at"),
        ("customers", "customer_id"),
        ("customers", "name"),
        ("customers", "segment"),
        ("customers", "country"),
        ("customers", "credit_limit"),
        ("customers", "updated_at"),
    ]


def test_ensure_source_tables_runs_concurrently(database_url):
    errors: list[BaseException] = []

    def ensure() -> None:
        try:
            with connect(database_url) as conn:
                ensure_source_tables(conn)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ensure) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


def test_ensure_source_tables_rejects_a_table_of_another_shape(database_url):
    with connect(database_url) as conn:
        conn.execute("CREATE TABLE public.customers (customer_id integer PRIMARY KEY)")
        with pytest.raises(KappaError, match=r"public\.customers\.customer_id is integer"):
            ensure_source_tables(conn)


def test_seed_customers_inserts_the_event_simulators_people_once(database_url):
    with connect(database_url) as conn:
        ensure_source_tables(conn)
        assert seed_customers(conn, CONFIG, 10) == 10
        assert seed_customers(conn, CONFIG, 5) == 5
        rows = conn.execute(
            "SELECT customer_id, name, segment, country, credit_limit FROM public.customers "
            "ORDER BY customer_id"
        ).fetchall()
        small = OltpConfig(customers=20, seed=11, writers=1)
        assert seed_customers(conn, small, 100) == 5  # only 20 ids in that pool
        assert seed_customers(conn, small, 100) == 0
    assert [r[0] for r in rows] == [f"c-{i:05d}" for i in range(15)]
    for index, (cid, name, segment, country, credit_limit) in enumerate(rows):
        expected = customer_row(CONFIG, index)
        assert (cid, name, segment, country, credit_limit) == (
            expected.customer_id,
            expected.name,
            expected.segment,
            expected.country,
            expected.credit_limit,
        )
        assert country == customer_profile(CONFIG.seed, index).home_country


def test_writers_refuse_to_start_without_the_tables(database_url):
    with pytest.raises(KappaError, match="create the source tables first"):
        run_transactions(database_url, CONFIG, transactions=4)


def test_concurrent_writers_leave_tables_that_match_their_stats(database_url):
    with connect(database_url) as conn:
        ensure_source_tables(conn)
    stats = run_transactions(database_url, CONFIG, transactions=300)
    assert stats.transactions == 300
    assert stats.committed > 200 and stats.rolled_back > 0
    assert stats.customers_inserted > 0 and stats.customers_updated > 0
    assert stats.calls_inserted > 0
    with connect(database_url) as conn:
        customers, calls = counts(conn)
        ids = [r[0] for r in conn.execute("SELECT customer_id FROM public.customers")]
        call_customers = {
            r[0] for r in conn.execute("SELECT DISTINCT customer_id FROM public.call_center_calls")
        }
        call_ids = [r[0] for r in conn.execute("SELECT call_id FROM public.call_center_calls")]
        assert _eventually_no_connections(conn)
    assert customers == stats.customers_inserted - stats.customers_deleted
    assert calls == stats.calls_inserted
    assert all(0 <= int(cid.removeprefix("c-")) < CONFIG.customers for cid in ids)
    # Calls name customers of the pool (their customer may since have been deleted).
    assert all(0 <= int(cid.removeprefix("c-")) < CONFIG.customers for cid in call_customers)
    assert len(call_customers) > 10  # spread over the customers, not piled on one
    assert all(cid.startswith(f"call-{CONFIG.seed}-") for cid in call_ids)


def test_a_second_run_continues_on_the_same_tables(database_url):
    with connect(database_url) as conn:
        ensure_source_tables(conn)
        seeded = seed_customers(conn, CONFIG, 40)
    first = run_transactions(database_url, CONFIG, transactions=80)
    # The same seed plans the same calls again: their ids must not collide with the first run's.
    second = run_transactions(database_url, CONFIG, transactions=80)
    total = first + second
    assert total.aborted == 0
    with connect(database_url) as conn:
        assert counts(conn) == (
            seeded + total.customers_inserted - total.customers_deleted,
            total.calls_inserted,
        )


def test_rolled_back_transactions_leave_nothing(database_url):
    config = OltpConfig(customers=500, seed=3, writers=4, rollback_rate=1.0, max_hold_s=0.01)
    with connect(database_url) as conn:
        ensure_source_tables(conn)
        seed_customers(conn, config, 25)
        before = table_rows(conn)
    stats = run_transactions(database_url, config, transactions=60)
    assert stats == OltpStats(rolled_back=60)
    with connect(database_url) as conn:
        assert table_rows(conn) == before


def test_rolled_back_transactions_leave_nothing_on_an_empty_table(database_url):
    config = OltpConfig(customers=50, seed=3, writers=2, rollback_rate=1.0, max_hold_s=0.0)
    with connect(database_url) as conn:
        ensure_source_tables(conn)
    stats = run_transactions(database_url, config, transactions=20)
    assert stats.rolled_back == 20
    with connect(database_url) as conn:
        assert counts(conn) == (0, 0)


def _eventually_no_connections(conn: psycopg.Connection[Any], timeout_s: float = 60.0) -> bool:
    """Backends end a moment after their client closed: wait for pg_stat_activity to agree."""
    deadline = time.monotonic() + timeout_s
    while simulator_connections(conn):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 120.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def test_paced_writers_stop_when_asked_and_close_their_connections(database_url):
    config = OltpConfig(customers=500, seed=5, writers=4)  # default holds (up to 0.2 s, some 1 s)
    with connect(database_url) as conn:
        ensure_source_tables(conn)
        seed_customers(conn, config, 50)
    stop = threading.Event()
    result: list[OltpStats] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(OltpWriters(database_url, config, rate=50).run(stop))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    with connect(database_url) as conn:
        # Every writer connected, then some of their transactions committed: they run.
        wait_until(
            lambda: simulator_connections(conn) == config.writers,
            f"all {config.writers} writers to connect",
        )
        wait_until(lambda: counts(conn) != (50, 0), "the writers' first committed transaction")
    stop.set()
    thread.join(timeout=120)
    assert not thread.is_alive(), "the writers did not stop within 120 s of the stop event"
    assert errors == []
    (stats,) = result
    assert stats.transactions > 0
    assert stats.committed > 0
    with connect(database_url) as conn:
        assert _eventually_no_connections(conn)
        customers, calls = counts(conn)
    assert customers == 50 + stats.customers_inserted - stats.customers_deleted
    assert calls == stats.calls_inserted
