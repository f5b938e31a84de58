"""Sensors that turn committed changes in the change tables into micro-batch runs.

A tick reads the snapshot horizon and the next batch boundary from the OLTP database and
the ledger head from the EDW; it writes nothing. The observation it records on the change
table shows the lag, and which open transactions hold the horizon back.
"""

import time
from datetime import UTC, datetime
from typing import Any

import dagster as dg

from kappa.catalog.captures import CaptureSpec
from kappa.cursor import OffsetCursor
from kappa.dagster.assets.cdc import change_table_key
from kappa.dagster.resources.capture import capture_resource, open_capture
from kappa.dagster.resources.warehouse import WarehouseResource
from kappa.dagster.sensors.micro_batch import (
    RANGES_TAG,
    SENSOR_STATEMENT_TIMEOUT_S,
    busy_partitions,
    micro_batch_request,
    minimum_interval,
    stopped_shards,
)
from kappa.edw.ledger import read_head
from kappa.partitions import TimeWindows
from kappa.sources.base import check_continuity


def build_capture_sensor(
    spec: CaptureSpec,
    *,
    windows: TimeWindows,
    interval_s: int,
    max_changes: int,
    failure_threshold: int,
    max_runtime_s: int | None = None,
) -> dg.SensorDefinition:
    """The sensor that launches ``spec.asset``'s micro-batches when changes commit.

    A recreated change table fails the tick with the reason; a change table whose last
    ``failure_threshold`` runs failed gets a warning and no run until its cool-down is over
    (:func:`kappa.dagster.sensors.micro_batch.stopped_shards`).

    A batch belongs to the time partition in which the tick saw its changes committed (its
    visibility time, never earlier than the last batch's partition): the run carries it as
    its partition key and the ledger records it.
    """

    @dg.sensor(
        name=f"{spec.asset}_sensor",
        description=(
            f"Polls `{spec.change_table}` for changes of transactions below the snapshot "
            f"horizon and requests runs of `{spec.asset}` with explicit transaction ranges "
            f"(at most {max_changes} changes, whole transactions), in the time partition "
            "where the changes became visible."
        ),
        asset_selection=[dg.AssetKey(spec.asset)],
        minimum_interval_seconds=minimum_interval(interval_s),
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={"warehouse", capture_resource(spec)},
    )
    def capture_sensor(context: dg.SensorEvaluationContext, **_: Any) -> dg.SensorResult:
        # Resources by key from ``context.resources`` (which ones depends on the engines of
        # the captures); a direct call of the sensor also passes them as keywords.
        cursor = OffsetCursor.parse(context.cursor)
        source = str(spec.change_table)
        warehouse: WarehouseResource = context.resources.warehouse
        with warehouse.connect(statement_timeout_s=SENSOR_STATEMENT_TIMEOUT_S) as edw:
            head = read_head(edw, warehouse.schemas, spec.asset, source, 0)
        with open_capture(
            context.resources, spec, statement_timeout_s=SENSOR_STATEMENT_TIMEOUT_S
        ) as changes:
            # A binlog starts at its oldest retained transaction; a change table at 0.
            bounds = changes.bounds([0])[0]
            start = head.end if head is not None else bounds.start
            epoch = changes.epoch()
            check_continuity(
                spec.asset, source, 0, head, bounds, epoch, positions=changes.positions
            )
            end = changes.plan_end(start, max_changes=max_changes)
            lag = changes.lag(start)

        events = []
        observed = {
            "pending": lag.pending_changes,
            "ready": lag.ready_changes,
            "holders": len(lag.holding_back),
        }
        if observed != cursor.log_end:
            events.append(
                dg.AssetObservation(asset_key=change_table_key(spec), metadata=lag.as_metadata())
            )
            cursor.log_end = observed

        if busy_partitions(context.instance, spec.asset):
            return dg.SensorResult(
                skip_reason=f"batch in flight for {source}",
                cursor=cursor.dump(),
                asset_events=events,
            )
        stopped = stopped_shards(
            context, spec.asset, names={0: source}, threshold=failure_threshold, now_s=time.time()
        )
        if stopped:
            return dg.SensorResult(
                skip_reason=f"{source} stopped: {stopped[0].describe()}",
                cursor=cursor.dump(),
                asset_events=events,
            )
        if end <= start:
            waiting = ""
            if lag.pending_changes:
                holders = ", ".join(
                    f"pid {h['pid']} open {h['open_for_s']} s"
                    if "pid" in h
                    else f"thread {h['thread']} open {h['open_for_s']} s"
                    for h in lag.holding_back
                )
                waiting = f"; {lag.pending_changes} committed change(s) wait behind open transactions ({holders})"
            return dg.SensorResult(
                skip_reason=f"no new committed changes in {source}{waiting}",
                cursor=cursor.dump(),
                asset_events=events,
            )
        window = windows.visible_at(datetime.now(UTC), head.partition_key if head else None)
        request = micro_batch_request(
            asset=spec.asset,
            partition_key=window.key,
            max_runtime_s=max_runtime_s,
            cursor=cursor,
            epoch=epoch,
            source=source,
            spans={0: (start, end)},
            config={"end": end},
        )
        cursor.seq += 1
        context.log.info(
            f"{spec.asset}: requesting {request.tags[RANGES_TAG]} ({lag.ready_changes} changes ready)"
        )
        return dg.SensorResult(run_requests=[request], cursor=cursor.dump(), asset_events=events)

    return capture_sensor
