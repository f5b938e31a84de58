"""A catalogue's Dagster definitions: what a code location's ``definitions.py`` calls.

From the settings (and the catalogue they name) it builds, for every event stream, the topic
source asset, the fact asset that loads micro-batches, its checks and its offset sensor (and
heal sensor when its step can load provisional rows); for every captured table, the change
table source, the target asset, its checks and its capture sensor; the freshness checks and
sensor; the retention sensor (:mod:`kappa.dagster.retention`); the ``edw_checks`` job; the
resources. A code location adds its own assets (marts) with ``dg.Definitions.merge``.
"""

from __future__ import annotations

from collections.abc import Sequence

import dagster as dg

from kappa.catalog.captures import CaptureSpec
from kappa.catalog.ingests import topic_ingests
from kappa.dagster.assets.cdc import (
    build_capture_asset,
    build_capture_reconciliation_check,
    build_capture_replay_check,
    change_table_source,
)
from kappa.dagster.assets.checks import build_freshness_checks, build_freshness_sensor
from kappa.dagster.assets.event_store import (
    build_fact_asset,
    build_reconciliation_check,
    build_replay_check,
    build_staleness_check,
    topic_source,
)
from kappa.dagster.resources.event_store import EventStoreResource
from kappa.dagster.resources.mariadb import MariadbResource
from kappa.dagster.resources.oltp import OltpResource
from kappa.dagster.resources.state import StateCacheResource
from kappa.dagster.resources.warehouse import WarehouseResource
from kappa.dagster.retention import policy_from
from kappa.dagster.sensors.cdc import build_capture_sensor
from kappa.dagster.sensors.event_store import build_offset_sensor
from kappa.dagster.sensors.heal import build_heal_sensor
from kappa.dagster.sensors.retention import build_retention_sensor
from kappa.heal import heals
from kappa.health import failure_threshold
from kappa.run import FactServices
from kappa.settings import Settings
from kappa.sources.captured import active_captures, mariadb_url
from kappa.sources.mariadb_server import URL_SETTING


def resources(
    settings: Settings, captures: Sequence[CaptureSpec] = ()
) -> dict[str, dg.ConfigurableResource]:
    """The resources every kappa asset and sensor uses; URLs come from the environment
    (``EnvVar``), so no secret is part of the definitions. ``captures`` in MariaDB add the
    binlog's server, whose setting must then be there (checked here, at load time)."""
    extra: dict[str, dg.ConfigurableResource] = {}
    if any(spec.engine == "mariadb" for spec in captures):
        mariadb_url()
        extra["mariadb"] = MariadbResource(url=dg.EnvVar(URL_SETTING))
    return extra | {
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
    }


def build_definitions(
    settings: Settings, *, services: FactServices | None = None
) -> dg.Definitions:
    """Every asset, check, sensor, job and resource of the catalogue's streams and captures.

    ``services`` are what the stateful steps read (the catalogue's captures by target, the
    waits of the settings, unless given); a fact asset shows the side tables its step
    declares in the lineage, as assets it writes.
    """
    services = services if services is not None else FactServices.from_settings(settings)
    ingests = topic_ingests(settings)
    topics = [spec for spec, _ in ingests]
    captures = active_captures(settings)
    limits = {"max_batch": settings.batch_max_records, "max_run": settings.run_max_records}
    interval = settings.sensor_interval_s
    facts = {
        spec.asset: build_fact_asset(
            spec,
            services=services,
            windows=settings.windows,
            memory_records=settings.run_memory_records,
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
        ],
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
            build_freshness_sensor(
                topics,
                captures,
                max_lag_s=settings.freshness_max_lag_s,
                failure_threshold=failure_threshold(settings.run_retries),
            ),
            build_retention_sensor(
                [*facts, *(spec.asset for spec in captures)],
                windows=settings.windows,
                policy=policy_from(settings),
            ),
        ],
        resources=resources(settings, captures),
        # One process per run: a micro-batch is one step per asset, and a step subprocess
        # would double the start-up cost of every batch.
        executor=dg.in_process_executor,
    )
