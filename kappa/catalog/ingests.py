"""What this deployment loads: the catalogue's streams, each with its stateful step (no
Dagster here, so the code location and the CLI share one catalogue)."""

from __future__ import annotations

from kappa.catalog.captures import CaptureSpec, load_captures
from kappa.catalog.files import SETTING
from kappa.catalog.streams import EventContract, resolve_step
from kappa.exceptions import ConfigurationError
from kappa.ingest.plan import TopicIngest
from kappa.setting_values import identifier
from kappa.settings import Settings
from kappa.steps.api import AsOf
from kappa.steps.config import build_step_class
from kappa.steps.protocol import Step


def build_step(
    contract: EventContract, captures: dict[str, CaptureSpec] | None = None
) -> Step | None:
    """The stream's step (:func:`kappa.steps.config.build_step_class`); its side tables and
    lookups checked against the stream and the captured tables."""
    if contract.step is None:
        return None
    where = f"{contract.catalog}: stream {contract.name}"
    try:
        step_class = resolve_step(contract.step)
    except ValueError as exc:
        raise ConfigurationError(SETTING, f"{where}, field step: {exc}") from None
    step: Step = build_step_class(
        step_class,
        contract.step_config,
        catalog=contract.catalog or "",
        stream=contract.name,
        dotted=contract.step,
    )
    _check_side_tables(contract, step, where)
    fields = {f.name for f in contract.fields}
    for lookup in getattr(step, "lookups", ()):
        if lookup.key not in fields:
            raise ConfigurationError(
                SETTING,
                f"{where}, field step: {contract.step} looks {lookup.target} up by "
                f"{lookup.key!r}, not a field of the stream",
            )
        if captures is None:
            continue
        spec = captures.get(lookup.target)
        wanted = "scd2" if isinstance(lookup, AsOf) else "current"
        if spec is None or spec.mode != wanted:
            raise ConfigurationError(
                SETTING,
                f"{where}, field step: {contract.step} needs a captured table with target "
                f"{lookup.target} in mode {wanted} (tables: "
                f"{', '.join(f'{c.target} ({c.mode})' for c in captures.values()) or 'none'})",
            )
    return step


def _check_side_tables(contract: EventContract, step: Step, where: str) -> None:
    """Side tables become EDW tables and Dagster assets: plain identifiers, none a stream."""
    for table in getattr(step, "side_tables", ()):
        for raw in (table.name, *(column for column, _ in table.columns)):
            try:
                identifier(SETTING, raw)
            except ConfigurationError as exc:
                raise ConfigurationError(
                    SETTING, f"{where}, field step: side table {table.name}: {exc.problem}"
                ) from None
        if table.name == contract.table:
            raise ConfigurationError(
                SETTING, f"{where}, field step: side table {table.name} is the fact itself"
            )


def topic_ingests(settings: Settings) -> list[tuple[TopicIngest, str]]:
    """The topics this deployment loads, each with the setting that names it (the stream's
    ``topic_env``, else the catalogue)."""
    captures = {c.target: c for c in load_captures(settings.catalog)}
    return [
        (
            TopicIngest(
                asset=contract.name,
                topic=contract.topic,
                contract=contract,
                description=contract.description,
                step=build_step(contract, captures),
            ),
            contract.topic_env or SETTING,
        )
        for contract in settings.streams
    ]
