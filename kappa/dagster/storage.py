"""Dagster's PostgreSQL storage without a schema reflection per run event or sensor tick.

dagster-postgres asks SQLAlchemy's inspector whether a migrated column or table exists on
every call that depends on it: ``has_run_stats_index_cols`` when a run event is handled and
when run records are read, ``has_backfill_id_column`` when a run is added, the asset key
table's columns when an asset event is stored, the ``instigators`` and ``secondary_indexes``
tables whenever a sensor's state is read or written. Each asks PostgreSQL's catalogue, and
sampling ``pg_stat_activity`` on the running local stack found about a fifth of the
active statements to be these lookups. A column or table a migration added does not go
away while the processes run, so the storages here remember one once it is found, for the
whole process (instances are rebuilt often); one not found is asked again the next time (a
migration may add it meanwhile), as before.

``dagster.yaml``::

    storage:
      custom:
        module: kappa.dagster.storage
        class: KappaPostgresStorage
        config:
          postgres_url: {env: KAPPA_DAGSTER_PG_URL}

The run workers rebuild the instance from its reference, which names this class too.

dagster-postgres also opens a new connection for every statement (``NullPool``: a
``DagsterInstance`` must not hold connections), and every instance built lists the
database's tables to decide whether to create them. The daemon, the code servers and the
run workers build an instance per tick, per sensor evaluation and per run: measured on the
running local stack, Dagster's database received about 96 new sessions a second (the EDW
about 4), and PostgreSQL spent most of its CPU starting backends and answering catalogue
lookups, not executing statements. The storages here take their connections from one
pool per process and database URL (:func:`shared_engine`; a forked child starts a pool of
its own) and list the tables once per process and storage class. A storage with a token
provider (cloud IAM auth) keeps an engine of its own, since its connections carry
credentials that expire.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import sqlalchemy
from dagster._core.storage.base_storage import DagsterStorage
from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.run_storage import PostgresRunStorage
from dagster_postgres.schedule_storage import PostgresScheduleStorage
from dagster_postgres.utils import (
    create_pg_engine,
    get_token_provider_from_config,
    pg_url_from_config,
)
from sqlalchemy.engine import Connection, Engine

# A pool per process and URL: two connections kept open (the daemon's and a worker's usual
# concurrency), more opened on demand and closed when returned. A kept connection idle for
# longer than PING_AFTER_IDLE_S is tested before use (the server may have restarted
# meanwhile; a test on every use was a round trip per statement) and one is replaced after
# half an hour.
POOL_SIZE = 2
POOL_OVERFLOW = 16
POOL_RECYCLE_S = 1800
PING_AFTER_IDLE_S = 10.0

_ENGINES: dict[str, Engine] = {}
_CHECKED: set[tuple[type, str]] = set()
_PRESENT: dict[tuple[type, str], _Present] = {}
_LOCK = threading.Lock()


def shared_engine(postgres_url: str) -> Engine:
    """This process's pooled engine for ``postgres_url`` (autocommit, like dagster-postgres's)."""
    with _LOCK:
        engine = _ENGINES.get(postgres_url)
        if engine is None:
            engine = _ENGINES[postgres_url] = create_pg_engine(
                postgres_url,
                None,
                isolation_level="AUTOCOMMIT",
                pool_size=POOL_SIZE,
                max_overflow=POOL_OVERFLOW,
                pool_recycle=POOL_RECYCLE_S,
            )
            sqlalchemy.event.listen(engine, "checkin", _returned)
            sqlalchemy.event.listen(engine, "checkout", _ping_if_idle)
        return engine


def _returned(_dbapi: Any, record: Any) -> None:
    record.info["returned_at"] = time.monotonic()


def _ping_if_idle(dbapi: Any, record: Any, _proxy: Any) -> None:
    """Test a connection idle for longer than :data:`PING_AFTER_IDLE_S`; a dead one makes the
    pool open a new one (SQLAlchemy retries a checkout refused with ``DisconnectionError``)."""
    returned = record.info.get("returned_at")
    if returned is None or time.monotonic() - returned <= PING_AFTER_IDLE_S:
        return
    try:
        cursor = dbapi.cursor()
        try:
            cursor.execute("SELECT 1")
        finally:
            cursor.close()
    except Exception as exc:
        raise sqlalchemy.exc.DisconnectionError(str(exc)) from exc


def _after_fork_in_child() -> None:
    # The parent's connections must not be used, nor closed, by the child: forget them (and
    # a lock another thread of the parent may have held when it forked).
    global _LOCK
    _LOCK = threading.Lock()
    for engine in _ENGINES.values():
        engine.dispose(close=False)


os.register_at_fork(after_in_child=_after_fork_in_child)


class _Present:
    """Names found present, remembered; a name not found is looked up again next time."""

    def __init__(self) -> None:
        self._found: set[str] = set()

    def check(self, name: str, look: Callable[[], bool]) -> bool:
        if name in self._found:
            return True
        present = look()
        if present:
            self._found.add(name)
        return present


def _storage_args(config_value: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "postgres_url": pg_url_from_config(config_value),
        "should_autocreate_tables": config_value.get("should_autocreate_tables", True),
        "token_provider": get_token_provider_from_config(config_value),
    }


class _FromConfig:
    """Built from dagster.yaml's config as dagster-postgres builds its own class."""

    @classmethod
    def from_config_value(
        cls, inst_data: ConfigurableClassData | None, config_value: Mapping[str, Any]
    ) -> Any:
        return cls(inst_data=inst_data, **_storage_args(config_value))  # type: ignore[call-arg]


class _Pooled(_FromConfig):
    """A dagster-postgres storage on this process's shared pool, its tables checked once,
    remembering for the whole process the migrated columns and tables it found."""

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: Any = None,
    ) -> None:
        key = (type(self), postgres_url)
        with _LOCK:
            self._present = _PRESENT.setdefault(key, _Present())
        check = should_autocreate_tables and key not in _CHECKED
        # The parent builds a NullPool engine (connecting only when used) and, when ``check``,
        # lists the tables and creates the missing ones.
        super().__init__(postgres_url, check, inst_data, token_provider)  # type: ignore[call-arg]
        if check:
            _CHECKED.add(key)
        self.should_autocreate_tables = should_autocreate_tables
        if token_provider is None:
            self._engine = shared_engine(postgres_url)


class KappaPostgresRunStorage(_Pooled, PostgresRunStorage):
    """Dagster's PostgreSQL run storage, remembering the migrated columns it found."""

    def has_run_stats_index_cols(self) -> bool:
        return self._present.check("run_stats", super().has_run_stats_index_cols)

    def has_bulk_actions_selector_cols(self) -> bool:
        return self._present.check("bulk_actions_selector", super().has_bulk_actions_selector_cols)

    def has_backfill_id_column(self) -> bool:
        return self._present.check("backfill_id", super().has_backfill_id_column)

    def has_bulk_action_job_name_column(self) -> bool:
        return self._present.check("bulk_action_job_name", super().has_bulk_action_job_name_column)

    def has_backfill_tags_table(self) -> bool:
        return self._present.check("backfill_tags", super().has_backfill_tags_table)


class KappaPostgresEventLogStorage(_Pooled, PostgresEventLogStorage):
    """Dagster's PostgreSQL event log storage, remembering the asset key table's migrated
    columns it found."""

    def _has_asset_key_col_on_connection(self, conn: Connection, column_name: str) -> bool:
        look = super()._has_asset_key_col_on_connection
        return self._present.check(column_name, lambda: look(conn, column_name))


class KappaPostgresScheduleStorage(_Pooled, PostgresScheduleStorage):
    """Dagster's PostgreSQL schedule storage (sensor cursors and ticks) on the shared pool,
    remembering the tables and built indexes it found (it lists the database's tables on
    every sensor state read and write: a tenth of the daemon's CPU, sampled on the stack)."""

    def _has_instigators_table(self, conn: Connection) -> bool:
        look = super()._has_instigators_table
        return self._present.check("instigators", lambda: look(conn))

    def _has_asset_daemon_asset_evaluations_table(self, conn: Connection) -> bool:
        look = super()._has_asset_daemon_asset_evaluations_table
        return self._present.check("asset_daemon_asset_evaluations", lambda: look(conn))

    def has_secondary_index_table(self) -> bool:
        return self._present.check("secondary_indexes", super().has_secondary_index_table)

    def has_built_index(self, migration_name: str) -> bool:
        look = super().has_built_index
        return self._present.check(f"index:{migration_name}", lambda: look(migration_name))


class KappaPostgresStorage(_FromConfig, DagsterPostgresStorage):
    """``DagsterPostgresStorage`` with the run and event log storages above (an instance's
    reference names this class, so run workers rebuild the same)."""

    def __init__(
        self,
        postgres_url: str,
        should_autocreate_tables: bool = True,
        inst_data: ConfigurableClassData | None = None,
        token_provider: Any = None,
    ) -> None:
        # DagsterPostgresStorage's attributes, with these storages (its own initialiser would
        # build, and migrate-check, the stock ones first).
        self.postgres_url = postgres_url
        self.should_autocreate_tables = should_autocreate_tables
        self._inst_data = inst_data
        args = (postgres_url, should_autocreate_tables)
        self._run_storage = KappaPostgresRunStorage(*args, token_provider=token_provider)
        self._event_log_storage = KappaPostgresEventLogStorage(*args, token_provider=token_provider)
        self._schedule_storage = KappaPostgresScheduleStorage(*args, token_provider=token_provider)
        DagsterStorage.__init__(self)  # type: ignore[arg-type]
