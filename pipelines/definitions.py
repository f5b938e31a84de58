"""The kappa-etl code location: composes assets, sensors and resources; nothing else.

Settings come from the environment and are validated here, at load time: a bad value fails
the code location with a message naming the variable.
"""

from __future__ import annotations

import dagster as dg

from assets.cdc import (
    build_capture_asset,
    build_capture_reconciliation_check,
    build_capture_replay_check,
    change_table_source,
)
from assets.checks import build_freshness_checks, build_freshness_sensor
from assets.event_store import (
    build_fact_asset,
    build_reconciliation_check,
    build_replay_check,
    build_staleness_check,
    topic_source,
)
from assets.marts import build_customer_daily
from kappa.capture import load_captures
from kappa.catalog import topic_ingests
from kappa.heal import heals
from kappa.health import failure_threshold
from kappa.run import FactServices
from kappa.settings import Settings
from resources.event_store import EventStoreResource
from resources.oltp import OltpResource
from resources.state import StateCacheResource
from resources.warehouse import WarehouseResource
from sensors.cdc import build_capture_sensor
from sensors.event_store import build_offset_sensor
from sensors.heal import build_heal_sensor
from sensors.marts import build_mart_sensor

FRAUD_ALERT = dg.AssetSpec(
    key="fraud_alert",
    deps=["fact_payment"],
    group_name="edw",
    kinds={"postgres"},
    owners=["team:data-platform"],
    description=(
        "Fraud alerts on payments (rule, score, evidence): velocity per card, amount anomaly "
        "against the customer's running statistics, merchant country differing from the "
        "customer's as of the event time (scored higher after a recent call-centre call). "
        "Written by `fact_payment` in the same transactions."
    ),
)


#: Marts are rebuilt per event date: at most every this many seconds, not with every batch.
MART_INTERVAL_S = 30


def build_definitions(settings: Settings) -> dg.Definitions:
    ingests = topic_ingests(settings)
    topics = [spec for spec, _ in ingests]
    captures = load_captures(settings.catalog)
    by_target = {c.target: c for c in captures}
    services = FactServices(
        customers=by_target.get("dim_customer"),
        calls=by_target.get("fact_call_center_call"),
        max_wait_s=settings.enrich_max_wait_s,
        reprocess_wait_s=settings.backfill_max_wait_s,
    )
    limits = {"max_batch": settings.batch_max_records, "max_run": settings.run_max_records}
    interval = settings.sensor_interval_s
    facts = {
        spec.asset: build_fact_asset(
            spec,
            services=services,
            side_assets=(FRAUD_ALERT,)
            if "fraud_alert" in getattr(spec.step, "side_tables", ())
            else (),
            windows=settings.windows,
            **limits,
        )
        for spec, _ in ingests
    }
    checks = (
        [build_replay_check(spec) for spec, _ in ingests]
        + [build_reconciliation_check(spec) for spec, _ in ingests]
        + [build_staleness_check(spec) for spec, _ in ingests if spec.step is not None]
        + [build_capture_reconciliation_check(spec) for spec in captures]
        + [build_capture_replay_check(spec) for spec in captures]
        + build_freshness_checks(
            topics,
            captures,
            max_lag_s=settings.freshness_max_lag_s,
            failure_threshold=failure_threshold(settings.run_retries),
        )
    )
    return dg.Definitions(
        asset_checks=checks,
        jobs=[
            dg.define_asset_job(
                "edw_checks",
                selection=dg.AssetSelection.checks(*checks),
                description=(
                    "Reconcile every shard with its source and re-derive the event facts from the "
                    "log (on demand or on a schedule: these re-read the sources)."
                ),
            )
        ],
        assets=[topic_source(spec) for spec, _ in ingests]
        + list(facts.values())
        + [change_table_source(spec) for spec in captures]
        + [
            build_capture_asset(
                spec, windows=settings.windows, max_changes=settings.batch_max_records
            )
            for spec in captures
        ]
        + [build_customer_daily(settings.windows, sorted(facts))],
        sensors=[
            build_offset_sensor(
                spec,
                windows=settings.windows,
                topic_setting=setting,
                max_runtime_s=settings.run_max_runtime_s,
                interval_s=interval,
                selection=sorted(facts[spec.asset].keys),
                failure_threshold=failure_threshold(settings.run_retries),
                **limits,
            )
            for spec, setting in ingests
        ]
        + [
            build_heal_sensor(
                spec,
                services=services,
                windows=settings.windows,
                interval_s=settings.heal_interval_s,
                selection=sorted(facts[spec.asset].keys),
                max_runtime_s=settings.run_max_runtime_s,
            )
            for spec, _ in ingests
            if spec.step is not None and heals(spec.contract)
        ]
        + [
            build_capture_sensor(
                spec,
                windows=settings.windows,
                interval_s=interval,
                max_changes=settings.batch_max_records,
                failure_threshold=failure_threshold(settings.run_retries),
                max_runtime_s=settings.run_max_runtime_s,
            )
            for spec in captures
        ]
        + [
            build_mart_sensor(
                "mart_customer_daily",
                sorted(facts),
                windows=settings.windows,
                interval_s=max(interval, MART_INTERVAL_S),
            ),
            build_freshness_sensor(
                topics,
                captures,
                max_lag_s=settings.freshness_max_lag_s,
                failure_threshold=failure_threshold(settings.run_retries),
            ),
        ],
        resources={
            "event_store": EventStoreResource(
                bootstrap_servers=dg.EnvVar("KAFKA_BOOTSTRAP_SERVERS"),
                timeout_s=settings.kafka_timeout_s,
            ),
            "oltp": OltpResource(url=dg.EnvVar("KAPPA_OLTP_URL")),
            "state_cache": StateCacheResource(max_keys=settings.state_cache_keys),
            "warehouse": WarehouseResource(
                url=dg.EnvVar("KAPPA_EDW_URL"),
                edw_schema=settings.edw_schema,
                meta_schema=settings.meta_schema,
            ),
        },
        # One process per run: a micro-batch is one step per asset, and a step subprocess
        # would double the start-up cost of every batch.
        executor=dg.in_process_executor,
    )


defs = build_definitions(Settings.from_env())
