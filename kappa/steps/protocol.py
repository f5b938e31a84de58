"""What a step is: the protocol a step class implements, and how the catalogue builds one."""

from __future__ import annotations

from typing import ClassVar, Protocol

import pandas as pd

from kappa.steps.api import Lookup, SideTable, StepOutput
from kappa.steps.config import StepConfig
from kappa.steps.context import StepContext


class Step(Protocol):
    """A transform with sharded, versioned state between decode and load.

    ``derived_columns`` (name, SQL type) are added, nullable, to the fact after the decoded
    fields; ``side_tables`` are created by the engine; ``lookups`` are fetched through the
    context once per batch. ``apply`` must depend only on the rows in log order and the
    state before them, never on where the batch was cut (see :mod:`kappa.steps.testing`).
    """

    derived_columns: ClassVar[tuple[tuple[str, str], ...]]
    side_tables: ClassVar[tuple[SideTable, ...]]
    lookups: ClassVar[tuple[Lookup, ...]]

    def apply(self, context: StepContext, rows: pd.DataFrame) -> StepOutput: ...


class CatalogStep(Protocol):
    """A step class the catalogue builds with its stream's ``config:`` mapping."""

    @classmethod
    def from_catalog(cls, config: StepConfig) -> Step: ...
