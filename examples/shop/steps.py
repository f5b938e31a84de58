"""The shop's stateful steps, built only on :mod:`kappa.steps`.

``OrderEnrichment``: the customer as of the order's time and the customer's order count,
mean and deviation before it. ``PaymentFraud``: the customer as of the payment's time and
the fraud rules (:mod:`examples.shop.fraud`), alerts in the ``fraud_alert`` side table.
"""

from __future__ import annotations

from typing import ClassVar

import pandas as pd

from examples.shop.fraud import ALERT_COLUMNS, FraudRules, fraud_alerts, velocity
from kappa.steps import (
    STATUS,
    AsOf,
    Lookup,
    Range,
    SideTable,
    StepConfig,
    StepContext,
    StepOutput,
    enrich_as_of,
    running_stats,
    to_cents,
)

#: The customer version valid at each event's time (``dim_customer`` is captured as SCD2).
CUSTOMER = AsOf(
    target="dim_customer",
    key="customer_id",
    columns=("segment", "country"),
    unknown="unknown_customer",
)
#: The customer's call-centre calls (``fact_call_center_call``, captured as current rows).
CALLS = Range(
    target="fact_call_center_call",
    key="customer_id",
    time="called_at",
    columns=("call_id", "reason"),
)
CALL_COLUMNS = ["customer_id", "call_id", "reason", "called_at"]
#: The as-of lookup's columns as the facts name them.
CUSTOMER_NAMES = {"segment": "customer_segment", "country": "customer_country"}

FRAUD_ALERT = SideTable(
    "fraud_alert",
    (
        ("rule", "text"),
        ("score", "numeric(4, 3)"),
        ("evidence", "jsonb"),
        ("customer_id", "text"),
        ("event_time", "timestamptz"),
    ),
    key=("rule",),
    description=(
        "Fraud alerts on payments (rule, score, evidence): velocity per card, amount anomaly "
        "against the customer's running statistics, merchant country differing from the "
        "customer's as of the event time (scored higher after a recent call-centre call). "
        "Written by `fact_payment` in the same transactions."
    ),
)
assert [c for c, _ in FRAUD_ALERT.columns] == ALERT_COLUMNS[1:], "the rules' frame is the table"


def customer_as_of(
    events: pd.DataFrame, versions: pd.DataFrame, watermark: pd.Timestamp | pd.Series | None
) -> pd.DataFrame:
    """The customer version valid at each event's time, with the facts' column names."""
    return enrich_as_of(
        events,
        versions,
        watermark,
        key=CUSTOMER.key,
        surrogate="customer_sk",
        columns=CUSTOMER.columns,
        unknown=CUSTOMER.unknown,
    ).rename(columns=CUSTOMER_NAMES)


class OrderEnrichment:
    """Orders: the customer as of the event time, and the customer's order statistics before it."""

    store = "order_stats"
    side_tables: ClassVar[tuple[SideTable, ...]] = ()
    lookups: ClassVar[tuple[Lookup, ...]] = (CUSTOMER,)
    #: Columns the step adds to the fact (nullable), after the decoded ones.
    derived_columns: ClassVar[tuple[tuple[str, str], ...]] = (
        ("customer_sk", "bigint"),
        ("customer_segment", "text"),
        ("customer_country", "text"),
        (STATUS, "text"),
        ("customer_orders_before", "integer"),
        ("customer_avg_amount_before", "numeric(14, 2)"),
        ("customer_stddev_amount_before", "double precision"),
    )

    def apply(self, context: StepContext, rows: pd.DataFrame) -> StepOutput:
        customers = rows["customer_id"].astype(object).tolist()
        enriched = context.as_of(CUSTOMER.target, rows).rename(columns=CUSTOMER_NAMES)
        prior = context.get_many(self.store, customers)
        stats = running_stats(rows["customer_id"], to_cents(rows["amount"]), prior)
        out = rows.reset_index(drop=True).assign(
            customer_sk=enriched["customer_sk"],
            customer_segment=enriched["customer_segment"],
            customer_country=enriched["customer_country"],
            enrichment=enriched[STATUS],
            customer_orders_before=stats.count_before,
            customer_avg_amount_before=stats.mean_cents_before,
            customer_stddev_amount_before=pd.Series(stats.stddev_before).round(4),
        )
        return StepOutput(rows=out, state={self.store: stats.after})


class PaymentFraud:
    """Payments: the customer as of the event time, and the fraud rules."""

    side_tables: ClassVar[tuple[SideTable, ...]] = (FRAUD_ALERT,)
    lookups: ClassVar[tuple[Lookup, ...]] = (CUSTOMER, CALLS)
    #: Columns the step adds to the fact (nullable), after the decoded ones.
    derived_columns: ClassVar[tuple[tuple[str, str], ...]] = (
        ("customer_sk", "bigint"),
        ("customer_country", "text"),
        (STATUS, "text"),
        ("fraud_score", "numeric(4, 3)"),
    )

    def __init__(self, rules: FraudRules) -> None:
        self.rules = rules

    @classmethod
    def from_catalog(cls, config: StepConfig) -> PaymentFraud:
        """The step of a catalogue stream: the rules' thresholds from its ``config:``."""
        return cls(FraudRules.from_catalog(config))

    def apply(self, context: StepContext, rows: pd.DataFrame) -> StepOutput:
        rows = rows.reset_index(drop=True)
        customers = rows["customer_id"].astype(object).tolist()
        enriched = context.as_of(CUSTOMER.target, rows).rename(columns=CUSTOMER_NAMES)
        stats_prior = context.get_many("payment_stats", customers)
        stats = running_stats(rows["customer_id"], to_cents(rows["amount"]), stats_prior)
        cards_prior = context.get_many("card_velocity", rows["card_id"].astype(object).tolist())
        counts, cards = velocity(rows, cards_prior, self.rules)
        calls = pd.DataFrame(columns=CALL_COLUMNS)
        if not rows.empty:
            calls = context.range(
                CALLS.target,
                rows,
                rows["event_time"].min() - pd.Timedelta(self.rules.geo_call_window),
                rows["event_time"].max(),
            )
        alerts = fraud_alerts(
            rows,
            enriched=enriched,
            stats=stats,
            velocity_counts=counts,
            calls=calls,
            rules=self.rules,
        )
        top = (
            alerts.groupby("event_id")["score"].max()
            if not alerts.empty
            else pd.Series(dtype=float)
        )
        out = rows.assign(
            customer_sk=enriched["customer_sk"],
            customer_country=enriched["customer_country"],
            enrichment=enriched[STATUS],
            fraud_score=rows["event_id"].map(top).astype(float),
        )
        return StepOutput(
            rows=out,
            state={"payment_stats": stats.after, "card_velocity": cards},
            side_tables={FRAUD_ALERT.name: alerts},
        )
