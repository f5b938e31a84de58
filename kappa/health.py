"""Whether a shard can load: the one place that decides a shard is stopped, and why.

A shard (topic partition or change table) is *stopped* when its next batch cannot succeed
without an operator:

- its source no longer continues where the ledger ends: the topic or change table was
  recreated (new topic id or table oid), the log ends before the ledger (lost or reset
  log), or it starts after it (offsets expired by retention before they were loaded).
  These are the continuity rules of :func:`kappa.sources.base.check_continuity`, one for
  every kind of source; their :class:`LogResetError` text is the reason;
- or its batches keep failing: the last ``retries + 1`` finished runs of the asset that
  covered the shard all failed (``KAPPA_RUN_RETRIES``: the first attempt and every automatic
  retry of it), as recorded in Dagster's run storage. The reason names how many runs failed
  in a row and the first line of the newest failure.

``kappa status``, the freshness check and its sensor, and the micro-batch sensors all ask
here, so a stopped shard never shows as a negative lag or as "fresh".
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kappa.edw.types import LedgerHead
from kappa.exceptions import LogResetError
from kappa.sources.base import OFFSETS, LogBounds, Positions, check_continuity

if TYPE_CHECKING:
    import dagster as dg

#: Run tags every micro-batch run carries (set by the sensors): its asset and its shards.
ASSET_TAG = "kappa/asset"
PARTITIONS_TAG = "kappa/partitions"

#: How many finished runs of an asset are read to count its shards' failures in a row.
_RUNS_READ = 100

#: A shard stopped by failing runs gets one new attempt once its newest failure is this old:
#: a transient cause (a database restarting) heals by itself, a refused batch costs a few
#: failed runs an hour instead of one every sensor tick.
RETRY_STOPPED_AFTER_S = 300.0


@dataclass(frozen=True)
class RunFailures:
    """Finished runs of an asset over one shard that failed in a row, newest first."""

    failed: int
    first_line: str
    run_id: str
    failed_at: float  # epoch seconds of the newest failure
    at_least: bool = False  # more runs may have failed than were read

    def describe(self) -> str:
        count = f"{'at least ' if self.at_least else ''}{self.failed}"
        return (
            f"its last {count} runs failed (run {self.run_id[:8]}: {self.first_line}); "
            f"the sensor tries again {RETRY_STOPPED_AFTER_S:g} s after the newest failure, "
            "or re-execute the run once the cause is fixed"
        )


def shard_stop(
    asset: str,
    source: str,
    shard: int,
    head: LedgerHead | None,
    bounds: LogBounds | None,
    epoch: str,
    failures: RunFailures | None = None,
    *,
    positions: Positions = OFFSETS,
) -> str | None:
    """Why shard ``shard`` of ``source`` cannot load for ``asset``, or None when it can: the
    continuity error first (the operator must act on it whatever the runs did), then the
    failing runs."""
    try:
        check_continuity(asset, source, shard, head, bounds, epoch, positions=positions)
    except LogResetError as exc:
        return str(exc)
    return failures.describe() if failures is not None else None


def failure_threshold(run_retries: int) -> int:
    """Runs failed in a row that stop a shard: the first attempt and each automatic retry."""
    return run_retries + 1


def recent_failures(
    instance: dg.DagsterInstance, asset: str, *, threshold: int
) -> dict[int, RunFailures]:
    """Shards of ``asset`` whose last ``threshold`` (or more) finished runs all failed.

    Runs in flight do not count (they may still succeed); a cancelled run ends the streak
    as a success does, since an operator stopped it on purpose.
    """
    import dagster as dg

    runs = instance.get_runs(
        filters=dg.RunsFilter(
            tags={ASSET_TAG: asset},
            statuses=[
                dg.DagsterRunStatus.SUCCESS,
                dg.DagsterRunStatus.FAILURE,
                dg.DagsterRunStatus.CANCELED,
            ],
        ),
        limit=_RUNS_READ,
    )
    streaks: dict[int, list[dg.DagsterRun]] = {}
    ended: set[int] = set()
    for run in runs:  # newest first
        for shard in (int(p) for p in run.tags.get(PARTITIONS_TAG, "").split(",") if p):
            if shard in ended:
                continue
            if run.status == dg.DagsterRunStatus.FAILURE:
                streaks.setdefault(shard, []).append(run)
            else:
                ended.add(shard)
    found: dict[int, RunFailures] = {}
    for shard, failed in streaks.items():
        if len(failed) < threshold:
            continue
        newest = failed[0]
        record = instance.get_run_record_by_id(newest.run_id)
        at = record.end_time if record is not None and record.end_time else time.time()
        found[shard] = RunFailures(
            failed=len(failed),
            first_line=failure_first_line(instance, newest.run_id),
            run_id=newest.run_id,
            failed_at=at,
            at_least=len(runs) >= _RUNS_READ and shard not in ended,
        )
    return found


def failure_first_line(instance: dg.DagsterInstance, run_id: str) -> str:
    """The first line of the error that failed ``run_id``: the innermost cause of its first
    step failure (the user's exception, not Dagster's wrapper), else the run failure's message."""
    import dagster as dg

    for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        dagster_event = event.dagster_event
        if dagster_event is None:
            continue
        error = dagster_event.step_failure_data.error
        while error is not None and error.cause is not None:
            error = error.cause
        if error is not None and error.message.strip():
            return error.message.strip().splitlines()[0]
    for event in instance.all_logs(run_id, of_type=dg.DagsterEventType.RUN_FAILURE):
        if event.message.strip():
            return event.message.strip().splitlines()[0]
    return "no failure message recorded"


def held(failures: Mapping[int, RunFailures], *, now_s: float) -> dict[int, RunFailures]:
    """The shards a sensor does not request yet: stopped by failures less than
    :data:`RETRY_STOPPED_AFTER_S` ago."""
    return {p: f for p, f in failures.items() if now_s - f.failed_at < RETRY_STOPPED_AFTER_S}
