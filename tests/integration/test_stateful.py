"""Stateful transforms end to end: CDC feeds dim_customer, events are enriched and scored.

Every expectation here is written out by hand from the inputs the test chose.
"""

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import orjson
import psycopg
import pytest

from examples.shop.simulator import SimulatedMessage
from tests.integration.harness import Pipeline, kill_mid_batch

pytestmark = pytest.mark.integration


def event(topic: str, event_type: str, customer: str, at: datetime, **payload) -> SimulatedMessage:
    event_id = str(uuid.uuid4())
    body = {
        "event_id": event_id,
        "event_type": event_type,
        "event_time": at.isoformat(),
        "source": "test",
        "schema_version": 1,
        "payload": {"customer_id": customer, **payload},
    }
    return SimulatedMessage(topic, customer.encode(), orjson.dumps(body), event_id, "valid", None)


def order(pipeline: Pipeline, customer: str, amount: float, at: datetime) -> SimulatedMessage:
    return event(
        pipeline.settings.stream("fact_order").topic,
        "order_placed",
        customer,
        at,
        order_id=f"o-{uuid.uuid4().hex[:8]}",
        amount=amount,
        currency="EUR",
        item_count=1,
        channel="web",
    )


def payment(
    pipeline: Pipeline, customer: str, amount: float, at: datetime, *, card: str, country: str
) -> SimulatedMessage:
    return event(
        pipeline.settings.stream("fact_payment").topic,
        "payment_attempted",
        customer,
        at,
        payment_id=f"p-{uuid.uuid4().hex[:8]}",
        order_id="o-1",
        card_id=card,
        amount=amount,
        currency="EUR",
        merchant_country=country,
        status="approved",
    )


def oltp(pipeline: Pipeline, statement: str, params: tuple = ()) -> None:
    with psycopg.connect(pipeline.env["KAPPA_OLTP_URL"], autocommit=True) as conn:
        conn.execute(statement, params)


def sk_of(pipeline: Pipeline, customer: str, segment: str) -> int:
    [(sk,)] = pipeline.query(
        "SELECT customer_sk FROM edw.dim_customer WHERE customer_id = %s AND segment = %s",
        (customer, segment),
    )
    return sk


def test_orders_join_the_customer_version_valid_at_their_event_time(pipeline: Pipeline):
    oltp(
        pipeline,
        "INSERT INTO customers (customer_id, name, segment, country, credit_limit) VALUES ('c-1', 'Ada', 'retail', 'DE', 100)",
    )
    [(before_change,)] = pipeline.query("SELECT clock_timestamp()")
    oltp(pipeline, "UPDATE customers SET segment = 'enterprise' WHERE customer_id = 'c-1'")
    [(after_change,)] = pipeline.query("SELECT clock_timestamp()")
    pipeline.drain("dim_customer")

    pipeline.produce(
        [
            order(pipeline, "c-1", 10.00, before_change - timedelta(milliseconds=1)),
            order(pipeline, "c-1", 20.00, after_change + timedelta(milliseconds=1)),
            order(
                pipeline, "c-1", 30.00, before_change - timedelta(hours=5)
            ),  # before the customer existed
            order(pipeline, "c-404", 5.00, after_change),  # no such customer
        ]
    )
    pipeline.drain("fact_order")
    rows = pipeline.query(
        "SELECT customer_id, amount, customer_sk, customer_segment, customer_country, enrichment, "
        "customer_orders_before, customer_avg_amount_before, customer_stddev_amount_before "
        "FROM edw.fact_order ORDER BY customer_id, kafka_offset"
    )
    retail, enterprise = sk_of(pipeline, "c-1", "retail"), sk_of(pipeline, "c-1", "enterprise")
    assert rows == [
        ("c-1", Decimal("10.00"), retail, "retail", "DE", "as_of", 0, None, None),
        (
            "c-1",
            Decimal("20.00"),
            enterprise,
            "enterprise",
            "DE",
            "as_of",
            1,
            Decimal("10.00"),
            None,
        ),
        # (10 + 20) / 2 = 15.00; sample deviation of 10 and 20 = sqrt(50) = 7.0711
        (
            "c-1",
            Decimal("30.00"),
            None,
            None,
            None,
            "unknown_customer",
            2,
            Decimal("15.00"),
            7.0711,
        ),
        ("c-404", Decimal("5.00"), None, None, None, "unknown_customer", 0, None, None),
    ]


def test_an_event_beyond_what_cdc_has_loaded_waits_then_is_marked_provisional(
    pipeline_env, instance, monkeypatch
):
    monkeypatch.setenv("KAPPA_ENRICH_MAX_WAIT_S", "1")
    pipeline = Pipeline(env={**pipeline_env, "KAPPA_ENRICH_MAX_WAIT_S": "1"}, instance=instance)
    oltp(
        pipeline,
        "INSERT INTO customers (customer_id, name, segment, country, credit_limit) VALUES ('c-1', 'Ada', 'retail', 'DE', 100)",
    )
    pipeline.drain("dim_customer")
    idle = psycopg.connect(pipeline.env["KAPPA_OLTP_URL"], autocommit=False)
    try:
        # An open writer holds change capture back: nothing after its start is known yet.
        idle.execute("UPDATE customers SET segment = 'smb' WHERE customer_id = 'c-1'")
        pipeline.produce([order(pipeline, "c-1", 10.00, datetime.now(UTC))])
        pipeline.drain("fact_order")
    finally:
        idle.rollback()
        idle.close()
    assert pipeline.query("SELECT customer_segment, enrichment FROM edw.fact_order") == [
        ("retail", "provisional")
    ]


def test_changes_of_other_customers_waiting_for_capture_do_not_hold_a_batch_back(
    pipeline_env, instance, monkeypatch
):
    """Completeness is asked for the batch's customers: a committed change of c-2 not loaded
    yet leaves c-1's order final (as of its event time) and c-2's provisional."""
    monkeypatch.setenv("KAPPA_ENRICH_MAX_WAIT_S", "1")
    pipeline = Pipeline(env={**pipeline_env, "KAPPA_ENRICH_MAX_WAIT_S": "1"}, instance=instance)
    oltp(
        pipeline,
        "INSERT INTO customers (customer_id, name, segment, country, credit_limit) VALUES "
        "('c-1', 'Ada', 'retail', 'DE', 100), ('c-2', 'Bob', 'retail', 'FR', 100)",
    )
    pipeline.drain("dim_customer")
    oltp(pipeline, "UPDATE customers SET segment = 'smb' WHERE customer_id = 'c-2'")  # not loaded
    now = datetime.now(UTC)
    pipeline.produce([order(pipeline, "c-1", 10.00, now), order(pipeline, "c-2", 20.00, now)])
    pipeline.drain("fact_order")
    rows = pipeline.query(
        "SELECT customer_id, customer_segment, enrichment, kafka_partition FROM edw.fact_order "
        "ORDER BY 1"
    )
    assert rows[0][3] != rows[1][3], "premise: the two customers' orders are in two batches"
    assert [r[:3] for r in rows] == [("c-1", "retail", "as_of"), ("c-2", "retail", "provisional")]


def test_fraud_rules_each_raise_their_alert(pipeline: Pipeline):
    oltp(
        pipeline,
        "INSERT INTO customers (customer_id, name, segment, country, credit_limit) VALUES "
        "('c-1', 'Ada', 'retail', 'DE', 100), ('c-2', 'Bob', 'retail', 'DE', 100), ('c-3', 'Cy', 'retail', 'FR', 100)",
    )
    now = datetime.now(UTC).replace(microsecond=0)
    oltp(
        pipeline,
        "INSERT INTO call_center_calls VALUES ('k-1', 'c-2', 'card_lost', 'negative', 60, %s)",
        (now - timedelta(hours=2),),
    )
    pipeline.drain("dim_customer")
    pipeline.drain("fact_call_center_call")
    # Every payment after the customers exist (the version valid at its event time), within seconds.
    [(t,)] = pipeline.query("SELECT clock_timestamp()")
    messages = [
        # velocity: card-v used 5 times within 4 seconds (limit 3 per 10 min) -> 4th and 5th alert
        *[
            payment(pipeline, "c-1", 10.00, t + timedelta(seconds=s), card="card-v", country="DE")
            for s in range(5)
        ],
        # amount anomaly: six payments of 10 or 12 (one card each), then 500 (z far above 3)
        *[
            payment(
                pipeline,
                "c-3",
                10.00 + 2 * (s % 2),
                t + timedelta(seconds=s),
                card=f"card-a{s}",
                country="FR",
            )
            for s in range(6)
        ],
        payment(pipeline, "c-3", 500.00, t + timedelta(seconds=6), card="card-a", country="FR"),
        # geo mismatch: c-1 lives in DE, pays in NL (0.5); c-2 too, but called 2 h before (0.9)
        payment(pipeline, "c-1", 15.00, t + timedelta(seconds=7), card="card-g", country="NL"),
        payment(pipeline, "c-2", 15.00, t + timedelta(seconds=7), card="card-h", country="NL"),
    ]
    pipeline.produce(messages)
    pipeline.drain("fact_payment")

    alerts = pipeline.query(
        "SELECT a.rule, a.score, p.customer_id, p.card_id, p.amount, a.evidence FROM edw.fraud_alert a "
        "JOIN edw.fact_payment p USING (event_id) ORDER BY a.rule, p.customer_id, p.event_time"
    )
    summary = [
        (rule, score, customer, card, amount) for rule, score, customer, card, amount, _ in alerts
    ]
    # z of 500 against mean 11.00, deviation 1.0954 (10,12,10,12,10,12): 446.4 -> score capped at 1
    assert summary == [
        ("amount_anomaly", Decimal("1.000"), "c-3", "card-a", Decimal("500.00")),
        ("geo_mismatch", Decimal("0.500"), "c-1", "card-g", Decimal("15.00")),
        ("geo_mismatch", Decimal("0.900"), "c-2", "card-h", Decimal("15.00")),
        ("velocity", Decimal("0.667"), "c-1", "card-v", Decimal("10.00")),  # 4 in window / (2 * 3)
        ("velocity", Decimal("0.833"), "c-1", "card-v", Decimal("10.00")),  # 5 in window / (2 * 3)
    ]
    evidence = {(rule, customer): ev for rule, _, customer, _, _, ev in alerts}
    assert evidence[("geo_mismatch", "c-2")]["call_id"] == "k-1"
    assert evidence[("geo_mismatch", "c-2")]["customer_country"] == "DE"
    assert evidence[("amount_anomaly", "c-3")]["payments_before"] == 6
    assert evidence[("amount_anomaly", "c-3")]["mean_before"] == 11.0
    [(top,)] = pipeline.query(
        "SELECT max(fraud_score) FROM edw.fact_payment WHERE card_id = 'card-h'"
    )
    assert top == Decimal("0.900")


def state_snapshot(pipeline: Pipeline, edw: str, meta: str) -> dict[str, list[tuple]]:
    return {
        "fact_payment": pipeline.query(f"SELECT * FROM {edw}.fact_payment ORDER BY event_id"),
        "fraud_alert": pipeline.query(f"SELECT * FROM {edw}.fraud_alert ORDER BY event_id, rule"),
        "state": pipeline.query(
            f"SELECT store, shard, key, value FROM {meta}.state s WHERE position = "
            f"(SELECT max(position) FROM {meta}.state t WHERE (t.store, t.shard, t.key) = (s.store, s.shard, s.key)) "
            "ORDER BY 1, 2, 3"
        ),
        "ledger": pipeline.query(
            f"SELECT shard, end_position FROM {meta}.ledger_head WHERE asset = 'fact_payment' ORDER BY 1"
        ),
    }


def test_a_stateful_batch_killed_then_retried_equals_a_clean_pass(
    pipeline: Pipeline, pipeline_env, instance
):
    oltp(
        pipeline,
        "INSERT INTO customers (customer_id, name, segment, country, credit_limit) "
        "SELECT 'c-' || lpad(i::text, 5, '0'), 'n', 'retail', 'DE', 100 FROM generate_series(0, 39) i",
    )
    pipeline.drain("dim_customer")
    pipeline.simulate(1200, invalid_rate=0.0)
    [request] = pipeline.tick("fact_payment").run_requests

    # Hold the state table: the run stops inside its transaction after writing facts and alerts.
    kill_mid_batch(pipeline, request, lock_table="kappa.state", blocked_query="COPY%state%")
    assert pipeline.query("SELECT count(*) FROM edw.fact_payment") == [(0,)]
    assert pipeline.query("SELECT count(*) FROM edw.fraud_alert") == [(0,)]
    assert pipeline.query("SELECT count(*) FROM kappa.state") == [(0,)]

    pipeline.drain("fact_payment")
    clean = Pipeline(
        env={**pipeline_env, "KAPPA_EDW_SCHEMA": "edw_clean", "KAPPA_META_SCHEMA": "kappa_clean"},
        instance=instance,
    )
    clean.drain("dim_customer")
    clean.drain("fact_payment")
    recovered = state_snapshot(pipeline, "edw", "kappa")
    assert recovered["fact_payment"] and recovered["state"]
    assert recovered == state_snapshot(clean, "edw_clean", "kappa_clean")
