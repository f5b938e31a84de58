"""Records the database refuses are isolated, not retried forever (issue 13).

Against the real broker, PostgreSQL and a Dagster instance: a CHECK constraint the decoder
cannot know about makes one record in the middle of a batch of thousands unloadable, which
is exactly the "validation can never be complete" case.
"""

import math
import uuid
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import orjson
import psycopg
import pytest
from kafka import KafkaProducer

from kappa.catalog.ingests import topic_ingests
from kappa.edw.connection import connect
from kappa.edw.poison import bisect_refused, is_data_error
from kappa.exceptions import MassRefusalError
from kappa.reconcile import compare_with_log
from kappa.sources.topic import EventStore
from tests.integration.harness import Pipeline, wait_for
from tests.integration.test_reprocess import reprocess

pytestmark = pytest.mark.integration

HOUR = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(hours=3)
ORDERS = 3000
POISON_AT = 1500  # the record's index in the batch (and its offset: partition 0 starts at 0)
POISON_AMOUNT = "666.66"  # what the test's CHECK constraint refuses
CUSTOMERS = 30


@pytest.fixture
def pipeline(pipeline_env, instance, monkeypatch) -> Pipeline:
    env = {
        **pipeline_env,
        "KAPPA_PARTITIONS": "hourly",
        "KAPPA_PARTITIONS_START": (HOUR - timedelta(days=1)).strftime("%Y-%m-%dT00:00"),
        "KAPPA_ENRICH_MAX_WAIT_S": "0",
        # The whole hour in one batch: the poison sits in the middle of 3000 records.
        "KAPPA_BATCH_MAX_RECORDS": "5000",
        "KAPPA_RUN_MAX_RECORDS": "5000",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return Pipeline(env=env, instance=instance)


def order_bytes(customer: str, amount: str, at: datetime) -> bytes:
    """An order whose amount is the JSON literal ``amount`` exactly as written."""
    body = {
        "event_id": str(uuid.uuid4()),
        "event_type": "order_placed",
        "event_time": (at - timedelta(seconds=1)).isoformat(),
        "source": "test",
        "schema_version": 1,
        "payload": {
            "order_id": f"o-{uuid.uuid4().hex[:8]}",
            "customer_id": customer,
            "amount": "AMOUNT",
            "currency": "EUR",
            "item_count": 1,
            "channel": "web",
        },
    }
    return orjson.dumps(body).replace(b'"AMOUNT"', amount.encode())


def produce(pipeline: Pipeline, records: list[tuple[str, bytes, datetime]]) -> None:
    """Into partition 0 of the orders topic, broker timestamps as given."""
    producer = KafkaProducer(bootstrap_servers=pipeline.env["KAFKA_BOOTSTRAP_SERVERS"], acks="all")
    try:
        for key, value, at in records:
            producer.send(
                pipeline.settings.stream("fact_order").topic,
                key=key.encode(),
                value=value,
                partition=0,
                timestamp_ms=int(at.timestamp() * 1000),
            )
        producer.flush()
    finally:
        producer.close()


def amount_of(i: int) -> str:
    return f"{10 + i % 50}.{i % 100:02d}"


def customer_of(i: int) -> str:
    return f"c-{i % CUSTOMERS:02d}"


def poison_batch(pipeline: Pipeline) -> list[tuple[str, bytes, datetime]]:
    """3000 orders in one hour, the poison at index 1500; one order in the next hour closes it."""
    records = []
    for i in range(ORDERS):
        at = HOUR + timedelta(minutes=10, milliseconds=i)
        amount = POISON_AMOUNT if i == POISON_AT else amount_of(i)
        records.append((customer_of(i), order_bytes(customer_of(i), amount, at), at))
    later = HOUR + timedelta(hours=1, minutes=5)
    records.append(("c-99", order_bytes("c-99", "1.00", later), later))
    return records


def refuse_poison(pipeline: Pipeline) -> None:
    with psycopg.connect(pipeline.edw_url, autocommit=True) as conn:
        conn.execute(
            f"ALTER TABLE edw.fact_order ADD CONSTRAINT fact_order_no_666 "
            f"CHECK (amount <> {POISON_AMOUNT})"
        )


def expected_stats(customer: str) -> list[tuple[int, int, Decimal | None]]:
    """(offset, orders before, mean before rounded half-even) of the customer's loaded orders,
    computed by hand from the produced amounts, the poison left out."""
    out: list[tuple[int, int, Decimal | None]] = []
    before: list[Decimal] = []
    for i in range(ORDERS):
        if customer_of(i) != customer or i == POISON_AT:
            continue
        mean = (
            (sum(before) / len(before)).quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)
            if before
            else None
        )
        out.append((i, len(before), mean))
        before.append(Decimal(amount_of(i)))
    return out


def dead_letters(pipeline: Pipeline) -> list[tuple]:
    return pipeline.query(
        "SELECT source, shard, position, raw_key, raw_value, reason FROM kappa.dead_letter "
        "WHERE asset = 'fact_order' ORDER BY position"
    )


def test_a_record_the_database_refuses_is_dead_lettered_and_the_rest_of_the_batch_loads(
    pipeline: Pipeline,
):
    records = poison_batch(pipeline)
    produce(pipeline, records)
    refuse_poison(pipeline)

    results = pipeline.drain("fact_order")

    topic = pipeline.settings.stream("fact_order").topic
    [(loaded,)] = pipeline.query(
        "SELECT count(*) FROM edw.fact_order WHERE kafka_partition = 0 AND kafka_offset < %s",
        (ORDERS,),
    )
    assert loaded == ORDERS - 1, "every valid event behind the poison loaded"
    [dead] = dead_letters(pipeline)
    assert dead[:5] == (topic, 0, POISON_AT, records[POISON_AT][0].encode(), records[POISON_AT][1])
    assert 'violates check constraint "fact_order_no_666"' in dead[5], dead[5]
    assert dead[5].startswith("refused by the database [23514]")
    # The ledger moved on past it: both hours loaded, nothing left to do.
    [(end,)] = pipeline.query(
        "SELECT end_position FROM kappa.ledger_head WHERE asset = 'fact_order' AND shard = 0"
    )
    assert end == ORDERS + 1
    [(received, loaded_rows, dead_lettered)] = pipeline.query(
        "SELECT received, loaded, dead_lettered FROM kappa.batch_ledger "
        "WHERE asset = 'fact_order' AND shard = 0 AND start_position = 0"
    )
    assert (received, loaded_rows, dead_lettered) == (ORDERS, ORDERS - 1, 1)

    # Bounded work: two probes per halving of the batch at most, reported in the metadata.
    probes = [
        m.metadata["poison_probes"].value
        for r in results
        for m in r.asset_materializations_for_node("fact_order")
    ]
    assert sum(probes) > 0
    assert sum(probes) <= 2 * math.ceil(math.log2(ORDERS)), probes

    # The running statistics never counted the refused amount.
    customer = customer_of(POISON_AT)
    rows = pipeline.query(
        "SELECT kafka_offset, customer_orders_before, customer_avg_amount_before "
        "FROM edw.fact_order WHERE customer_id = %s ORDER BY kafka_offset",
        (customer,),
    )
    assert rows == expected_stats(customer)
    [(state,)] = pipeline.query(
        "SELECT value FROM kappa.state WHERE store = 'fact_order/order_stats' AND key = %s "
        "ORDER BY position DESC LIMIT 1",
        (customer,),
    )
    kept = [Decimal(amount_of(i)) for i, _, _ in expected_stats(customer)]
    assert state["n"] == len(kept) and state["sum"] == int(sum(kept) * 100)

    # The replay-equivalence check agrees: the log, decoded, gives the same account.
    with (
        EventStore(pipeline.env["KAFKA_BOOTSTRAP_SERVERS"]) as store,
        connect(pipeline.edw_url) as conn,
    ):
        spec = next(t for t, _ in topic_ingests(pipeline.settings) if t.asset == "fact_order")
        comparisons = compare_with_log(store, conn, pipeline.schemas, spec)
    assert comparisons and all(c.equal for c in comparisons), [c.describe() for c in comparisons]

    # A backfill of that partition isolates the same record: same rows, same dead letters.
    facts = pipeline.query("SELECT * FROM edw.fact_order ORDER BY kafka_offset")
    letters = dead_letters(pipeline)
    window = pipeline.settings.windows.at(HOUR + timedelta(minutes=10)).key
    result = reprocess(pipeline, "fact_order", window)
    metadata = result.asset_materializations_for_node("fact_order")[0].metadata
    assert metadata["rows_dead_lettered"].value == 1
    assert 0 < metadata["poison_probes"].value <= 2 * math.ceil(math.log2(ORDERS))
    assert pipeline.query("SELECT * FROM edw.fact_order ORDER BY kafka_offset") == facts
    assert dead_letters(pipeline) == letters


def test_amounts_a_column_would_round_or_overflow_are_dead_lettered_with_their_reasons(
    pipeline: Pipeline,
):
    literals = ["12.50", "0.004", "999999999999.995", "1000000000000.00", "999999999999.99"]
    at = HOUR + timedelta(minutes=10)
    produce(
        pipeline,
        [(f"c-{i}", order_bytes(f"c-{i}", a, at), at) for i, a in enumerate(literals)],
    )

    pipeline.drain("fact_order")

    assert pipeline.query("SELECT amount FROM edw.fact_order ORDER BY kafka_offset") == [
        (Decimal("12.50"),),
        (Decimal("999999999999.99"),),
    ]
    assert [(p, r) for _, _, p, _, _, r in dead_letters(pipeline)] == [
        (1, "'payload.amount' has more than 2 decimals: 0.004"),
        (2, "'payload.amount' has more than 2 decimals: 999999999999.995"),
        (3, "'payload.amount' does not fit numeric(14, 2): 1000000000000.00"),
    ]


def test_a_change_the_target_refuses_is_dead_lettered_with_its_change_id(
    pipeline: Pipeline,
):
    with psycopg.connect(pipeline.edw_url, autocommit=True) as conn:
        conn.execute(
            "ALTER TABLE edw.dim_customer ADD CONSTRAINT dim_customer_no_blocked "
            "CHECK (segment <> 'blocked')"
        )
    with psycopg.connect(pipeline.env["KAPPA_OLTP_URL"], autocommit=True) as conn:
        for i in range(40):
            segment = "blocked" if i == 17 else "retail"
            conn.execute(
                "INSERT INTO customers (customer_id, name, segment, country, credit_limit) "
                "VALUES (%s, %s, %s, 'DE', 100)",
                (f"c-{i:02d}", f"n-{i}", segment),
            )
        conn.execute("UPDATE customers SET credit_limit = 250 WHERE customer_id = 'c-20'")
        [(refused_id,)] = conn.execute(
            "SELECT change_id FROM cdc.customers_changes WHERE after->>'segment' = 'blocked'"
        ).fetchall()

    results = []

    def all_applied() -> bool:
        # Transactions still open elsewhere on the server hold changes back: drain until
        # the ledger has taken all 41.
        results.extend(pipeline.drain("dim_customer"))
        [(received,)] = pipeline.query(
            "SELECT coalesce(sum(received), 0) FROM kappa.batch_ledger WHERE asset = 'dim_customer'"
        )
        return received == 41

    wait_for(all_applied, timeout=120, what="the 41 changes to be taken by dim_customer batches")

    rows = pipeline.query(
        "SELECT customer_id, credit_limit, is_current FROM edw.dim_customer ORDER BY 1, 2"
    )
    expected = [(f"c-{i:02d}", Decimal("100.00"), i != 20) for i in range(40) if i != 17]
    expected.insert(20, ("c-20", Decimal("250.00"), True))
    assert rows == expected
    [(position, value, reason)] = pipeline.query(
        "SELECT position, raw_value, reason FROM kappa.dead_letter WHERE asset = 'dim_customer'"
    )
    assert position == refused_id
    assert orjson.loads(value)["after"] is not None and "blocked" in value.decode()
    assert 'violates check constraint "dim_customer_no_blocked"' in reason, reason
    assert pipeline.query(
        "SELECT sum(received), sum(loaded), sum(dead_lettered) FROM kappa.batch_ledger "
        "WHERE asset = 'dim_customer'"
    ) == [(41, 40, 1)]
    probes = [
        m.metadata["poison_probes"].value
        for r in results
        for m in r.asset_materializations_for_node("dim_customer")
        if "poison_probes" in m.metadata
    ]
    assert probes and 0 < sum(probes) <= 2 * math.ceil(math.log2(41))

    # Reprocessing the capture's partitions isolates the same change: same rows, same letters.
    letters = pipeline.query(
        "SELECT position, reason FROM kappa.dead_letter WHERE asset = 'dim_customer'"
    )
    replayed = []
    for (window,) in pipeline.query(
        "SELECT DISTINCT partition_key FROM kappa.batch_ledger WHERE asset = 'dim_customer'"
    ):
        result = reprocess(pipeline, "dim_customer", window)
        metadata = result.asset_materializations_for_node("dim_customer")[0].metadata
        assert metadata["mode"].value == "reprocess"
        replayed.append((metadata["rows_dead_lettered"].value, metadata["poison_probes"].value))
    assert sum(d for d, _ in replayed) == 1 and sum(p for _, p in replayed) > 0, replayed
    assert (
        pipeline.query(
            "SELECT customer_id, credit_limit, is_current FROM edw.dim_customer ORDER BY 1, 2"
        )
        == expected
    )
    assert (
        pipeline.query(
            "SELECT position, reason FROM kappa.dead_letter WHERE asset = 'dim_customer'"
        )
        == letters
    )


def probe_table(conn: psycopg.Connection) -> None:
    conn.execute("DROP TABLE IF EXISTS probe_target")
    conn.execute("CREATE TABLE probe_target (n integer PRIMARY KEY CHECK (n >= 0))")


def insert_range(conn: psycopg.Connection, values: list[int]):  # type: ignore[no-untyped-def]
    def write(lo: int, hi: int) -> None:
        with conn.cursor().copy("COPY probe_target (n) FROM STDIN") as copy:
            for n in values[lo:hi]:
                copy.write_row((n,))

    return write


def test_bisection_finds_each_refused_record_in_logarithmic_probes(database_url: str):
    values = list(range(4096))
    values[1000] = -1
    values[3000] = 5  # a duplicate of an earlier key: refused when written after it
    with psycopg.connect(database_url, autocommit=True) as conn:
        probe_table(conn)
        write = insert_range(conn, values)
        with conn.transaction():
            with pytest.raises(psycopg.errors.CheckViolation) as failed, conn.transaction():
                write(0, len(values))
            found = bisect_refused(conn, len(values), write, failed.value)
            [(left,)] = conn.execute("SELECT count(*) FROM probe_target").fetchall()
        assert sorted(found.refused) == [1000, 3000]
        assert 'violates check constraint "probe_target_n_check"' in found.refused[1000]
        assert "[23505]" in found.refused[3000] and "duplicate key" in found.refused[3000]
        assert found.probes <= 2 * 2 * 12, "two probes per halving, per refused record"
        assert left == 0, "the probes were rolled back"


@pytest.mark.parametrize(
    ("size", "refused"),
    [(4000, range(0, 4000, 50)), (20, range(20))],
    ids=["more than 1 % and 16 of the batch", "every record of a small batch"],
)
def test_a_table_that_refuses_most_records_fails_the_batch_instead_of_dead_lettering_it(
    database_url: str, size: int, refused: range
):
    values = list(range(size))
    for i in refused:
        values[i] = -1 - i
    with psycopg.connect(database_url, autocommit=True) as conn:
        probe_table(conn)
        write = insert_range(conn, values)
        with conn.transaction():
            with pytest.raises(psycopg.errors.CheckViolation) as failed, conn.transaction():
                write(0, size)
            with pytest.raises(MassRefusalError, match="probe_target_n_check") as raised:
                bisect_refused(conn, size, write, failed.value)
            [(left,)] = conn.execute("SELECT count(*) FROM probe_target").fetchall()
    assert raised.value.size == size and left == 0


def test_a_failure_no_single_record_causes_fails_with_the_original_error(database_url: str):
    with psycopg.connect(database_url, autocommit=True) as conn:
        probe_table(conn)
        # Refuses a statement that writes more than 100 rows: only the rows together fail.
        conn.execute(
            """
CREATE OR REPLACE FUNCTION probe_target_limit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF (SELECT count(*) FROM written) > 100 THEN
    RAISE EXCEPTION 'too many rows at once' USING ERRCODE = '23514';
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER probe_target_limit AFTER INSERT ON probe_target
  REFERENCING NEW TABLE AS written FOR EACH STATEMENT EXECUTE FUNCTION probe_target_limit();
"""
        )
        write = insert_range(conn, list(range(1000)))
        with conn.transaction():
            with pytest.raises(psycopg.errors.CheckViolation) as failed, conn.transaction():
                write(0, 1000)
            with pytest.raises(psycopg.errors.CheckViolation) as raised:
                bisect_refused(conn, 1000, write, failed.value)
        assert raised.value is failed.value


def test_a_lost_connection_is_not_isolated_but_fails(database_url: str):
    with psycopg.connect(database_url, autocommit=True) as conn:
        probe_table(conn)
        with psycopg.connect(database_url, autocommit=True) as killer:

            def write(lo: int, hi: int) -> None:
                pid = conn.info.backend_pid
                killer.execute("SELECT pg_terminate_backend(%s)", (pid,))
                conn.execute("SELECT 1")

            with pytest.raises(psycopg.OperationalError) as raised, conn.transaction():
                bisect_refused(conn, 10, write, psycopg.errors.CheckViolation("refused"))
            assert not is_data_error(raised.value)


def payment_bytes(event_id: str, amount: str, at: datetime) -> bytes:
    body = {
        "event_id": event_id,
        "event_type": "payment_attempted",
        "event_time": (at - timedelta(seconds=1)).isoformat(),
        "source": "test",
        "schema_version": 1,
        "payload": {
            "payment_id": f"p-{event_id[:8]}",
            "order_id": "o-1",
            "customer_id": "c-1",
            "card_id": "card-1",
            "amount": "AMOUNT",
            "currency": "EUR",
            "merchant_country": "DE",
            "status": "approved",
        },
    }
    return orjson.dumps(body).replace(b'"AMOUNT"', amount.encode())


def test_a_refused_payment_counts_in_no_fraud_state_and_raises_no_alert(pipeline: Pipeline):
    ids = [str(uuid.uuid4()) for _ in range(5)]
    at = [HOUR + timedelta(minutes=10, seconds=i) for i in range(5)]
    producer = KafkaProducer(bootstrap_servers=pipeline.env["KAFKA_BOOTSTRAP_SERVERS"], acks="all")
    try:
        for i in range(5):
            amount = POISON_AMOUNT if i == 1 else "20.00"
            producer.send(
                pipeline.settings.stream("fact_payment").topic,
                key=b"c-1",
                value=payment_bytes(ids[i], amount, at[i]),
                partition=0,
                timestamp_ms=int(at[i].timestamp() * 1000),
            )
        producer.flush()
    finally:
        producer.close()
    with psycopg.connect(pipeline.edw_url, autocommit=True) as conn:
        conn.execute(
            f"ALTER TABLE edw.fact_payment ADD CONSTRAINT fact_payment_no_666 "
            f"CHECK (amount <> {POISON_AMOUNT})"
        )

    pipeline.drain("fact_payment")

    loaded = pipeline.query("SELECT event_id::text FROM edw.fact_payment ORDER BY kafka_offset")
    assert [r[0] for r in loaded] == [ids[0], *ids[2:]]
    [(position, reason)] = pipeline.query(
        "SELECT position, reason FROM kappa.dead_letter WHERE asset = 'fact_payment'"
    )
    assert position == 1 and 'violates check constraint "fact_payment_no_666"' in reason
    # Four payments of the card, not five: only the fourth passes the velocity limit of 3,
    # and it saw 4 payments in the window.
    alerts = pipeline.query("SELECT event_id::text, rule, evidence FROM edw.fraud_alert")
    assert [(e, r, ev["payments_in_window"]) for e, r, ev in alerts] == [(ids[4], "velocity", 4)]
    [(state,)] = pipeline.query(
        "SELECT value FROM kappa.state WHERE store = 'fact_payment/card_velocity' "
        "AND key = 'card-1' ORDER BY position DESC LIMIT 1"
    )
    assert len(state["times"]) == 4
