"""The shop demo's settings: environment variables validated once, when they are loaded.

They use the engine's setting helpers, so a bad value fails here with the same
:class:`~kappa.exceptions.ConfigurationError` as an engine setting, starting with the
variable's name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from kappa.exceptions import ConfigurationError
from kappa.settings import Setting, number, setting_value, whole_number

SHOP_SETTINGS: tuple[Setting, ...] = (
    Setting(
        "KAPPA_TOPIC_ORDERS",
        "orders",
        "Topic of `order_placed` events (the `topic_env` of stream fact_order in catalog.yaml).",
    ),
    Setting(
        "KAPPA_TOPIC_PAYMENTS",
        "payments",
        "Topic of `payment_attempted` events (the `topic_env` of stream fact_payment).",
    ),
    Setting("KAPPA_SIM_RATE", "50", "Simulated events per second (orders and payments together)."),
    Setting(
        "KAPPA_SIM_SEED",
        "42",
        "Seed of the event simulator (same seed and start time, same events).",
    ),
    Setting("KAPPA_SIM_CUSTOMERS", "500", "Number of simulated customers."),
    Setting("KAPPA_SIM_DUPLICATE_RATE", "0.02", "Share of simulated events sent twice."),
    Setting(
        "KAPPA_SIM_LATE_RATE", "0.05", "Share of simulated events with an out-of-order event time."
    ),
    Setting("KAPPA_SIM_INVALID_RATE", "0.005", "Share of simulated messages that are malformed."),
    Setting(
        "KAPPA_OLTP_RATE",
        "5",
        "Simulated OLTP transactions per second (customers, and calls when they are captured "
        "from PostgreSQL).",
    ),
    Setting("KAPPA_OLTP_WRITERS", "3", "Concurrent writers of the OLTP simulator."),
    Setting(
        "KAPPA_CALLS_RATE",
        "2",
        "Simulated call-centre transactions per second (1-3 calls each), written to MariaDB "
        "by `examples.shop.calls` when the catalogue captures the calls from there.",
    ),
)

_BY_NAME = {s.name: s for s in SHOP_SETTINGS}


def _int(env: Mapping[str, str], name: str, *, minimum: int, maximum: int) -> int:
    raw = setting_value(env, _BY_NAME[name])
    return whole_number(name, raw, minimum=minimum, maximum=maximum)


def _float(env: Mapping[str, str], name: str, *, minimum: float, maximum: float) -> float:
    raw = setting_value(env, _BY_NAME[name])
    return number(name, raw, minimum=minimum, maximum=maximum)


@dataclass(frozen=True)
class ShopSettings:
    """The validated settings of the shop's two simulators (the topics are the catalogue's)."""

    sim_rate: float
    sim_seed: int
    sim_customers: int
    sim_duplicate_rate: float
    sim_late_rate: float
    sim_invalid_rate: float
    oltp_rate: float
    oltp_writers: int
    calls_rate: float

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ShopSettings:
        env = os.environ if env is None else env
        customers = _int(env, "KAPPA_SIM_CUSTOMERS", minimum=1, maximum=10_000_000)
        writers = _int(env, "KAPPA_OLTP_WRITERS", minimum=1, maximum=64)
        if writers > customers:
            # Each writer inserts its own share of the customer ids (examples.shop.oltp).
            raise ConfigurationError(
                "KAPPA_OLTP_WRITERS",
                f"{writers} writers need at least as many customers "
                f"(KAPPA_SIM_CUSTOMERS is {customers}): each writer inserts "
                "its own share of the customer ids",
            )
        return cls(
            sim_rate=_float(env, "KAPPA_SIM_RATE", minimum=0.0, maximum=1_000_000),
            sim_seed=_int(env, "KAPPA_SIM_SEED", minimum=0, maximum=2**63 - 1),
            sim_customers=customers,
            sim_duplicate_rate=_float(env, "KAPPA_SIM_DUPLICATE_RATE", minimum=0.0, maximum=1.0),
            sim_late_rate=_float(env, "KAPPA_SIM_LATE_RATE", minimum=0.0, maximum=1.0),
            sim_invalid_rate=_float(env, "KAPPA_SIM_INVALID_RATE", minimum=0.0, maximum=1.0),
            oltp_rate=_float(env, "KAPPA_OLTP_RATE", minimum=0.0, maximum=100_000),
            oltp_writers=writers,
            calls_rate=_float(env, "KAPPA_CALLS_RATE", minimum=0.0, maximum=100_000),
        )
