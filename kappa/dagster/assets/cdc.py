"""Assets fed by change data capture: the change tables and what they become in the EDW."""

from collections.abc import Iterator

import dagster as dg

from kappa.catalog.captures import CaptureSpec
from kappa.dagster.assets.event_store import (
    reconciliation_result,
    replay_result,
    tag_resolved_positions,
    window_table,
)
from kappa.dagster.assets.partitions import arrival_partitions
from kappa.dagster.assets.recent_batches import recent_batches_metadata
from kappa.dagster.resources.capture import capture_resource, open_capture
from kappa.dagster.resources.warehouse import WarehouseResource
from kappa.exceptions import BatchSupersededError, KappaError
from kappa.ingest.capture import ChangeWindowLoader
from kappa.ingest.changes import run_change_batch
from kappa.ingest.outcome import WindowOutcome
from kappa.ingest.reprocess import reprocess_window
from kappa.partitions import TimeWindows
from kappa.reconcile import compare_changes_with_log, reconcile_source

OWNERS = ["team:data-platform"]


class ChangeRangeConfig(dg.Config):
    """Where the micro-batch the sensor planned ends: it applies transactions ``[ledger
    end, end)``.

    Unset (a backfill, or a materialisation launched in the UI): the run reprocesses its
    time partitions from the change table instead.
    """

    end: int | None = None


def change_table_key(spec: CaptureSpec) -> dg.AssetKey:
    return dg.AssetKey(["cdc", spec.name])


def change_table_source(spec: CaptureSpec) -> dg.AssetSpec:
    """The change source as an external asset, observed by the sensor (horizon and lag)."""
    if spec.engine == "mariadb":
        return dg.AssetSpec(
            key=change_table_key(spec),
            description=(
                f"The binlog of the MariaDB server holding `{spec.source}` (row events of "
                "committed transactions, numbered by GTID). Observed by "
                f"`{spec.asset}_sensor`: the binlog's end, the table's rows not loaded yet, "
                "transactions open on the server."
            ),
            group_name="oltp_cdc",
            kinds={"mysql"},
            owners=OWNERS,
        )
    return dg.AssetSpec(
        key=change_table_key(spec),
        description=(
            f"Change table `{spec.change_table}`, filled by triggers on `{spec.source}` "
            f"(operation, xid8, before/after images). Observed by `{spec.asset}_sensor`: "
            "snapshot horizon, pending changes, transactions holding the horizon back."
        ),
        group_name="oltp_cdc",
        kinds={"postgres"},
        owners=OWNERS,
    )


def build_capture_asset(
    spec: CaptureSpec, *, windows: TimeWindows, max_changes: int
) -> dg.AssetsDefinition:
    """The EDW table a captured OLTP table becomes (SCD2 dimension or current state),
    partitioned by the time its changes became visible to the sensor.

    A run with an ``end`` (from the sensor) applies the next committed changes to the open
    partition. A run without (a backfill or a materialisation launched in the UI) replaces
    each of its partitions, oldest first: see :func:`kappa.ingest.reprocess.reprocess_window`
    and :class:`kappa.ingest.capture.ChangeWindowLoader`.
    """
    kind = (
        "SCD type 2 dimension (every version, valid_from/valid_to)"
        if spec.mode == "scd2"
        else "current state"
    )
    keys = ", ".join(spec.keys)

    @dg.asset(
        name=spec.asset,
        deps=[change_table_key(spec)],
        group_name="edw",
        kinds={"postgres", "pandas"},
        owners=OWNERS,
        description=(
            f"`{spec.source}` as a {kind}, keyed by {keys}; applied from `{spec.change_table}` "
            "in transaction order. Partitioned by the time changes became visible (committed "
            "below the snapshot horizon)."
        ),
        tags={"kappa/source": "cdc"},
        partitions_def=arrival_partitions(windows),
        backfill_policy=dg.BackfillPolicy.single_run(),
        required_resource_keys={"warehouse", capture_resource(spec)},
    )
    def capture(
        context: dg.AssetExecutionContext, config: ChangeRangeConfig
    ) -> Iterator[dg.MaterializeResult]:
        warehouse: WarehouseResource = context.resources.warehouse
        if config.end is None:
            yield _reprocess(context, warehouse)
            return
        with open_capture(context.resources, spec) as source, warehouse.connect() as edw:
            try:
                outcome = run_change_batch(
                    source,
                    edw,
                    warehouse.schemas,
                    requested_end=config.end,
                    run_id=context.run.run_id,
                    max_changes=max_changes,
                    partition_key=context.partition_key,
                )
            except BatchSupersededError as exc:
                context.log.warning(str(exc))
                yield dg.MaterializeResult(metadata={"mode": "micro-batch", "superseded": str(exc)})
                return
            lag = outcome.capture_lag or source.lag(outcome.end)
        metadata = {
            "mode": "micro-batch",
            "transaction_range": f"[{outcome.start}, {outcome.end})",
            "rows_received": outcome.received,
            "rows_loaded": outcome.loaded,
            "rows_dead_lettered": outcome.dead_lettered,
            "poison_probes": outcome.probes,
            "rows_deduplicated": 0,
            "lag_after_batch": lag.pending_changes,
            "batch_seconds": round(outcome.seconds, 3),
            **lag.as_metadata(),
        }
        metadata.update(
            recent_batches_metadata(
                context.instance, spec.asset, metadata, run_id=context.run.run_id
            )
        )
        # On the materialisation only (not stored again in the step's output event), and no
        # log line: the materialisation says all of it (see "Dagster storage").
        context.add_asset_metadata(metadata)
        yield dg.MaterializeResult()

    def _reprocess(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        keys = list(context.partition_keys)
        outcomes: list[WindowOutcome] = []
        with open_capture(context.resources, spec) as changes, warehouse.connect() as edw:
            for key in keys:
                try:
                    (outcome,) = reprocess_window(
                        changes,
                        edw,
                        warehouse.schemas,
                        spec.asset,
                        windows.window(key),
                        ChangeWindowLoader(changes, edw, warehouse.schemas, spec),
                        run_id=context.run.run_id,
                    )
                except KappaError as exc:
                    context.log.error(str(exc))
                    raise dg.Failure(
                        description=str(exc),
                        metadata={
                            "partitions_reprocessed": [o.window for o in outcomes],
                            "failed_partition": key,
                        },
                    ) from None
                outcomes.append(outcome)
                context.log.info(
                    f"{spec.asset} partition {key}: "
                    + (
                        f"replaced transactions [{outcome.start}, {outcome.end}); "
                        f"{outcome.loaded} changes applied, {outcome.removed_rows} rows rebuilt"
                        if outcome.status == "replaced"
                        else "no batch of the ledger became visible in it: nothing to replace"
                    )
                )
        tag_resolved_positions(context, outcomes)
        return dg.MaterializeResult(
            metadata={
                "mode": "reprocess",
                "partitions": ", ".join(keys)
                if len(keys) <= 3
                else f"{keys[0]} .. {keys[-1]} ({len(keys)})",
                "resolved_transactions": window_table(outcomes, "transactions"),
                "rows_removed": sum(o.removed_rows for o in outcomes),
                "rows_received": sum(o.received for o in outcomes),
                "rows_loaded": sum(o.loaded for o in outcomes),
                "rows_dead_lettered": sum(o.dead_lettered for o in outcomes),
                "poison_probes": sum(o.probes for o in outcomes),
                "batch_seconds": round(sum(o.seconds for o in outcomes), 3),
            }
        )

    return capture


def build_capture_reconciliation_check(spec: CaptureSpec) -> dg.AssetChecksDefinition:
    """Changes captured = applied + dead-lettered, over the transactions the ledger covers."""

    @dg.asset_check(
        asset=spec.asset,
        name="reconciliation",
        blocking=False,
        description=(
            f"The ledger covers `{spec.change_table}` without gap or overlap, and the changes of the "
            "covered transactions are what it received: applied + dead-lettered."
        ),
        required_resource_keys={"warehouse", capture_resource(spec)},
    )
    def reconciliation(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        warehouse: WarehouseResource = context.resources.warehouse
        with open_capture(context.resources, spec) as source, warehouse.connect() as conn:
            (found,) = reconcile_source(source, conn, warehouse.schemas, spec.asset)
            return reconciliation_result([found])

    return reconciliation


def build_capture_replay_check(spec: CaptureSpec) -> dg.AssetChecksDefinition:
    """Replay equivalence per time partition: each partition re-derived from the change table
    (in a transaction rolled back afterwards) equals what the EDW holds."""

    @dg.asset_check(
        asset=spec.asset,
        name="replay_equivalence",
        blocking=False,
        description=(
            f"Re-derives each time partition of `{spec.asset}` from `{spec.change_table}` as a "
            "backfill would, inside a transaction that is rolled back, and compares the rows its "
            "transactions wrote or closed, and its dead letters, with what the EDW holds (counts "
            "and an order-independent checksum)."
        ),
        required_resource_keys={"warehouse", capture_resource(spec)},
    )
    def replay_equivalence(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        warehouse: WarehouseResource = context.resources.warehouse
        with open_capture(context.resources, spec) as source, warehouse.connect() as conn:
            comparisons = compare_changes_with_log(source, conn, warehouse.schemas, spec)
        return replay_result(str(spec.change_table), comparisons, "transactions")

    return replay_equivalence
