"""What every micro-batch sensor shares: run tags, the in-flight check, run keys."""

import dagster as dg

from kappa.cursor import OffsetCursor
from kappa.health import (
    ASSET_TAG,
    PARTITIONS_TAG,
    RunFailures,
    held,
    recent_failures,
    shard_tags,
)

#: Dagster abandons a sensor evaluation after 60 s: no query of a tick may take longer.
SENSOR_STATEMENT_TIMEOUT_S = 20.0
RANGES_TAG = "kappa/ranges"
MAX_RUNTIME_TAG = "dagster/max_runtime"


def minimum_interval(interval_s: int) -> int:
    """The ``minimum_interval_seconds`` to declare for a sensor meant to tick every
    ``interval_s`` (``KAPPA_SENSOR_INTERVAL_S``).

    Dagster's sensor daemon looks at its sensors once every 5 s and skips a sensor whose last
    evaluation started less than its minimum interval ago. An evaluation starts a few
    milliseconds into a loop (in the daemon's thread pool), so at the next loop a minimum equal
    to the loop's period has not quite passed: declared as 5 s, the offset sensors ticked
    every 10 s about half of the time (tick gaps measured on the local stack: 5.0, 10.0, 10.7,
    9.3, 10.0, 5.0 s). One second less lets every loop due tick it.
    """
    return max(1, interval_s - 1)


#: Runs that hold their partitions: queued, starting, running or being cancelled.
IN_FLIGHT = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def busy_partitions(instance: dg.DagsterInstance, asset: str) -> frozenset[int]:
    """Partitions (shards) with a batch of ``asset`` queued or running."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={ASSET_TAG: asset}, statuses=IN_FLIGHT))
    busy: set[int] = set()
    for run in runs:
        busy.update(int(p) for p in run.tags.get(PARTITIONS_TAG, "").split(",") if p)
    return frozenset(busy)


def stopped_shards(
    context: dg.SensorEvaluationContext,
    asset: str,
    *,
    names: dict[int, str],
    threshold: int,
    now_s: float,
) -> dict[int, RunFailures]:
    """Shards of ``asset`` whose last ``threshold`` runs failed and that wait out their
    cool-down (:data:`kappa.health.RETRY_STOPPED_AFTER_S`): the tick requests no run for
    them. Every stopped shard gets a warning in the tick log; once its cool-down is over it
    is planned again (its warning says so): a transient cause heals by itself, a refused
    batch costs a few failed runs an hour instead of one per tick. ``names``: shard -> its
    name."""
    failures = {
        p: f
        for p, f in recent_failures(context.instance, asset, threshold=threshold).items()
        if p in names
    }
    holding = held(failures, now_s=now_s)
    for shard, failure in sorted(failures.items()):
        what = "held: no run requested" if shard in holding else "cool-down over: planned again"
        context.log.warning(f"{asset} {names[shard]} stopped: {failure.describe()} ({what})")
    return holding


def micro_batch_request(
    *,
    asset: str,
    cursor: OffsetCursor,
    epoch: str,
    source: str,
    spans: dict[int, tuple[int, int]],
    config: dict,
    selection: list[dg.AssetKey] | None = None,
    partition_key: str | None = None,
    max_runtime_s: int | None = None,
) -> dg.RunRequest:
    """A run for ``asset`` over ``spans`` (shard -> [start, end)): positions in the config,
    shards in the tags (``selection``: every asset the step writes, default ``asset``), the time
    partition it appends to as its partition key. The run key carries the cursor's generation and sequence, so a tick
    evaluated twice asks for the same key and a key is never reused after a cursor reset."""
    text = ",".join(f"{shard}:{start}-{end}" for shard, (start, end) in sorted(spans.items()))
    return dg.RunRequest(
        run_key=f"{asset}/{cursor.generation}.{cursor.seq}/{epoch[:8] or '-'}/{partition_key or '-'}/{text}",
        partition_key=partition_key,
        asset_selection=selection or [dg.AssetKey(asset)],
        # Checks such as replay equivalence re-read the log: never with every micro-batch.
        asset_check_keys=[],
        run_config={"ops": {asset: {"config": config}}},
        tags={
            ASSET_TAG: asset,
            **shard_tags(asset, spans),
            RANGES_TAG: f"{source}:{text}",
            # Run monitoring fails a run past this (a worker that died with the daemon
            # would otherwise hold its partitions forever: the run stays STARTED).
            **({MAX_RUNTIME_TAG: str(max_runtime_s)} if max_runtime_s else {}),
        },
    )
