"""The checks of an event fact: replay equivalence (re-derived from the log, per time
partition), reconciliation with the log (per shard), and state continuity; and the metadata
tables they and the fact report in."""

from typing import Any

import dagster as dg

from kappa.dagster.resources.event_store import EventStoreResource
from kappa.dagster.resources.warehouse import WarehouseResource
from kappa.edw.checkpoints import read_checkpoints
from kappa.ingest.plan import TopicIngest
from kappa.reconcile import (
    PartitionComparison,
    ShardReconciliation,
    compare_with_log,
    reconcile_topic,
)

_TYPES = {bool: "bool", int: "int", float: "float", str: "string"}


def metadata_table(rows: list[dict[str, Any]]) -> dg.TableMetadataValue:
    """A metadata table whose schema follows the rows' keys and value types."""
    first = rows[0] if rows else {}
    return dg.MetadataValue.table(
        records=[dg.TableRecord(row) for row in rows],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn(name, _TYPES.get(type(value), "string"))
                for name, value in first.items()
            ]
        ),
    )


def build_replay_check(spec: TopicIngest) -> dg.AssetChecksDefinition:
    """Replay equivalence: the fact re-derived from the log equals what the EDW holds."""

    @dg.asset_check(
        asset=spec.asset,
        name="replay_equivalence",
        blocking=False,
        description=(
            f"Reads every offset of `{spec.topic}` the ledger says was loaded, decodes it with the "
            f"same code, and compares the distinct valid events and the dead letters with "
            f"`{spec.asset}` per partition (counts and an order-independent checksum)."
        ),
    )
    def replay_equivalence(
        event_store: EventStoreResource, warehouse: WarehouseResource
    ) -> dg.AssetCheckResult:
        with event_store.open() as store, warehouse.connect() as conn:
            comparisons = compare_with_log(store, conn, warehouse.schemas, spec)
        return replay_result(spec.topic, comparisons)

    return replay_equivalence


def replay_result(
    source: str, comparisons: list[PartitionComparison], positions: str = "offsets"
) -> dg.AssetCheckResult:
    """The check result of a replay comparison: passes when every range is equal."""
    differing = [c for c in comparisons if not c.equal]
    return dg.AssetCheckResult(
        passed=not differing,
        description=(
            "; ".join(f"{source}[{c.partition}] {c.describe()}" for c in differing)
            if differing
            else f"{len(comparisons)} (time partition, shard) ranges equal to the log"
        ),
        metadata={
            "partitions": metadata_table(
                [
                    {
                        "window": c.window or "",
                        "partition": c.partition,
                        positions: f"[{c.start}, {c.end})",
                        "log_rows": c.log_rows,
                        "edw_rows": c.edw_rows,
                        "log_dead_letters": c.log_dead_letters,
                        "edw_dead_letters": c.edw_dead_letters,
                        "checksums_equal": c.log_checksum == c.edw_checksum,
                    }
                    for c in comparisons
                ]
            ),
            "rows_differing": sum(abs(c.log_rows - c.edw_rows) for c in comparisons),
        },
    )


def reconciliation_result(accounts: list[ShardReconciliation]) -> dg.AssetCheckResult:
    """The check result of a reconciliation: passes when every shard adds up."""
    failing = [a for a in accounts if a.problems]
    return dg.AssetCheckResult(
        passed=not failing,
        description=(
            "; ".join(f"{a.shard}: {', '.join(a.problems)}" for a in failing)
            if failing
            else f"{len(accounts)} shards reconcile: source = received = loaded + dead-lettered + deduplicated"
        ),
        metadata={
            "shards": metadata_table(
                [
                    {
                        "shard": a.shard,
                        "ledger": f"[{a.ledger_start}, {a.ledger_end})",
                        "lag": a.lag,
                        "in_source": a.source_count,
                        "received": a.received,
                        "loaded": a.loaded,
                        "dead_lettered": a.dead_lettered,
                        "deduplicated": a.deduplicated,
                        "ok": not a.problems,
                    }
                    for a in accounts
                ]
            ),
            "lag": sum(a.lag for a in accounts),
        },
    )


def build_reconciliation_check(spec: TopicIngest) -> dg.AssetChecksDefinition:
    """Produced = loaded + dead-lettered + deduplicated, per topic partition, with no gap."""

    @dg.asset_check(
        asset=spec.asset,
        name="reconciliation",
        blocking=False,
        description=(
            f"Per partition of `{spec.topic}`: the ledger covers the log without gap or overlap, the "
            "records in the covered range are what the ledger received, and received = loaded + "
            "dead-lettered + deduplicated."
        ),
    )
    def reconciliation(
        event_store: EventStoreResource, warehouse: WarehouseResource
    ) -> dg.AssetCheckResult:
        with event_store.open() as store, warehouse.connect() as conn:
            return reconciliation_result(reconcile_topic(store, conn, warehouse.schemas, spec))

    return reconciliation


def build_staleness_check(spec: TopicIngest) -> dg.AssetChecksDefinition:
    """Partitions processed from a state their predecessor no longer ends with."""

    @dg.asset_check(
        asset=spec.asset,
        name="state_continuity",
        blocking=False,
        description=(
            f"Each time partition of `{spec.asset}` was processed from the state its "
            "predecessor ends with (state checkpoints). Fails, naming them, when reprocessing "
            "a partition changed the state it ends with: the partitions after it are stale "
            "until reprocessed (one backfill from the changed partition to now)."
        ),
    )
    def state_continuity(warehouse: WarehouseResource) -> dg.AssetCheckResult:
        with warehouse.connect() as conn:
            checkpoints = read_checkpoints(conn, warehouse.schemas, spec.asset, spec.topic)
        stale = [c for c in checkpoints if c.stale_reason]
        first_stale = min((c.partition_key for c in stale), default=None)
        return dg.AssetCheckResult(
            passed=not stale,
            description=(
                f"stale from partition {first_stale} on: "
                + "; ".join(
                    f"{c.source}[{c.shard}] {c.partition_key}: {c.stale_reason}" for c in stale
                )
                + f". Reprocess {first_stale} to now in one backfill "
                f"(`kappa backfill {spec.asset} --from {first_stale}`)."
                if stale
                else f"{len(checkpoints)} partition starts follow from their predecessors"
            ),
            metadata={
                "checkpoints": len(checkpoints),
                "stale_partitions": sorted({c.partition_key for c in stale}),
            },
        )

    return state_continuity
