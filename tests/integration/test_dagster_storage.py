"""Dagster's PostgreSQL storage as the local stack configures it (``kappa.dagster.storage``):
runs and their events stored as by dagster-postgres, without a schema reflection per event,
and the run workers' instances, rebuilt from its reference, on the same classes."""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import dagster as dg
import pytest
import sqlalchemy
from sqlalchemy.engine import make_url
from sqlalchemy.pool import Pool

from kappa.dagster.storage import (
    KappaPostgresEventLogStorage,
    KappaPostgresRunStorage,
    KappaPostgresScheduleStorage,
    KappaPostgresStorage,
    shared_engine,
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


def _sessions_per_run(ref: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """(database connections opened, table listings) by each of four runs, each on an
    instance rebuilt from ``ref`` as the daemon, a code server or a run worker builds one."""
    opened: Counter[str] = Counter()
    inspect = sqlalchemy.inspect

    def counting(subject: Any, *args: Any, **kwargs: Any) -> Any:
        inspector = inspect(subject, *args, **kwargs)
        get_table_names = inspector.get_table_names

        def table_names(*a: Any, **k: Any) -> Any:
            opened["listings"] += 1
            return get_table_names(*a, **k)

        inspector.get_table_names = table_names  # type: ignore[method-assign]
        return inspector

    def connected(*_: Any) -> None:
        opened["connections"] += 1

    counts = []
    sqlalchemy.event.listen(Pool, "connect", connected)
    try:
        with monkeypatch.context() as patch:
            patch.setattr(sqlalchemy, "inspect", counting)
            for _ in range(4):
                before = opened.copy()
                with dg.DagsterInstance.from_ref(ref) as fresh:
                    assert dg.materialize([counted], instance=fresh).success
                    assert fresh.get_run_records(limit=1)
                    # What a sensor evaluation reads first: its state (and cursor).
                    assert fresh.schedule_storage is not None
                    assert fresh.schedule_storage.get_instigator_state("origin", "sensor") is None
                after = opened - before
                counts.append((after["connections"], after["listings"]))
    finally:
        sqlalchemy.event.remove(Pool, "connect", connected)
    return counts


def test_instances_of_a_process_share_one_pool_and_check_their_tables_once(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with _instance(database_url, "dagster-postgres") as stock:
        stock_counts = _sessions_per_run(stock.get_ref(), monkeypatch)
    with _instance(database_url, "kappa") as instance:
        assert isinstance(instance.get_ref().storage_data, dg._serdes.ConfigurableClassData)
        assert isinstance(instance.schedule_storage, KappaPostgresScheduleStorage)
        counts = _sessions_per_run(instance.get_ref(), monkeypatch)
    # dagster-postgres connects anew for every statement and lists the tables for every
    # instance; here the first run may fill the pool, the later ones connect no more.
    assert min(c for c, _ in stock_counts) >= 10, stock_counts
    assert min(n for _, n in stock_counts) >= 4, stock_counts
    assert counts[1:] == [(0, 0)] * 3, (counts, stock_counts)


def test_a_forked_child_takes_connections_of_its_own(database_url: str) -> None:
    url = make_url(database_url).set(drivername="postgresql+psycopg2")
    engine = shared_engine(url.render_as_string(hide_password=False))
    backend = "SELECT pg_backend_pid()"
    with engine.connect() as conn:
        parent = conn.exec_driver_sql(backend).scalar()
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: the pooled connection is the parent's, never to be touched
        try:
            with engine.connect() as conn:
                os.write(write, str(conn.exec_driver_sql(backend).scalar()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as answer:
        in_child = int(answer.read() or 0)
    os.waitpid(child, 0)
    with engine.connect() as conn:  # the parent's kept connection is intact
        assert conn.exec_driver_sql(backend).scalar() == parent
    assert in_child and in_child != parent


def test_a_pooled_connection_that_died_while_idle_is_replaced_before_use(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    from kappa.dagster import storage

    url = make_url(database_url).set(drivername="postgresql+psycopg2")
    engine = shared_engine(url.render_as_string(hide_password=False))
    backend = "SELECT pg_backend_pid()"
    with engine.connect() as conn:
        killed = conn.exec_driver_sql(backend).scalar()
    with psycopg.connect(database_url, autocommit=True) as admin:  # as a server restart would
        admin.execute("SELECT pg_terminate_backend(%s)", (killed,))
    monkeypatch.setattr(storage, "PING_AFTER_IDLE_S", 0.0)  # it has been idle long enough
    with engine.connect() as conn:
        replacement = conn.exec_driver_sql(backend).scalar()
    assert replacement and replacement != killed
