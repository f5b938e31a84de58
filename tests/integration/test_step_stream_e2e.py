"""A brand-new stream with a stateful step of its own, end to end on a real Dagster daemon.

Everything the stream needs is outside the engine: a catalogue file and a step module (the
README's "Add your own stream" example, read from the README so the two cannot drift) and a
three-line ``definitions.py``, all under the test's directory, key ``meter_id``, eight
field types, a derived column and a side table. Events with duplicates and malformed
messages go to the real broker; the offset sensor of a real ``dagster-daemon`` launches the
runs. Then: each valid event exactly once with the derived column the step's rules give,
every malformed message a dead letter, the side table's rows, passing ``reconciliation``
and ``replay_equivalence`` checks, and a backfill of the partition giving the same rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import orjson
import psutil
import psycopg
import pytest
from kafka import KafkaProducer

from kappa.catalog.streams import load_streams
from kappa.edw.connection import connect
from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.local.dagster_instance import dagster_environment, write_dagster_yaml
from kappa.settings import REPO_ROOT, Settings
from tests.conftest import fresh_database

pytestmark = pytest.mark.integration

MAX_JUMP_WH = 5000
PARTITIONS = 2
METERS = 5
VALID = 120
DUPLICATES = 15
MALFORMED = 6

CATALOG = """
streams:
  - name: fact_meter_reading
    topic: {topic}
    key_field: meter_id
    event_types: [meter_read]
    schema_versions: [1]
    description: Meter readings with the meter's previous reading and jumps.
    fields:
      meter_id: {{type: text, pattern: "m-[0-9]+"}}
      reading_id: uuid
      wh: {{type: bigint, min: 0}}
      tariff: "numeric(8,4)"
      estimated: boolean
      billed_on: date
      phase: {{type: enum, values: [l1, l2, l3]}}
      grid: char(2)
      tags: {{type: jsonb, nullable: true}}
    step: meters.steps:ReadingJumps
    config: {{max_jump_wh: {max_jump}}}
"""

DEFINITIONS = """from kappa.dagster.definitions import build_definitions
from kappa.settings import Settings

defs = build_definitions(Settings.from_env())
"""


def readme_step_module() -> str:
    """The step module the README shows under "`meters/steps.py`:"."""
    text = (REPO_ROOT / "README.md").read_text()
    found = re.search(r"`meters/steps\.py`:\n\n```python\n(.*?)```", text, re.S)
    assert found, "the README's step example"
    return found.group(1)


def write_location(root: Path, topic: str) -> Path:
    (root / "meters").mkdir()
    (root / "meters" / "__init__.py").write_text('"""A step of the test\'s own."""\n')
    (root / "meters" / "steps.py").write_text(readme_step_module())
    (root / "definitions.py").write_text(DEFINITIONS)
    (root / "workspace.yaml").write_text(
        "load_from:\n  - python_module:\n      module_name: definitions\n"
        f"      working_directory: {root}\n      location_name: meters\n"
    )
    catalog = root / "catalog.yaml"
    catalog.write_text(CATALOG.format(topic=topic, max_jump=MAX_JUMP_WH))
    return catalog


def reading(n: int, meter: int, wh: int, at: datetime) -> dict:
    return {
        "event_id": str(uuid.UUID(int=7 * 10**6 + n)),
        "event_type": "meter_read",
        "event_time": at.isoformat(),
        "source": "meter-head-end",
        "schema_version": 1,
        "payload": {
            "meter_id": f"m-{meter}",
            "reading_id": str(uuid.UUID(int=n)),
            "wh": wh,
            "tariff": 0.1234,
            "estimated": n % 2 == 0,
            "billed_on": "2026-11-30",
            "phase": ("l1", "l2", "l3")[n % 3],
            "grid": "NL",
            "tags": {"n": n} if n % 4 else None,
        },
    }


def produce(bootstrap: str, topic: str) -> tuple[dict[str, int | None], set[str]]:
    """Valid readings (each meter's wh rising, now and then by a jump), duplicates of some,
    and malformed messages; returns per event_id the expected ``wh_before`` (the meter's
    previous distinct reading, in production order, which is log order for one key) and
    the event_ids whose reading jumps by more than the step's threshold."""
    now = datetime.now(UTC) - timedelta(minutes=1)
    last: dict[int, int] = {}
    expected: dict[str, int | None] = {}
    jumps: set[str] = set()
    messages: list[tuple[str, bytes]] = []
    sent: list[dict] = []
    for n in range(VALID):
        meter = n % METERS
        step = 9000 if n % 17 == 5 else 100 + n  # a jump now and then
        wh = last.get(meter, 1000 * meter) + step
        event = reading(n, meter, wh, now + timedelta(milliseconds=n))
        expected[event["event_id"]] = last.get(meter)
        if meter in last and wh - last[meter] > MAX_JUMP_WH:
            jumps.add(event["event_id"])
        last[meter] = wh
        sent.append(event)
        messages.append((f"m-{meter}", orjson.dumps(event)))
        if n % (VALID // DUPLICATES) == 0 and len(messages) < VALID + DUPLICATES:
            # The same event again, with another reading value: the first one counts.
            again = {**event, "payload": {**event["payload"], "wh": wh + 1}}
            messages.append((f"m-{meter}", orjson.dumps(again)))
    bad = [
        b"not json",
        orjson.dumps({**sent[0], "event_id": str(uuid.uuid4()), "payload": {"meter_id": "m-1"}}),
        orjson.dumps({**sent[1], "event_id": str(uuid.uuid4()), "event_type": "meter_exploded"}),
        orjson.dumps(
            {**sent[2], "event_id": str(uuid.uuid4()), "payload": {**sent[2]["payload"], "wh": -1}}
        ),
        orjson.dumps(
            {
                **sent[3],
                "event_id": str(uuid.uuid4()),
                "payload": {**sent[3]["payload"], "grid": "NLD"},
            }
        ),
        orjson.dumps(
            {
                **sent[4],
                "event_id": str(uuid.uuid4()),
                "payload": {**sent[4]["payload"], "meter_id": "x-4"},
            }
        ),
    ]
    assert len(bad) == MALFORMED
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        for key, value in messages:
            producer.send(topic, key=key.encode(), value=value)
        for i, value in enumerate(bad):
            # The malformed ones keyed like valid ones, so both partitions get some.
            producer.send(topic, key=f"m-{i % METERS}".encode(), value=value)
        producer.flush(30)
    finally:
        producer.close()
    return expected, jumps


@pytest.fixture
def dagster_database_url(pg_server_url: str) -> Iterator[str]:
    """A database of its own for the Dagster instance, dropped after the test."""
    with fresh_database(pg_server_url, "kappa_dagster") as url:
        yield url


def _kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """The daemon this test started and everything it started (code server, runs)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [psutil.Process(proc.pid), *children]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    proc.wait(30)


def digest(conn: psycopg.Connection, statement: str) -> tuple[int, str]:
    rows = conn.execute(statement).fetchall()
    return len(rows), hashlib.sha256(repr(sorted(rows)).encode()).hexdigest()[:16]


FACT = "SELECT * FROM edw.fact_meter_reading"
JUMPS = "SELECT * FROM edw.meter_jump"


@pytest.mark.timeout(600)
def test_a_new_stream_with_its_own_step_loads_exactly_once_through_the_daemons_sensor(
    broker, database_url, dagster_database_url, topic_factory, tmp_path, monkeypatch
):
    topic = topic_factory("meter-readings", PARTITIONS)
    location = tmp_path / "location"
    location.mkdir()
    catalog = write_location(location, topic)
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAPPA_EDW_URL": database_url,
        "KAPPA_OLTP_URL": database_url,
        "KAPPA_CATALOG": str(catalog),
        "KAPPA_DAGSTER_PG_URL": dagster_database_url,
        "KAPPA_SENSOR_INTERVAL_S": "2",
        "KAPPA_BATCH_MAX_RECORDS": "40",
        "KAPPA_ENRICH_MAX_WAIT_S": "0",
        # Only a daemon runs here (no Celery workers): a process per run.
        "KAPPA_RUN_LAUNCHER": "process",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The step module is importable here (checks, backfill) as in the code server.
    monkeypatch.syspath_prepend(str(location))
    settings = Settings.from_env(env)
    schemas = Schemas(settings.edw_schema, settings.meta_schema)
    with connect(database_url) as conn:
        ensure_schema(conn, schemas, load_streams(catalog, env))
    expected, jumps = produce(broker, topic)

    home = tmp_path / "dagster_home"
    write_dagster_yaml(home, settings)
    daemon_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("KAPPA_", "KAFKA_"))},
        **env,
        **dagster_environment(settings, home),
        # The engine from this checkout, then the location's own modules.
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(location)]),
    }
    log_path = tmp_path / "daemon.log"
    with log_path.open("ab") as log:
        daemon = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "dagster-daemon"),
                "run",
                "-w",
                str(location / "workspace.yaml"),
            ],
            cwd=location,
            env=daemon_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 300
            with connect(database_url) as conn:
                while time.monotonic() < deadline:
                    covered = conn.execute(
                        "SELECT coalesce(sum(received), 0) FROM kappa.batch_ledger "
                        "WHERE asset = 'fact_meter_reading'"
                    ).fetchone()
                    if covered and covered[0] >= VALID + DUPLICATES + MALFORMED:
                        break
                    time.sleep(1)
        finally:
            _kill_tree(daemon)
    tail = log_path.read_text(errors="replace")[-3000:]

    with connect(database_url) as conn:
        received = conn.execute(
            "SELECT count(*), coalesce(sum(received), 0), coalesce(sum(loaded), 0), "
            "coalesce(sum(dead_lettered), 0) FROM kappa.batch_ledger "
            "WHERE asset = 'fact_meter_reading'"
        ).fetchone()
        assert received is not None and received[1] == VALID + DUPLICATES + MALFORMED, tail
        batches, _, loaded, dead = received
        assert batches >= 2, "the sensor cut the log into several micro-batches"
        assert (loaded, dead) == (VALID, MALFORMED)
        rows = dict(
            conn.execute("SELECT event_id::text, wh_before FROM edw.fact_meter_reading").fetchall()
        )
        assert rows == expected  # exactly once, the first of duplicates, state across batches
        assert {
            r[0] for r in conn.execute("SELECT event_id::text FROM edw.meter_jump").fetchall()
        } == jumps
        assert jumps, "the data has jumps"
        reasons = [
            r[0]
            for r in conn.execute(
                "SELECT reason FROM kappa.dead_letter WHERE asset = 'fact_meter_reading'"
            ).fetchall()
        ]
        assert len(reasons) == MALFORMED and all(reasons)
        side_coordinates = conn.execute(
            "SELECT count(*) FROM edw.meter_jump j JOIN edw.fact_meter_reading f USING "
            "(event_id, topic, kafka_partition, kafka_offset)"
        ).fetchone()
        assert side_coordinates == (len(jumps),)
        before = {"fact": digest(conn, FACT), "jumps": digest(conn, JUMPS)}
        # Arrival-time partitions: one, or two when the test runs across a boundary.
        partition_keys = [
            r[0]
            for r in conn.execute(
                "SELECT DISTINCT partition_key FROM kappa.batch_ledger "
                "WHERE asset = 'fact_meter_reading' ORDER BY 1"
            ).fetchall()
        ]

    from kappa.dagster.definitions import build_definitions

    defs = build_definitions(settings)
    assert {"fact_meter_reading", "meter_jump"} <= {
        k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()
    }
    job = defs.resolve_implicit_global_asset_job_def()
    with dg.instance_for_test() as instance:
        for name in ("reconciliation", "replay_equivalence"):
            evaluation = (
                job.get_subset(
                    asset_check_selection={
                        dg.AssetCheckKey(dg.AssetKey("fact_meter_reading"), name)
                    }
                )
                .execute_in_process(instance=instance)
                .get_asset_check_evaluations()[0]
            )
            assert evaluation.passed, (name, evaluation.description)
        # A backfill of the partitions (the fact's job, no offset ranges): the same rows.
        fact_job = job.get_subset(
            asset_selection=set(defs.resolve_assets_def("fact_meter_reading").keys),
            asset_check_selection=set(),
        )
        for key in partition_keys:
            backfill = fact_job.execute_in_process(instance=instance, partition_key=key)
            assert backfill.success and backfill.asset_materializations_for_node(
                "fact_meter_reading"
            )
    with connect(database_url) as conn:
        assert {"fact": digest(conn, FACT), "jumps": digest(conn, JUMPS)} == before
