"""What this deployment loads: the topics and their stateful steps (no Dagster here, so the
code location and the CLI share one catalogue)."""

from __future__ import annotations

from datetime import timedelta

from kappa.contracts import ORDER_PLACED, PAYMENT_ATTEMPTED
from kappa.ingest import TopicIngest
from kappa.settings import Settings
from kappa.stateful import OrderEnrichment, PaymentFraud
from kappa.transforms import FraudRules


def topic_ingests(settings: Settings) -> list[tuple[TopicIngest, str]]:
    """The topics this deployment loads, each with the setting that names it."""
    return [
        (
            TopicIngest(
                asset="fact_order",
                topic=settings.topic_orders,
                contract=ORDER_PLACED,
                description=(
                    "Orders placed (`order_placed` events), one row per distinct event_id, with the "
                    "customer as of the event time (`dim_customer` version) and the customer's order "
                    "count, mean and deviation before the order."
                ),
                step=OrderEnrichment(),
            ),
            "KAPPA_TOPIC_ORDERS",
        ),
        (
            TopicIngest(
                asset="fact_payment",
                topic=settings.topic_payments,
                contract=PAYMENT_ATTEMPTED,
                description=(
                    "Payment attempts (`payment_attempted` events), one row per distinct event_id, "
                    "with the customer as of the event time and the highest fraud score."
                ),
                step=PaymentFraud(fraud_rules(settings)),
            ),
            "KAPPA_TOPIC_PAYMENTS",
        ),
    ]


def fraud_rules(settings: Settings) -> FraudRules:
    return FraudRules(
        velocity_max_payments=settings.fraud_velocity_max,
        velocity_window=timedelta(seconds=settings.fraud_velocity_window_s),
        amount_z=settings.fraud_amount_z,
        geo_call_window=timedelta(hours=settings.fraud_call_window_h),
    )
