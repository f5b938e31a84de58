"""Assets fed by change data capture: the change tables and what they become in the EDW."""

import dagster as dg

from assets.event_store import reconciliation_result
from assets.recent_batches import recent_batches_metadata
from kappa import cdc
from kappa.capture import CaptureSpec
from kappa.ingest import run_capture_batch
from kappa.reconcile import reconcile_capture
from resources.oltp import OltpResource
from resources.warehouse import WarehouseResource

OWNERS = ["team:data-platform"]


class ChangeRangeConfig(dg.Config):
    """The transaction ids ``[start, end)`` a run applies, as planned by the sensor.

    Unset (a manual materialisation in the UI): the run takes the next committed changes.
    """

    end: int | None = None


def change_table_key(spec: CaptureSpec) -> dg.AssetKey:
    return dg.AssetKey(["cdc", spec.name])


def change_table_source(spec: CaptureSpec) -> dg.AssetSpec:
    """The change table as an external asset, observed by the sensor (horizon and lag)."""
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


def build_capture_asset(spec: CaptureSpec, *, max_changes: int) -> dg.AssetsDefinition:
    """The EDW table a captured OLTP table becomes (SCD2 dimension or current state)."""
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
        description=f"`{spec.source}` as a {kind}, keyed by {keys}; applied from `{spec.change_table}` in transaction order.",
        tags={"kappa/source": "cdc"},
    )
    def capture(
        context: dg.AssetExecutionContext,
        config: ChangeRangeConfig,
        oltp: OltpResource,
        warehouse: WarehouseResource,
    ) -> dg.MaterializeResult:
        with oltp.connect() as source, warehouse.connect() as edw:
            outcome = run_capture_batch(
                source,
                edw,
                warehouse.schemas,
                spec,
                requested_end=config.end,
                run_id=context.run.run_id,
                max_changes=max_changes,
            )
            lag = outcome.capture_lag or cdc.capture_lag(source, spec, outcome.end)
        context.log.info(
            f"{spec.change_table} transactions [{outcome.start}, {outcome.end}) {outcome.status}: "
            f"{outcome.loaded} applied, {outcome.dead_lettered} dead-lettered, {lag.pending_changes} pending"
        )
        metadata = {
            "transaction_range": f"[{outcome.start}, {outcome.end})",
            "rows_received": outcome.received,
            "rows_loaded": outcome.loaded,
            "rows_dead_lettered": outcome.dead_lettered,
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
        return dg.MaterializeResult(metadata=metadata)

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
    )
    def reconciliation(oltp: OltpResource, warehouse: WarehouseResource) -> dg.AssetCheckResult:
        with oltp.connect() as source, warehouse.connect() as conn:
            return reconciliation_result([reconcile_capture(source, conn, warehouse.schemas, spec)])

    return reconciliation
