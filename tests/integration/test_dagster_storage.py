"""Dagster's PostgreSQL storage as the local stack configures it (``kappa.dagster.storage``):
runs and their events stored as by dagster-postgres, without a schema reflection per event,
and the run workers' instances, rebuilt from its reference, on the same classes."""

from __future__ import annotations

from collections import Counter
from typing import Any

import dagster as dg
import pytest
import sqlalchemy
from sqlalchemy.engine import make_url

from kappa.dagster.storage import (
    KappaPostgresEventLogStorage,
    KappaPostgresRunStorage,
    KappaPostgresStorage,
)


@dg.asset
def counted() -> int:
    return 1


def _instance(database_url: str, kind: str) -> Any:
    url = make_url(database_url).set(drivername="postgresql+psycopg2")
    postgres = {"postgres_url": url.render_as_string(hide_password=False)}
    storage = (
        {"postgres": postgres}
        if kind == "dagster-postgres"
        else {
            "custom": {
                "module": "kappa.dagster.storage",
                "class": "KappaPostgresStorage",
                "config": postgres,
            }
        }
    )
    return dg.instance_for_test(overrides={"storage": storage})


@pytest.fixture
def instance(database_url: str):
    with _instance(database_url, "kappa") as test_instance:
        yield test_instance


def _lookups_per_run(instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Schema column lookups (SQLAlchemy's inspector) made by each of four runs of an asset."""
    inspected: Counter[str] = Counter()
    inspect = sqlalchemy.inspect

    def counting(subject: Any, *args: Any, **kwargs: Any) -> Any:
        inspector = inspect(subject, *args, **kwargs)
        get_columns = inspector.get_columns

        def columns(table: str, *a: Any, **k: Any) -> Any:
            inspected[table] += 1
            return get_columns(table, *a, **k)

        inspector.get_columns = columns  # type: ignore[method-assign]
        return inspector

    with monkeypatch.context() as patch:
        patch.setattr(sqlalchemy, "inspect", counting)
        counts = []
        for _ in range(4):
            before = sum(inspected.values())
            assert dg.materialize([counted], instance=instance).success
            instance.get_run_records(limit=10)
            counts.append(sum(inspected.values()) - before)
    return counts


def test_runs_store_their_events_and_migrated_columns_are_looked_up_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _instance(database_url, "dagster-postgres") as stock:
        stock_lookups = _lookups_per_run(stock, monkeypatch)
    with _instance(database_url, "kappa") as instance:
        ref = instance.get_ref()
        assert ref.storage_data is not None
        assert ref.storage_data.class_name == KappaPostgresStorage.__name__
        assert isinstance(instance.run_storage, KappaPostgresRunStorage)
        assert isinstance(instance.event_log_storage, KappaPostgresEventLogStorage)
        lookups = _lookups_per_run(instance, monkeypatch)
        # Both instances share the database: the stock one's four runs, then these four.
        records = instance.get_run_records()
        assert [r.dagster_run.status for r in records] == [dg.DagsterRunStatus.SUCCESS] * 8
        event = instance.get_latest_materialization_event(dg.AssetKey("counted"))
        assert event is not None and event.run_id == records[0].dagster_run.run_id
    # dagster-postgres looks the columns up again in every run; these storages once.
    assert min(stock_lookups) >= 2, stock_lookups
    assert lookups[1:] == [0, 0, 0], (lookups, stock_lookups)


def test_a_run_worker_rebuilds_the_same_storage_from_the_reference(
    instance: dg.DagsterInstance,
) -> None:
    assert dg.materialize([counted], instance=instance).success
    ref = instance.get_ref()
    with dg.DagsterInstance.from_ref(ref) as worker:
        assert isinstance(worker.run_storage, KappaPostgresRunStorage)
        assert isinstance(worker.event_log_storage, KappaPostgresEventLogStorage)
        assert len(worker.get_run_records()) == 1
