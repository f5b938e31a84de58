"""The shop's code location: the catalogue's definitions from kappa's Dagster integration, and
the shop's own marts.

Settings come from the environment and are validated here, at load time: a bad value fails
the code location with a message naming the variable.
"""

from __future__ import annotations

import dagster as dg

from assets.marts import build_customer_daily
from kappa.catalog.captures import load_captures
from kappa.dagster.definitions import build_definitions as build_catalogue_definitions
from kappa.run import FactServices
from kappa.settings import Settings
from sensors.marts import build_mart_sensor

FRAUD_ALERT = dg.AssetSpec(
    key="fraud_alert",
    deps=["fact_payment"],
    group_name="edw",
    kinds={"postgres"},
    owners=["team:data-platform"],
    description=(
        "Fraud alerts on payments (rule, score, evidence): velocity per card, amount anomaly "
        "against the customer's running statistics, merchant country differing from the "
        "customer's as of the event time (scored higher after a recent call-centre call). "
        "Written by `fact_payment` in the same transactions."
    ),
)


#: The facts the shop's mart summarises (its SQL reads these tables).
SHOP_FACTS = ["fact_order", "fact_payment"]

#: Marts are rebuilt per event date: at most every this many seconds, not with every batch.
MART_INTERVAL_S = 30


def build_definitions(settings: Settings) -> dg.Definitions:
    by_target = {c.target: c for c in load_captures(settings.catalog)}
    catalogue = build_catalogue_definitions(
        settings,
        services=FactServices(
            customers=by_target.get("dim_customer"),
            calls=by_target.get("fact_call_center_call"),
            max_wait_s=settings.enrich_max_wait_s,
            reprocess_wait_s=settings.backfill_max_wait_s,
        ),
        side_assets={"fraud_alert": FRAUD_ALERT},
    )
    marts = dg.Definitions(
        assets=[build_customer_daily(settings.windows, SHOP_FACTS)],
        sensors=[
            build_mart_sensor(
                "mart_customer_daily",
                SHOP_FACTS,
                windows=settings.windows,
                interval_s=max(settings.sensor_interval_s, MART_INTERVAL_S),
            )
        ],
    )
    return dg.Definitions.merge(catalogue, marts)


defs = build_definitions(Settings.from_env())
