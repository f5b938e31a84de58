"""Pressure: a 10x burst is absorbed by bigger batches within bounded memory."""

from __future__ import annotations

import pytest

from tests.chaos.conftest import full_only, record, trials
from tests.chaos.faults import reap, start_worker
from tests.chaos.streams import audit, produce, simulated
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration


@full_only
def test_a_10x_burst_is_absorbed_by_bigger_batches_within_bounded_memory(
    broker, database_url, topic_factory, instance, monkeypatch
):
    steady = trials(150, 600)
    batch_max, run_max = steady * 2, steady * 4
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAPPA_EDW_URL": database_url,
        "KAPPA_OLTP_URL": database_url,
        "KAPPA_TOPIC_ORDERS": topic_factory("orders", 4),
        "KAPPA_TOPIC_PAYMENTS": topic_factory("payments", 2),
        "KAPPA_BATCH_MAX_RECORDS": str(batch_max),
        "KAPPA_RUN_MAX_RECORDS": str(run_max),
        "KAPPA_ENRICH_MAX_WAIT_S": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    pipeline = Pipeline(env=env, instance=instance)
    records = []

    def cycle(asset: str) -> list[tuple[int, int, int]]:
        """Tick and run until caught up: (records in the run, largest partition range, peak RSS kB)."""
        runs = []
        for _ in range(50):
            requests = pipeline.tick(asset).run_requests
            if not requests:
                return runs
            for request in requests:
                spans = [
                    (int(a), int(b))
                    for a, b in (
                        part.split(":")[1].split("-")
                        for part in request.tags["kappa/ranges"].split(":", 1)[1].split(",")
                    )
                ]
                worker, started = start_worker(pipeline, request)
                ended = reap(worker, started, kill_after=None)
                assert ended.returncode == 0
                runs.append(
                    (sum(b - a for a, b in spans), max(b - a for a, b in spans), ended.max_rss_kb)
                )
        raise AssertionError(f"{asset} still lagging after 50 runs")

    steady_runs = []
    for round_ in range(2):
        records += produce(broker, simulated(pipeline, steady, seed=100 + round_))
        steady_runs += cycle("fact_order")
    records += produce(broker, simulated(pipeline, steady * 10, seed=200))
    burst_runs = cycle("fact_order")
    payment_runs = cycle("fact_payment")

    found = audit(pipeline, records, complete=True)
    steady_size = max(r[0] for r in steady_runs)
    burst_size = max(r[0] for r in burst_runs)
    steady_rss = max(r[2] for r in steady_runs) / 1024
    burst_rss = max(r[2] for r in burst_runs) / 1024
    capped = all(r[1] <= batch_max and r[0] <= run_max for r in burst_runs + payment_runs)
    if not capped:
        found.note("unexpected", 1, "a run exceeded the batch or run limit")
    record(
        "10x burst",
        1,
        f"{len(burst_runs)} runs of up to {burst_size} records (steady: {steady_size}), "
        f"caps {batch_max}/partition, {run_max}/run; peak RSS {burst_rss:.0f} MB (steady {steady_rss:.0f} MB)",
        found,
    )
    assert burst_size > steady_size, "a lagging topic gets bigger batches"
    assert capped
    # Bounded memory: a burst of ten times the data costs the run little more than steady state.
    assert burst_rss < steady_rss * 1.5 + 64
    assert found.total == 0, found.details
