"""Assets fed by the event store: the topics (source assets) and the facts loaded from them
(their checks are in :mod:`kappa.dagster.assets.fact_checks`)."""

from collections import Counter
from collections.abc import Iterator
from typing import Any

import dagster as dg

from kappa.dagster.assets.fact_checks import (
    build_reconciliation_check,
    build_replay_check,
    build_staleness_check,
    metadata_table,
    reconciliation_result,
    replay_result,
)
from kappa.dagster.assets.partitions import arrival_partitions, previous_partition_dep
from kappa.dagster.assets.recent_batches import recent_batches_metadata
from kappa.dagster.resources.capture import capture_resource, open_capture
from kappa.dagster.resources.state import StateCacheResource
from kappa.dagster.resources.warehouse import WarehouseResource
from kappa.heal import HEAL_TAG
from kappa.ingest.outcome import BatchOutcome, WindowOutcome
from kappa.ingest.plan import OffsetRange, TopicIngest
from kappa.partitions import TimeWindows
from kappa.run import (
    Connections,
    FactServices,
    reprocess_partitions,
    run_micro_batches,
)

OWNERS = ["team:data-platform"]


class OffsetRangeConfig(dg.Config):
    """Offsets ``[start, end)`` of one topic partition."""

    topic: str
    partition: int
    start: int
    end: int


class MicroBatchConfig(dg.Config):
    """The ranges a micro-batch run loads, as planned by the sensor.

    Empty (a backfill, or a materialisation launched in the UI): the run reprocesses its
    time partitions from the log instead.
    """

    ranges: list[OffsetRangeConfig] = []


def topic_asset_key(topic: str) -> dg.AssetKey:
    return dg.AssetKey(["event_store", topic])


def topic_source(spec: TopicIngest) -> dg.AssetSpec:
    """The topic as an external asset, observed by the sensor (end offsets per partition)."""
    return dg.AssetSpec(
        key=topic_asset_key(spec.topic),
        description=(
            f"Kafka-API topic `{spec.topic}`: "
            f"{', '.join(f'`{t}`' for t in spec.contract.event_types)} events keyed by "
            f"`{spec.contract.key_field}`. Observed by `{spec.asset}_sensor` (end offsets)."
        ),
        group_name="event_store",
        kinds={"kafka"},
        owners=OWNERS,
    )


def _outcomes_table(outcomes: list[BatchOutcome]) -> dg.TableMetadataValue:
    return metadata_table(
        [
            {
                "partition": o.partition,
                "start": o.start,
                "end": o.end,
                "status": o.status,
                "received": o.received,
                "loaded": o.loaded,
                "dead_lettered": o.dead_lettered,
                "deduplicated": o.deduplicated,
                "lag_after": o.lag_after,
                "seconds": round(o.seconds, 3),
                "capture_wait_s": round(o.capture_wait_s, 3),
            }
            for o in outcomes
        ]
    )


def window_table(
    outcomes: list[WindowOutcome], positions: str = "offsets"
) -> dg.TableMetadataValue:
    return metadata_table(
        [
            {
                "window": o.window,
                "partition": o.partition,
                positions: f"[{o.start}, {o.end})",
                "status": o.status,
                "removed": o.removed_rows,
                "received": o.received,
                "loaded": o.loaded,
                "dead_lettered": o.dead_lettered,
                "deduplicated": o.deduplicated,
                "batches": o.batches,
                "stale_from": o.stale_from or "",
                "seconds": round(o.seconds, 3),
            }
            for o in outcomes
        ]
    )


RESOLVED_TAG = "kappa/resolved_offsets"
#: Run tags are short: the resolved offsets of a long range are in the materialisation.
_MAX_TAG_LENGTH = 4000


def tag_resolved_positions(
    context: dg.AssetExecutionContext, outcomes: list[WindowOutcome]
) -> None:
    """Freeze on the run the positions each reprocessed partition resolved to (a tag, when
    short enough; the materialisation's table always has them)."""
    resolved = ";".join(
        f"{o.window}={o.partition}:{o.start}-{o.end}" for o in outcomes if o.end > o.start
    )
    if resolved and len(resolved) <= _MAX_TAG_LENGTH:
        context.instance.add_run_tags(context.run.run_id, {RESOLVED_TAG: resolved})


def side_table_assets(spec: TopicIngest) -> tuple[dg.AssetSpec, ...]:
    """The side tables of the fact's step as assets written by the fact (lineage)."""
    if spec.step is None:
        return ()
    return tuple(
        dg.AssetSpec(
            key=table.name,
            deps=[spec.asset],
            group_name="edw",
            kinds={"postgres"},
            owners=OWNERS,
            description=table.description or f"Written by `{spec.asset}` in its transactions.",
        )
        for table in spec.step.side_tables
    )


def build_fact_asset(
    spec: TopicIngest,
    *,
    windows: TimeWindows,
    max_batch: int,
    max_run: int,
    memory_records: int,
    services: FactServices | None = None,
) -> dg.AssetsDefinition:
    """The EDW fact loaded from one topic in micro-batches (and the side tables its step
    declares, written in the same transactions), partitioned by arrival time.

    A run with offset ranges (from the sensor) appends a micro-batch to the open partition.
    A run without (a backfill or a materialisation launched in the UI) reprocesses each of
    its partitions, oldest first, each in one transaction: see
    :func:`kappa.ingest.reprocess.reprocess_window`.
    """
    services = services or FactServices()
    upstream: list[dg.AssetKey | dg.AssetDep] = [topic_asset_key(spec.topic)]
    if spec.step is not None:
        targets = dict.fromkeys(lookup.target for lookup in spec.step.lookups)
        upstream += [
            dg.AssetKey(services.captures[t].asset) for t in targets if t in services.captures
        ]
        upstream.append(previous_partition_dep(spec.asset))
    side_assets = side_table_assets(spec)
    main = dg.AssetSpec(
        key=spec.asset,
        deps=upstream,
        group_name="edw",
        kinds={"postgres", "pandas"},
        owners=OWNERS,
        description=spec.description,
        tags={"kappa/source": "event_store"},
    )

    # The resource of each engine its step's lookups are captured from (their completeness).
    engines = {
        capture_resource(services.captures[lookup.target])
        for lookup in (spec.step.lookups if spec.step is not None else ())
        if lookup.target in services.captures and lookup.target not in services.off
    }

    @dg.multi_asset(
        name=spec.asset,
        specs=[main, *side_assets],
        can_subset=False,
        partitions_def=arrival_partitions(windows),
        backfill_policy=dg.BackfillPolicy.single_run(),
        required_resource_keys={"event_store", "warehouse", "oltp", "state_cache", *engines},
    )
    def fact(
        context: dg.AssetExecutionContext, config: MicroBatchConfig
    ) -> Iterator[dg.MaterializeResult]:
        resources = context.resources
        warehouse: WarehouseResource = resources.warehouse
        state_cache: StateCacheResource = resources.state_cache
        connections = Connections(
            schemas=warehouse.schemas,
            event_store=resources.event_store.open,
            edw=warehouse.connect,
            oltp=resources.oltp.connect,
            change_source=lambda capture: open_capture(resources, capture),
        )
        if not config.ranges:
            yield from _reprocess(context, connections)
            return
        cache = state_cache.cache(warehouse.schemas)
        run = run_micro_batches(
            connections,
            spec,
            [OffsetRange(r.topic, r.partition, r.start, r.end) for r in config.ranges],
            run_id=context.run.run_id,
            partition_key=context.partition_key,
            max_batch=max_batch,
            memory_records=memory_records,
            cache=cache,
            services=services,
            log=context.log,
        )
        outcomes = run.outcomes
        if run.failures:
            raise dg.Failure(
                description="\n".join(run.failures),
                metadata={"committed_partitions": [o.partition for o in outcomes]},
            )
        reasons: Counter[str] = Counter()
        for o in outcomes:
            reasons.update(o.dead_letter_reasons)
        metadata: dict[str, Any] = {
            "mode": "micro-batch",
            "ranges": _outcomes_table(outcomes),
            "offset_ranges": ", ".join(
                f"{spec.topic}[{o.partition}]:{o.start}-{o.end}" for o in outcomes
            )
            or "none",
            "rows_received": sum(o.received for o in outcomes),
            "rows_loaded": sum(o.loaded for o in outcomes),
            "rows_dead_lettered": sum(o.dead_lettered for o in outcomes),
            "rows_deduplicated": sum(o.deduplicated for o in outcomes),
            "poison_probes": sum(o.probes for o in outcomes),
            "lag_after_batch": sum(o.lag_after for o in outcomes),
            "batch_seconds": round(sum(o.seconds for o in outcomes), 3),
            # The longest a batch of the run waited for change capture of its lookups'
            # targets (at most KAPPA_ENRICH_MAX_WAIT_S; the partitions run in parallel).
            "capture_wait_s": round(max((o.capture_wait_s for o in outcomes), default=0.0), 3),
            # The most records its batches held in memory at once (KAPPA_RUN_MEMORY_RECORDS).
            "records_in_memory_peak": run.peak_records,
            "dead_letter_reasons": dict(reasons),
            "event_dates": sorted(set().union(*(o.event_dates for o in outcomes))),
            "state_cache": {"keys": len(cache), "hits": cache.hits, "misses": cache.misses},
        }
        metadata.update(
            recent_batches_metadata(
                context.instance, spec.asset, metadata, run_id=context.run.run_id
            )
        )
        # On the materialisation only: metadata of the output would be stored a second time,
        # in the step's output event, which no page reads (see "Dagster storage").
        context.add_asset_metadata(metadata, asset_key=spec.asset)
        yield dg.MaterializeResult(asset_key=spec.asset)
        for side in side_assets:
            context.add_asset_metadata(
                {
                    "side_rows": {
                        o.partition: o.side_rows.get(side.key.path[-1], 0) for o in outcomes
                    }
                },
                asset_key=side.key,
            )
            yield dg.MaterializeResult(asset_key=side.key)

    def _reprocess(
        context: dg.AssetExecutionContext, connections: Connections
    ) -> Iterator[dg.MaterializeResult]:
        keys = list(context.partition_keys)
        run = reprocess_partitions(
            connections,
            spec,
            windows,
            keys,
            run_id=context.run.run_id,
            max_batch=max_batch,
            services=services,
            log=context.log,
            heal=HEAL_TAG in context.run.tags,
        )
        outcomes = run.outcomes
        if run.error is not None:
            raise dg.Failure(
                description=run.error,
                metadata={
                    "partitions_reprocessed": sorted({o.window for o in outcomes}),
                    "failed_partition": run.failed_partition or "",
                },
            )
        tag_resolved_positions(context, outcomes)
        stale_from = sorted({o.stale_from for o in outcomes if o.stale_from})
        yield dg.MaterializeResult(
            asset_key=spec.asset,
            metadata={
                "mode": "heal" if HEAL_TAG in context.run.tags else "reprocess",
                "partitions": ", ".join(keys)
                if len(keys) <= 3
                else f"{keys[0]} .. {keys[-1]} ({len(keys)})",
                "resolved_offsets": window_table(outcomes),
                "rows_removed": sum(o.removed_rows for o in outcomes),
                "rows_received": sum(o.received for o in outcomes),
                "rows_loaded": sum(o.loaded for o in outcomes),
                "rows_dead_lettered": sum(o.dead_lettered for o in outcomes),
                "rows_deduplicated": sum(o.deduplicated for o in outcomes),
                "poison_probes": sum(o.probes for o in outcomes),
                "batch_seconds": round(sum(o.seconds for o in outcomes), 3),
                "event_dates": sorted(set().union(*(o.event_dates for o in outcomes))),
                "stale_from": ", ".join(stale_from) or "none",
            },
        )
        for side in side_assets:
            yield dg.MaterializeResult(
                asset_key=side.key,
                metadata={
                    "side_rows": sum(o.side_rows.get(side.key.path[-1], 0) for o in outcomes)
                },
            )

    return fact


__all__ = [  # the checks too: callers import every fact builder from here
    "RESOLVED_TAG",
    "FactServices",
    "MicroBatchConfig",
    "OffsetRangeConfig",
    "build_fact_asset",
    "build_reconciliation_check",
    "build_replay_check",
    "build_staleness_check",
    "metadata_table",
    "reconciliation_result",
    "replay_result",
    "side_table_assets",
    "tag_resolved_positions",
    "topic_asset_key",
    "topic_source",
    "window_table",
]
