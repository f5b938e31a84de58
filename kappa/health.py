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
from collections.abc import Iterable, Mapping
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

#: Run tag prefix, one tag per shard a run loads (``kappa/shard/3: fact_order``): the run
#: storage filters a shard's runs by it, so a shard's last runs are read exactly however many
#: runs of other shards came after them.
SHARD_TAG_PREFIX = "kappa/shard/"


def shard_tag(shard: int) -> str:
    """The run tag that says a run loads ``shard`` (its value is the asset)."""
    return f"{SHARD_TAG_PREFIX}{shard}"


def shard_tags(asset: str, shards: Iterable[int]) -> dict[str, str]:
    """The tags of a run of ``asset`` over ``shards``: the shard list (:data:`PARTITIONS_TAG`)
    and one :func:`shard_tag` per shard."""
    ordered = sorted(shards)
    return {
        PARTITIONS_TAG: ",".join(str(shard) for shard in ordered),
        **{shard_tag(shard): asset for shard in ordered},
    }


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

    def describe(self) -> str:
        return (
            f"its last {self.failed} runs failed (run {self.run_id[:8]}: {self.first_line}); "
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

    Exact whatever the number of runs: the shards that may be stopped are those of the
    asset's failed runs (the run storage filters them by status), and each one's last runs
    are read through its own tag (:func:`shard_tag`), so a shard's failures count however many
    runs of other shards finished after them. The failures counted are the shard's failed runs
    since its newest success or cancellation. Runs made before the shard tags (none of them
    planned by this version) are not seen by the per-shard queries.
    """
    import dagster as dg

    failure = [dg.DagsterRunStatus.FAILURE]
    ending = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.CANCELED]
    candidates: set[int] = set()
    for run in instance.get_runs(filters=dg.RunsFilter(tags={ASSET_TAG: asset}, statuses=failure)):
        candidates.update(int(p) for p in run.tags.get(PARTITIONS_TAG, "").split(",") if p)
    found: dict[int, RunFailures] = {}
    for shard in sorted(candidates):
        tags = {shard_tag(shard): asset}
        last = instance.get_run_records(
            filters=dg.RunsFilter(tags=tags, statuses=[*failure, *ending]),
            limit=max(threshold, 1),
        )  # newest first
        if not last or len(last) < threshold:
            continue
        if any(r.dagster_run.status != dg.DagsterRunStatus.FAILURE for r in last):
            continue
        ended = instance.get_run_records(filters=dg.RunsFilter(tags=tags, statuses=ending), limit=1)
        failed = instance.get_runs_count(
            dg.RunsFilter(
                tags=tags,
                statuses=failure,
                created_after=ended[0].create_timestamp if ended else None,
            )
        )
        newest = last[0]
        found[shard] = RunFailures(
            failed=max(failed, len(last)),
            first_line=failure_first_line(instance, newest.dagster_run.run_id),
            run_id=newest.dagster_run.run_id,
            failed_at=newest.end_time or time.time(),
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
