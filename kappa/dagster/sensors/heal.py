"""Heal sensors: re-derive the time partitions of provisional rows once change capture
covers them, through the same path as a backfill (a run of the fact without offset ranges),
each shard only from its first ledger batch holding a provisional row.

A tick reads the provisional rows (a partial index), the ledger and change capture's
completeness; it has no side effects. It asks for at most one partition per asset, never
while a heal run of that asset is in flight. The run carries the asset's tag (the run
queue's limit of one per asset) and holds every shard, so the live sensor plans nothing
while it runs.
"""

from contextlib import ExitStack
from functools import partial
from typing import Any

import dagster as dg

from kappa.dagster.assets.event_store import FactServices
from kappa.dagster.resources.capture import capture_resource, open_capture
from kappa.dagster.resources.event_store import EventStoreResource
from kappa.dagster.resources.warehouse import WarehouseResource
from kappa.dagster.sensors.micro_batch import (
    ASSET_TAG,
    IN_FLIGHT,
    MAX_RUNTIME_TAG,
    SENSOR_STATEMENT_TIMEOUT_S,
)
from kappa.heal import (
    HEAL_TAG,
    group_values,
    ledger_fingerprint,
    plan_heal,
    provisional_groups,
)
from kappa.health import shard_tags
from kappa.ingest.plan import TopicIngest
from kappa.partitions import TimeWindows
from kappa.run import Connections, open_dimensions
from kappa.steps.warehouse import VersionCache

__all__ = ["HEAL_KEY_TAG", "HEAL_TAG", "build_heal_sensor"]

#: The ledger state of the partition the heal run was asked for (see ledger_fingerprint).
HEAL_KEY_TAG = "kappa/heal_key"


def build_heal_sensor(
    spec: TopicIngest,
    *,
    services: FactServices,
    windows: TimeWindows,
    interval_s: int,
    selection: list[dg.AssetKey] | None = None,
    max_runtime_s: int | None = None,
) -> dg.SensorDefinition:
    """The sensor that heals ``spec.asset``'s provisional rows (see the module)."""

    engines = {
        capture_resource(services.captures[lookup.target])
        for lookup in (spec.step.lookups if spec.step is not None else ())
        if lookup.target in services.captures and lookup.target not in services.off
    }

    @dg.sensor(
        name=f"{spec.asset}_heal_sensor",
        description=(
            f"Re-derives a time partition of `{spec.asset}` holding `provisional` rows once "
            "change capture is complete past their event times (the backfill path, from each "
            "shard's first batch holding a provisional row), one partition at a time; runs "
            f"tagged `{HEAL_TAG}`."
        ),
        asset_selection=selection or [dg.AssetKey(spec.asset)],
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={"event_store", "warehouse", "oltp", *engines},
    )
    def heal_sensor(context: dg.SensorEvaluationContext, **_: Any) -> dg.SensorResult:
        resources = context.resources
        event_store: EventStoreResource = resources.event_store
        warehouse: WarehouseResource = resources.warehouse
        in_flight = context.instance.get_runs(
            filters=dg.RunsFilter(tags={ASSET_TAG: spec.asset}, statuses=IN_FLIGHT)
        )
        healing = [r for r in in_flight if HEAL_TAG in r.tags]
        if healing:
            run = healing[0]
            return dg.SensorResult(
                skip_reason=f"heal run {run.run_id[:8]} of {spec.asset} partition "
                f"{run.tags[HEAL_TAG]} is {run.status.value.lower()}"
            )
        schemas = warehouse.schemas
        with warehouse.connect(statement_timeout_s=SENSOR_STATEMENT_TIMEOUT_S) as conn:
            groups = provisional_groups(conn, schemas, spec.asset, spec.contract)
            completeness = None
            if groups:
                connections = Connections(
                    schemas=schemas,
                    event_store=event_store.open,
                    edw=warehouse.connect,
                    oltp=partial(
                        resources.oltp.connect, statement_timeout_s=SENSOR_STATEMENT_TIMEOUT_S
                    ),
                    change_source=lambda capture: open_capture(
                        resources, capture, statement_timeout_s=SENSOR_STATEMENT_TIMEOUT_S
                    ),
                )
                with ExitStack() as stack:
                    lookups = open_dimensions(
                        stack, conn, spec, connections, services, VersionCache()
                    )
                    if lookups is not None:
                        completeness = lookups.watermark(group_values(groups))
            plan = plan_heal(spec.asset, groups, completeness, windows)
            if plan.partition_key is None:
                return dg.SensorResult(skip_reason=plan.waiting)
            key = plan.partition_key
            fingerprint = ledger_fingerprint(conn, schemas, spec.asset, spec.topic, key)
        failed = context.instance.get_runs(
            filters=dg.RunsFilter(
                tags={ASSET_TAG: spec.asset, HEAL_TAG: key, HEAL_KEY_TAG: fingerprint},
                statuses=[dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED],
            ),
            limit=1,
        )
        if failed:
            return dg.SensorResult(
                skip_reason=f"the heal run {failed[0].run_id[:8]} of {spec.asset} partition "
                f"{key} did not succeed and nothing in that partition changed since: it is "
                "asked for again when a batch of it commits (or backfill the partition)"
            )
        with event_store.open() as store:
            shards = store.partitions(spec.topic)
        context.log.info(
            f"{spec.asset} {key}: {plan.ready_rows} of {plan.provisional_rows} provisional "
            "rows are covered by change capture now; re-deriving the partition from each "
            "shard's first batch holding a provisional row"
            + (f" ({plan.waiting})" if plan.waiting else "")
        )
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"heal/{spec.asset}/{key}/{fingerprint}",
                    partition_key=key,
                    asset_selection=selection or [dg.AssetKey(spec.asset)],
                    # Checks re-read the log: not with every heal.
                    asset_check_keys=[],
                    tags={
                        ASSET_TAG: spec.asset,
                        **shard_tags(spec.asset, shards),
                        HEAL_TAG: key,
                        HEAL_KEY_TAG: fingerprint,
                        **({MAX_RUNTIME_TAG: str(max_runtime_s)} if max_runtime_s else {}),
                    },
                )
            ]
        )

    return heal_sensor
