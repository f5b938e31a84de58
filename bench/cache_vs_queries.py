"""Benchmark: stateful logic through the state cache vs. per-message EDW queries.

The design's answer to stateful algorithms (running statistics, fraud rules, as-of
enrichment) is a state cache and bulk dimension look-ups per micro-batch instead of "the
ETL app performing expensive queries for each and every message" (the seed article). This
command measures both on the same generated events and the same PostgreSQL:

* cache path: :class:`examples.shop.steps.OrderEnrichment` and :class:`examples.shop.steps.PaymentFraud`
  over a :class:`kappa.state.StateCache` (PostgreSQL backend) and
  :class:`kappa.steps.warehouse.WarehouseLookups`, in batches, the state of each batch saved in
  its own transaction: a micro-batch minus fetching the log and loading the facts;
* per-message path: for each event, prepared statements on one connection (the customer
  version valid at the event time, an upsert of the customer's running statistics, for
  payments the card's payments in the velocity window, and the latest call when the
  merchant country differs from the customer's), the same rules in Python, one commit
  per event.

The per-message path is slow, so it processes ``--baseline-events`` events only: every
event of the first customers (by id), in production order, so that the compared events
have a history. Rates (events/s) are compared, and both paths' results on those events
must agree.

Usage::

    python -m bench.cache_vs_queries [--events N] [--customers C] [--pg-url URL]

Without ``--pg-url`` an embedded PostgreSQL is started in a temporary directory and removed
afterwards; with it, a fresh database is created on that server and dropped afterwards.
Figures go to ``bench/results/cache_vs_queries.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import itertools
import json
import math
import os
import platform
import pstats
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from bench.common import (
    PER_MESSAGE_DDL,
    Edw,
    bench_database,
    per_message_statements,
    populate_edw,
    stats_before,
    stored_mean_before,
)
from bench.demo import ORDER_PLACED, PAYMENT_ATTEMPTED
from examples.shop.fraud import FraudRules
from examples.shop.simulator import SimulatorConfig, generate
from examples.shop.steps import OrderEnrichment, PaymentFraud
from kappa.decode.batch import decode_batch
from kappa.edw.connection import connect
from kappa.exceptions import KappaError
from kappa.settings import Settings
from kappa.sources.base import RawBatch
from kappa.state import StateCache
from kappa.state.postgres import PostgresStateBackend
from kappa.steps import Step, to_cents
from kappa.steps.completeness import WaitBudget
from kappa.steps.engine import apply_step, wait_for_step
from kappa.steps.warehouse import WarehouseLookups

RESULTS = Path(__file__).resolve().parent / "results" / "cache_vs_queries.json"

#: Event time of the first event; events follow at RATE per second of event time.
START = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
RATE = 25.0
TOPICS = {"orders": ORDER_PLACED, "payments": PAYMENT_ATTEMPTED}


# -- workload ---------------------------------------------------------------------------------


@dataclass
class Workload:
    """Decoded events of both topics (log order) and the order they were produced in."""

    orders: pd.DataFrame
    payments: pd.DataFrame
    #: (topic, row index in that topic's frame), in production order.
    stream: list[tuple[str, int]]
    first: datetime
    last: datetime

    @property
    def events(self) -> int:
        return len(self.stream)


def generate_workload(events: int, customers: int, seed: int, late_rate: float) -> Workload:
    """``events`` valid simulator messages, decoded as a micro-batch would decode them."""
    config = SimulatorConfig(
        topic_orders="orders",
        topic_payments="payments",
        customers=customers,
        seed=seed,
        duplicate_rate=0.0,
        late_rate=late_rate,
        invalid_rate=0.0,
    )
    raw = {topic: RawBatch(topic=topic, partition=0, start=0, end=0) for topic in TOPICS}
    stream: list[tuple[str, int]] = []
    start_ms = START.timestamp() * 1000
    messages = generate(config, start=START, rate=RATE)
    for slot, message in enumerate(itertools.islice(messages, events)):
        if message.kind != "valid":
            continue
        batch = raw[message.topic]
        stream.append((message.topic, len(batch.offsets)))
        batch.offsets.append(len(batch.offsets))
        batch.timestamps.append(round(start_ms + slot * 1000 / RATE))
        batch.keys.append(message.key)
        batch.values.append(message.value)
    decoded = {}
    for topic, batch in raw.items():
        batch.end = len(batch.offsets)
        result = decode_batch(batch, TOPICS[topic])
        if len(result.dead_letters) or result.duplicates_in_batch:
            raise RuntimeError(f"{topic}: the generated events did not all decode")
        decoded[topic] = result.rows
    times = pd.concat([decoded["orders"]["event_time"], decoded["payments"]["event_time"]])
    return Workload(
        orders=decoded["orders"],
        payments=decoded["payments"],
        stream=stream,
        first=times.min().to_pydatetime(),
        last=times.max().to_pydatetime(),
    )


# -- the EDW ----------------------------------------------------------------------------------


# -- what each path computed, for the agreement check -------------------------------------------


@dataclass
class Outcome:
    """One path's timing and results, keyed by event id."""

    events: int
    seconds: float
    #: order event id -> (customer_sk, orders before, average amount before, stddev before)
    orders: dict[str, tuple[Any, ...]] = field(default_factory=dict)
    #: payment event id -> customer_sk
    payments: dict[str, int | None] = field(default_factory=dict)
    #: (payment event id, rule) -> score
    alerts: dict[tuple[str, str], float] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.seconds


def _optional_int(value: Any) -> int | None:
    return None if pd.isna(value) else int(value)


def _optional_float(value: Any) -> float | None:
    return None if pd.isna(value) else float(value)


# -- (a) the cache path -----------------------------------------------------------------------


def run_cache_path(
    conn: psycopg.Connection,
    oltp: psycopg.Connection,
    edw: Edw,
    workload: Workload,
    *,
    batch_size: int,
    rules: FraudRules,
    max_wait_s: float,
    shard: int = 0,
    profiler: cProfile.Profile | None = None,
) -> Outcome:
    """Both stateful steps over every event, in batches, state saved per batch.

    As in a run, each batch first waits (up to ``max_wait_s``) for change capture to cover
    its event times, completeness read from the OLTP database (``oltp``: the bench database,
    whose change tables are empty, so nothing holds a batch back). ``profiler``, if given,
    runs during the timed part only.
    """
    cache = StateCache(PostgresStateBackend(edw.schemas))
    captures = {edw.customers.target: edw.customers, edw.calls.target: edw.calls}
    plans: list[tuple[str, Step, pd.DataFrame]] = [
        ("orders", OrderEnrichment(), workload.orders),
        ("payments", PaymentFraud(rules), workload.payments),
    ]
    outputs: dict[str, list[Any]] = {"orders": [], "payments": []}
    batches = 0
    if profiler is not None:
        profiler.enable()
    started = time.perf_counter()
    for topic, step, rows in plans:
        lookups = WarehouseLookups(
            conn, edw.schemas, oltp=oltp, captures=captures, lookups=step.lookups
        )
        for begin in range(0, len(rows), batch_size):
            batch = rows.iloc[begin : begin + batch_size]
            completeness = wait_for_step(step, lookups, batch, WaitBudget(max_wait_s))
            output = apply_step(
                step,
                batch,
                conn=conn,
                state=cache,
                shard=shard,
                lookups=lookups,
                completeness=completeness,
            )
            end = begin + len(batch)
            with conn.transaction():
                for store, values in output.state.items():
                    cache.save(conn, store, shard, end, values)
            for store, values in output.state.items():
                cache.remember(store, shard, values)
            outputs[topic].append(output)
            batches += 1
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()

    outcome = Outcome(
        events=workload.events,
        seconds=seconds,
        notes={"batches": batches, "cache_hits": cache.hits, "cache_misses": cache.misses},
    )
    for output in outputs["orders"]:
        for event_id, sk, before, mean, stddev in output.rows[
            [
                "event_id",
                "customer_sk",
                "customer_orders_before",
                "customer_avg_amount_before",
                "customer_stddev_amount_before",
            ]
        ].itertuples(index=False):
            outcome.orders[event_id] = (
                _optional_int(sk),
                int(before),
                _optional_float(mean),
                _optional_float(stddev),
            )
    for output in outputs["payments"]:
        for event_id, sk in output.rows[["event_id", "customer_sk"]].itertuples(index=False):
            outcome.payments[event_id] = _optional_int(sk)
        for event_id, rule, score in output.side_tables["fraud_alert"][
            ["event_id", "rule", "score"]
        ].itertuples(index=False):
            outcome.alerts[(event_id, rule)] = float(score)
    return outcome


# -- (b) the per-message path -----------------------------------------------------------------


def per_message_share(workload: Workload, events: int) -> list[tuple[str, int]]:
    """All events of the first customers (by id), in production order, ``events`` at most.

    Whole customers rather than the first events of the stream: the compared events then
    have a history, enough for the amount rule's minimum of prior payments.
    """
    customer_of = {
        "orders": workload.orders["customer_id"].tolist(),
        "payments": workload.payments["customer_id"].tolist(),
    }
    per_customer = Counter(customer_of[topic][i] for topic, i in workload.stream)
    chosen: set[str] = set()
    covered = 0
    for customer in sorted(per_customer):
        if covered >= events:
            break
        chosen.add(customer)
        covered += per_customer[customer]
    share = [(topic, i) for topic, i in workload.stream if customer_of[topic][i] in chosen]
    return share[:events]


def run_per_message(
    url: str, edw: Edw, workload: Workload, *, events: int, rules: FraudRules
) -> Outcome:
    """``events`` events (:func:`per_message_share`) one by one, a commit per event."""
    orders = workload.orders.assign(cents=to_cents(workload.orders["amount"]))
    payments = workload.payments.assign(cents=to_cents(workload.payments["amount"]))
    order_rows = list(
        zip(
            orders["event_id"],
            orders["customer_id"],
            orders["event_time"].dt.to_pydatetime(),
            orders["cents"].tolist(),
            strict=True,
        )
    )
    payment_rows = list(
        zip(
            payments["event_id"],
            payments["customer_id"],
            payments["event_time"].dt.to_pydatetime(),
            payments["cents"].tolist(),
            payments["amount"].tolist(),
            payments["card_id"],
            payments["merchant_country"],
            payments["payment_id"],
            strict=True,
        )
    )
    todo = [
        (topic, order_rows[i] if topic == "orders" else payment_rows[i])
        for topic, i in per_message_share(workload, events)
    ]
    window, call_window = rules.velocity_window, rules.geo_call_window
    statements_run = 0
    outcome = Outcome(events=len(todo), seconds=0.0)
    with psycopg.connect(url, application_name="kappa-bench-per-message") as conn:
        q = per_message_statements(conn, edw)
        cur = conn.cursor()
        started = time.perf_counter()
        for topic, event in todo:
            if topic == "orders":
                event_id, customer, at, cents = event
                cur.execute(q["customer"], (customer, at, at), prepare=True)
                version = cur.fetchone()
                cur.execute(
                    q["stats"], ("order_stats", customer, cents, cents * cents), prepare=True
                )
                after = cur.fetchone()
                before, _, stddev = stats_before(after, cents)  # type: ignore[arg-type]
                # Rounded as the step rounds, so that the results compare exactly.
                outcome.orders[event_id] = (
                    version[0] if version else None,
                    before,
                    stored_mean_before(after, cents),  # type: ignore[arg-type]
                    None if stddev is None else float(np.round(stddev, 4)),
                )
                statements_run += 3
            else:
                event_id, customer, at, cents, amount, card, merchant, payment_id = event
                cur.execute(q["customer"], (customer, at, at), prepare=True)
                version = cur.fetchone()
                cur.execute(
                    q["stats"], ("payment_stats", customer, cents, cents * cents), prepare=True
                )
                before, mean, stddev = stats_before(cur.fetchone(), cents)  # type: ignore[arg-type]
                cur.execute(q["velocity"], (card, at - window, at), prepare=True)
                in_window = cur.fetchone()[0] + 1  # type: ignore[index]
                cur.execute(q["seen"], (payment_id, card, at), prepare=True)
                statements_run += 5
                outcome.payments[event_id] = version[0] if version else None
                if in_window > rules.velocity_max_payments:
                    score = min(1.0, in_window / (2 * rules.velocity_max_payments))
                    outcome.alerts[(event_id, "velocity")] = float(np.round(score, 3))
                if (
                    mean is not None
                    and stddev is not None
                    and before >= rules.amount_min_history
                    and stddev > 0
                ):
                    z = (amount - mean) / stddev
                    if z >= rules.amount_z:
                        score = min(1.0, z / (3 * rules.amount_z))
                        outcome.alerts[(event_id, "amount_anomaly")] = float(np.round(score, 3))
                if version is not None and version[1] != merchant:
                    cur.execute(q["call"], (customer, at - call_window, at), prepare=True)
                    called = cur.fetchone() is not None
                    statements_run += 1
                    score = rules.geo_after_call_score if called else rules.geo_score
                    outcome.alerts[(event_id, "geo_mismatch")] = float(np.round(score, 3))
            conn.commit()
        outcome.seconds = time.perf_counter() - started
    outcome.notes["customers"] = len({event[1] for _, event in todo})
    # BEGIN and COMMIT are a round trip each.
    outcome.notes["statements_per_event"] = round((statements_run + 2 * len(todo)) / len(todo), 2)
    return outcome


# -- agreement ----------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    return bool(a == b)


def disagreements(cache: Outcome, baseline: Outcome) -> list[str]:
    """Differences between the paths on the events the per-message path processed."""
    found: list[str] = []
    for event_id, expected in baseline.orders.items():
        got = cache.orders.get(event_id)
        if got is None or not all(_same(g, e) for g, e in zip(got, expected, strict=True)):
            found.append(f"order {event_id}: cache {got}, per-message {expected}")
    for event_id, expected_sk in baseline.payments.items():
        if cache.payments.get(event_id, "missing") != expected_sk:
            found.append(
                f"payment {event_id}: customer_sk cache {cache.payments.get(event_id)}, "
                f"per-message {expected_sk}"
            )
    cache_alerts = {k: v for k, v in cache.alerts.items() if k[0] in baseline.payments}
    for key in sorted(cache_alerts.keys() | baseline.alerts.keys()):
        score, expected_score = cache_alerts.get(key), baseline.alerts.get(key)
        if score is None or expected_score is None or not _same(score, expected_score):
            found.append(f"alert {key}: cache {score}, per-message {expected_score}")
    return found


def alert_counts(alerts: dict[tuple[str, str], float], events: set[str]) -> dict[str, int]:
    counts = Counter(rule for event_id, rule in alerts if event_id in events)
    return {rule: counts.get(rule, 0) for rule in ("velocity", "amount_anomaly", "geo_mismatch")}


# -- PostgreSQL ---------------------------------------------------------------------------------


# -- the command --------------------------------------------------------------------------------


#: Where the cache path's time goes: (label, module file, function name), cumulative time
#: summed over the functions of that name in that file (both steps' ``apply``), except
#: ``save``: ``StateCache.save`` calls ``PostgresStateBackend.save``, counted once.
PROFILE_PARTS: tuple[tuple[str, str, str], ...] = (
    ("stateful steps (apply, total)", "examples/shop/steps.py", "apply"),
    ("  dimension versions from the EDW", "kappa/steps/warehouse.py", "versions"),
    ("  calls from the EDW", "kappa/steps/warehouse.py", "range"),
    ("  as-of enrichment", "kappa/steps/asof.py", "enrich_as_of"),
    ("    of which _utc (time conversion)", "kappa/steps/asof.py", "_utc"),
    ("  running statistics", "kappa/steps/stats.py", "running_stats"),
    ("  velocity window", "examples/shop/fraud.py", "velocity"),
    ("  fraud rules", "examples/shop/fraud.py", "fraud_alerts"),
    ("  state cache reads (get_many)", "kappa/state.py", "get_many"),
    ("state saved per batch (COPY)", "kappa/state.py", "save"),
    ("state into memory (remember)", "kappa/state.py", "remember"),
    ("waiting for PostgreSQL (all)", "psycopg/connection.py", "wait"),
)


def _profile(
    conn: psycopg.Connection,
    oltp: psycopg.Connection,
    edw: Edw,
    workload: Workload,
    batch_size: int,
    rules: FraudRules,
    max_wait_s: float,
) -> str:
    """The cache path again (fresh cache, another shard) under cProfile: where time goes."""
    profiler = cProfile.Profile()
    outcome = run_cache_path(
        conn,
        oltp,
        edw,
        workload,
        batch_size=batch_size,
        rules=rules,
        max_wait_s=max_wait_s,
        shard=1,
        profiler=profiler,
    )
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    total = stats.total_tt  # type: ignore[attr-defined]
    out.write(
        f"cache path under cProfile: {outcome.seconds:.2f} s with the profiler's overhead; "
        "cumulative time of each part:\n"
    )
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    for label, module, name in PROFILE_PARTS:
        times = [
            entry[3]
            for (filename, _, function), entry in raw.items()
            if filename.endswith(module) and function == name
        ]
        seconds = max(times, default=0.0) if name == "save" else sum(times)
        out.write(f"  {label:<40}{seconds:>7.2f} s {100 * seconds / total:>5.1f} %\n")
    out.write("\nfunctions with the most own time:\n")
    stats.strip_dirs().sort_stats("tottime").print_stats(15)
    return out.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cache_vs_queries",
        description="Stateful steps through the state cache vs. per-message EDW queries.",
    )
    parser.add_argument("--events", type=int, default=100_000, help="events (default 100000)")
    parser.add_argument("--customers", type=int, default=5_000, help="customers (default 5000)")
    parser.add_argument(
        "--baseline-events",
        type=int,
        default=2_000,
        help="events the per-message path processes: all events of the first customers "
        "(default 2000)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=20_000,
        help="cache path batch size (default 20000; a micro-batch under lag holds up to KAPPA_BATCH_MAX_RECORDS per partition)",
    )
    parser.add_argument("--seed", type=int, default=7, help="simulator seed (default 7)")
    parser.add_argument(
        "--late-rate", type=float, default=0.05, help="share of late events (default 0.05)"
    )
    parser.add_argument(
        "--pg-url",
        help="an existing PostgreSQL server (a fresh database is created there and dropped "
        "afterwards); default: an embedded server in a temporary directory",
    )
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help=f"JSON figures (default {RESULTS})"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each path, interleaved; the median rate counts (default 3)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also run the cache path once more under cProfile and print where time goes",
    )
    args = parser.parse_args(argv)
    for name in ("events", "customers", "baseline_events", "batch_size", "repeat"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.baseline_events > args.events:
        parser.error("--baseline-events cannot exceed --events")
    return args


def reset_state(conn: psycopg.Connection, edw: Edw) -> None:
    """Both paths start from empty state: the durable tier and the per-message tables."""
    conn.execute(
        sql.SQL("TRUNCATE {}, bench.customer_stats, bench.payment_seen").format(
            sql.Identifier(edw.schemas.meta, "state")
        )
    )


def _spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}" if len(values) > 1 else ""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rules = FraudRules()
    load_before = os.getloadavg()
    print(f"generating {args.events:,} events for {args.customers:,} customers ...", flush=True)
    workload = generate_workload(args.events, args.customers, args.seed, args.late_rate)
    caches: list[Outcome] = []
    baselines: list[Outcome] = []
    # The product's default wait for change capture (KAPPA_ENRICH_MAX_WAIT_S).
    max_wait_s = Settings.from_env({}).enrich_max_wait_s
    with (
        bench_database(args.pg_url) as (url, where),
        connect(url) as conn,
        connect(url, setting="KAPPA_OLTP_URL") as oltp,
    ):
        pg_version = conn.execute("SHOW server_version").fetchone()[0]  # type: ignore[index]
        edw = populate_edw(conn, args.customers, args.seed, workload.first, workload.last)
        conn.execute(PER_MESSAGE_DDL)
        print(
            f"PostgreSQL {pg_version} ({where}); EDW: {edw.versions:,} customer versions, "
            f"{edw.call_rows:,} calls",
            flush=True,
        )
        # Interleaved, so that both paths see the same conditions on a shared machine.
        for run in range(1, args.repeat + 1):
            reset_state(conn, edw)
            print(f"run {run}/{args.repeat}: cache path ...", flush=True)
            caches.append(
                run_cache_path(
                    conn,
                    oltp,
                    edw,
                    workload,
                    batch_size=args.batch_size,
                    rules=rules,
                    max_wait_s=max_wait_s,
                )
            )
            print(
                f"run {run}/{args.repeat}: per-message path on {args.baseline_events:,} events ...",
                flush=True,
            )
            baselines.append(
                run_per_message(url, edw, workload, events=args.baseline_events, rules=rules)
            )
        profile = None
        if args.profile:
            reset_state(conn, edw)
            profile = _profile(conn, oltp, edw, workload, args.batch_size, rules, max_wait_s)

    cache_eps = statistics.median(o.rate for o in caches)
    baseline_eps = statistics.median(o.rate for o in baselines)
    ratio = cache_eps / baseline_eps
    cache, baseline = caches[0], baselines[0]
    differences = [
        line for c, b in zip(caches, baselines, strict=True) for line in disagreements(c, b)
    ]
    compared = set(baseline.orders) | set(baseline.payments)
    counts = alert_counts(cache.alerts, compared), alert_counts(baseline.alerts, compared)

    runs = f"median of {args.repeat} runs" if args.repeat > 1 else "1 run"
    print()
    print(f"{'path':<38}{'events':>9}{'seconds':>9}{'events/s':>10}   range of runs")
    print(
        f"{f'cache (batches of {args.batch_size:,})':<38}{cache.events:>9,}"
        f"{statistics.median(o.seconds for o in caches):>9.2f}{cache_eps:>10,.0f}"
        f"   {_spread([o.rate for o in caches])}"
    )
    print(
        f"{'per-message (prepared, commit per event)':<38}{baseline.events:>9,}"
        f"{statistics.median(o.seconds for o in baselines):>9.2f}{baseline_eps:>10,.0f}"
        f"   {_spread([o.rate for o in baselines])}"
    )
    print(
        f"\nratio cache/per-message: {ratio:,.1f}x ({runs}). Rates are compared: the "
        f"per-message path ran on {baseline.events:,} of the {cache.events:,} events (all "
        f"events of {baseline.notes['customers']:,} customers), "
        f"{baseline.notes['statements_per_event']} round trips per event incl. BEGIN and COMMIT."
    )
    print(
        f"cache path: {cache.notes['batches']} batches, state cache "
        f"{cache.notes['cache_hits']:,} hits / {cache.notes['cache_misses']:,} misses per run"
    )
    verdict = "AGREE" if not differences else f"DISAGREE ({len(differences)} differences)"
    print(
        f"results on the {baseline.events:,} events both processed: {verdict} "
        f"({len(baseline.orders):,} orders: customer version and running statistics; "
        f"{len(baseline.payments):,} payments: customer version and alerts)"
    )
    print(f"  alerts, cache path:       {counts[0]}")
    print(f"  alerts, per-message path: {counts[1]}")
    for line in differences[:10]:
        print(f"  {line}")
    if profile:
        print()
        print(profile)

    figures = {
        "events": cache.events,
        "baseline_events": baseline.events,
        "customers": args.customers,
        "batch_size": args.batch_size,
        "repeat": args.repeat,
        "cache_eps": round(cache_eps, 1),
        "per_message_eps": round(baseline_eps, 1),
        "ratio": round(ratio, 1),
        "runs": {
            "cache_eps": [round(o.rate, 1) for o in caches],
            "per_message_eps": [round(o.rate, 1) for o in baselines],
        },
        "agree": not differences,
        "alerts_compared": counts[1],
        "per_message_round_trips_per_event": baseline.notes["statements_per_event"],
        "machine": {
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_before": [round(x, 2) for x in load_before],
        },
        "pg_version": pg_version,
        "pg": where,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    print(f"\nfigures written to {args.output}")
    return 0 if not differences else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KappaError as exc:
        sys.exit(f"error: {exc}")
