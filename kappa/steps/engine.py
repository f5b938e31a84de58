"""How the engine runs a step over one decoded batch (the ingest and backfill paths, and
the test helpers, call the same function, so tests exercise what runs)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pandas as pd

from kappa.state.base import StateAccess
from kappa.steps.api import StepOutput, completeness_keys, side_table_rows
from kappa.steps.completeness import Completeness, WaitBudget, wait_for_capture
from kappa.steps.context import Lookups, StepContext
from kappa.steps.protocol import Step

if TYPE_CHECKING:
    import psycopg


def wait_for_step(
    step: Step, lookups: Lookups, rows: pd.DataFrame, budget: WaitBudget
) -> Completeness | None:
    """Wait, within ``budget``, until change capture covers the rows' event times for the
    step's lookup keys (None for an empty batch: nothing to wait for)."""
    if rows.empty:
        return None
    return wait_for_capture(lookups, rows, completeness_keys(step.lookups), budget=budget)


def apply_step(
    step: Step,
    rows: pd.DataFrame,
    *,
    conn: psycopg.Connection | None,
    state: StateAccess,
    shard: int,
    lookups: Lookups,
    completeness: Completeness | None,
) -> StepOutput:
    """The step's output for ``rows`` with the side tables completed by the engine's
    columns (the source coordinates of each side row's event)."""
    context = StepContext(
        conn=conn,
        state=state,
        shard=shard,
        lookups=lookups,
        declared=tuple(step.lookups),
        completeness=completeness,
    )
    output = step.apply(context, rows)
    output.side_tables = dict(side_table_rows(output, rows, tuple(step.side_tables)))
    return output


Rerun = Callable[[pd.DataFrame], StepOutput]
