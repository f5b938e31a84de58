"""Time partitions of the change tables, on real PostgreSQL: live batches recorded in the
partition where their changes became visible (a late-committing transaction included), each
partition replaced from the change table with the live result, the refusals, and the same
through Dagster (sensor partition keys, a materialisation without a range)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import dagster as dg
import psycopg
import pytest

from kappa.catalog.captures import load_captures
from kappa.edw.connection import connect
from kappa.edw.types import Schemas
from kappa.exceptions import BatchSupersededError, LogResetError, ReprocessError
from kappa.ingest.capture import ChangeWindowLoader, run_capture_batch
from kappa.ingest.reprocess import reprocess_window
from kappa.partitions import TimeWindows
from kappa.reconcile import compare_capture_with_log, reconcile_capture
from kappa.sources import pg_capture
from tests.demo import TEST_CATALOG

pytestmark = pytest.mark.integration

SPECS = {spec.name: spec for spec in load_captures(TEST_CATALOG)}
SCHEMAS = Schemas()
WINDOWS = TimeWindows("hourly", datetime(2026, 11, 1, tzinfo=UTC))
HOUR_1 = WINDOWS.at(datetime(2026, 11, 20, 8, 30, tzinfo=UTC)).key
HOUR_2 = WINDOWS.at(datetime(2026, 11, 20, 9, 30, tzinfo=UTC)).key

CHECKSUMS = {
    "dim_customer": "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)), count(*) "
    "FROM edw.dim_customer t",
    "fact_call_center_call": "SELECT md5(string_agg(t::text, ',' ORDER BY t::text)), count(*) "
    "FROM edw.fact_call_center_call t",
    "dead_letters": "SELECT md5(string_agg(asset || position || reason, ',' ORDER BY asset, "
    "position)), count(*) FROM kappa.dead_letter",
    "ledger": "SELECT md5(string_agg(concat_ws(':', asset, partition_key, s, e, r, l, d), ',' "
    "ORDER BY asset, partition_key)), count(*) FROM (SELECT asset, partition_key, "
    "min(start_position) s, max(end_position) e, sum(received) r, sum(loaded) l, "
    "sum(dead_lettered) d FROM kappa.batch_ledger GROUP BY asset, partition_key) g",
}


def checksums(url: str) -> dict[str, tuple]:
    with connect(url) as conn:
        return {name: tuple(conn.execute(q).fetchone() or ()) for name, q in CHECKSUMS.items()}


def load(url: str, window: str, *, max_changes: int = 7) -> int:
    """Live micro-batches of both captures until nothing is ready, in ``window`` (the
    partition the sensor would give them now). Returns the batches committed."""
    committed = 0
    with connect(url) as oltp, connect(url) as edw:
        for spec in SPECS.values():
            while True:
                outcome = run_capture_batch(
                    oltp,
                    edw,
                    SCHEMAS,
                    spec,
                    requested_end=None,
                    run_id=f"live-{window}",
                    max_changes=max_changes,
                    partition_key=window,
                )
                if outcome.status != "committed":
                    break
                committed += 1
    return committed


def reprocess(url: str, window: str, *, asset: str = "dim_customer"):
    spec = next(s for s in SPECS.values() if s.asset == asset)
    with connect(url) as oltp, connect(url) as edw:
        source = pg_capture.ChangeTable(oltp, spec)
        (outcome,) = reprocess_window(
            source,
            edw,
            SCHEMAS,
            spec.asset,
            WINDOWS.window(window),
            ChangeWindowLoader(source, edw, SCHEMAS, spec),
            run_id=f"re-{window}",
        )
        return outcome


def write(url: str, *statements: str) -> None:
    """One OLTP transaction."""
    with psycopg.connect(url) as conn:
        for statement in statements:
            conn.execute(statement)


def customer(i: int, segment: str = "retail") -> str:
    return f"INSERT INTO customers VALUES ('c-{i}', 'N{i}', '{segment}', 'DE', {100 + i})"


def call(i: int, customer_id: int) -> str:
    return (
        f"INSERT INTO call_center_calls VALUES ('k-{i}', 'c-{customer_id}', 'billing', "
        f"'neutral', {30 + i}, now())"
    )


@pytest.fixture
def two_hours(captured: str) -> dict[str, tuple[int, int]]:
    """Changes made visible in hour 1 and hour 2, hour 2 updating hour 1's keys, one hour-1
    transaction committing only in hour 2. Returns each partition's transaction range."""
    url = captured
    for i in range(1, 13):
        write(url, customer(i), call(i, i))
    write(url, "UPDATE customers SET segment = 'smb' WHERE customer_id IN ('c-1', 'c-2')")
    write(url, "UPDATE customers SET customer_id = 'c-50' WHERE customer_id = 'c-5'")
    with psycopg.connect(url) as conn:  # not a valid change: a dead letter with its reason
        conn.execute(
            "INSERT INTO cdc.customers_changes (op, before, after) VALUES ('X', NULL, '{}')"
        )
    late = psycopg.connect(url, autocommit=False)
    try:
        late.execute("UPDATE customers SET credit_limit = 999 WHERE customer_id = 'c-3'")
        write(url, customer(13), call(13, 13))  # committed, but behind the open transaction
        assert load(url, HOUR_1) >= 3
        late.commit()  # the old transaction's changes become visible in hour 2
    finally:
        late.close()
    write(url, "UPDATE customers SET segment = 'enterprise' WHERE customer_id IN ('c-1', 'c-4')")
    write(
        url,
        "DELETE FROM customers WHERE customer_id = 'c-6'",
        "DELETE FROM call_center_calls WHERE call_id = 'k-6'",
    )
    write(
        url,
        customer(20),
        call(20, 1),
        "UPDATE call_center_calls SET duration_s = 5 WHERE call_id = 'k-2'",
    )
    assert load(url, HOUR_2) >= 2
    with connect(url) as conn:
        spans = conn.execute(
            "SELECT partition_key, min(start_position), max(end_position) FROM kappa.batch_ledger "
            "WHERE asset = 'dim_customer' GROUP BY partition_key"
        ).fetchall()
    return {key: (start, end) for key, start, end in spans}


def test_each_partition_is_replaced_with_the_rows_the_live_batches_made(two_hours, captured):
    url = captured
    assert set(two_hours) == {HOUR_1, HOUR_2}
    assert two_hours[HOUR_1][1] == two_hours[HOUR_2][0], "the partitions meet: no gap, no overlap"
    with connect(url) as conn:
        late = conn.execute(
            "SELECT source_xid FROM edw.dim_customer WHERE customer_id = 'c-3' AND is_current"
        ).fetchone()
    assert late is not None and two_hours[HOUR_2][0] <= late[0] < two_hours[HOUR_2][1], (
        "a transaction that committed in hour 2 belongs to hour 2, whatever its own time says"
    )
    live = checksums(url)
    assert live["dead_letters"][1] == 1 and live["dim_customer"][1] > 13

    for window in (HOUR_1, HOUR_2, HOUR_1):
        outcome = reprocess(url, window)
        assert (outcome.status, (outcome.start, outcome.end)) == ("replaced", two_hours[window])
        assert outcome.loaded > 0 and outcome.removed_rows > 0
        assert checksums(url) == live, f"after reprocessing {window}"
    for window in (HOUR_2, HOUR_1):
        reprocess(url, window, asset="fact_call_center_call")
        assert checksums(url) == live
    with connect(url) as conn, connect(url) as oltp:
        batches = conn.execute(
            "SELECT count(*) FROM kappa.batch_ledger WHERE asset = 'dim_customer'"
        ).fetchone()
        assert batches == (2,), "one batch per replaced partition"
        for spec in SPECS.values():
            assert reconcile_capture(oltp, conn, SCHEMAS, spec).problems == []


def test_reprocessing_repairs_the_rows_of_its_partition(two_hours, captured):
    url = captured
    live = checksums(url)
    with connect(url) as conn:
        conn.execute("UPDATE edw.dim_customer SET segment = 'tampered' WHERE customer_id = 'c-2'")
        conn.execute("DELETE FROM edw.fact_call_center_call WHERE call_id = 'k-7'")
    assert checksums(url) != live
    reprocess(url, HOUR_1)
    reprocess(url, HOUR_1, asset="fact_call_center_call")
    assert checksums(url) == live
    assert reprocess(url, WINDOWS.at(datetime(2026, 11, 2, tzinfo=UTC)).key).status == "empty"


def test_purged_changes_and_a_recreated_change_table_are_refused_untouched(two_hours, captured):
    url = captured
    live = checksums(url)
    start, end = two_hours[HOUR_1]
    with psycopg.connect(url) as conn:  # retention on the change table took some of hour 1
        conn.execute(
            "DELETE FROM cdc.customers_changes WHERE change_id IN "
            "(SELECT change_id FROM cdc.customers_changes ORDER BY change_id LIMIT 2)"
        )
    with pytest.raises(ReprocessError) as refused:
        reprocess(url, HOUR_1)
    message = str(refused.value)
    assert f"cdc.customers_changes[0] transactions [{start}, {end})" in message
    assert "purged" in message and "Nothing in the EDW was changed" in message
    assert checksums(url) == live

    with psycopg.connect(url) as conn:
        conn.execute("DROP TABLE cdc.customers_changes")
    with connect(url) as conn:
        pg_capture.install_capture(conn, SPECS["customers"])
    with pytest.raises(LogResetError, match="recreated"):
        reprocess(url, HOUR_2)
    assert checksums(url) == live


def test_a_closed_partition_takes_no_new_batch(two_hours, captured):
    url = captured
    write(url, customer(30))
    with connect(url) as oltp, connect(url) as edw, pytest.raises(BatchSupersededError):
        run_capture_batch(
            oltp,
            edw,
            SCHEMAS,
            SPECS["customers"],
            requested_end=None,
            run_id="late-run",
            max_changes=100,
            partition_key=HOUR_1,
        )
    assert load(url, HOUR_2) == 1


def test_sensor_runs_carry_the_visible_partition_and_a_rangeless_run_reprocesses(
    pipeline, monkeypatch
):
    """Through Dagster: the sensor's run request carries the partition of now, the run
    records it in the ledger, and a run of that partition without a range (a backfill, the
    UI's Materialize) replaces it with the same rows."""
    write(pipeline.env["KAPPA_OLTP_URL"], *(customer(i) for i in range(1, 6)))
    write(
        pipeline.env["KAPPA_OLTP_URL"],
        "UPDATE customers SET segment = 'smb' WHERE customer_id = 'c-2'",
    )
    before = datetime.now(UTC)
    runs = pipeline.drain("dim_customer")
    after = datetime.now(UTC)
    windows = pipeline.settings.windows
    keys = {run.dagster_run.tags.get("dagster/partition") for run in runs}
    assert keys <= {windows.at(before).key, windows.at(after).key} and len(keys) == 1
    key = keys.pop()
    ledger = pipeline.query(
        "SELECT DISTINCT partition_key FROM kappa.batch_ledger WHERE asset = 'dim_customer'"
    )
    assert ledger == [(key,)]
    live = pipeline.query(CHECKSUMS["dim_customer"])
    pipeline.query("UPDATE edw.dim_customer SET segment = 'tampered'")

    job = pipeline.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection={pipeline.defs.get_assets_def("dim_customer").key}
    )
    result = job.execute_in_process(instance=pipeline.instance, partition_key=key)
    assert result.success
    metadata = result.asset_materializations_for_node("dim_customer")[0].metadata
    assert metadata["mode"].value == "reprocess"
    assert metadata["rows_loaded"].value == 6
    assert pipeline.query(CHECKSUMS["dim_customer"]) == live
    assert result.dagster_run.tags["kappa/resolved_offsets"].startswith(f"{key}=0:")

    check = pipeline.defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_check_selection={dg.AssetCheckKey(dg.AssetKey("dim_customer"), "replay_equivalence")}
    )
    [evaluation] = check.execute_in_process(
        instance=pipeline.instance
    ).get_asset_check_evaluations()
    assert evaluation.passed, evaluation.description
    assert [r.data["window"] for r in evaluation.metadata["partitions"].value.records] == [key]


def test_visibility_never_goes_back_to_a_closed_window() -> None:
    now = datetime(2026, 11, 20, 9, 10, tzinfo=UTC)
    assert WINDOWS.visible_at(now, None).key == HOUR_2
    assert WINDOWS.visible_at(now, HOUR_1).key == HOUR_2
    later = WINDOWS.at(now + timedelta(hours=2)).key
    assert WINDOWS.visible_at(now, later).key == later, "a clock that went back keeps the window"
    assert WINDOWS.visible_at(now, "2026-11-20").key == HOUR_2, "another grain's key is ignored"


def test_replay_equivalence_check_compares_each_partition_and_changes_nothing(two_hours, captured):
    url = captured
    live = checksums(url)
    with connect(url) as oltp, connect(url) as conn:
        clean = compare_capture_with_log(oltp, conn, SCHEMAS, SPECS["customers"])
    assert [(c.window, c.start, c.end, c.equal) for c in clean] == [
        (HOUR_1, *two_hours[HOUR_1], True),
        (HOUR_2, *two_hours[HOUR_2], True),
    ]
    assert clean[0].log_dead_letters == clean[0].edw_dead_letters == 1
    assert checksums(url) == live, "the re-derivation was rolled back"

    with connect(url) as conn:  # a version of hour 2 lost, another closed wrongly
        conn.execute(
            "DELETE FROM edw.dim_customer WHERE customer_sk = (SELECT max(customer_sk) "
            "FROM edw.dim_customer)"
        )
    with connect(url) as oltp, connect(url) as conn:
        found = compare_capture_with_log(oltp, conn, SCHEMAS, SPECS["customers"])
    assert [c.equal for c in found] == [True, False]
    assert found[1].log_rows == found[1].edw_rows + 1
    assert "log gives" in found[1].describe()


def test_a_change_of_grain_does_not_close_the_day_of_the_last_hour(two_hours, captured):
    """Hourly to daily: the day holding the last hourly batch is still open; an hour before
    a later day is closed."""
    url = captured
    write(url, customer(31))
    assert load(url, "2026-11-20") == 1
    write(url, customer(32))
    assert load(url, "2026-11-21") == 1
    write(url, customer(33))
    with pytest.raises(BatchSupersededError, match="2026-11-20-08:00 is closed"):
        load(url, HOUR_1)
