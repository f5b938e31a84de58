"""What this deployment loads: the catalogue's streams, each with its stateful step (no
Dagster here, so the code location and the CLI share one catalogue)."""

from __future__ import annotations

from datetime import timedelta

from kappa.catalog.files import SETTING
from kappa.catalog.streams import EventContract, resolve_step
from kappa.exceptions import ConfigurationError
from kappa.ingest import TopicIngest
from kappa.settings import Settings
from kappa.stateful import StatefulStep
from kappa.transforms import FraudRules


def build_step(settings: Settings, contract: EventContract) -> StatefulStep | None:
    """The stream's step: ``Class.from_catalog(settings, config)`` where the class defines
    it (a step that needs settings), else ``Class(**config)``."""
    if contract.step is None:
        return None
    try:
        step_class = resolve_step(contract.step)
    except ValueError as exc:
        raise ConfigurationError(
            SETTING, f"{contract.catalog}: stream {contract.name}, field step: {exc}"
        ) from None
    config = dict(contract.step_config)
    factory = getattr(step_class, "from_catalog", None)
    step: StatefulStep = factory(settings, config) if factory is not None else step_class(**config)
    return step


def topic_ingests(settings: Settings) -> list[tuple[TopicIngest, str]]:
    """The topics this deployment loads, each with the setting that names it (the stream's
    ``topic_env``, else the catalogue)."""
    return [
        (
            TopicIngest(
                asset=contract.name,
                topic=contract.topic,
                contract=contract,
                description=contract.description,
                step=build_step(settings, contract),
            ),
            contract.topic_env or SETTING,
        )
        for contract in settings.streams
    ]


def fraud_rules(settings: Settings) -> FraudRules:
    return FraudRules(
        velocity_max_payments=settings.fraud_velocity_max,
        velocity_window=timedelta(seconds=settings.fraud_velocity_window_s),
        amount_z=settings.fraud_amount_z,
        geo_call_window=timedelta(hours=settings.fraud_call_window_h),
    )
