"""The run workers' Celery application: ``celery -A kappa.dagster.celery_worker worker -Q kappa-live``.

It is the run launcher's own application, read from the Dagster instance (``DAGSTER_HOME``'s
dagster.yaml, with the broker and result backend it names), with the run task of
:func:`kappa.dagster.celery.register_worker_tasks`. The launcher's ``include`` (the code
location's module) is imported by the worker before it forks its pool processes, so each
process starts warm.
"""

from __future__ import annotations

from celery import Celery
from dagster import DagsterInstance

from kappa.dagster.celery import KappaCeleryRunLauncher, register_worker_tasks
from kappa.dagster.celery_storage import prepare_celery_storage
from kappa.exceptions import ConfigurationError


def _app() -> Celery:
    with DagsterInstance.get() as instance:
        launcher = instance.run_launcher
        if not isinstance(launcher, KappaCeleryRunLauncher):
            raise ConfigurationError(
                "KAPPA_RUN_LAUNCHER",
                f"the Dagster instance in DAGSTER_HOME launches runs with "
                f"{type(launcher).__name__}, not Celery: no run would reach this worker",
            )
        app = launcher.celery
    register_worker_tasks(app)
    # Before the worker consumes: two workers starting at once on a new database would both
    # create the broker's tables, and the loser would die.
    prepare_celery_storage(app)
    return app


app = _app()
