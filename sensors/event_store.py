"""Sensors that turn new offsets in the event store into micro-batch runs.

A sensor evaluation only reads metadata (partitions, log bounds, topic id: each call bounded
by a timeout), the ledger heads, and the run storage; it has no side effects, so the daemon
may evaluate a tick twice. Run requests carry offset ranges, never payloads.
"""

import dagster as dg

from assets.event_store import topic_asset_key
from kappa.cursor import OffsetCursor
from kappa.event_store import UnknownTopicError
from kappa.exceptions import ConfigurationError
from kappa.ingest import TopicIngest, check_continuity, plan_ranges
from kappa.warehouse import read_heads
from resources.event_store import EventStoreResource
from resources.warehouse import WarehouseResource
from sensors.micro_batch import (
    RANGES_TAG,
    SENSOR_STATEMENT_TIMEOUT_S,
    busy_partitions,
    micro_batch_request,
)


def build_offset_sensor(
    spec: TopicIngest,
    *,
    topic_setting: str,
    interval_s: int,
    max_batch: int,
    max_run: int,
    selection: list[dg.AssetKey] | None = None,
) -> dg.SensorDefinition:
    """The sensor that launches ``spec.asset``'s micro-batches when its topic grows."""

    @dg.sensor(
        name=f"{spec.asset}_sensor",
        description=(
            f"Polls the end offsets of `{spec.topic}` and requests micro-batch runs of "
            f"`{spec.asset}` with explicit offset ranges (at most {max_batch} records per "
            "partition), one batch in flight per partition."
        ),
        asset_selection=selection or [dg.AssetKey(spec.asset)],
        minimum_interval_seconds=interval_s,
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
                spec.asset, spec.topic, partition, heads.get(partition), bounds[partition], epoch
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

        busy = busy_partitions(context.instance, spec.asset)
        ranges = plan_ranges(
            spec.topic, heads, bounds, busy=busy, max_batch=max_batch, max_run=max_run
        )
        if not ranges:
            waiting = [p for p in partitions if p in busy]
            reason = (
                "batch in flight for "
                + ", ".join(f"{spec.topic}[{p}]" for p in waiting)
                + "; no new offsets elsewhere"
                if waiting
                else f"no new offsets in {spec.topic} (ledger at the log end of every partition)"
            )
            return dg.SensorResult(
                skip_reason=reason, cursor=cursor.dump(), asset_events=list(events)
            )
        request = micro_batch_request(
            asset=spec.asset,
            cursor=cursor,
            epoch=epoch,
            source=spec.topic,
            spans={r.partition: (r.start, r.end) for r in ranges},
            selection=selection,
            config={
                "ranges": [
                    {"topic": r.topic, "partition": r.partition, "start": r.start, "end": r.end}
                    for r in ranges
                ]
            },
        )
        cursor.seq += 1
        lag = sum(b.end - (heads[p].end if p in heads else b.start) for p, b in bounds.items())
        context.log.info(f"{spec.asset}: requesting {request.tags[RANGES_TAG]} (total lag {lag})")
        return dg.SensorResult(
            run_requests=[request], cursor=cursor.dump(), asset_events=list(events)
        )

    return offset_sensor
