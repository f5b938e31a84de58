"""The latest evaluation of every asset check, read from the Dagster instance (for ``kappa status``).

Which checks exist comes from the catalogue, through the same builder the code location
calls (:func:`kappa.dagster.definitions.build_definitions`); what they last said comes from the instance's
event log storage (``get_latest_asset_check_execution_by_key``): the same records the UI's
Checks tabs show, whether a run or the freshness sensor wrote them.

The instance is the deployment's: ``DAGSTER_HOME`` when set, else the one ``kappa up``
writes to ``$KAPPA_HOME/dagster`` (its storage at ``KAPPA_DAGSTER_PG_URL`` or the embedded
PostgreSQL).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kappa.dagster.instance import InstanceUnavailable, open_instance
from kappa.exceptions import KappaError
from kappa.settings import Settings

if TYPE_CHECKING:
    import dagster as dg


@dataclass(frozen=True)
class CheckState:
    """What one check last said."""

    asset: str
    check: str
    #: passed, failed, running (planned in a run not finished), error (its run failed), never
    state: str
    severity: str = ""
    description: str = ""
    age_s: float | None = None

    @property
    def failing(self) -> bool:
        return self.state in ("failed", "error")


def catalogue_check_keys(settings: Settings) -> list[dg.AssetCheckKey]:
    """Every asset check kappa builds from the catalogue (the library never imports a code
    location: the checks come from the builder that code locations call)."""
    from kappa.dagster.definitions import build_definitions
    from kappa.run import FactServices

    defs = build_definitions(settings, services=FactServices())
    return sorted(
        defs.resolve_asset_graph().asset_check_keys,
        key=lambda k: (k.asset_key.to_user_string(), k.name),
    )


def latest_check_states(
    instance: dg.DagsterInstance, keys: Sequence[dg.AssetCheckKey], *, now: float | None = None
) -> list[CheckState]:
    """The latest execution of each check, in the order of ``keys``."""
    import dagster as dg
    from dagster._core.storage.asset_check_execution_record import (
        AssetCheckExecutionRecordStatus as Status,
    )

    now = time.time() if now is None else now
    latest = instance.event_log_storage.get_latest_asset_check_execution_by_key(list(keys))
    states: list[CheckState] = []
    for key in keys:
        asset, name = key.asset_key.to_user_string(), key.name
        record = latest.get(key)
        if record is None:
            states.append(CheckState(asset, name, "never"))
            continue
        age = round(now - record.create_timestamp, 1)
        evaluation = None
        if record.event is not None and record.event.dagster_event is not None:
            data = record.event.dagster_event.event_specific_data
            if isinstance(data, dg.AssetCheckEvaluation):
                evaluation = data
                age = round(now - record.event.timestamp, 1)
        if record.status == Status.SUCCEEDED:
            state = "passed"
        elif record.status == Status.FAILED:
            state = "failed"
        else:  # planned: still running, or its run ended without evaluating it
            run = instance.get_run_by_id(record.run_id) if record.run_id else None
            state = (
                "error" if run is not None and run.is_finished and not run.is_success else "running"
            )
        states.append(
            CheckState(
                asset,
                name,
                state,
                severity=evaluation.severity.value if evaluation else "",
                description=(evaluation.description or "") if evaluation else "",
                age_s=age,
            )
        )
    return states


def read_check_states(settings: Settings) -> list[CheckState]:
    """Every check of the catalogue with what it last said; any failure to build the checks
    or to read the instance is an :class:`InstanceUnavailable` that says why."""
    try:
        keys = catalogue_check_keys(settings)
    except KappaError as exc:
        raise InstanceUnavailable(f"the catalogue's checks did not build: {exc}") from None
    except Exception as exc:
        raise InstanceUnavailable(
            f"the catalogue's checks did not build: {type(exc).__name__}: {exc}"
        ) from None
    with open_instance(settings) as instance:
        try:
            return latest_check_states(instance, keys)
        except Exception as exc:
            raise InstanceUnavailable(
                f"the Dagster instance did not answer: {type(exc).__name__}: {_first_line(exc)}"
            ) from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
