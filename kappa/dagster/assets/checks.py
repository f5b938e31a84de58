"""Freshness: an asset check on every fact and captured table, and the sensor that keeps it
current.

The check passes while the oldest record or change the EDW has not loaded yet is at most
``KAPPA_FRESHNESS_MAX_LAG_S`` old (see :mod:`kappa.freshness`), and fails with ERROR severity,
whatever the lag, while a shard is stopped (:mod:`kappa.health`: a lost or recreated log,
expired offsets, a recreated change table, or the last ``KAPPA_RUN_RETRIES`` + 1 runs over
the shard failed), with the reason. It can be run on demand (the
``edw_checks`` job, or "Execute" on the asset's Checks tab); the ``freshness_sensor``
evaluates it every :data:`FRESHNESS_INTERVAL_S` seconds and records the result as a runless
check evaluation, so the UI shows it without a run per evaluation. The sensor only reads
(log bounds, one small fetch per lagging partition, the ledger heads, the change tables).
"""

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import dagster as dg
import psycopg

from kappa.catalog.captures import CaptureSpec
from kappa.dagster.assets.cdc import change_table_key
from kappa.dagster.assets.event_store import topic_asset_key
from kappa.dagster.resources.capture import capture_resource, open_capture
from kappa.dagster.resources.event_store import EventStoreResource
from kappa.dagster.resources.warehouse import WarehouseResource
from kappa.edw.types import Schemas
from kappa.freshness import (
    FreshnessVerdict,
    capture_freshness,
    topic_freshness,
    verdict,
)
from kappa.health import RunFailures, recent_failures
from kappa.ingest.plan import TopicIngest
from kappa.sources.base import ChangeSource
from kappa.sources.topic import EventStore

FRESHNESS_CHECK = "freshness"
FRESHNESS_SENSOR = "freshness_sensor"
FRESHNESS_INTERVAL_S = 30
#: Freshness is about time, not correctness: a late asset warns, a wrong one errors.
FRESHNESS_SEVERITY = dg.AssetCheckSeverity.WARN
#: A stopped asset does not catch up by waiting: an operator has to act.
STOPPED_SEVERITY = dg.AssetCheckSeverity.ERROR
#: Queries of a sensor tick must answer well within Dagster's 60 s.
_STATEMENT_TIMEOUT_S = 20.0


def freshness_metadata(result: FreshnessVerdict) -> dict[str, "dg.RawMetadataValue"]:
    from kappa.dagster.assets.event_store import metadata_table

    return {
        "lag_s": result.lag_s,
        "max_lag_s": result.max_lag_s,
        "pending": result.pending,
        "shards": metadata_table(
            [
                {
                    "shard": s.shard,
                    "pending": s.pending,
                    "oldest_pending_age_s": -1.0 if s.lag_s is None else float(s.lag_s),
                    "within_bound": s.within(result.max_lag_s),
                    "stopped": s.stopped or "",
                }
                for s in result.shards
            ]
        ),
    }


def _severity(result: FreshnessVerdict) -> dg.AssetCheckSeverity:
    return STOPPED_SEVERITY if result.stopped else FRESHNESS_SEVERITY


def freshness_evaluation(result: FreshnessVerdict) -> dg.AssetCheckEvaluation:
    return dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey(result.asset),
        check_name=FRESHNESS_CHECK,
        passed=result.passed,
        severity=_severity(result),
        description=result.describe(),
        metadata=freshness_metadata(result),
    )


def freshness_result(result: FreshnessVerdict) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=result.passed,
        severity=_severity(result),
        description=result.describe(),
        metadata=freshness_metadata(result),
    )


def _description(source: str, max_lag_s: float) -> str:
    return (
        f"Lag within {max_lag_s:g} s (KAPPA_FRESHNESS_MAX_LAG_S): the oldest {source} not yet "
        f"loaded is at most that old. Evaluated by `{FRESHNESS_SENSOR}` every "
        f"{FRESHNESS_INTERVAL_S} s, or on demand."
    )


def build_topic_freshness_check(
    spec: TopicIngest, *, max_lag_s: float, failure_threshold: int
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=spec.asset,
        name=FRESHNESS_CHECK,
        blocking=False,
        additional_deps=[topic_asset_key(spec.topic)],
        description=_description(f"record of `{spec.topic}`", max_lag_s),
    )
    def freshness(
        context: dg.AssetCheckExecutionContext,
        event_store: EventStoreResource,
        warehouse: WarehouseResource,
    ) -> dg.AssetCheckResult:
        failures = recent_failures(context.instance, spec.asset, threshold=failure_threshold)
        with event_store.open() as store, warehouse.connect() as conn:
            shards = topic_freshness(store, conn, warehouse.schemas, spec, failures=failures)
        return freshness_result(verdict(spec.asset, shards, max_lag_s))

    return freshness


def build_capture_freshness_check(
    spec: CaptureSpec, *, max_lag_s: float, failure_threshold: int
) -> dg.AssetChecksDefinition:
    @dg.asset_check(
        asset=spec.asset,
        name=FRESHNESS_CHECK,
        blocking=False,
        additional_deps=[change_table_key(spec)],
        description=_description(f"change in `{spec.change_table}`", max_lag_s),
        required_resource_keys={"warehouse", capture_resource(spec)},
    )
    def freshness(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        warehouse: WarehouseResource = context.resources.warehouse
        failures = recent_failures(context.instance, spec.asset, threshold=failure_threshold)
        with open_capture(context.resources, spec) as source, warehouse.connect() as conn:
            shard = capture_freshness(source, conn, warehouse.schemas, spec, failures=failures)
        return freshness_result(verdict(spec.asset, [shard], max_lag_s))

    return freshness


def build_freshness_checks(
    topics: Sequence[TopicIngest],
    captures: Sequence[CaptureSpec],
    *,
    max_lag_s: float,
    failure_threshold: int,
) -> list[dg.AssetChecksDefinition]:
    """The freshness check of every fact loaded from a topic and every captured table
    (``failure_threshold``: failed runs in a row that stop a shard)."""
    return [
        build_topic_freshness_check(t, max_lag_s=max_lag_s, failure_threshold=failure_threshold)
        for t in topics
    ] + [
        build_capture_freshness_check(c, max_lag_s=max_lag_s, failure_threshold=failure_threshold)
        for c in captures
    ]


def evaluate_freshness(
    store: EventStore,
    edw: psycopg.Connection,
    open_source: Callable[[CaptureSpec], AbstractContextManager[ChangeSource]],
    schemas: Schemas,
    topics: Sequence[TopicIngest],
    captures: Sequence[CaptureSpec],
    *,
    max_lag_s: float,
    failures: Callable[[str], Mapping[int, RunFailures]],
    on_error: Callable[[str, Exception], None],
) -> list[FreshnessVerdict]:
    """Every asset's verdict (``failures``: an asset's shards whose runs keep failing); an
    asset whose sources do not answer is reported and left out (its previous evaluation
    stays the latest), so one broken source hides no other."""
    verdicts: list[FreshnessVerdict] = []
    for topic in topics:
        try:
            shards = topic_freshness(store, edw, schemas, topic, failures=failures(topic.asset))
            verdicts.append(verdict(topic.asset, shards, max_lag_s))
        except Exception as exc:
            edw.rollback()
            on_error(topic.asset, exc)
    for capture in captures:
        try:
            with open_source(capture) as changes:
                shard = capture_freshness(
                    changes, edw, schemas, capture, failures=failures(capture.asset)
                )
            verdicts.append(verdict(capture.asset, [shard], max_lag_s))
        except Exception as exc:
            edw.rollback()
            on_error(capture.asset, exc)
    return verdicts


def build_freshness_sensor(
    topics: Sequence[TopicIngest],
    captures: Sequence[CaptureSpec],
    *,
    max_lag_s: float,
    failure_threshold: int,
) -> dg.SensorDefinition:
    """Records a freshness evaluation of every asset every FRESHNESS_INTERVAL_S seconds."""

    @dg.sensor(
        name=FRESHNESS_SENSOR,
        description=(
            f"Every {FRESHNESS_INTERVAL_S} s: the `{FRESHNESS_CHECK}` check of "
            f"{', '.join(t.asset for t in topics)} and {', '.join(c.asset for c in captures)} "
            "(oldest record or change not yet loaded against KAPPA_FRESHNESS_MAX_LAG_S), "
            "recorded without launching runs."
        ),
        minimum_interval_seconds=FRESHNESS_INTERVAL_S,
        default_status=dg.DefaultSensorStatus.RUNNING,
        required_resource_keys={"event_store", "warehouse"}
        | {capture_resource(c) for c in captures},
    )
    def freshness_sensor(context: dg.SensorEvaluationContext, **_: Any) -> dg.SensorResult:
        # Resources by key from ``context.resources`` (which ones depends on the engines of
        # the captures); a direct call of the sensor also passes them as keywords.
        event_store: EventStoreResource = context.resources.event_store
        warehouse: WarehouseResource = context.resources.warehouse
        errors: list[str] = []

        def failed(asset: str, exc: Exception) -> None:
            errors.append(f"{asset}: {type(exc).__name__}: {exc}")
            context.log.warning(errors[-1])

        with (
            event_store.open() as store,
            warehouse.connect(statement_timeout_s=_STATEMENT_TIMEOUT_S) as edw,
        ):
            verdicts = evaluate_freshness(
                store,
                edw,
                lambda capture: open_capture(
                    context.resources, capture, statement_timeout_s=_STATEMENT_TIMEOUT_S
                ),
                warehouse.schemas,
                topics,
                captures,
                max_lag_s=max_lag_s,
                failures=lambda asset: recent_failures(
                    context.instance, asset, threshold=failure_threshold
                ),
                on_error=failed,
            )
        for v in verdicts:
            for shard in v.stopped:
                context.log.warning(f"{v.asset} {shard.shard} stopped: {shard.stopped}")
        summary = ", ".join(
            f"{v.asset} STOPPED ({', '.join(s.shard for s in v.stopped)})"
            if v.stopped
            else f"{v.asset} {'ok' if v.passed else 'STALE'} ({v.lag_s:.0f} s)"
            for v in verdicts
        )
        return dg.SensorResult(
            asset_events=[freshness_evaluation(v) for v in verdicts],
            skip_reason=f"freshness recorded: {summary}"
            + (f"; not evaluated: {'; '.join(errors)}" if errors else ""),
        )

    return freshness_sensor
