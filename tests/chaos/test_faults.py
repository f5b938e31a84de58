"""Faults in the middle of a stream, each followed by a comparison with the reference."""

from __future__ import annotations

import os
import random
import signal
import time
from collections import Counter
from functools import partial

import psycopg
import pytest

from examples.shop.oltp import OltpConfig, run_transactions, seed_customers
from tests.chaos.cdc_reference import audit_captures
from tests.chaos.conftest import full_only, record, trials
from tests.chaos.faults import (
    kill_when,
    ledger_end,
    open_batch_transaction,
    reap,
    start_worker,
    wait_backends_gone,
)
from tests.chaos.reference import Anomalies
from tests.chaos.streams import audit, drain, produce, simulated
from tests.integration.harness import Pipeline, wait_for

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("KAPPA_CHAOS_SEED", "20261126"))
ASSETS = ("fact_order", "fact_payment", "dim_customer")


def audit_all(pipeline: Pipeline, records, *, complete: bool) -> Anomalies:
    found = audit(pipeline, records, complete=complete)
    with psycopg.connect(pipeline.edw_url, autocommit=True) as conn:
        found += audit_captures(conn, conn, complete=complete)
    return found


def ledger_moved(pipeline: Pipeline, asset: str, before: int) -> bool:
    return ledger_end(pipeline, asset) != before


#: Where each trial's kill is aimed: inside a batch's open transaction, just after a batch
#: committed (while the run goes on), or at a random time of the run.
KILL_POINTS = ("in an open batch transaction", "right after a commit", "at a random time")


def test_runs_sigkilled_at_random_points_lose_and_duplicate_nothing(chaos_pipeline: Pipeline):
    pipeline = chaos_pipeline
    rng = random.Random(SEED)
    oltp = OltpConfig(customers=60, seed=SEED % 1000, writers=2, max_hold_s=0.01)
    with psycopg.connect(pipeline.edw_url, autocommit=True) as conn:
        seed_customers(conn, oltp, 40)
    count = trials(len(KILL_POINTS), 30)
    records = []
    landed: Counter[str] = Counter()
    total = Anomalies()
    estimate = {asset: 1.5 for asset in ASSETS}
    with psycopg.connect(pipeline.edw_url, autocommit=True) as watch:
        for trial in range(count):
            records += produce(
                pipeline.env["KAFKA_BOOTSTRAP_SERVERS"],
                simulated(pipeline, rng.randint(800, 2500), seed=rng.randrange(2**31)),
            )
            run_transactions(pipeline.edw_url, oltp, transactions=rng.randint(5, 30))
            asset = ASSETS[trial % len(ASSETS)]
            aim = KILL_POINTS[(trial + trial // len(ASSETS)) % len(KILL_POINTS)]
            [request] = pipeline.tick(asset).run_requests
            before = ledger_end(pipeline, asset)
            worker, started = start_worker(pipeline, request)
            if aim == KILL_POINTS[0]:
                ended = kill_when(
                    worker,
                    started,
                    lambda: open_batch_transaction(watch),
                    what="an open batch transaction",
                )
            elif aim == KILL_POINTS[1]:
                ended = kill_when(
                    worker,
                    started,
                    partial(ledger_moved, pipeline, asset, before),
                    what="a batch commit",
                )
            else:
                ended = reap(worker, started, kill_after=rng.uniform(0.0, estimate[asset]))
            wait_backends_gone(pipeline)
            moved = ledger_end(pipeline, asset) != before
            if not ended.killed:
                landed["after the run ended"] += 1
                estimate[asset] = max(estimate[asset], ended.seconds * 1.1)
            else:
                landed["after commit" if moved else "before commit"] += 1
            # Right after the kill: the ledger's prefix is consistent with the reference.
            found = audit_all(pipeline, records, complete=False)
            if found.total:
                found.details.insert(
                    0, f"trial {trial} ({asset}, killed {aim} at {ended.seconds:.2f} s)"
                )
            total += found
    report = drain(pipeline, (*ASSETS, "fact_call_center_call"))
    final = audit_all(pipeline, records, complete=True)
    total += final
    outcome = (
        f"recovered {count}/{count}: killed {landed['before commit']} before commit, "
        f"{landed['after commit']} after commit, {landed['after the run ended']} ran to the end"
    )
    record("SIGKILL of a run at a random point", count, outcome, total)
    assert report.failed_runs == 0, report.errors
    assert total.total == 0, total.details
    # The kills landed where they were aimed: at least one inside a batch before its commit,
    # and one after a commit of a run still going (a run that ended first proves nothing).
    assert landed["before commit"] >= 1, outcome
    assert landed["after commit"] >= 1, outcome


@full_only
def test_postgresql_crashed_mid_run_and_restarted_loses_and_duplicates_nothing(
    own_postgres, broker, topic_factory, instance, monkeypatch
):
    from kappa.exceptions import ConfigurationError

    server = own_postgres
    with psycopg.connect(server.url(), autocommit=True) as conn:
        conn.execute("CREATE DATABASE chaos")
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAPPA_EDW_URL": server.url("chaos"),
        "KAPPA_OLTP_URL": server.url("chaos"),
        "KAPPA_TOPIC_ORDERS": topic_factory("orders", 4),
        "KAPPA_TOPIC_PAYMENTS": topic_factory("payments", 2),
        "KAPPA_BATCH_MAX_RECORDS": "2000",
        "KAPPA_RUN_MAX_RECORDS": "6000",
        "KAPPA_ENRICH_MAX_WAIT_S": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pipeline = Pipeline(env=env, instance=instance)
    rng = random.Random(SEED + 1)
    count = trials(1, 5)
    records = []
    total = Anomalies()
    failed_runs = loud = 0
    for trial in range(count):
        records += produce(
            broker, simulated(pipeline, rng.randint(1500, 3000), seed=rng.randrange(2**31))
        )
        asset = ("fact_order", "fact_payment")[trial % 2]
        [request] = pipeline.tick(asset).run_requests
        worker, started = start_worker(pipeline, request)
        ended = None
        try:
            time.sleep(rng.uniform(0.0, 1.5))
            pid = int((server.data_dir / "postmaster.pid").read_text().splitlines()[0])
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown: a crash, recovery on start
            wait_for(lambda: not server.is_running(), timeout=60, what="PostgreSQL to go down")
            # While it is down, a tick fails naming the setting, it does not guess.
            with pytest.raises(ConfigurationError) as down:
                pipeline.tick(asset)
            loud += str(down.value).startswith("KAPPA_EDW_URL")
            ended = reap(worker, started, kill_after=None)
        finally:
            if worker.poll() is None:
                worker.kill()
            server.start()
        failed_runs += ended is not None and ended.returncode != 0
        total += audit(pipeline, records, complete=False)
    report = drain(pipeline)
    total += audit(pipeline, records, complete=True)
    record(
        "PostgreSQL crash (immediate stop) mid-run, restart",
        count,
        f"recovered {count}/{count}; {failed_runs} runs failed with it, reloaded; "
        f"ticks while down named KAPPA_EDW_URL {loud}/{count}",
        total,
    )
    assert report.failed_runs == 0, report.errors
    assert loud == count
    assert total.total == 0, total.details


@full_only
def test_a_broker_restarted_mid_run_stops_loudly_keeps_what_was_loaded_and_replay_recovers(
    database_url, local_state_dir, instance, monkeypatch
):
    """The local broker keeps nothing across a restart: the log comes back empty. The
    pipeline must notice (LogResetError naming topic and partition), touch no loaded row,
    and after ``kappa replay`` hold exactly the new log's events."""
    from kappa import cli
    from kappa.exceptions import LogResetError
    from kappa.local.broker import LocalBroker
    from kappa.local.processes import free_port
    from kappa.local.topics import ensure_topics

    broker = LocalBroker(free_port(), local_state_dir / f"broker-{SEED}.log")
    broker.start()
    topics = {"orders": 4, "payments": 2}
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": broker.bootstrap_servers,
        "KAPPA_EDW_URL": database_url,
        "KAPPA_OLTP_URL": database_url,
        "KAPPA_TOPIC_ORDERS": "orders",
        "KAPPA_TOPIC_PAYMENTS": "payments",
        "KAPPA_BATCH_MAX_RECORDS": "2000",
        "KAPPA_RUN_MAX_RECORDS": "6000",
        "KAPPA_ENRICH_MAX_WAIT_S": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    rng = random.Random(SEED + 2)
    count = trials(1, 3)
    total = Anomalies()
    loud = kept = 0
    try:
        ensure_topics(broker.bootstrap_servers, topics, timeout_s=15)
        pipeline = Pipeline(env=env, instance=instance)
        for _ in range(count):
            records = produce(
                broker.bootstrap_servers, simulated(pipeline, 2000, seed=rng.randrange(2**31))
            )
            drain(pipeline, ("fact_payment",))
            [request] = pipeline.tick("fact_order").run_requests
            worker, started = start_worker(pipeline, request)
            time.sleep(rng.uniform(0.0, 1.5))
            broker.stop()
            broker.start()
            ensure_topics(broker.bootstrap_servers, topics, timeout_s=15)
            reap(worker, started, kill_after=None)
            loaded = pipeline.query("SELECT * FROM edw.fact_order ORDER BY event_id")
            ledger = pipeline.query("SELECT * FROM kappa.batch_ledger ORDER BY batch_id")
            records = produce(
                broker.bootstrap_servers, simulated(pipeline, 300, seed=rng.randrange(2**31))
            )
            stopped = 0
            for asset in ("fact_order", "fact_payment"):
                # An asset whose ledger holds nothing yet (its only run died with the
                # broker) has nothing to protect: it simply loads the new log.
                had_loaded = bool(
                    pipeline.query("SELECT 1 FROM kappa.ledger_head WHERE asset = %s", (asset,))
                )
                try:
                    pipeline.tick(asset)
                    stopped += not had_loaded
                except LogResetError as exc:
                    stopped += (
                        had_loaded
                        and str(exc).startswith(f"{asset}: ")
                        and ("Nothing was skipped or re-loaded" in str(exc))
                    )
            loud += stopped == 2
            kept += (
                pipeline.query("SELECT * FROM edw.fact_order ORDER BY event_id") == loaded
                and pipeline.query("SELECT * FROM kappa.batch_ledger ORDER BY batch_id") == ledger
            )
            # The operator's decision: the new log is the truth.
            for asset in ("fact_order", "fact_payment"):
                assert cli.main(["replay", asset, "--yes"]) == 0
            report = drain(pipeline)
            assert report.failed_runs == 0, report.errors
            total += audit(pipeline, records, complete=True)
    finally:
        broker.stop()
    record(
        "broker restart mid-run (log reset), then kappa replay",
        count,
        f"assets with a ledger stopped loudly (LogResetError) {loud}/{count}, "
        f"EDW untouched {kept}/{count}, "
        f"replay equals the new log",
        total,
    )
    assert loud == count and kept == count
    assert total.total == 0, total.details
