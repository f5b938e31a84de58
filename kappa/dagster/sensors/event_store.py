"""Sensors that turn new offsets in the event store into micro-batch runs.

A sensor evaluation only reads metadata (partitions, log bounds, topic id: each call bounded
by a timeout), the ledger heads, and the run storage; it has no side effects, so the daemon
may evaluate a tick twice. Run requests carry offset ranges, never payloads.

A stopped partition (:mod:`kappa.health`) says so: a log that cannot continue where the
ledger ends fails the tick with the reason; a partition whose runs keep failing gets a
warning and no run until its cool-down is over (see :func:`kappa.dagster.sensors.micro_batch.stopped_shards`).
"""

import time
from datetime import UTC, datetime

import dagster as dg

from kappa.cursor import OffsetCursor
from kappa.dagster.assets.event_store import topic_asset_key
from kappa.dagster.resources.event_store import EventStoreResource
from kappa.dagster.resources.warehouse import WarehouseResource
from kappa.dagster.sensors.micro_batch import (
    RANGES_TAG,
    SENSOR_STATEMENT_TIMEOUT_S,
    busy_partitions,
    micro_batch_request,
    minimum_interval,
    stopped_shards,
)
from kappa.edw.ledger import read_heads
from kappa.exceptions import ConfigurationError
from kappa.ingest.plan import TopicIngest
from kappa.partitions import TimeWindows
from kappa.run import plan_runs
from kappa.sources.base import check_continuity
from kappa.sources.topic import UnknownTopicError


def build_offset_sensor(
    spec: TopicIngest,
    *,
    windows: TimeWindows,
    topic_setting: str,
    max_runtime_s: int | None = None,
    interval_s: int,
    max_batch: int,
    max_run: int,
    failure_threshold: int,
    selection: list[dg.AssetKey] | None = None,
) -> dg.SensorDefinition:
    """The sensor that launches ``spec.asset``'s micro-batches when its topic grows
    (``failure_threshold``: failed runs in a row that stop a partition)."""

    @dg.sensor(
        name=f"{spec.asset}_sensor",
        description=(
            f"Polls the end offsets of `{spec.topic}` and requests micro-batch runs of "
            f"`{spec.asset}` with explicit offset ranges (at most {max_batch} records per "
            "partition), one batch in flight per partition."
        ),
        asset_selection=selection or [dg.AssetKey(spec.asset)],
        minimum_interval_seconds=minimum_interval(interval_s),
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def offset_sensor(
        context: dg.SensorEvaluationContext,
        event_store: EventStoreResource,
        warehouse: WarehouseResource,
    ) -> dg.SensorResult:
        cursor = OffsetCursor.parse(context.cursor)
        with event_store.open() as store:
            try:
                partitions = store.partitions(spec.topic)
            except UnknownTopicError as exc:
                raise ConfigurationError(topic_setting, str(exc)) from None
            bounds = store.log_bounds(spec.topic, partitions)
            epoch = store.topic_id(spec.topic) or ""
            with warehouse.connect(statement_timeout_s=SENSOR_STATEMENT_TIMEOUT_S) as conn:
                heads = read_heads(conn, warehouse.schemas, spec.asset, spec.topic)
            for partition in partitions:
                check_continuity(
                    spec.asset,
                    spec.topic,
                    partition,
                    heads.get(partition),
                    bounds[partition],
                    epoch,
                )
            busy = busy_partitions(context.instance, spec.asset)
            stopped = stopped_shards(
                context,
                spec.asset,
                names={p: f"{spec.topic}[{p}]" for p in partitions if p not in busy},
                threshold=failure_threshold,
                now_s=time.time(),
            )
            busy |= frozenset(stopped)
            now = datetime.now(UTC)
            # Batches never cross a time partition's boundary; a shard whose next record
            # belongs to a partition that starts after the current one (a producer's clock
            # ahead stamped it) is not a Dagster partition yet: it waits, nothing is skipped.
            plan = plan_runs(
                store,
                spec,
                windows,
                heads,
                bounds,
                busy=busy,
                max_batch=max_batch,
                max_run=max_run,
                now=now,
            )
        ahead = plan.ahead
        current = windows.at(now)
        for partition, window in sorted(ahead.items()):
            context.log.warning(
                f"{spec.topic}[{partition}] from offset "
                f"{heads[partition].end if partition in heads else bounds[partition].start} "
                f"belongs to time partition {window.key}, which starts after the current one "
                f"({current.key}): its records are stamped ahead of this clock (a producer's "
                "clock ahead?); the shard waits until that partition exists"
            )

        events: list[dg.AssetObservation] = []
        log_end = {str(p): b.end for p, b in bounds.items()}
        if log_end != cursor.log_end:
            events.append(
                dg.AssetObservation(
                    asset_key=topic_asset_key(spec.topic),
                    metadata={
                        "end_offsets": log_end,
                        "start_offsets": {str(p): b.start for p, b in bounds.items()},
                        "records_retained": sum(b.end - b.start for b in bounds.values()),
                        "topic_id": epoch or "unknown",
                    },
                )
            )
            cursor.log_end = log_end

        if not plan.runs:
            waiting = [p for p in partitions if p in busy and p not in stopped]
            reasons = [
                f"{spec.topic}[{p}] stopped: {failure.describe()}"
                for p, failure in sorted(stopped.items())
            ]
            if waiting:
                reasons.append(
                    "batch in flight for " + ", ".join(f"{spec.topic}[{p}]" for p in waiting)
                )
            if ahead:
                reasons.append(
                    "records stamped ahead of the clock wait for their time partition: "
                    + ", ".join(f"{spec.topic}[{p}] -> {w.key}" for p, w in sorted(ahead.items()))
                )
            reason = (
                "; ".join(reasons) + "; no new offsets elsewhere"
                if reasons
                else f"no new offsets in {spec.topic} (ledger at the log end of every partition)"
            )
            return dg.SensorResult(
                skip_reason=reason, cursor=cursor.dump(), asset_events=list(events)
            )
        requests = []
        for planned in plan.runs:
            group = planned.ranges
            key = planned.partition_key
            request = micro_batch_request(
                asset=spec.asset,
                cursor=cursor,
                epoch=epoch,
                source=spec.topic,
                partition_key=key,
                max_runtime_s=max_runtime_s,
                spans={r.partition: (r.start, r.end) for r in group},
                selection=selection,
                config={
                    "ranges": [
                        {"topic": r.topic, "partition": r.partition, "start": r.start, "end": r.end}
                        for r in group
                    ]
                },
            )
            requests.append(request)
            context.log.info(f"{spec.asset} {key}: requesting {request.tags[RANGES_TAG]}")
        cursor.seq += 1
        lag = sum(b.end - (heads[p].end if p in heads else b.start) for p, b in bounds.items())
        context.log.info(f"{spec.asset}: total lag {lag}")
        return dg.SensorResult(
            run_requests=requests, cursor=cursor.dump(), asset_events=list(events)
        )

    return offset_sensor
