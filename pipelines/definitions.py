"""The kappa-etl code location: composes assets, sensors and resources; nothing else.

Settings come from the environment and are validated here, at load time: a bad value fails
the code location with a message naming the variable.
"""

from __future__ import annotations

import dagster as dg

from assets.cdc import build_capture_asset, change_table_source
from assets.event_store import build_fact_asset, topic_source
from kappa.capture import load_captures
from kappa.contracts import ORDER_PLACED, PAYMENT_ATTEMPTED
from kappa.ingest import TopicIngest
from kappa.settings import Settings
from resources.event_store import EventStoreResource
from resources.oltp import OltpResource
from resources.warehouse import WarehouseResource
from sensors.cdc import build_capture_sensor
from sensors.event_store import build_offset_sensor


def topic_ingests(settings: Settings) -> list[tuple[TopicIngest, str]]:
    """The topics this deployment loads, each with the setting that names it."""
    return [
        (
            TopicIngest(
                asset="fact_order",
                topic=settings.topic_orders,
                contract=ORDER_PLACED,
                description="Orders placed (`order_placed` events), one row per distinct event_id.",
            ),
            "KAPPA_TOPIC_ORDERS",
        ),
        (
            TopicIngest(
                asset="fact_payment",
                topic=settings.topic_payments,
                contract=PAYMENT_ATTEMPTED,
                description="Payment attempts (`payment_attempted` events), one row per distinct event_id.",
            ),
            "KAPPA_TOPIC_PAYMENTS",
        ),
    ]


def build_definitions(settings: Settings) -> dg.Definitions:
    ingests = topic_ingests(settings)
    captures = load_captures(settings.capture_config)
    limits = {"max_batch": settings.batch_max_records, "max_run": settings.run_max_records}
    interval = settings.sensor_interval_s
    return dg.Definitions(
        assets=[topic_source(spec) for spec, _ in ingests]
        + [build_fact_asset(spec, **limits) for spec, _ in ingests]
        + [change_table_source(spec) for spec in captures]
        + [build_capture_asset(spec, max_changes=settings.batch_max_records) for spec in captures],
        sensors=[
            build_offset_sensor(spec, topic_setting=setting, interval_s=interval, **limits)
            for spec, setting in ingests
        ]
        + [
            build_capture_sensor(spec, interval_s=interval, max_changes=settings.batch_max_records)
            for spec in captures
        ],
        resources={
            "event_store": EventStoreResource(
                bootstrap_servers=dg.EnvVar("KAFKA_BOOTSTRAP_SERVERS"),
                timeout_s=settings.kafka_timeout_s,
            ),
            "oltp": OltpResource(url=dg.EnvVar("KAPPA_OLTP_URL")),
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
