"""Testing a step without a database or a broker, through the engine's own step call.

Batch invariance is what makes a step safe to run in micro-batches, to replay and to heal:
the same rows processed as one batch or cut anywhere into several (state carried between
the parts, as the engine saves it) must give the same rows, side tables and final state.
:func:`batch_differences` checks exactly that::

    from kappa.steps.testing import MemoryLookups, batch_differences

    lookups = MemoryLookups(versions={"dim_site": versions}, mark=far_future)
    assert batch_differences(MyStep(), decoded_rows, lookups, splits=[3, 10]) == []

``rows`` are decoded rows (as :func:`kappa.decode.batch.decode_batch` returns them), in log
order; lookup data are frames named by target, their key column named as the lookup's
event field.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import orjson
import pandas as pd
from pandas.testing import assert_frame_equal

from kappa.state.base import State
from kappa.state.cache import StateCache
from kappa.steps.api import AsOf, Range
from kappa.steps.completeness import Completeness
from kappa.steps.engine import apply_step
from kappa.steps.protocol import Step


class MemoryLookups:
    """Lookups answered from frames: ``versions`` of SCD2 targets and ``ranges`` of
    current-mode targets, by target; complete up to ``mark`` (None: not known)."""

    def __init__(
        self,
        *,
        versions: Mapping[str, pd.DataFrame] | None = None,
        ranges: Mapping[str, pd.DataFrame] | None = None,
        mark: pd.Timestamp | None = None,
        pending: Mapping[str, Mapping[str, pd.Timestamp]] | None = None,
        surrogates: Mapping[str, str] | None = None,
    ) -> None:
        self.version_frames = dict(versions or {})
        self.range_frames = dict(ranges or {})
        self.mark = mark
        self.pending = dict(pending or {})
        self.surrogates = dict(surrogates or {})

    def watermark(self, keys: Mapping[str, Sequence[str]] | None = None) -> Completeness | None:
        return Completeness(self.mark, self.pending) if self.mark is not None else None

    def surrogate(self, lookup: AsOf) -> str:
        # As the engine names an SCD2 target's surrogate key: dim_<name> -> <name>_sk.
        return self.surrogates.get(lookup.target, f"{lookup.target.removeprefix('dim_')}_sk")

    def versions(self, lookup: AsOf, keys: list[str]) -> pd.DataFrame:
        frame = self.version_frames[lookup.target]
        return frame[frame[lookup.key].isin(keys)].reset_index(drop=True)

    def range(
        self, lookup: Range, keys: list[str], since: pd.Timestamp, until: pd.Timestamp
    ) -> pd.DataFrame:
        frame = self.range_frames[lookup.target]
        keep = frame[lookup.key].isin(keys) & frame[lookup.time].between(since, until)
        return frame[keep].reset_index(drop=True)


class MemoryStateBackend:
    """A versioned state backend in memory: one version per (store, shard, key, position),
    values through JSON as PostgreSQL's ``jsonb`` stores them."""

    def __init__(self) -> None:
        self.versions: dict[tuple[str, int, str], dict[int, State]] = {}

    def load(
        self, conn: Any, store: str, shard: int, keys: Sequence[str], *, as_of: int | None = None
    ) -> dict[str, State]:
        found = {}
        for key in keys:
            versions = {
                p: v
                for p, v in self.versions.get((store, shard, key), {}).items()
                if as_of is None or p <= as_of
            }
            if versions:
                found[key] = orjson.loads(orjson.dumps(versions[max(versions)]))
        return found

    def save(
        self, conn: Any, store: str, shard: int, position: int, values: Mapping[str, State]
    ) -> None:
        for key, value in values.items():
            versions = self.versions.setdefault((store, shard, key), {})
            if position in versions:
                raise AssertionError(f"second version of {store}/{key!r} at {position}")
            versions[position] = orjson.loads(orjson.dumps(value))

    def rewind(self, conn: Any, store: str, shard: int, position: int) -> int:
        forgotten = 0
        for (s, sh, _), versions in self.versions.items():
            if s == store and sh == shard:
                for later in [p for p in versions if p > position]:
                    del versions[later]
                    forgotten += 1
        return forgotten

    def latest(self) -> dict[tuple[str, int, str], State]:
        return {k: v[max(v)] for k, v in self.versions.items() if v}


@dataclass
class StepRun:
    """What a step produced over the batches of a run: fact rows and side-table rows in
    log order, and the state the backend ends with."""

    rows: pd.DataFrame
    side_tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    state: dict[tuple[str, int, str], State] = field(default_factory=dict)


def segments(start: int, end: int, splits: Iterable[int]) -> list[tuple[int, int]]:
    """Batches ``[a, b)`` covering ``[start, end)``, cut at ``splits`` (a repeated split
    makes an empty batch, as a batch whose events are all loaded already)."""
    bounds = [start, *sorted(s for s in splits if start <= s <= end), end]
    return list(pairwise(bounds))


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    # The warehouse writes each batch's frame on its own: an empty batch's frame (with
    # whatever dtypes an empty frame has) never meets the others.
    kept = [f for f in frames if not f.empty]
    return pd.concat(kept, ignore_index=True) if kept else frames[0]


def run_in_batches(
    step: Step,
    rows: pd.DataFrame,
    lookups: MemoryLookups,
    splits: Iterable[int] = (),
    *,
    start: int = 0,
    shard: int = 0,
    backend: MemoryStateBackend | None = None,
    cache: StateCache | None = None,
) -> StepRun:
    """Run ``step`` over ``rows[start:]`` in batches cut at ``splits`` (row positions), each
    batch's state saved at its end position and remembered once "committed", as the
    engine's commit does."""
    backend = backend if backend is not None else MemoryStateBackend()
    cache = cache if cache is not None else StateCache(backend)
    outputs: list[pd.DataFrame] = []
    sides: dict[str, list[pd.DataFrame]] = {}
    for begin, end in segments(start, len(rows), splits):
        batch = rows.iloc[begin:end]
        output = apply_step(
            step,
            batch,
            conn=None,
            state=cache,
            shard=shard,
            lookups=lookups,
            completeness=lookups.watermark(),
        )
        for store, values in output.state.items():
            cache.save(None, store, shard, end, values)  # type: ignore[arg-type]
        for store, values in output.state.items():
            cache.remember(store, shard, values)
        outputs.append(output.rows)
        for name, frame in output.side_tables.items():
            sides.setdefault(name, []).append(frame)
    side_tables = {}
    for table in step.side_tables:
        if table.name in sides:
            order = ["event_id", *table.key]
            side_tables[table.name] = (
                _concat(sides[table.name]).sort_values(order).reset_index(drop=True)
            )
    return StepRun(
        rows=_concat(outputs).reset_index(drop=True),
        side_tables=side_tables,
        state=backend.latest(),
    )


def _difference(what: str, left: pd.DataFrame, right: pd.DataFrame) -> list[str]:
    try:
        assert_frame_equal(left, right)
    except AssertionError as exc:
        return [f"{what}: {exc}"]
    return []


def compare_runs(whole: StepRun, parts: StepRun) -> list[str]:
    """What differs between two runs of the same rows (empty: nothing)."""
    found = _difference("rows", parts.rows, whole.rows)
    for name in sorted(set(whole.side_tables) | set(parts.side_tables)):
        left, right = whole.side_tables.get(name), parts.side_tables.get(name)
        if left is None or right is None:
            if not (left if left is not None else right).empty:  # type: ignore[union-attr]
                found.append(f"side table {name}: rows in one run only")
            continue
        found += _difference(f"side table {name}", right, left)
    for key in sorted(set(whole.state) | set(parts.state)):
        if whole.state.get(key) != parts.state.get(key):
            found.append(
                f"state {key}: {parts.state.get(key)!r} after the cuts, "
                f"{whole.state.get(key)!r} as one batch"
            )
    return found


def batch_differences(
    step: Step,
    rows: pd.DataFrame,
    lookups: MemoryLookups,
    splits: Iterable[int],
    *,
    max_keys: int = 200_000,
) -> list[str]:
    """Differences between ``step`` over ``rows`` as one batch and over ``rows`` cut at
    ``splits`` (state carried between the parts through an LRU of ``max_keys`` over a
    versioned backend): rows, side tables, final state. Empty when the step is invariant."""
    whole = run_in_batches(step, rows, lookups)
    backend = MemoryStateBackend()
    parts = run_in_batches(
        step, rows, lookups, splits, backend=backend, cache=StateCache(backend, max_keys=max_keys)
    )
    return compare_runs(whole, parts)
