"""What a stateful step declares and returns: the engine reads these declarations to create
the step's columns and side tables, to fetch its lookups once per batch, and to decide how
complete change capture is for each row."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import pandas as pd

from kappa.state.base import State

#: Columns the engine adds to every side table: the event the row belongs to, and where that
#: event is in the log (a replay or a partition replacement deletes side rows by them).
SIDE_TABLE_ENGINE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("topic", "text"),
    ("kafka_partition", "integer"),
    ("kafka_offset", "bigint"),
)


@dataclass
class StepOutput:
    """A step's result for one batch: the fact rows (row per input row, derived columns
    added), the state to save per store (key -> value), and the side tables' rows by name
    (each with the ``event_id`` of its fact row)."""

    rows: pd.DataFrame
    state: dict[str, dict[str, State]] = field(default_factory=dict)
    side_tables: dict[str, pd.DataFrame] = field(default_factory=dict)


@dataclass(frozen=True, init=False)
class SideTable:
    """A table a step writes besides its fact, in the same transaction.

    The engine creates it as ``event_id uuid`` + ``columns`` + the source coordinates
    (:data:`SIDE_TABLE_ENGINE_COLUMNS`), every column NOT NULL but those in ``nullable``,
    primary key ``(event_id, *key)``, and shows it in the lineage as an asset (named
    ``name``) written by the fact. Replay, partition replacement and asset selections use
    its ``name``.
    """

    name: str
    columns: tuple[tuple[str, str], ...]
    key: tuple[str, ...]
    nullable: frozenset[str]
    description: str

    def __init__(
        self,
        name: str,
        columns: Iterable[tuple[str, str]],
        *,
        key: Iterable[str] = (),
        nullable: Iterable[str] = (),
        description: str = "",
    ) -> None:
        # Normalised, so equal declarations compare equal whatever sequences they came as.
        values = {
            "name": str(name),
            "columns": tuple((str(c), str(t)) for c, t in columns),
            "key": tuple(key),
            "nullable": frozenset(nullable),
            "description": description,
        }
        for attribute, value in values.items():
            object.__setattr__(self, attribute, value)
        names = [c for c, _ in self.columns]
        reserved = {"event_id", *(c for c, _ in SIDE_TABLE_ENGINE_COLUMNS)}
        clash = sorted(reserved & set(names))
        if clash:
            raise ValueError(f"side table {name}: {', '.join(clash)} are the engine's columns")
        unknown = [k for k in self.key if k not in names]
        if unknown:
            raise ValueError(f"side table {name}: key {', '.join(unknown)} is not a column")

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class AsOf:
    """The version of an SCD2 capture target valid at each event's time.

    ``key`` is the event field that matches the target's business key; ``columns`` the
    target's columns wanted (its surrogate key always comes too); a row without a version
    then gets the status ``unknown``.
    """

    target: str
    key: str
    columns: tuple[str, ...] = ()
    unknown: str = "unknown"


@dataclass(frozen=True)
class Range:
    """Rows of a ``current``-mode capture target whose ``on`` column matches the events'
    ``key`` field and whose ``time`` column falls in a time range the step asks for."""

    target: str
    key: str
    time: str
    columns: tuple[str, ...]
    on: str = ""

    @property
    def match(self) -> str:
        """The target's column compared with the event field."""
        return self.on or self.key


Lookup = AsOf | Range


def completeness_keys(lookups: tuple[Lookup, ...]) -> tuple[str, ...]:
    """The event fields whose change capture decides whether a row is final, in order."""
    return tuple(dict.fromkeys(lookup.key for lookup in lookups))


def lookup_for(lookups: tuple[Lookup, ...], target: str, kind: type) -> Lookup:
    for lookup in lookups:
        if isinstance(lookup, kind) and lookup.target == target:
            return lookup
    raise KeyError(f"no {kind.__name__} lookup of {target!r} declared by the step")


def side_table_rows(
    output: StepOutput, rows: pd.DataFrame, tables: tuple[SideTable, ...]
) -> Mapping[str, pd.DataFrame]:
    """The output's side tables with the engine's columns, in the table's column order: the
    source coordinates come from the fact row of the same event_id."""
    coordinates = rows[["event_id", *(c for c, _ in SIDE_TABLE_ENGINE_COLUMNS)]]
    out: dict[str, pd.DataFrame] = {}
    for table in tables:
        frame = output.side_tables.get(table.name)
        if frame is None:
            continue
        order = ["event_id", *(c for c, _ in table.columns)]
        missing = [c for c in order if c not in frame.columns]
        if missing:
            raise ValueError(f"side table {table.name}: rows lack {', '.join(missing)}")
        out[table.name] = frame[order].merge(coordinates, on="event_id", how="left")
    return out
