"""Dagster's PostgreSQL storage without a schema reflection per run event.

dagster-postgres asks SQLAlchemy's inspector whether a migrated column exists on every call
that depends on it: ``has_run_stats_index_cols`` when a run event is handled and when run
records are read, ``has_backfill_id_column`` when a run is added, the asset key table's
columns when an asset event is stored. Each asks PostgreSQL's catalogue over a new
connection (the storage uses no connection pool), and
sampling ``pg_stat_activity`` on the running local stack found about a fifth of the
active statements to be these lookups. A column a migration added does not go away while
the processes run, so the storages here remember a column once it is found; one not found
is asked again the next time (a migration may add it meanwhile), as before.

``dagster.yaml``::

    storage:
      custom:
        module: kappa.dagster.storage
        class: KappaPostgresStorage
        config:
          postgres_url: {env: KAPPA_DAGSTER_PG_URL}

The run workers rebuild the instance from its reference, which names this class too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from dagster._core.storage.base_storage import DagsterStorage
from dagster._serdes import ConfigurableClassData
from dagster_postgres import DagsterPostgresStorage
from dagster_postgres.event_log import PostgresEventLogStorage
from dagster_postgres.run_storage import PostgresRunStorage
from dagster_postgres.schedule_storage import PostgresScheduleStorage
from dagster_postgres.utils import get_token_provider_from_config, pg_url_from_config
from sqlalchemy.engine import Connection


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


class _RemembersColumns(_FromConfig):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._present = _Present()
        super().__init__(*args, **kwargs)


class KappaPostgresRunStorage(_RemembersColumns, PostgresRunStorage):
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


class KappaPostgresEventLogStorage(_RemembersColumns, PostgresEventLogStorage):
    """Dagster's PostgreSQL event log storage, remembering the asset key table's migrated
    columns it found."""

    def _has_asset_key_col_on_connection(self, conn: Connection, column_name: str) -> bool:
        look = super()._has_asset_key_col_on_connection
        return self._present.check(column_name, lambda: look(conn, column_name))


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
        self._schedule_storage = PostgresScheduleStorage(*args, token_provider=token_provider)
        DagsterStorage.__init__(self)  # type: ignore[arg-type]
