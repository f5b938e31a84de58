"""Configuration and secrets: bad values fail at load or launch naming the setting; a
password never reaches logs, run config, tags, event metadata or what the UI shows."""

from __future__ import annotations

import logging
from pathlib import Path

import dagster as dg
import psycopg
import pytest
from dagster._core.remote_representation.external_data import RepositorySnap
from dagster._serdes import serialize_value
from sqlalchemy.engine import make_url

from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.exceptions import ConfigurationError, KappaError
from kappa.local.processes import free_port
from kappa.settings import Settings
from pipelines.definitions import build_definitions
from tests.chaos.conftest import record
from tests.chaos.reference import Anomalies
from tests.chaos.streams import produce, simulated
from tests.demo import DEMO
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration

PASSWORD = "Zq9-chaos-S3cret"


def with_password(url: str, user: str = "postgres", database: str | None = None) -> str:
    parsed = make_url(url).set(username=user, password=PASSWORD)
    if database:
        parsed = parsed.set(database=database)
    return parsed.render_as_string(hide_password=False)


def failure_text(result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(
        str(e.event_specific_data.error.message)  # type: ignore[union-attr]
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.STEP_FAILURE
    )


def test_bad_configuration_fails_naming_the_setting(
    chaos_env, instance, tmp_path: Path, monkeypatch
):
    checked: list[tuple[str, bool]] = []

    def at_load(name: str, value: str) -> None:
        try:
            Settings.from_env({**chaos_env, name: value})
        except ConfigurationError as exc:
            checked.append((f"{name}={value!r} at load", str(exc).startswith(f"{name}: ")))
        else:
            checked.append((f"{name}={value!r} at load", False))

    at_load("KAPPA_EDW_URL", "mysql://etl@db/edw")
    at_load("KAPPA_EDW_URL", "postgresql://etl@db")
    at_load("KAPPA_OLTP_URL", "not a url")
    at_load("KAFKA_BOOTSTRAP_SERVERS", "broker-without-port")
    at_load("KAPPA_EDW_SCHEMA", "edw; DROP TABLE x")
    at_load("KAPPA_META_SCHEMA", "Kappa")
    at_load("KAPPA_TOPIC_ORDERS", "orders/../x")
    at_load("KAPPA_BATCH_MAX_RECORDS", "lots")

    # An invalid identifier or a missing table in catalog.yaml fails naming the file's setting.
    bad = tmp_path / "catalog.yaml"
    bad.write_text(
        Path(Settings.from_env(chaos_env).catalog)
        .read_text()
        .replace("dim_customer", "Dim-Customer")
    )
    try:
        build_definitions(Settings.from_env({**chaos_env, "KAPPA_CATALOG": str(bad)}))
        checked.append(("catalog.yaml: invalid identifier", False))
    except ConfigurationError as exc:
        checked.append(("catalog.yaml: invalid identifier", str(exc).startswith("KAPPA_CATALOG")))
    missing = tmp_path / "missing.yaml"
    missing.write_text(
        Path(Settings.from_env(chaos_env).catalog)
        .read_text()
        .replace("public.customers", "public.no_such")
    )
    from examples.shop.oltp import ensure_source_tables
    from kappa.catalog.captures import load_captures
    from kappa.sources.pg_capture import install_capture

    with psycopg.connect(chaos_env["KAPPA_OLTP_URL"], autocommit=True) as conn:
        ensure_source_tables(conn)
        try:
            for spec in load_captures(missing):
                install_capture(conn, spec)
            checked.append(("catalog.yaml: captured table missing", False))
        except ConfigurationError as exc:
            checked.append(
                (
                    "catalog.yaml: captured table missing",
                    str(exc).startswith("KAPPA_CATALOG"),
                )
            )

    # At launch: the sensor tick (unknown topic, unreachable broker, wrong credentials, a
    # database never initialised) names the setting and shows no password.
    def at_launch(what: str, setting: str, asset: str = "fact_order", **changes: str) -> None:
        env = {**chaos_env, **changes}
        for name, value in changes.items():
            monkeypatch.setenv(name, value)
        try:
            pipeline = Pipeline.__new__(Pipeline)
            pipeline.env, pipeline.instance, pipeline.cursors = env, instance, {}
            pipeline.settings = Settings.from_env(env)
            pipeline.defs = build_definitions(pipeline.settings)
            result = pipeline.tick(asset)
            text = ""
            for request in result.run_requests:
                text += failure_text(pipeline.execute(request, raise_on_error=False))
            ok = text.startswith(f"{setting}: ") and PASSWORD not in text
        except (ConfigurationError, KappaError) as exc:
            ok = str(exc).startswith(f"{setting}: ") and PASSWORD not in str(exc)
        finally:
            for name in changes:
                if name in chaos_env:
                    monkeypatch.setenv(name, chaos_env[name])
                else:
                    monkeypatch.delenv(name)
        checked.append((what, ok))

    at_launch(
        "unknown topic",
        "KAPPA_TOPIC_PAYMENTS",
        "fact_payment",
        KAPPA_TOPIC_PAYMENTS="no-such-topic",
    )
    at_launch(
        "unreachable broker",
        "KAFKA_BOOTSTRAP_SERVERS",
        KAFKA_BOOTSTRAP_SERVERS=f"127.0.0.1:{free_port()}",
        KAPPA_KAFKA_TIMEOUT_S="1",
    )
    at_launch(
        "wrong credentials (unknown role, password)",
        "KAPPA_EDW_URL",
        KAPPA_EDW_URL=with_password(chaos_env["KAPPA_EDW_URL"], user="intruder"),
    )
    at_launch(
        "EDW URL to a closed port (password)",
        "KAPPA_EDW_URL",
        KAPPA_EDW_URL=with_password(f"postgresql://127.0.0.1:{free_port()}/edw"),
    )
    with psycopg.connect(chaos_env["KAPPA_EDW_URL"], autocommit=True) as conn:
        conn.execute("CREATE SCHEMA empty_edw")
    produce(chaos_env["KAFKA_BOOTSTRAP_SERVERS"], simulated_for(chaos_env, 50))
    at_launch(
        "EDW tables missing (never initialised)",
        "KAPPA_EDW_URL",
        KAPPA_EDW_SCHEMA="empty_edw",
        KAPPA_META_SCHEMA="empty_meta",
    )
    with psycopg.connect(chaos_env["KAPPA_EDW_URL"], autocommit=True) as conn:
        ensure_schema(conn, Schemas(), DEMO.streams)
    at_launch(
        "change table missing (EDW initialised, triggers never installed)",
        "KAPPA_CATALOG",
        "dim_customer",
        KAPPA_OLTP_URL=with_password(chaos_env["KAPPA_OLTP_URL"]),
    )
    failed = [what for what, ok in checked if not ok]
    found = Anomalies()
    found.note("unexpected", len(failed), f"not named or leaked: {failed}")
    record(
        "bad configuration (URLs, topics, tables, identifiers, credentials)",
        len(checked),
        f"{len(checked) - len(failed)}/{len(checked)} fail at load or launch naming the setting",
        found,
    )
    assert not failed


def simulated_for(env: dict[str, str], count: int):  # type: ignore[no-untyped-def]
    class _P:
        settings = Settings.from_env(env)

    return simulated(_P(), count, seed=3)  # type: ignore[arg-type]


def test_a_password_never_reaches_logs_run_config_metadata_or_the_ui(
    chaos_env, instance, monkeypatch, caplog, capfd
):
    caplog.set_level(logging.INFO)
    env = {
        **chaos_env,
        "KAPPA_EDW_URL": with_password(chaos_env["KAPPA_EDW_URL"]),
        "KAPPA_OLTP_URL": with_password(chaos_env["KAPPA_OLTP_URL"]),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pipeline = Pipeline(env=env, instance=instance)  # trust auth: the password is accepted
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], simulated(pipeline, 300, seed=5))
    runs = []
    for asset in ("fact_order", "fact_payment", "dim_customer"):
        for request in pipeline.tick(asset).run_requests:
            runs.append(pipeline.execute(request, raise_on_error=False))
    # A run that fails on its database (the URL's database does not exist) must not print it.
    produce(env["KAFKA_BOOTSTRAP_SERVERS"], simulated(pipeline, 50, seed=6))
    requests = pipeline.tick("fact_order").run_requests
    monkeypatch.setenv("KAPPA_EDW_URL", with_password(chaos_env["KAPPA_EDW_URL"], database="gone"))
    for request in requests:
        failed = pipeline.execute(request, raise_on_error=False)
        assert not failed.success and "KAPPA_EDW_URL: cannot connect" in failure_text(failed)
        runs.append(failed)
    with pytest.raises(ConfigurationError) as failed_tick:
        pipeline.tick("fact_order")

    places = {
        "run configs and tags": serialize_value(
            [(r.run_config, r.tags) for r in instance.get_runs()]
        ),
        "event log (messages, metadata, errors)": serialize_value(
            [e for r in instance.get_runs() for e in instance.all_logs(r.run_id)]
        ),
        "UI (repository snapshot: resources, config schema)": serialize_value(
            RepositorySnap.from_def(pipeline.defs.get_repository_def())
        ),
        "python logs": caplog.text,
        "stdout and stderr": "".join(capfd.readouterr()),
        "error of a failing tick": str(failed_tick.value),
    }
    leaked = [where for where, text in places.items() if PASSWORD in text]
    found = Anomalies()
    found.note("unexpected", len(leaked), f"password found in {leaked}")
    record(
        "password in the URLs: logs, run config, metadata, UI",
        len(places),
        f"{len(runs)} runs; password found in {len(leaked)} of {len(places)} places; UI shows EnvVar names",
        found,
    )
    assert "KAPPA_EDW_URL" in places["UI (repository snapshot: resources, config schema)"]
    assert not leaked
