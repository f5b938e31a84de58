"""The public step API: what a stateful step of a catalogue stream imports.

A step class declares ``derived_columns``, ``side_tables`` (:class:`SideTable`) and
``lookups`` (:class:`AsOf`, :class:`Range`), builds itself from its stream's ``config:``
with ``from_catalog(config: StepConfig)``, and implements ``apply(context, rows) ->
StepOutput``. Generic algorithms for steps: :func:`enrich_as_of` (the as-of join) and
:func:`running_stats` (integer-exact running statistics). Batch-invariance testing:
:mod:`kappa.steps.testing`.
"""

from kappa.exact import round_half_even_div
from kappa.state.base import State
from kappa.steps.api import AsOf, Lookup, Range, SideTable, StepOutput
from kappa.steps.asof import AS_OF, PROVISIONAL, STATUS, enrich_as_of, join_key, utc_times
from kappa.steps.completeness import Completeness, WaitBudget
from kappa.steps.config import StepConfig
from kappa.steps.context import Lookups, StepContext
from kappa.steps.protocol import Step
from kappa.steps.stats import RunningStats, running_stats, to_cents

__all__ = [
    "AS_OF",
    "PROVISIONAL",
    "STATUS",
    "AsOf",
    "Completeness",
    "Lookup",
    "Lookups",
    "Range",
    "RunningStats",
    "SideTable",
    "State",
    "Step",
    "StepConfig",
    "StepContext",
    "StepOutput",
    "WaitBudget",
    "enrich_as_of",
    "join_key",
    "round_half_even_div",
    "running_stats",
    "to_cents",
    "utc_times",
]
