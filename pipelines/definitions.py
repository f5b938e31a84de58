"""The shop's code location: the catalogue's definitions from kappa's Dagster integration
(its steps and their side tables come from catalog.yaml), merged with the shop's mart.

Settings come from the environment and are validated here, at load time: a bad value fails
the code location with a message naming the variable.
"""

from __future__ import annotations

import dagster as dg

from assets.marts import build_customer_daily
from kappa.dagster.definitions import build_definitions as build_catalogue_definitions
from kappa.settings import Settings
from sensors.marts import build_mart_sensor

#: The facts the shop's mart summarises (its SQL reads these tables).
SHOP_FACTS = ["fact_order", "fact_payment"]

#: Marts are rebuilt per event date: at most every this many seconds, not with every batch.
MART_INTERVAL_S = 30


def build_definitions(settings: Settings) -> dg.Definitions:
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
    return dg.Definitions.merge(build_catalogue_definitions(settings), marts)


defs = build_definitions(Settings.from_env())
