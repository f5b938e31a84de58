"""``kappa up``: the local stack until Ctrl-C.

It starts what is not given by configuration (an embedded PostgreSQL unless database URLs
are set, a local broker unless ``KAFKA_BOOTSTRAP_SERVERS`` is set), prepares databases,
schemas, tables and topics (:mod:`kappa.cli.prepare`), writes the Dagster instance config,
and supervises the catalogue's producers, the Dagster daemon and the webserver.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from kappa.catalog.ingests import topic_ingests
from kappa.cli.output import loaded_topics, repo_root, say, step
from kappa.cli.prepare import prepare
from kappa.edw.connection import connect
from kappa.edw.ledger import read_heads
from kappa.edw.types import Schemas
from kappa.exceptions import ConfigurationError, KappaError
from kappa.health import shard_stop
from kappa.settings import Settings, redact
from kappa.sources.captured import active_captures
from kappa.sources.mariadb_server import URL_SETTING
from kappa.sources.topic import EventStore, UnknownTopicError


def ledger_problems(settings: Settings) -> list[str]:
    """Why an asset cannot continue where its ledger ends (a lost or reset log), in words."""
    problems: list[str] = []
    schemas = Schemas(settings.edw_schema, settings.meta_schema)
    with (
        EventStore(
            settings.resolved_bootstrap_servers, timeout_s=settings.kafka_timeout_s
        ) as store,
        connect(settings.resolved_edw_url) as conn,
    ):
        for spec, setting in topic_ingests(settings):
            asset, topic = spec.asset, spec.topic
            try:
                partitions = store.partitions(topic)
            except UnknownTopicError as exc:
                problems.append(str(ConfigurationError(setting, str(exc))))
                continue
            bounds = store.log_bounds(topic, partitions)
            epoch = store.topic_id(topic) or ""
            heads = read_heads(conn, schemas, asset, topic)
            for partition in partitions:
                problem = shard_stop(
                    asset, topic, partition, heads.get(partition), bounds[partition], epoch
                )
                if problem is not None:
                    problems.append(problem)
    return problems


def _wait_http(url: str, *, timeout_s: float, alive: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise KappaError(f"the process serving {url} exited while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise KappaError(f"{url} did not answer within {timeout_s:.0f} s")


def settle_previous_session(dagster_home: Path, env: dict[str, str]) -> int:
    """End the runs an earlier `kappa up` left queued or running; returns how many.

    The local stack owns its Dagster storage, so at start no run can really be in flight: a
    run still marked so died with the previous session, and the sensors would wait for it
    forever. Queued runs are cancelled rather than launched with stale ranges; the ledger
    decides what the next batches load.
    """
    import os

    import dagster as dg

    os.environ.update(
        {k: v for k, v in env.items() if k in ("DAGSTER_HOME", "KAPPA_DAGSTER_PG_URL")}
    )
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        queued = instance.get_runs(
            filters=dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.QUEUED, dg.DagsterRunStatus.NOT_STARTED]
            )
        )
        running = instance.get_runs(
            filters=dg.RunsFilter(
                statuses=[
                    dg.DagsterRunStatus.STARTING,
                    dg.DagsterRunStatus.STARTED,
                    dg.DagsterRunStatus.CANCELING,
                ]
            )
        )
        for run in queued:
            instance.report_run_canceled(
                run,
                message="left queued by an earlier `kappa up`; the ledger decides what loads next",
            )
        for run in running:
            instance.report_run_failed(run, message="its process ended with an earlier `kappa up`")
    return len(queued) + len(running)


def up(settings: Settings, *, reset: bool, producers: bool, seed: bool = False) -> int:
    """Run the local stack until Ctrl-C (or until one of its processes dies); ``producers``:
    start the catalogue's ``local.producers``; ``seed``: passed to ``local.seed`` as
    ``top_up`` (see :func:`~kappa.cli.prepare.prepare`)."""
    from kappa.local.broker import LocalBroker
    from kappa.local.catalog import load_local
    from kappa.local.dagster_instance import (
        dagster_environment,
        worker_command,
        write_dagster_yaml,
    )
    from kappa.local.mariadb import local_mariadb
    from kappa.local.pg_admin import check_postgres, ensure_database
    from kappa.local.postgres import EmbeddedPostgres
    from kappa.local.supervisor import Supervisor

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGTERM while starting unwinds like Ctrl-C, so everything started so far is stopped.
    signal.signal(signal.SIGTERM, interrupted)
    home = settings.home
    root = repo_root()
    # Refused before anything starts when it does not validate.
    section = load_local(settings.catalog)
    if reset and home.exists():
        say(f"Resetting local state: removing {home}")
        shutil.rmtree(home)
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    say("Starting the kappa-etl local stack")

    with ExitStack() as stack:
        # Stop what we started, in reverse order, however we leave (Ctrl-C included).
        if settings.uses_embedded_postgres:
            postgres = EmbeddedPostgres(
                home / "pg", settings.pg_port, log_path=logs / "postgres.log"
            )
            with step(f"embedded PostgreSQL on 127.0.0.1:{settings.pg_port}"):
                postgres.start()
            stack.callback(postgres.stop)
            with step("databases kappa_edw, kappa_dagster, kappa_oltp"):
                if settings.oltp_url is None:
                    ensure_database(postgres.base_url, "kappa_oltp", setting="KAPPA_OLTP_URL")
                if settings.edw_url is None:
                    ensure_database(postgres.base_url, "kappa_edw", setting="KAPPA_EDW_URL")
                if settings.dagster_pg_url is None:
                    ensure_database(
                        postgres.base_url, "kappa_dagster", setting="KAPPA_DAGSTER_PG_URL"
                    )
        mariadb = local_mariadb(settings, home / "mariadb")
        if mariadb.server is not None:
            say(f"  local MariaDB (binlog on) on 127.0.0.1:{mariadb.server.port}")
            stack.callback(mariadb.server.stop)
        if mariadb.message is not None:
            say(f"  ! {mariadb.message}")
        if mariadb.env:
            settings = Settings.from_env({**settings.env, **mariadb.env})
        with step("database connections"):
            check_postgres("KAPPA_EDW_URL", settings.resolved_edw_url)
            check_postgres("KAPPA_DAGSTER_PG_URL", settings.resolved_dagster_pg_url)
            check_postgres("KAPPA_OLTP_URL", settings.resolved_oltp_url)
        if settings.uses_local_broker:
            broker = LocalBroker(
                settings.broker_port,
                logs / "broker.log",
                storage=settings.broker_storage,
                data_dir=settings.broker_data_dir,
            )
            # broker.stop stops its S3 server too, after the broker.
            stack.callback(broker.stop)
            if broker.object_store is not None:
                with step(f"local S3 server for the broker's log in {settings.broker_data_dir}"):
                    broker.object_store.start()
            with step(
                f"local broker (Tansu, {settings.broker_storage} storage) on {broker.bootstrap_servers}"
            ):
                broker.start()
        # An embedded OLTP database is the local stack's own: the catalogue's local hooks
        # prepare it with or without the producers, so `--no-simulator` starts too.
        prepare(
            settings,
            create_topics=True,
            local=producers or settings.oltp_url is None,
            seed=seed,
        )
        dagster_home = home / "dagster"
        with step(f"Dagster instance config in {dagster_home}"):
            write_dagster_yaml(dagster_home, settings, root / "workspace.yaml")

        problems = ledger_problems(settings)
        env: dict[str, str] = {
            **settings.env,
            "KAFKA_BOOTSTRAP_SERVERS": settings.resolved_bootstrap_servers,
            "KAPPA_EDW_URL": settings.resolved_edw_url,
            "KAPPA_OLTP_URL": settings.resolved_oltp_url,
            **dagster_environment(settings, dagster_home),
        }
        if settings.dagster_pg_url is None:
            with step("runs left over by an earlier session"):
                settled = settle_previous_session(dagster_home, env)
            if settled:
                say(f"    {settled} run(s) of an earlier session marked as ended")
        supervisor = Supervisor()
        stack.callback(supervisor.stop_all)
        workspace = str(root / "workspace.yaml")
        # The catalogue's producers run from its directory (their modules are found there).
        for producer in section.producers if producers else ():
            with step(f"producer {producer.name} (python -m {producer.module})"):
                supervisor.start(
                    producer.name,
                    [sys.executable, "-m", producer.module],
                    env=env,
                    log_path=logs / f"{producer.name}.log",
                    cwd=section.directory,
                )
        if settings.run_launcher == "celery":
            from kappa.dagster.celery import BACKFILL_QUEUE, LIVE_QUEUE

            # The code location loads from the repository root in the workers too.
            worker_env = {**env, "PYTHONPATH": str(root)}
            pools = [("worker-live", LIVE_QUEUE, settings.workers)]
            if settings.backfill_workers:
                pools.append(("worker-backfill", BACKFILL_QUEUE, settings.backfill_workers))
            for name, queue, concurrency in pools:
                with step(f"run workers {name} ({concurrency} processes, Celery queue {queue})"):
                    supervisor.start(
                        name,
                        worker_command(queue, concurrency, name),
                        env=worker_env,
                        log_path=logs / f"{name}.log",
                        cwd=root,
                        restart=True,
                        # A worker's warm shutdown waits for its runs; a run cut short is
                        # safe (exactly once) and the next session settles it.
                        grace_s=5,
                    )
        with step("Dagster daemon"):
            supervisor.start(
                "daemon",
                [str(bin_dir / "dagster-daemon"), "run", "-w", workspace],
                env=env,
                log_path=logs / "dagster-daemon.log",
                cwd=root,
            )
        ui = f"http://127.0.0.1:{settings.ui_port}"
        with step(f"Dagster webserver on {ui}"):
            supervisor.start(
                "webserver",
                [
                    str(bin_dir / "dagster-webserver"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(settings.ui_port),
                    "-w",
                    workspace,
                ],
                env=env,
                log_path=logs / "dagster-webserver.log",
                cwd=root,
            )
            _wait_http(
                f"{ui}/server_info", timeout_s=180, alive=lambda: supervisor.exited() is None
            )

        say("")
        say("kappa-etl is running")
        say(f"  Dagster UI      {ui}  (assets: {ui}/assets, sensors: {ui}/overview/automation)")
        say(
            f"  broker          {settings.resolved_bootstrap_servers}"
            + (
                f"  (local, {settings.broker_storage} storage)"
                if settings.uses_local_broker
                else ""
            )
        )
        say(
            f"  EDW             {redact(settings.resolved_edw_url)}  (schemas {settings.edw_schema}, {settings.meta_schema})"
        )
        say(f"  Dagster storage {redact(settings.resolved_dagster_pg_url)}")
        captured = active_captures(settings)
        for engine, url in (
            ("postgresql", settings.resolved_oltp_url),
            ("mariadb", settings.env.get(URL_SETTING, "")),
        ):
            tables = ", ".join(str(c.source) for c in captured if c.engine == engine)
            if tables:
                say(f"  OLTP {engine:<10} {redact(url)}  (captured: {tables})")
        say(f"  topics          {', '.join(loaded_topics(settings))}")
        say(f"  running         {', '.join(supervisor.names)}")
        say(f"  logs            {logs}")
        for problem in problems:
            say(f"\n  ! {problem}")
        if problems and settings.uses_local_broker:
            lost = (
                "The local broker keeps nothing across restarts (KAPPA_BROKER_STORAGE=memory)"
                if settings.broker_storage == "memory"
                else f"The local broker's log in {settings.broker_data_dir} was lost or recreated"
            )
            say(
                f"  ! {lost} while PostgreSQL keeps the ledger:"
                " start from empty local state with `make reset` (kappa up --reset)."
            )
        say("\nPress Ctrl-C to stop.")
        outcome = supervisor.wait()
        say(f"\nStopping ({outcome.describe()}) ...")
    say("Stopped.")
    return 1 if outcome.reason == "child_exited" else 0
