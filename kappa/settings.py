"""Settings from the environment, validated once, at load time.

Every setting is an environment variable with a default that works for the local stack.
A bad value fails here with a :class:`~kappa.exceptions.ConfigurationError` whose message
starts with the variable's name, never later from deep inside a client library.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from kappa.exceptions import ConfigurationError
from kappa.partitions import GRAINS, TimeWindows
from kappa.setting_docs import SETTINGS, Setting
from kappa.setting_values import (
    bootstrap_servers,
    identifier,
    number,
    postgres_url,
    redact,
    topic_name,
    whole_number,
)

if TYPE_CHECKING:
    from kappa.catalog.streams import EventContract

BrokerStorage = Literal["durable", "memory"]
RunLauncher = Literal["celery", "process"]
#: The values of ``KAPPA_RUN_LAUNCHER``.
RUN_LAUNCHERS: tuple[RunLauncher, ...] = ("celery", "process")
#: URL schemes the run workers' Celery broker and result backend accept.
CELERY_BROKER_SCHEMES = ("redis", "rediss", "amqp", "pyamqp", "sqla+postgresql")
CELERY_BACKEND_SCHEMES = ("redis", "rediss", "db+postgresql")
#: The values of ``KAPPA_BROKER_STORAGE`` (memory: nothing survives a restart).
BROKER_STORAGES: tuple[BrokerStorage, ...] = ("durable", "memory")
SETTING_CATALOG = "KAPPA_CATALOG"

#: The repository root: workspace.yaml and catalog.yaml live there.
REPO_ROOT = Path(__file__).resolve().parents[1]

#: Public here too: the parsers of kappa.setting_values, for a project's own settings.
__all__ = [
    "BROKER_STORAGES",
    "REPO_ROOT",
    "SETTINGS",
    "SETTING_CATALOG",
    "Setting",
    "Settings",
    "bootstrap_servers",
    "broker_storage",
    "identifier",
    "number",
    "postgres_url",
    "redact",
    "setting_value",
    "time_windows",
    "topic_name",
    "whole_number",
]

_DEFAULTS = {s.name: s.default for s in SETTINGS}


def _raw(env: Mapping[str, str], name: str) -> str:
    return env.get(name, _DEFAULTS[name]).strip()


def setting_value(env: Mapping[str, str], setting: Setting) -> str:
    """The raw value of ``setting`` in ``env`` (its default when unset), stripped."""
    return env.get(setting.name, setting.default).strip()


def _int(env: Mapping[str, str], name: str, *, minimum: int, maximum: int) -> int:
    return whole_number(name, _raw(env, name), minimum=minimum, maximum=maximum)


def _float(env: Mapping[str, str], name: str, *, minimum: float, maximum: float) -> float:
    return number(name, _raw(env, name), minimum=minimum, maximum=maximum)


def broker_storage(env: Mapping[str, str]) -> BrokerStorage:
    """``KAPPA_BROKER_STORAGE``: ``durable`` or ``memory``."""
    raw = _raw(env, "KAPPA_BROKER_STORAGE").lower()
    for storage in BROKER_STORAGES:
        if raw == storage:
            return storage
    raise ConfigurationError(
        "KAPPA_BROKER_STORAGE", f"expected one of {', '.join(BROKER_STORAGES)}, got {raw!r}"
    )


def run_launcher(env: Mapping[str, str]) -> RunLauncher:
    """``KAPPA_RUN_LAUNCHER``: ``celery`` or ``process``."""
    raw = _raw(env, "KAPPA_RUN_LAUNCHER").lower()
    for launcher in RUN_LAUNCHERS:
        if raw == launcher:
            return launcher
    raise ConfigurationError(
        "KAPPA_RUN_LAUNCHER", f"expected one of {', '.join(RUN_LAUNCHERS)}, got {raw!r}"
    )


def celery_url(name: str, raw: str, schemes: tuple[str, ...]) -> str:
    """A Celery broker or result backend URL whose scheme is one of ``schemes``."""
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    if not any(scheme == s or scheme.startswith(s + "+") for s in schemes):
        raise ConfigurationError(
            name,
            f"{redact(raw)!r} is not a URL with one of the schemes {', '.join(schemes)}",
        )
    return raw


def workers(env: Mapping[str, str]) -> int:
    """``KAPPA_WORKERS``: live run worker processes (empty: the cores, at least 2)."""
    if not _raw(env, "KAPPA_WORKERS"):
        return max(2, os.cpu_count() or 1)
    return _int(env, "KAPPA_WORKERS", minimum=1, maximum=256)


def time_windows(env: Mapping[str, str]) -> TimeWindows:
    """The partitioning from ``KAPPA_PARTITIONS`` and ``KAPPA_PARTITIONS_START``."""
    grain = _raw(env, "KAPPA_PARTITIONS").lower()
    if grain not in GRAINS:
        raise ConfigurationError(
            "KAPPA_PARTITIONS", f"{grain!r} is not one of {', '.join(sorted(GRAINS))}"
        )
    raw = _raw(env, "KAPPA_PARTITIONS_START")
    try:
        start = datetime.fromisoformat(raw)
    except ValueError:
        raise ConfigurationError(
            "KAPPA_PARTITIONS_START", f"{raw!r} is not an ISO date (2026-11-01 or 2026-11-01T08:00)"
        ) from None
    if start.tzinfo is not None and start.utcoffset() != timedelta(0):
        raise ConfigurationError("KAPPA_PARTITIONS_START", f"{raw!r}: partitions are in UTC")
    try:
        return TimeWindows(grain, start.replace(tzinfo=UTC))
    except ValueError as exc:
        raise ConfigurationError("KAPPA_PARTITIONS_START", str(exc)) from None


@dataclass(frozen=True)
class Settings:
    """The validated configuration of one deployment."""

    home: Path
    kafka_bootstrap_servers: str | None
    edw_url: str | None
    dagster_pg_url: str | None
    oltp_url: str | None
    catalog: Path
    #: The streams of the catalogue, validated, with their topics resolved.
    streams: tuple[EventContract, ...]
    pg_port: int
    broker_port: int
    mariadb_port: int
    broker_storage: BrokerStorage
    edw_schema: str
    meta_schema: str
    topic_partitions: int
    batch_max_records: int
    run_max_records: int
    run_memory_records: int
    sensor_interval_s: int
    windows: TimeWindows
    kafka_timeout_s: float
    run_retries: int
    run_max_runtime_s: int
    max_concurrent_runs: int
    run_launcher: RunLauncher
    celery_broker_url: str | None
    celery_backend_url: str | None
    workers: int
    backfill_workers: int
    ui_port: int
    enrich_max_wait_s: float
    backfill_max_wait_s: float
    heal_interval_s: int
    state_cache_keys: int
    freshness_max_lag_s: float
    run_retention_hours: int
    run_retention_deletes: int
    env: Mapping[str, str] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        kafka = _raw(env, "KAFKA_BOOTSTRAP_SERVERS")
        edw = _raw(env, "KAPPA_EDW_URL")
        dagster_pg = _raw(env, "KAPPA_DAGSTER_PG_URL")
        oltp = _raw(env, "KAPPA_OLTP_URL")
        if "KAPPA_CAPTURE_CONFIG" in env:
            raise ConfigurationError(
                "KAPPA_CAPTURE_CONFIG",
                "was renamed to KAPPA_CATALOG: one catalogue file holds the streams and the "
                "captured tables (its `tables:` section is what capture.yaml held)",
            )
        raw_catalog = Path(_raw(env, "KAPPA_CATALOG") or "catalog.yaml")
        catalog = raw_catalog if raw_catalog.is_absolute() else REPO_ROOT / raw_catalog
        from kappa.catalog.streams import load_streams  # contracts validates with this module

        streams = load_streams(catalog, env)
        edw_schema = identifier("KAPPA_EDW_SCHEMA", _raw(env, "KAPPA_EDW_SCHEMA"))
        meta_schema = identifier("KAPPA_META_SCHEMA", _raw(env, "KAPPA_META_SCHEMA"))
        if edw_schema == meta_schema:
            raise ConfigurationError("KAPPA_META_SCHEMA", "must differ from KAPPA_EDW_SCHEMA")
        batch_max = _int(env, "KAPPA_BATCH_MAX_RECORDS", minimum=1, maximum=10_000_000)
        run_max = _int(env, "KAPPA_RUN_MAX_RECORDS", minimum=1, maximum=100_000_000)
        if run_max < batch_max:
            raise ConfigurationError(
                "KAPPA_RUN_MAX_RECORDS", f"{run_max} is below KAPPA_BATCH_MAX_RECORDS ({batch_max})"
            )
        memory = _int(env, "KAPPA_RUN_MEMORY_RECORDS", minimum=1, maximum=100_000_000)
        broker_url = _raw(env, "KAPPA_CELERY_BROKER_URL")
        backend_url = _raw(env, "KAPPA_CELERY_BACKEND_URL")
        return cls(
            home=Path(_raw(env, "KAPPA_HOME") or ".kappa").resolve(),
            kafka_bootstrap_servers=bootstrap_servers("KAFKA_BOOTSTRAP_SERVERS", kafka)
            if kafka
            else None,
            edw_url=postgres_url("KAPPA_EDW_URL", edw) if edw else None,
            dagster_pg_url=postgres_url("KAPPA_DAGSTER_PG_URL", dagster_pg) if dagster_pg else None,
            oltp_url=postgres_url("KAPPA_OLTP_URL", oltp) if oltp else None,
            catalog=catalog,
            streams=streams,
            pg_port=_int(env, "KAPPA_PG_PORT", minimum=1, maximum=65535),
            broker_port=_int(env, "KAPPA_BROKER_PORT", minimum=1, maximum=65535),
            mariadb_port=_int(env, "KAPPA_MARIADB_PORT", minimum=1, maximum=65535),
            broker_storage=broker_storage(env),
            edw_schema=edw_schema,
            meta_schema=meta_schema,
            topic_partitions=_int(env, "KAPPA_TOPIC_PARTITIONS", minimum=1, maximum=1024),
            batch_max_records=batch_max,
            run_max_records=run_max,
            run_memory_records=memory,
            sensor_interval_s=_int(env, "KAPPA_SENSOR_INTERVAL_S", minimum=1, maximum=3600),
            windows=time_windows(env),
            kafka_timeout_s=_float(env, "KAPPA_KAFKA_TIMEOUT_S", minimum=0.1, maximum=300),
            run_retries=_int(env, "KAPPA_RUN_RETRIES", minimum=0, maximum=100),
            run_max_runtime_s=_int(env, "KAPPA_RUN_MAX_RUNTIME_S", minimum=10, maximum=86_400),
            max_concurrent_runs=_int(env, "KAPPA_MAX_CONCURRENT_RUNS", minimum=1, maximum=256),
            run_launcher=run_launcher(env),
            celery_broker_url=celery_url(
                "KAPPA_CELERY_BROKER_URL", broker_url, CELERY_BROKER_SCHEMES
            )
            if broker_url
            else None,
            celery_backend_url=celery_url(
                "KAPPA_CELERY_BACKEND_URL", backend_url, CELERY_BACKEND_SCHEMES
            )
            if backend_url
            else None,
            workers=workers(env),
            backfill_workers=_int(env, "KAPPA_BACKFILL_WORKERS", minimum=0, maximum=256),
            ui_port=_int(env, "KAPPA_UI_PORT", minimum=1, maximum=65535),
            enrich_max_wait_s=_float(env, "KAPPA_ENRICH_MAX_WAIT_S", minimum=0.0, maximum=3600),
            backfill_max_wait_s=_float(env, "KAPPA_BACKFILL_MAX_WAIT_S", minimum=0.0, maximum=3600),
            heal_interval_s=_int(env, "KAPPA_HEAL_INTERVAL_S", minimum=1, maximum=86400),
            state_cache_keys=_int(env, "KAPPA_STATE_CACHE_KEYS", minimum=1, maximum=100_000_000),
            freshness_max_lag_s=_float(
                env, "KAPPA_FRESHNESS_MAX_LAG_S", minimum=1.0, maximum=31_536_000
            ),
            run_retention_hours=_int(env, "KAPPA_RUN_RETENTION_HOURS", minimum=0, maximum=87_600),
            run_retention_deletes=_int(
                env, "KAPPA_RUN_RETENTION_DELETES", minimum=1, maximum=10_000
            ),
            env=env,
        )

    def stream(self, name: str) -> EventContract:
        """The catalogue's stream ``name``."""
        for candidate in self.streams:
            if candidate.name == name:
                return candidate
        raise ConfigurationError(SETTING_CATALOG, f"{self.catalog} declares no stream {name!r}")

    @property
    def local_pg_base_url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}"

    @property
    def local_broker(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def resolved_edw_url(self) -> str:
        return self.edw_url or f"{self.local_pg_base_url}/kappa_edw"

    @property
    def resolved_dagster_pg_url(self) -> str:
        return self.dagster_pg_url or f"{self.local_pg_base_url}/kappa_dagster"

    @property
    def resolved_bootstrap_servers(self) -> str:
        return self.kafka_bootstrap_servers or self.local_broker

    @property
    def resolved_oltp_url(self) -> str:
        return self.oltp_url or f"{self.local_pg_base_url}/kappa_oltp"

    @property
    def resolved_celery_broker_url(self) -> str:
        """The run workers' Celery broker: kombu's SQLAlchemy transport on the Dagster
        database unless ``KAPPA_CELERY_BROKER_URL`` names another."""
        return self.celery_broker_url or _sqlalchemy_url("sqla+", self.resolved_dagster_pg_url)

    @property
    def resolved_celery_backend_url(self) -> str:
        """The run workers' result backend: Celery's database backend on the Dagster
        database unless ``KAPPA_CELERY_BACKEND_URL`` names another."""
        return self.celery_backend_url or _sqlalchemy_url("db+", self.resolved_dagster_pg_url)

    @property
    def uses_embedded_postgres(self) -> bool:
        return self.edw_url is None or self.dagster_pg_url is None or self.oltp_url is None

    @property
    def uses_local_broker(self) -> bool:
        return self.kafka_bootstrap_servers is None

    @property
    def broker_data_dir(self) -> Path:
        """Where the local broker keeps its log on durable storage."""
        return self.home / "broker"


def _sqlalchemy_url(prefix: str, postgres: str) -> str:
    """``postgres`` as a psycopg2 SQLAlchemy URL behind kombu's or Celery's ``prefix``."""
    from sqlalchemy.engine import make_url

    url = make_url(postgres).set(drivername="postgresql+psycopg2")
    return prefix + url.render_as_string(hide_password=False)
