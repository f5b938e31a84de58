"""The ``kappa`` command: bring up the local stack, check a deployment, run the simulator.

``kappa up`` starts what is not given by configuration (an embedded PostgreSQL unless
database URLs are set, a local broker unless ``KAFKA_BOOTSTRAP_SERVERS`` is set), makes
databases, schemas, tables and topics idempotently, writes the Dagster instance config, and
supervises the simulator, the Dagster daemon and the webserver until Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

from psycopg import sql

from kappa.backfill import SUCCEEDED, launch_backfill, wait_for_backfill
from kappa.catalog.captures import load_captures
from kappa.catalog.ingests import topic_ingests
from kappa.changes.target import ensure_target
from kappa.edw.connection import connect
from kappa.edw.evolution import plan_evolution
from kappa.edw.ledger import read_heads
from kappa.edw.replay import reset_for_replay, rewind_topic_asset
from kappa.edw.schema import ensure_schema
from kappa.edw.types import LedgerHead, Schemas
from kappa.exceptions import ConfigurationError, KappaError
from kappa.freshness import ShardFreshness, capture_freshness, topic_freshness
from kappa.health import RunFailures, failure_threshold, recent_failures, topic_stop
from kappa.settings import Settings, redact
from kappa.sources import pg_capture
from kappa.sources.pg_capture import install_capture
from kappa.sources.topic import EventStore, UnknownTopicError


def _repo_root() -> Path:
    """The folder with ``workspace.yaml``: the source tree (editable install) or the cwd."""
    for candidate in (Path(__file__).resolve().parents[1], Path.cwd()):
        if (candidate / "workspace.yaml").exists():
            return candidate
    raise ConfigurationError("workspace.yaml", "not found next to the kappa package nor in the cwd")


def _print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, for terminals and runbooks."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, *rows]:
        _say("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _timestamp(text: str) -> datetime:
    """An ISO-8601 time with a zone, for --from."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no zone (add Z or +00:00)")
    return moment


def _utc_time(text: str) -> datetime:
    """An ISO-8601 date or time, UTC unless it names a zone, for partition bounds."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:  # an hourly partition key, as the UI and the checks show them
            moment = datetime.strptime(text, "%Y-%m-%d-%H:%M").replace(tzinfo=UTC)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an ISO-8601 date or time, nor a partition key"
            ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def _step(title: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"  • {title} ...", end="", flush=True)
    try:
        yield
    except BaseException:
        print(" failed", flush=True)
        raise
    print(f" ok ({time.monotonic() - started:.1f} s)", flush=True)


def _topics(settings: Settings) -> dict[str, str]:
    """Each loaded topic, with the setting that names it (a stream's topic_env, else the
    catalogue)."""
    return {spec.topic: setting for spec, setting in topic_ingests(settings)}


def prepare(
    settings: Settings, *, create_topics: bool, demo_sources: bool, seed: bool = False
) -> None:
    """Schemas, tables, capture triggers and topics: idempotent, safe to run on every start.

    ``demo_sources`` creates the simulator's OLTP tables and seeds the demo customers, but
    only into an empty ``customers`` table (the first start) or when ``seed`` asks for it
    (``--seed``: tops up to the configured count): a restart changes no source data. Against
    a real OLTP database the captured tables exist already and only the change tables and
    triggers are added.
    """
    from kappa import oltp
    from kappa.local.topics import ensure_topics

    captures = load_captures(settings.catalog)
    schemas = Schemas(settings.edw_schema, settings.meta_schema)

    # A catalogue the existing fact tables cannot follow is refused before anything (a topic
    # included) is created; ensure_schema checks again inside its transaction.
    with (
        _step(f"catalogue {settings.catalog.name} against the EDW"),
        connect(settings.resolved_edw_url) as conn,
    ):
        plan_evolution(conn, schemas, settings.streams)
    if create_topics:
        with _step(f"topics {', '.join(_topics(settings))}"):
            ensure_topics(
                settings.resolved_bootstrap_servers,
                {topic: settings.topic_partitions for topic in _topics(settings)},
                timeout_s=settings.kafka_timeout_s,
            )
    with (
        _step(f"EDW schemas {settings.edw_schema}, {settings.meta_schema}"),
        connect(settings.resolved_edw_url) as conn,
    ):
        changes = ensure_schema(conn, schemas, settings.streams)
        for spec in captures:
            ensure_target(conn, schemas, spec)
    for change in changes:
        _say(f"  schema evolution: {change}")
    names = ", ".join(str(spec.source) for spec in captures)
    with (
        _step(f"change capture on {names}"),
        connect(settings.resolved_oltp_url, setting="KAPPA_OLTP_URL") as conn,
    ):
        if demo_sources:
            oltp.ensure_source_tables(conn)
        for spec in captures:
            install_capture(conn, spec)
    if demo_sources:
        # Most simulated customers exist from the start (captured, so they reach
        # dim_customer); the OLTP writers insert the rest over time.
        config = oltp.OltpConfig.from_settings(settings)
        count = settings.sim_customers * 9 // 10
        with (
            _step("demo customers" + (" (--seed)" if seed else "")),
            connect(settings.resolved_oltp_url, setting="KAPPA_OLTP_URL") as conn,
        ):
            seeded = oltp.seed_demo_customers(conn, config, count, top_up=seed)
        if seeded is None:
            _say("    customers has rows already: not seeded (`--seed` tops it up)")
        else:
            _say(f"    {seeded} customer(s) seeded")


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
                problem = topic_stop(
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


def up(settings: Settings, *, reset: bool, simulate: bool, seed: bool = False) -> int:
    """Run the local stack until Ctrl-C (or until one of its processes dies); ``seed``: top
    up the demo customers even when the OLTP database has some (see :func:`prepare`)."""
    from kappa.local.broker import LocalBroker
    from kappa.local.dagster_instance import dagster_environment, write_dagster_yaml
    from kappa.local.pg_admin import check_postgres, ensure_database
    from kappa.local.postgres import EmbeddedPostgres
    from kappa.local.supervisor import Supervisor

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGTERM while starting unwinds like Ctrl-C, so everything started so far is stopped.
    signal.signal(signal.SIGTERM, interrupted)
    home = settings.home
    root = _repo_root()
    if reset and home.exists():
        _say(f"Resetting local state: removing {home}")
        shutil.rmtree(home)
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    bin_dir = Path(sys.executable).parent
    _say("Starting the kappa-etl local stack")

    with ExitStack() as stack:
        # Stop what we started, in reverse order, however we leave (Ctrl-C included).
        if settings.uses_embedded_postgres:
            postgres = EmbeddedPostgres(
                home / "pg", settings.pg_port, log_path=logs / "postgres.log"
            )
            with _step(f"embedded PostgreSQL on 127.0.0.1:{settings.pg_port}"):
                postgres.start()
            stack.callback(postgres.stop)
            with _step("databases kappa_edw, kappa_dagster, kappa_oltp"):
                if settings.oltp_url is None:
                    ensure_database(postgres.base_url, "kappa_oltp", setting="KAPPA_OLTP_URL")
                if settings.edw_url is None:
                    ensure_database(postgres.base_url, "kappa_edw", setting="KAPPA_EDW_URL")
                if settings.dagster_pg_url is None:
                    ensure_database(
                        postgres.base_url, "kappa_dagster", setting="KAPPA_DAGSTER_PG_URL"
                    )
        with _step("database connections"):
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
                with _step(f"local S3 server for the broker's log in {settings.broker_data_dir}"):
                    broker.object_store.start()
            with _step(
                f"local broker (Tansu, {settings.broker_storage} storage) on {broker.bootstrap_servers}"
            ):
                broker.start()
        # The embedded OLTP database is the demo's: its source tables exist with or without
        # the simulators (catalog.yaml names them), so `--no-simulator` starts too.
        prepare(
            settings,
            create_topics=True,
            demo_sources=simulate or settings.oltp_url is None,
            seed=seed,
        )
        dagster_home = home / "dagster"
        with _step(f"Dagster instance config in {dagster_home}"):
            write_dagster_yaml(dagster_home, settings)

        problems = ledger_problems(settings)
        env: dict[str, str] = {
            **settings.env,
            "KAFKA_BOOTSTRAP_SERVERS": settings.resolved_bootstrap_servers,
            "KAPPA_EDW_URL": settings.resolved_edw_url,
            "KAPPA_OLTP_URL": settings.resolved_oltp_url,
            **dagster_environment(settings, dagster_home),
        }
        if settings.dagster_pg_url is None:
            with _step("runs left over by an earlier session"):
                settled = settle_previous_session(dagster_home, env)
            if settled:
                _say(f"    {settled} run(s) of an earlier session marked as ended")
        supervisor = Supervisor()
        stack.callback(supervisor.stop_all)
        workspace = str(root / "workspace.yaml")
        if simulate:
            with _step(f"event simulator ({settings.sim_rate:g} events/s)"):
                supervisor.start(
                    "simulator",
                    [sys.executable, "-m", "kappa.cli", "simulate"],
                    env=env,
                    log_path=logs / "simulator.log",
                    cwd=root,
                )
            with _step(
                f"OLTP simulator ({settings.oltp_rate:g} transactions/s, {settings.oltp_writers} writers)"
            ):
                supervisor.start(
                    "oltp-simulator",
                    [sys.executable, "-m", "kappa.cli", "simulate-oltp"],
                    env=env,
                    log_path=logs / "oltp-simulator.log",
                    cwd=root,
                )
        with _step("Dagster daemon"):
            supervisor.start(
                "daemon",
                [str(bin_dir / "dagster-daemon"), "run", "-w", workspace],
                env=env,
                log_path=logs / "dagster-daemon.log",
                cwd=root,
            )
        ui = f"http://127.0.0.1:{settings.ui_port}"
        with _step(f"Dagster webserver on {ui}"):
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

        _say("")
        _say("kappa-etl is running")
        _say(f"  Dagster UI      {ui}  (assets: {ui}/assets, sensors: {ui}/overview/automation)")
        _say(
            f"  broker          {settings.resolved_bootstrap_servers}"
            + (
                f"  (local, {settings.broker_storage} storage)"
                if settings.uses_local_broker
                else ""
            )
        )
        _say(
            f"  EDW             {redact(settings.resolved_edw_url)}  (schemas {settings.edw_schema}, {settings.meta_schema})"
        )
        _say(f"  Dagster storage {redact(settings.resolved_dagster_pg_url)}")
        _say(
            f"  OLTP            {redact(settings.resolved_oltp_url)}  (captured: {', '.join(str(c.source) for c in load_captures(settings.catalog))})"
        )
        _say(f"  topics          {', '.join(_topics(settings))}")
        _say(f"  running         {', '.join(supervisor.names)}")
        _say(f"  logs            {logs}")
        for problem in problems:
            _say(f"\n  ! {problem}")
        if problems and settings.uses_local_broker:
            lost = (
                "The local broker keeps nothing across restarts (KAPPA_BROKER_STORAGE=memory)"
                if settings.broker_storage == "memory"
                else f"The local broker's log in {settings.broker_data_dir} was lost or recreated"
            )
            _say(
                f"  ! {lost} while PostgreSQL keeps the ledger:"
                " start from empty local state with `make reset` (kappa up --reset)."
            )
        _say("\nPress Ctrl-C to stop.")
        outcome = supervisor.wait()
        _say(f"\nStopping ({outcome.describe()}) ...")
    _say("Stopped.")
    return 1 if outcome.reason == "child_exited" else 0


def check(settings: Settings) -> int:
    """Preflight: can this deployment reach its databases, broker and topics?"""
    from kappa.local.pg_admin import check_postgres

    failures = 0

    def run(title: str, probe: Callable[[], object]) -> None:
        nonlocal failures
        try:
            probe()
        except KappaError as exc:
            failures += 1
            _say(f"  ✗ {title}: {exc}")
        else:
            _say(f"  ✓ {title}")

    run("KAPPA_EDW_URL", lambda: check_postgres("KAPPA_EDW_URL", settings.resolved_edw_url))
    run("KAPPA_OLTP_URL", lambda: check_postgres("KAPPA_OLTP_URL", settings.resolved_oltp_url))
    run(
        "KAPPA_DAGSTER_PG_URL",
        lambda: check_postgres("KAPPA_DAGSTER_PG_URL", settings.resolved_dagster_pg_url),
    )

    def topics() -> None:
        with EventStore(
            settings.resolved_bootstrap_servers, timeout_s=settings.kafka_timeout_s
        ) as store:
            for topic, setting in _topics(settings).items():
                try:
                    store.partitions(topic)
                except UnknownTopicError as exc:
                    raise ConfigurationError(setting, str(exc)) from None

    run("KAFKA_BOOTSTRAP_SERVERS and topics", topics)
    return 1 if failures else 0


def backfill(
    settings: Settings,
    asset: str,
    *,
    since: datetime | None,
    until: datetime | None,
    url: str | None,
    wait_s: float | None,
) -> int:
    """Launch a Dagster backfill of ``asset``'s time partitions from ``since`` (default: the
    first) to ``until`` (default: now), on the running webserver, as the UI would."""
    topics = {spec.asset: spec for spec, _ in topic_ingests(settings)}
    captured = {spec.asset for spec in load_captures(settings.catalog)}
    if asset not in topics and asset not in captured:
        raise KappaError(
            f"{asset!r} has no time partitions; partitioned assets: "
            f"{', '.join(sorted([*topics, *captured]))}"
        )
    step = topics[asset].step if asset in topics else None
    windows = settings.windows
    first = windows.at(since or windows.start)
    last = windows.at(until or datetime.now(UTC))
    if last.start < first.start:
        raise KappaError(f"--to {last.key} is before --from {first.key}")
    keys = [w.key for w in windows.span(first.key, last.key)]
    selection = [asset, *(step.side_tables if step is not None else ())]
    server = url or f"http://127.0.0.1:{settings.ui_port}"
    backfill_id = launch_backfill(
        server, selection, keys, title=f"reprocess {asset} {keys[0]} .. {keys[-1]}"
    )
    _say(
        f"{asset}: backfill {backfill_id} of {len(keys)} partitions ({keys[0]} .. {keys[-1]}) "
        f"launched on {server}; the daemon runs them in order: {server}/runs/b/{backfill_id}"
    )
    if wait_s is None:
        return 0
    final = wait_for_backfill(server, backfill_id, timeout_s=wait_s)
    _say(f"{asset}: backfill {backfill_id} {final}")
    return 0 if final in SUCCEEDED else 1


def replay(
    settings: Settings, asset: str, *, confirmed: bool, since: datetime | None = None
) -> int:
    """Reload ``asset`` from the beginning of its log, or from ``since`` (topics only)."""
    topics = {spec.asset: spec for spec, _ in topic_ingests(settings)}
    tables = {
        spec.asset: (spec.contract.table, spec.step.side_tables if spec.step else ())
        for spec in topics.values()
    }
    tables.update({spec.asset: (spec.target, ()) for spec in load_captures(settings.catalog)})
    if asset not in tables:
        raise KappaError(f"unknown asset {asset!r}; replayable: {', '.join(sorted(tables))}")
    if since is not None and asset not in topics:
        raise KappaError(f"{asset} replays from the beginning of its change table only (no --from)")
    scope = (
        "from the start of its log or change table"
        if since is None
        else f"from {since.isoformat()}"
    )
    if not confirmed:
        _say(
            f"This deletes {asset}'s rows, state, alerts, dead letters and ledger batches "
            f"{'(all of them)' if since is None else 'after that point'} in "
            f"{redact(settings.resolved_edw_url)}; its sensor then reloads it {scope}. "
            "Run again with --yes to do it."
        )
        return 1
    schemas = Schemas(settings.edw_schema, settings.meta_schema)
    table, side_tables = tables[asset]
    if since is None:
        with connect(settings.resolved_edw_url) as conn:
            removed = reset_for_replay(conn, schemas, table, asset, side_tables=side_tables)
        _say(
            f"{asset}: removed {removed.rows} rows, {removed.dead_letters} dead letters and "
            f"{removed.batches} ledger batches in one transaction; the next sensor tick reloads "
            "it from the start of the log."
        )
        return 0
    spec = topics[asset]
    with EventStore(
        settings.resolved_bootstrap_servers, timeout_s=settings.kafka_timeout_s
    ) as store:
        offsets = store.offsets_for_times(
            spec.topic, store.partitions(spec.topic), int(since.timestamp() * 1000)
        )
    with connect(settings.resolved_edw_url) as conn:
        restarts = rewind_topic_asset(
            conn, schemas, table, asset, spec.topic, offsets, side_tables=side_tables
        )
    moved = ", ".join(f"{spec.topic}[{p}] at {o}" for p, o in sorted(restarts.items())) or "nothing"
    _say(
        f"{asset}: rewound {moved} (the batch boundaries at or before {since.isoformat()}) in one "
        "transaction, state as it stood there; the next sensor tick reloads from those offsets."
    )
    return 0


def _age(seconds: float | None) -> str:
    """A compact age, one word: 42s, 7min, 3h, 2d."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def _shorten(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def status(settings: Settings, *, batches: int = 5, checks: bool = True) -> int:
    """Lag per shard, the last batches and the failing asset checks, as compact tables.

    A shard that cannot load (:mod:`kappa.health`) shows ``stopped`` as its lag, and the
    reason below the table. Exit 0 when no shard is stopped and every check the Dagster
    instance knows of passes (or the instance cannot be read, which is said), 1 otherwise.
    """
    schemas = Schemas(settings.edw_schema, settings.meta_schema)
    failures: dict[str, dict[int, RunFailures]]
    failures, runs_note = _run_failures(settings) if checks else ({}, "not read (--no-checks)")
    header = (
        "asset",
        "shard",
        "log end",
        "loaded to",
        "lag",
        "oldest",
        "batches",
        "loaded",
        "dead",
        "dedup",
        "last batch",
    )
    rows: list[tuple[str, ...]] = []
    stopped: list[tuple[str, str, str]] = []
    with connect(settings.resolved_edw_url) as edw:
        meta = sql.Identifier(schemas.meta)
        totals = {
            (r[0], r[1], r[2]): r[3:]
            for r in edw.execute(
                sql.SQL(
                    "SELECT asset, source, shard, sum(loaded), sum(dead_lettered), sum(deduplicated), "
                    "extract(epoch FROM clock_timestamp() - max(committed_at))::float8 "
                    "FROM {}.batch_ledger GROUP BY 1, 2, 3"
                ).format(meta)
            ).fetchall()
        }

        def row(
            asset: str,
            source: str,
            shard: int,
            end: int | str,
            head: LedgerHead | None,
            lag: int,
            fresh: ShardFreshness | None,
        ) -> None:
            loaded, dead, dedup, age = totals.get((asset, source, shard), (0, 0, 0, None))
            why = fresh.stopped if fresh is not None else None
            if why is not None:
                stopped.append((asset, f"{source}[{shard}]", why))
            rows.append(
                (
                    asset,
                    f"{source}[{shard}]",
                    str(end),
                    str(head.end if head else "-"),
                    "stopped" if why is not None else str(lag),
                    _age(fresh.lag_s if fresh is not None else None),
                    str(head.batches if head else 0),
                    str(loaded),
                    str(dead),
                    str(dedup),
                    "-" if age is None else f"{_age(age)} ago",
                )
            )

        with EventStore(
            settings.resolved_bootstrap_servers, timeout_s=settings.kafka_timeout_s
        ) as store:
            for spec, _ in topic_ingests(settings):
                bounds = store.log_bounds(spec.topic, store.partitions(spec.topic))
                heads = read_heads(edw, schemas, spec.asset, spec.topic)
                shards = {
                    f.shard: f
                    for f in topic_freshness(
                        store, edw, schemas, spec, failures=failures.get(spec.asset)
                    )
                }
                for partition, bound in sorted(bounds.items()):
                    head = heads.get(partition)
                    row(
                        spec.asset,
                        spec.topic,
                        partition,
                        bound.end,
                        head,
                        bound.end - (head.end if head else bound.start),
                        shards.get(f"{spec.topic}[{partition}]"),
                    )
        with connect(settings.resolved_oltp_url, setting="KAPPA_OLTP_URL") as oltp:
            for capture in load_captures(settings.catalog):
                head = read_heads(edw, schemas, capture.asset, str(capture.change_table)).get(0)
                lag = pg_capture.capture_lag(oltp, capture, head.end if head else 0)
                row(
                    capture.asset,
                    str(capture.change_table),
                    0,
                    f"xid {lag.horizon}",
                    head,
                    lag.pending_changes,
                    capture_freshness(
                        oltp, edw, schemas, capture, failures=failures.get(capture.asset)
                    ),
                )
        recent = edw.execute(
            sql.SQL(
                "SELECT asset, source, shard, start_position, end_position, received, loaded, "
                "dead_lettered, deduplicated, "
                "extract(epoch FROM clock_timestamp() - committed_at)::float8, run_id "
                "FROM {}.batch_ledger ORDER BY committed_at DESC, batch_id DESC LIMIT %s"
            ).format(meta),
            (batches,),
        ).fetchall()
    _say(
        f"lag per shard (oldest: age of the oldest record or change not loaded yet; bound {settings.freshness_max_lag_s:g} s)"
    )
    _print_table(header, rows)
    if stopped:
        _say(f"\n{len(stopped)} shard(s) stopped: they load nothing until an operator acts")
        for asset, shard, why in stopped:
            _say(f"  {asset} {shard}: {why}")
    _say(f"\nfailed runs: {runs_note}")
    if batches > 0:
        _say(f"\nlast {len(recent)} batches")
        _print_table(
            (
                "asset",
                "shard",
                "positions",
                "received",
                "loaded",
                "dead",
                "dedup",
                "committed",
                "run",
            ),
            [
                (
                    r[0],
                    f"{r[1]}[{r[2]}]",
                    f"[{r[3]}, {r[4]})",
                    str(r[5]),
                    str(r[6]),
                    str(r[7]),
                    str(r[8]),
                    f"{_age(r[9])} ago",
                    str(r[10])[:8],
                )
                for r in recent
            ]
            or [("-",) * 9],
        )
    halted = 1 if stopped else 0
    if not checks:
        return halted
    from kappa.check_status import InstanceUnavailable, read_check_states

    try:
        states = read_check_states(settings)
    except InstanceUnavailable as exc:
        _say(f"\nchecks: not read ({exc})")
        return halted
    failing = [s for s in states if s.failing]
    counts = {name: sum(s.state == name for s in states) for name in ("passed", "running", "never")}
    _say(
        f"\nchecks: {len(states)} defined, {counts['passed']} passed, {len(failing)} failing, "
        f"{counts['running']} running, {counts['never']} never evaluated"
    )
    if failing:
        _print_table(
            ("asset", "check", "state", "severity", "when", "why"),
            [
                (
                    s.asset,
                    s.check,
                    s.state,
                    s.severity.lower() or "-",
                    f"{_age(s.age_s)} ago",
                    _shorten(s.description) or "-",
                )
                for s in failing
            ],
        )
    from kappa.dagster.retention import status_lines

    _say("\n".join(status_lines(settings)))
    return 1 if failing or stopped else 0


def _run_failures(settings: Settings) -> tuple[dict[str, dict[int, RunFailures]], str]:
    """Per asset, the shards whose last runs failed (from the Dagster instance), and a note
    saying what was read; an instance that cannot be read leaves them unknown, said so."""
    from kappa.check_status import InstanceUnavailable, open_instance

    threshold = failure_threshold(settings.run_retries)
    assets = [spec.asset for spec, _ in topic_ingests(settings)] + [
        c.asset for c in load_captures(settings.catalog)
    ]
    try:
        with open_instance(settings) as instance:
            found = {a: recent_failures(instance, a, threshold=threshold) for a in assets}
    except InstanceUnavailable as exc:
        return {}, f"not read ({exc})"
    return found, (
        f"read from the Dagster instance (a shard whose last {threshold} runs failed is stopped, "
        "KAPPA_RUN_RETRIES + 1)"
    )


def reconcile(settings: Settings) -> int:
    """Per shard: source against ledger against counts; exit 1 if anything does not add up."""
    from kappa.reconcile import reconcile_capture, reconcile_topic

    schemas = Schemas(settings.edw_schema, settings.meta_schema)
    with (
        EventStore(
            settings.resolved_bootstrap_servers, timeout_s=settings.kafka_timeout_s
        ) as store,
        connect(settings.resolved_edw_url) as edw,
        connect(settings.resolved_oltp_url, setting="KAPPA_OLTP_URL") as oltp,
    ):
        accounts = [
            a
            for spec, _ in topic_ingests(settings)
            for a in reconcile_topic(store, edw, schemas, spec)
        ]
        accounts += [
            reconcile_capture(oltp, edw, schemas, c) for c in load_captures(settings.catalog)
        ]
    header = (
        "asset",
        "shard",
        "ledger",
        "lag",
        "in source",
        "received",
        "loaded",
        "dead",
        "dedup",
        "result",
    )
    rows = [
        (
            a.asset,
            a.shard,
            f"[{a.ledger_start},{a.ledger_end})",
            str(a.lag),
            str(a.source_count),
            str(a.received),
            str(a.loaded),
            str(a.dead_lettered),
            str(a.deduplicated),
            "ok" if not a.problems else "; ".join(a.problems),
        )
        for a in accounts
    ]
    _print_table(header, rows)
    return 1 if any(a.problems for a in accounts) else 0


def _stop_on_signal() -> threading.Event:
    """Logging for a simulator process, and an event set by SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def simulate_oltp(settings: Settings) -> int:
    """Run the OLTP writers (customers, call-centre calls) until SIGINT/SIGTERM."""
    from kappa import oltp

    stop = _stop_on_signal()
    writers = oltp.OltpWriters(
        settings.resolved_oltp_url, oltp.OltpConfig.from_settings(settings), rate=settings.oltp_rate
    )
    writers.run(stop)
    return 0


def simulate(settings: Settings) -> int:
    """Run the event simulator until SIGINT/SIGTERM."""
    from kappa import simulator

    simulator.run(settings, stop=_stop_on_signal())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kappa", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    up_parser = commands.add_parser("up", help="bring up the local stack and the Dagster UI")
    up_parser.add_argument(
        "--reset", action="store_true", help="start from empty local state (KAPPA_HOME)"
    )
    up_parser.add_argument(
        "--no-simulator", action="store_true", help="do not start the event simulator"
    )
    up_parser.add_argument(
        "--seed",
        action="store_true",
        help="top up the demo customers (by default they are seeded only into an empty table)",
    )
    init_parser = commands.add_parser(
        "init", help="create schemas, tables, capture triggers and topics (idempotent)"
    )
    init_parser.add_argument(
        "--demo-sources",
        action="store_true",
        help="also create the simulator's OLTP tables (seeded when empty)",
    )
    init_parser.add_argument(
        "--seed",
        action="store_true",
        help="with --demo-sources: top up the demo customers even when the table has rows",
    )
    commands.add_parser("check", help="check that databases, broker and topics answer")
    status_parser = commands.add_parser(
        "status", help="lag per shard, the last batches and the failing asset checks"
    )
    status_parser.add_argument(
        "--batches", type=int, default=5, help="how many of the last batches to list (default 5)"
    )
    status_parser.add_argument(
        "--no-checks",
        action="store_true",
        help="do not read Dagster (check results, failed runs)",
    )
    commands.add_parser(
        "reconcile", help="source = received = loaded + dead-lettered + deduplicated, per shard"
    )
    commands.add_parser("simulate", help="produce simulated events at KAPPA_SIM_RATE")
    commands.add_parser(
        "simulate-oltp", help="write simulated OLTP transactions at KAPPA_OLTP_RATE"
    )
    replay_parser = commands.add_parser("replay", help="reload an asset from the start of its log")
    replay_parser.add_argument("asset", help="fact_order, fact_payment, dim_customer, ...")
    replay_parser.add_argument(
        "--yes", action="store_true", help="confirm: the asset's rows are deleted"
    )
    replay_parser.add_argument(
        "--from",
        dest="since",
        type=_timestamp,
        help="replay from this broker time on (ISO-8601 with zone), not from the beginning",
    )
    backfill_parser = commands.add_parser(
        "backfill",
        help="reprocess time partitions of a fact as a Dagster backfill (needs the webserver)",
    )
    backfill_parser.add_argument("asset", help="fact_order or fact_payment")
    backfill_parser.add_argument(
        "--from",
        dest="since",
        type=_utc_time,
        help="first partition: the one holding this date or time (UTC); default: the first",
    )
    backfill_parser.add_argument(
        "--to", dest="until", type=_utc_time, help="last partition (default: the current one)"
    )
    backfill_parser.add_argument(
        "--url", help="Dagster webserver (default http://127.0.0.1:KAPPA_UI_PORT)"
    )
    backfill_parser.add_argument(
        "--wait", type=float, metavar="SECONDS", help="wait for the backfill to finish"
    )
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "up":
            return up(settings, reset=args.reset, simulate=not args.no_simulator, seed=args.seed)
        if args.command == "init":
            prepare(settings, create_topics=True, demo_sources=args.demo_sources, seed=args.seed)
            return 0
        if args.command == "check":
            return check(settings)
        if args.command == "status":
            return status(settings, batches=max(args.batches, 0), checks=not args.no_checks)
        if args.command == "reconcile":
            return reconcile(settings)
        if args.command == "backfill":
            return backfill(
                settings,
                args.asset,
                since=args.since,
                until=args.until,
                url=args.url,
                wait_s=args.wait,
            )
        if args.command == "replay":
            return replay(settings, args.asset, confirmed=args.yes, since=args.since)
        if args.command == "simulate-oltp":
            return simulate_oltp(settings)
        return simulate(settings)
    except KappaError as exc:
        print(f"\nkappa: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
