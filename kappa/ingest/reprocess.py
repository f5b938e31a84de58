"""Reprocessing one time partition of an asset from its source (a backfill, or a heal of its
tail), for every kind of source: where the window lies in each shard, the continuity checks,
the replacement in one transaction. What a kind does with the window's positions (decode,
step and COPY for events; validate and rebuild for changes) is its :class:`WindowLoader`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Protocol

import psycopg

from kappa.edw.ledger import read_heads
from kappa.edw.types import BatchRecord, Schemas
from kappa.edw.window import WindowReplacement, ledger_span, replace_window
from kappa.ingest.outcome import WindowOutcome
from kappa.partitions import Window
from kappa.sources.base import LogBounds, Source, TimeIndexed, check_continuity


class WindowLoader(Protocol):
    """What one kind of source does when a time partition of one shard is replaced, inside
    the replacement's transaction (see :func:`reprocess_window`)."""

    #: Whether the asset's step keeps state: a window's start must have a checkpoint.
    stateful: bool
    #: Whether the state at a window's start is checkpointed, and the next window marked
    #: stale when the state it starts from changes (a kind whose assets may have steps).
    checkpoints: bool

    def begin(
        self,
        plan: Mapping[int, tuple[int, int]],
        stack: ExitStack,
        read_ahead: Source | None,
    ) -> None:
        """Before any shard is reloaded: ``plan`` maps each shard to re-derive to its
        positions ``[start, end)``; what the loader opens goes on ``stack`` (closed after the
        transaction ends); ``read_ahead``: a second reader of the source, if the caller has one."""
        ...

    def reload(
        self, record: BatchRecord, replaced: WindowReplacement, outcome: WindowOutcome
    ) -> None:
        """Delete what the asset holds of ``record``'s positions (up to
        ``replaced.held_end``, setting ``replaced.removed_rows``), read them again, transform
        and write them with their ledger rows, and count what was done into ``outcome``."""
        ...


def locate_window(
    source: TimeIndexed,
    bounds: Mapping[int, LogBounds],
    window: Window,
    shards: list[int],
    *,
    is_first: bool,
    ahead: TimeIndexed | None = None,
) -> dict[int, tuple[int, int]]:
    """Each shard's positions ``[start, end)`` of ``window`` in a source that can search its
    records' times (``locate`` of the window's start and end; the log start for the first
    window, the log end while the window is open). With a second reader (``ahead``), the
    ends are searched on it while the starts are on ``source``, at the same time."""

    def starts_of() -> dict[int, int | None]:
        if is_first:
            return dict.fromkeys(shards)
        return source.locate(shards, window.start_ms, bounds=bounds)

    if ahead is None:
        starts = starts_of()
        ends = source.locate(shards, window.end_ms, bounds=bounds)
    else:
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(ahead.locate, shards, window.end_ms, bounds=bounds)
            starts = starts_of()
            ends = pending.result()
    resolved: dict[int, tuple[int, int]] = {}
    for shard in shards:
        found_start, found_end = starts[shard], ends[shard]
        if is_first:
            start = bounds[shard].start
        else:
            start = found_start if found_start is not None else bounds[shard].end
        end = found_end if found_end is not None else bounds[shard].end
        resolved[shard] = (start, max(start, end))
    return resolved


def reprocess_window(
    source: Source,
    conn: psycopg.Connection,
    schemas: Schemas,
    asset: str,
    window: Window,
    loader: WindowLoader,
    *,
    run_id: str,
    is_first: bool = False,
    from_positions: Mapping[int, int] | None = None,
    read_ahead: Source | None = None,
) -> list[WindowOutcome]:
    """Replace time partition ``window`` of ``asset`` from ``source``, in one transaction
    (every shard of the window, or none); one outcome per shard.

    Where the window lies: in a source that can search its records' times
    (:class:`~kappa.sources.base.TimeIndexed`, a topic) its ``locate`` answers, ``is_first``
    saying the window is the asset's first (it starts at the log start); in any other (a
    change table) the positions its ledger batches cover, read under the head's lock.

    With ``from_positions`` only a part is re-derived: in each shard it names, from that
    position on (a ledger batch boundary inside the window, whose state the state versions
    hold, so the rows equal those of a whole re-derivation); the shards it leaves out keep
    what they hold (status ``kept``).

    ``read_ahead``: a second reader of the source (not used elsewhere meanwhile), which the
    loader may use to read the next chunk while the current one is written.

    A reset log, expired positions, a predecessor not loaded or a missing checkpoint raise
    before anything is deleted (:class:`LogResetError`, :class:`ReprocessError`); so do the
    loader's own refusals, inside the transaction (which then changes nothing).
    """
    shards = source.shards()
    epoch = source.epoch()
    bounds = source.bounds(shards)
    located: dict[int, tuple[int, int]] | None = None
    if isinstance(source, TimeIndexed):
        ahead = read_ahead if isinstance(read_ahead, TimeIndexed) else None
        located = locate_window(source, bounds, window, shards, is_first=is_first, ahead=ahead)
    heads = read_heads(conn, schemas, asset, source.name)
    for shard in shards:
        check_continuity(
            asset, source.name, shard, heads.get(shard), bounds[shard], epoch,
            positions=source.positions,
        )  # fmt: skip
    outcomes: list[WindowOutcome] = []
    # The stack closes after the transaction ends: a pending read-ahead is dropped last.
    with ExitStack() as stack, conn.transaction():
        resolved = (
            located
            if located is not None
            else {s: ledger_span(conn, schemas, asset, source.name, s, window.key) for s in shards}
        )
        # Where each shard's re-derivation starts (None: kept as it is).
        starts: dict[int, int | None] = {s: resolved[s][0] for s in shards}
        if from_positions is not None:
            starts = {
                s: max(resolved[s][0], from_positions[s]) if s in from_positions else None
                for s in shards
            }
        plan = {s: (begin, resolved[s][1]) for s in shards if (begin := starts[s]) is not None}
        loader.begin(plan, stack, read_ahead)
        for shard in shards:
            started = time.monotonic()
            opening, end = resolved[shard]
            begin = starts[shard]
            if begin is None:
                outcomes.append(
                    WindowOutcome(asset, source.name, window.key, shard, opening, opening, "kept")
                )
                continue
            outcome = WindowOutcome(asset, source.name, window.key, shard, begin, end, "empty")
            outcomes.append(outcome)
            if end <= begin:
                outcome.seconds = time.monotonic() - started
                continue
            record = BatchRecord(asset, source.name, shard, epoch, begin, end, run_id, window.key)
            with replace_window(
                conn,
                schemas,
                record=record,
                log_start=bounds[shard].start,
                stateful=loader.stateful,
                checkpoints=loader.checkpoints,
                partition_start=opening,
            ) as replaced:
                loader.reload(record, replaced, outcome)
            outcome.status = "replaced"
            outcome.removed_rows = replaced.removed_rows
            outcome.stale_from = replaced.stale_from
            outcome.seconds = time.monotonic() - started
    return outcomes
