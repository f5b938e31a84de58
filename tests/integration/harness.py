"""A deployment of the code location against the test broker and a fresh database.

Sensors are evaluated and runs executed through Dagster (``build_sensor_context`` and the
asset job on a real instance); nothing of the pipeline is faked.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path

import dagster as dg
import psycopg
from kafka import KafkaProducer

from examples.shop import simulator
from examples.shop.oltp import ensure_source_tables
from kappa.catalog.captures import load_captures
from kappa.changes.target import ensure_target
from kappa.edw.connection import connect
from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.settings import Settings
from kappa.sources.pg_capture import install_capture
from pipelines.definitions import build_definitions
from tests.demo import TEST_CATALOG


@dataclass
class Pipeline:
    env: dict[str, str]
    instance: dg.DagsterInstance
    settings: Settings = field(init=False)
    defs: dg.Definitions = field(init=False)
    cursors: dict[str, str | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The demo's catalogue with its calls in PostgreSQL, unless the test names another.
        self.env = {"KAPPA_CATALOG": str(TEST_CATALOG), **self.env}
        self.settings = Settings.from_env(self.env)
        self.defs = build_definitions(self.settings)
        with connect(self.edw_url) as conn:
            ensure_schema(conn, self.schemas, self.settings.streams)
            for spec in load_captures(self.settings.catalog):
                ensure_target(conn, self.schemas, spec)
        with connect(self.env["KAPPA_OLTP_URL"]) as conn:
            ensure_source_tables(conn)
            for spec in load_captures(self.settings.catalog):
                if spec.engine == "postgresql":  # a MariaDB table is read from its binlog
                    install_capture(conn, spec)

    @property
    def edw_url(self) -> str:
        return self.env["KAPPA_EDW_URL"]

    @property
    def schemas(self) -> Schemas:
        return Schemas(self.settings.edw_schema, self.settings.meta_schema)

    # -- sources ----------------------------------------------------------------------------

    def simulate(
        self, count: int, *, seed: int = 7, **rates: float
    ) -> list[simulator.SimulatedMessage]:
        """Produce ``count`` simulated messages to the deployment's topics; returns them."""
        config = simulator.SimulatorConfig(
            topic_orders=self.settings.stream("fact_order").topic,
            topic_payments=self.settings.stream("fact_payment").topic,
            customers=rates.pop("customers", 40),
            seed=seed,
            duplicate_rate=rates.pop("duplicate_rate", 0.05),
            late_rate=rates.pop("late_rate", 0.05),
            invalid_rate=rates.pop("invalid_rate", 0.03),
        )
        messages = list(
            islice(simulator.generate(config, start=datetime.now(UTC), rate=1000.0), count)
        )
        self.produce(messages)
        return messages

    def produce(self, messages: Iterable[simulator.SimulatedMessage]) -> None:
        producer = KafkaProducer(bootstrap_servers=self.env["KAFKA_BOOTSTRAP_SERVERS"], acks="all")
        try:
            simulator.produce(messages, producer)
        finally:
            producer.close()

    # -- Dagster ----------------------------------------------------------------------------

    def tick(self, asset: str) -> dg.SensorResult:
        sensor = self.defs.get_sensor_def(f"{asset}_sensor")
        with dg.build_sensor_context(
            instance=self.instance, cursor=self.cursors.get(asset), resources=self.defs.resources
        ) as context:
            result = sensor(context)
        assert isinstance(result, dg.SensorResult)
        self.cursors[asset] = result.cursor
        return result

    def execute(
        self, request: dg.RunRequest, *, raise_on_error: bool = True
    ) -> dg.ExecuteInProcessResult:
        """Execute a run request as the daemon would: its assets and only its checks."""
        checks = request.asset_check_keys
        job = self.defs.resolve_implicit_global_asset_job_def().get_subset(
            asset_selection=set(request.asset_selection or []),
            asset_check_selection=set(checks) if checks is not None else None,
        )
        return job.execute_in_process(
            run_config=request.run_config,
            instance=self.instance,
            tags=request.tags,
            raise_on_error=raise_on_error,
            partition_key=request.partition_key,
        )

    def drain(self, asset: str, *, max_ticks: int = 200) -> list[dg.ExecuteInProcessResult]:
        """Tick and run until the sensor has nothing left to request."""
        results = []
        for _ in range(max_ticks):
            result = self.tick(asset)
            if not result.run_requests:
                return results
            for request in result.run_requests:
                results.append(self.execute(request))
        raise AssertionError(f"{asset} still had work after {max_ticks} ticks")

    # -- EDW --------------------------------------------------------------------------------

    def query(self, statement: str, params: tuple = ()) -> list[tuple]:
        with connect(self.edw_url) as conn:
            cursor = conn.execute(statement, params)  # type: ignore[arg-type]
            return cursor.fetchall() if cursor.description is not None else []


ROOT = Path(__file__).parents[2]


def wait_for(predicate, *, timeout: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def kill_mid_batch(
    pipeline: Pipeline, request: dg.RunRequest, *, lock_table: str, blocked_query: str
) -> None:
    """Run ``request`` in a worker process, hold ``lock_table`` so the batch stops inside its
    transaction at a statement matching ``blocked_query`` (ILIKE), SIGKILL the worker there,
    and wait until the server has rolled the batch back."""
    blocker = psycopg.connect(pipeline.edw_url)
    blocker.execute(f"LOCK TABLE {lock_table} IN EXCLUSIVE MODE")
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.integration.run_batch",
            json.dumps(request.run_config),
            json.dumps(request.tags),
            *([request.partition_key] if request.partition_key else []),
        ],
        cwd=ROOT,
        env={**os.environ, **pipeline.env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: pipeline.query(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'kappa-etl' "
                "AND wait_event_type = 'Lock' AND query ILIKE %s",
                (blocked_query,),
            ),
            timeout=90,
            what=f"the run to block on {lock_table} inside its batch transaction",
        )
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(timeout=30) == -signal.SIGKILL
    finally:
        worker.kill()
        blocker.rollback()
        blocker.close()
    wait_for(
        lambda: (
            not pipeline.query(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'kappa-etl' "
                "AND state <> 'idle' AND pid <> pg_backend_pid()"
            )
        ),
        timeout=30,
        what="the killed run's backend to go away",
    )


def expected_event_ids(messages: Iterable[simulator.SimulatedMessage], topic: str) -> set[str]:
    """Distinct valid events of ``topic``, straight from the producer's ground truth."""
    return {m.event_id for m in messages if m.topic == topic and m.kind == "valid" and m.event_id}
