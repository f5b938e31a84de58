"""Runs in warm Celery workers: dagster-celery's ``CeleryRunLauncher`` with queues and heartbeats.

A run becomes a Celery task that an already running worker process executes, so the code
location is imported once per worker, not once per run. On top of dagster-celery this adds:

* **Two queues.** Backfill runs (tagged ``dagster/backfill``) go to the backfill queue, every
  other run (the sensors' micro-batches, heal and check runs) to the live queue. Each queue is
  served by its own worker processes, so a long backfill never occupies the processes the
  live micro-batches need; Celery priorities would not do that (a worker busy with a 3-minute
  backfill run cannot take a higher-priority task) and kombu's SQLAlchemy transport has none.
* **Heartbeats.** While a run executes, its worker process refreshes the task's ``STARTED``
  state in the result backend every :data:`HEARTBEAT_INTERVAL_S` with the time. The health
  check that Dagster's run monitoring calls reports a run whose heartbeat is older than
  ``heartbeat_timeout_seconds`` as failed (then run retries launch it again): a worker killed
  with its whole machine leaves its task ``STARTED`` forever, which dagster-celery alone
  reports as running. A pool process killed alone is reported by its Celery worker as a
  ``FAILURE`` (``WorkerLostError``) and seen at the next check.

The workers run ``celery -A kappa.dagster.celery_worker worker -Q <queue>`` with the same
``DAGSTER_HOME`` as the daemon: their Celery application is this launcher's, read from
dagster.yaml (:mod:`kappa.dagster.celery_worker`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from celery import Celery, states
from dagster import DagsterInstance, DagsterRun, Field, IntSource, StringSource
from dagster._core.launcher import CheckRunHealthResult, LaunchRunContext, WorkerStatus
from dagster._core.storage.tags import BACKFILL_ID_TAG
from dagster_celery.config import TASK_EXECUTE_JOB_NAME, TASK_RESUME_JOB_NAME
from dagster_celery.launcher import CeleryRunLauncher
from dagster_celery.tags import DAGSTER_CELERY_QUEUE_TAG, DAGSTER_CELERY_TASK_ID_TAG
from kombu import Exchange, Queue

from kappa.dagster import celery_transport
from kappa.dagster.celery_storage import CLEAN_EVERY_S, clean_celery_storage

# Every process holding this launcher (daemon, webserver, workers) polls the SQLAlchemy
# broker at the shorter interval.
celery_transport.install()

_LOG = logging.getLogger(__name__)

LIVE_QUEUE = "kappa-live"
BACKFILL_QUEUE = "kappa-backfill"
#: Seconds between a running task's heartbeats.
HEARTBEAT_INTERVAL_S = 5.0
#: A run whose heartbeat is older than this is failed by the health check (default).
HEARTBEAT_TIMEOUT_S = 30


def declare_queues(app: Celery, queues: tuple[str, ...]) -> None:
    """Route dagster-celery's ``<queue>.<task>`` routing keys to the queue of that name
    (a topic exchange per queue, so the same binding works on every kombu transport)."""
    app.conf.task_queues = [
        Queue(name, Exchange(name, type="topic"), routing_key=f"{name}.#") for name in queues
    ]
    app.conf.task_default_exchange_type = "topic"


class KappaCeleryRunLauncher(CeleryRunLauncher):
    """``CeleryRunLauncher`` with a live and a backfill queue and a heartbeat health check."""

    def __init__(
        self,
        default_queue: str = LIVE_QUEUE,
        backfill_queue: str = BACKFILL_QUEUE,
        heartbeat_timeout_seconds: int = HEARTBEAT_TIMEOUT_S,
        **kwargs: Any,
    ) -> None:
        super().__init__(default_queue=default_queue, **kwargs)
        self.backfill_queue = backfill_queue
        self.heartbeat_timeout_s = heartbeat_timeout_seconds
        declare_queues(self.celery, (default_queue, backfill_queue))
        self._cleaned_at: float | None = None

    def queue_for(self, run: DagsterRun) -> str:
        """The queue a run goes to: a queue tag wins, then backfill runs to the backfill queue."""
        if DAGSTER_CELERY_QUEUE_TAG in run.tags:
            return run.tags[DAGSTER_CELERY_QUEUE_TAG]
        return self.backfill_queue if BACKFILL_ID_TAG in run.tags else self.default_queue

    def launch_run(self, context: LaunchRunContext) -> None:
        run = context.dagster_run
        queue = self.queue_for(run)
        if run.tags.get(DAGSTER_CELERY_QUEUE_TAG) != queue:
            # The tag is what dagster-celery routes by, and it shows the queue in the UI.
            self._instance.add_run_tags(run.run_id, {DAGSTER_CELERY_QUEUE_TAG: queue})
            run = run.with_tags({**run.tags, DAGSTER_CELERY_QUEUE_TAG: queue})
            context = LaunchRunContext(dagster_run=run, workspace=context.workspace)
        super().launch_run(context)
        self._clean_storage()

    def _clean_storage(self) -> None:
        """At most every :data:`CLEAN_EVERY_S`: delete what the broker and result backend keep
        of finished runs (:mod:`kappa.dagster.celery_storage`); never fails a launch."""
        now = time.monotonic()
        if self._cleaned_at is not None and now - self._cleaned_at < CLEAN_EVERY_S:
            return
        self._cleaned_at = now
        try:
            cleaned = clean_celery_storage(self.celery)
        except Exception as exc:  # a cleanup that failed is tried again next time
            _LOG.warning("cleaning the Celery broker and result tables failed: %s", exc)
            return
        _LOG.info(
            "Celery storage cleaned: %s delivered message(s) deleted, expired results %s",
            cleaned.delivered_messages,
            "deleted" if cleaned.expired_results else "left to the backend",
        )

    def check_run_worker_health(self, run: DagsterRun) -> CheckRunHealthResult:
        task_id = run.tags.get(DAGSTER_CELERY_TASK_ID_TAG)
        if task_id is None:
            return CheckRunHealthResult(WorkerStatus.UNKNOWN, "the run has no Celery task")
        # One read of the task's state and payload (a second read could see a later state).
        meta = self.celery.backend.get_task_meta(task_id)
        state, info = meta.get("status"), meta.get("result")
        if state == states.STARTED:
            info = info if isinstance(info, Mapping) else {}
            beat = info.get("heartbeat")
            if beat is None:
                # Started by a worker without heartbeats: only its outcome tells.
                return CheckRunHealthResult(WorkerStatus.RUNNING)
            age = time.time() - float(beat)
            if age > self.heartbeat_timeout_s:
                return CheckRunHealthResult(
                    WorkerStatus.FAILED,
                    f"the Celery worker {info.get('hostname')} (pid {info.get('pid')}) running "
                    f"the run sent no heartbeat for {age:.0f} s (limit "
                    f"{self.heartbeat_timeout_s} s): it died or lost its connection",
                )
            return CheckRunHealthResult(WorkerStatus.RUNNING)
        if state == states.SUCCESS:
            return CheckRunHealthResult(WorkerStatus.SUCCESS)
        if state == states.FAILURE:
            return CheckRunHealthResult(WorkerStatus.FAILED, f"the Celery task failed: {info!r}")
        return CheckRunHealthResult(WorkerStatus.UNKNOWN, f"Celery task state {state}")

    @classmethod
    def config_type(cls) -> dict[str, Any]:
        parent = super().config_type()
        assert isinstance(parent, Mapping)
        config = dict(parent)
        config["default_queue"] = Field(
            StringSource,
            is_required=False,
            default_value=LIVE_QUEUE,
            description="The queue of live runs (every run not of a backfill).",
        )
        config["backfill_queue"] = Field(
            StringSource,
            is_required=False,
            default_value=BACKFILL_QUEUE,
            description="The queue of backfill runs (tagged dagster/backfill).",
        )
        config["heartbeat_timeout_seconds"] = Field(
            IntSource,
            is_required=False,
            default_value=HEARTBEAT_TIMEOUT_S,
            description="A started run whose worker sent no heartbeat for this long is failed.",
        )
        return config


@contextmanager
def heartbeat(
    app: Celery, task_id: str, hostname: str, interval_s: float = HEARTBEAT_INTERVAL_S
) -> Iterator[None]:
    """Refresh ``task_id``'s STARTED state with the time every ``interval_s`` while the body
    runs; the last write is over before the body's outcome is stored."""
    stop = threading.Event()

    def beat() -> None:
        app.backend.store_result(
            task_id,
            {"pid": os.getpid(), "hostname": hostname, "heartbeat": time.time()},
            states.STARTED,
        )

    def loop() -> None:
        while not stop.wait(interval_s):
            try:
                beat()
            except Exception:  # a missed beat; the health check allows several
                continue

    beat()
    thread = threading.Thread(target=loop, name=f"heartbeat-{task_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


_instances: dict[int, DagsterInstance] = {}


def worker_instance() -> DagsterInstance:
    """One Dagster instance per worker process (a forked pool process makes its own)."""
    pid = os.getpid()
    instance = _instances.get(pid)
    if instance is None:
        _instances.clear()
        instance = _instances[pid] = DagsterInstance.get()
    return instance


def register_worker_tasks(app: Celery) -> None:
    """The run task the workers execute: dagster-celery's, with heartbeats and one Dagster
    instance per worker process."""
    from dagster._cli.api import _execute_run_command_body, _resume_run_command_body
    from dagster._grpc.types import ExecuteRunArgs, ResumeRunArgs
    from dagster._serdes import unpack_value

    def _ignore(_event: object) -> None:
        return None

    @app.task(bind=True, name=TASK_EXECUTE_JOB_NAME, track_started=True)
    def execute_job(task: Any, execute_job_args_packed: Any) -> int:
        args = unpack_value(execute_job_args_packed, as_type=ExecuteRunArgs)
        with heartbeat(app, task.request.id, task.request.hostname):
            return _execute_run_command_body(
                instance=worker_instance(),
                run_id=args.run_id,
                write_stream_fn=_ignore,
                set_exit_code_on_failure=True,
            )

    @app.task(bind=True, name=TASK_RESUME_JOB_NAME, track_started=True)
    def resume_job(task: Any, execute_job_args_packed: Any) -> int:
        args = unpack_value(execute_job_args_packed, as_type=ResumeRunArgs)
        with heartbeat(app, task.request.id, task.request.hostname):
            return _resume_run_command_body(
                instance=worker_instance(),
                run_id=args.run_id,
                write_stream_fn=_ignore,
                set_exit_code_on_failure=True,
            )
