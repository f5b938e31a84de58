"""``make bench-freshness``: how long an event takes from its producer to the EDW, on the
running stack.

Starts the local stack as ``kappa up --reset`` does (embedded PostgreSQL, local broker,
event and OLTP simulators, Dagster daemon and webserver) in a temporary ``KAPPA_HOME`` on
free ports, with a 5 s sensor interval and the simulator at a steady rate. After a warm-up
it measures for ``--duration`` seconds, waits for the runs to catch up, and reads, for
every event produced in the window, produce time (the record's CreateTime, ``broker_time``
in the fact) to commit time (``committed_at`` of the first ledger batch that held its
offset, written in the batch's transaction just before it commits; batches are recorded as
they commit, since a heal run later replaces a partition's batches with its own). Then it stops the stack.

Figures go to ``bench/results/freshness.json`` and are merged into ``latest.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from kappa.local.processes import free_port

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]

LATENCY = """
WITH f AS (
  SELECT topic, kafka_partition, kafka_offset, broker_time FROM edw.fact_order
   WHERE broker_time >= %(start)s AND broker_time < %(end)s
  UNION ALL
  SELECT topic, kafka_partition, kafka_offset, broker_time FROM edw.fact_payment
   WHERE broker_time >= %(start)s AND broker_time < %(end)s
)
SELECT extract(epoch FROM min(l.committed_at) - f.broker_time)::float8
FROM f JOIN pg_temp.first_commits l
  ON l.source = f.topic AND l.shard = f.kafka_partition
 AND f.kafka_offset >= l.start_position AND f.kafka_offset < l.end_position
GROUP BY l.asset, f.topic, f.kafka_partition, f.kafka_offset, f.broker_time
"""


class LedgerRecorder:
    """Every ledger batch of the facts as it first commits.

    A heal run (or a backfill) replaces a partition's ledger batches with its own, later
    ones: read at the end, the ledger would charge the heal's commit time to every event of
    the partition. So the batches are recorded while the window runs, and an event's commit
    time is the earliest commit of a batch that held it.
    """

    #: Overlap between polls: ``committed_at`` is taken just before a batch commits, so a
    #: batch can become visible after a later-stamped one of another shard.
    OVERLAP = timedelta(seconds=60)

    def __init__(self, url: str) -> None:
        self.url = url
        self.batches: dict[tuple[str, str, int, int, int], datetime] = {}
        self.since = datetime(1970, 1, 1, tzinfo=UTC)

    def poll(self) -> None:
        try:
            with psycopg.connect(self.url, connect_timeout=3) as conn:
                rows = conn.execute(
                    "SELECT asset, source, shard, start_position, end_position, committed_at "
                    "FROM kappa.batch_ledger WHERE asset IN ('fact_order', 'fact_payment') "
                    "AND committed_at >= %s",
                    (self.since - self.OVERLAP,),
                ).fetchall()
        except psycopg.Error:
            return  # a missed poll: the overlap of the next one covers it
        for asset, source, shard, start, end, committed in rows:
            self.batches.setdefault((asset, source, shard, start, end), committed)
            self.since = max(self.since, committed)

    def load_into(self, conn: psycopg.Connection) -> None:
        """The recorded batches as the temporary table ``first_commits``."""
        conn.execute(
            "CREATE TEMP TABLE first_commits (asset text, source text, shard integer, "
            "start_position bigint, end_position bigint, committed_at timestamptz)"
        )
        with conn.cursor().copy(
            "COPY first_commits (asset, source, shard, start_position, end_position, "
            "committed_at) FROM STDIN"
        ) as copy:
            for key, committed in self.batches.items():
                copy.write_row((*key, committed))


def _wait(predicate: Any, timeout: float, what: str, proc: subprocess.Popen[bytes]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the stack exited ({proc.returncode}) while waiting for {what}")
        try:
            value = predicate()
        except psycopg.Error:
            value = None
        if value:
            return value
        time.sleep(2)
    raise RuntimeError(f"timed out waiting for {what}")


def _first_batch(url: str) -> bool:
    with psycopg.connect(url, connect_timeout=3) as conn:
        row = conn.execute(
            "SELECT count(DISTINCT asset) FROM kappa.batch_ledger "
            "WHERE asset IN ('fact_order', 'fact_payment')"
        ).fetchone()
        return bool(row and row[0] == 2)


TOPICS = {"fact_order": "orders", "fact_payment": "payments"}


def log_ends(env: dict[str, str]) -> dict[tuple[str, str, int], int]:
    """(asset, topic, partition) -> end offset of the log now."""
    from kappa.sources.topic import EventStore

    ends = {}
    with EventStore(f"127.0.0.1:{env['KAPPA_BROKER_PORT']}", timeout_s=15) as store:
        for asset, topic in TOPICS.items():
            for partition, bounds in store.log_bounds(topic, store.partitions(topic)).items():
                ends[(asset, topic, partition)] = bounds.end
    return ends


def covered(url: str, ends: dict[tuple[str, str, int], int]) -> bool:
    with psycopg.connect(url, connect_timeout=3) as conn:
        heads = {
            (a, t, p): e
            for a, t, p, e in conn.execute(
                "SELECT asset, source, shard, end_position FROM kappa.ledger_head"
            ).fetchall()
        }
    return all(heads.get(key, -1) >= end for key, end in ends.items())


PROVISIONAL = """
SELECT event_id::text, broker_time FROM edw.fact_order WHERE enrichment = 'provisional'
   AND broker_time >= %(start)s AND broker_time < %(end)s
UNION ALL
SELECT event_id::text, broker_time FROM edw.fact_payment WHERE enrichment = 'provisional'
   AND broker_time >= %(start)s AND broker_time < %(end)s
"""


class ProvisionalTracker:
    """How long rows of the window stay ``provisional`` before the heal sensors re-derive
    them: the provisional rows are sampled every ``poll_s`` (a partial index makes that
    cheap), a row's time is from the first sample that shows it to the first that does not
    (so within one ``poll_s``)."""

    def __init__(self, url: str, poll_s: float = 2.0) -> None:
        self.url = url
        self.poll_s = poll_s
        self.first_seen: dict[str, float] = {}
        self.produced: dict[str, datetime] = {}
        self.healed: dict[str, float] = {}
        self.current: set[str] = set()

    def sample(self, start: datetime, end: datetime) -> set[str]:
        """The provisional rows produced in ``[start, end)`` now; rows tracked before and
        produced at or after ``end`` are no longer followed."""
        try:
            with psycopg.connect(self.url, connect_timeout=3) as conn:
                found = conn.execute(PROVISIONAL, {"start": start, "end": end}).fetchall()
        except psycopg.Error:
            return self.current  # a missed sample: the next one decides
        now = time.monotonic()
        rows = {event_id for event_id, _ in found}
        for event_id, produced in found:
            self.first_seen.setdefault(event_id, now)
            self.produced.setdefault(event_id, produced)
        for event_id in self.current - rows:
            if self.produced[event_id] < end:
                self.healed.setdefault(event_id, now)
            else:
                del self.first_seen[event_id], self.produced[event_id]
        self.current = rows
        return rows

    def figures(self) -> dict[str, Any]:
        durations = np.array([self.healed[e] - self.first_seen[e] for e in self.healed])
        now = time.monotonic()
        left = np.array([now - self.first_seen[e] for e in self.current])
        return {
            "provisional_rows_seen": len(self.first_seen),
            "provisional_healed": int(durations.size),
            "provisional_p50_s": round(float(np.percentile(durations, 50)), 1)
            if durations.size
            else None,
            "provisional_max_s": round(float(durations.max()), 1) if durations.size else None,
            "provisional_left": int(left.size),
            "provisional_left_oldest_s": round(float(left.max()), 1) if left.size else None,
            "provisional_poll_s": self.poll_s,
        }


RUN_PHASES = """
SELECT r.run_id, r.create_timestamp,
  min(e.timestamp) FILTER (WHERE e.dagster_event_type = 'PIPELINE_STARTING'),
  min(e.timestamp) FILTER (WHERE e.dagster_event_type = 'PIPELINE_START'),
  min(e.timestamp) FILTER (WHERE e.dagster_event_type = 'STEP_START'),
  min(e.timestamp) FILTER (WHERE e.dagster_event_type = 'STEP_SUCCESS')
FROM runs r
JOIN run_tags t ON t.run_id = r.run_id AND t.key = 'kappa/asset'
 AND t.value IN ('fact_order', 'fact_payment')
JOIN event_logs e ON e.run_id = r.run_id
WHERE r.create_timestamp >= %s AND r.create_timestamp < %s
  AND EXISTS (SELECT 1 FROM run_tags h WHERE h.run_id = r.run_id AND h.key = 'kappa/heal')
      = %s
GROUP BY r.run_id, r.create_timestamp
"""


def run_phases(
    dagster_url: str, start: datetime, end: datetime, *, heal: bool = False
) -> dict[str, Any]:
    """Medians of where a micro-batch run's time goes (``heal``: a heal run's), from
    Dagster's run storage (UTC); for heal runs also the longest step and the steps' sum,
    the time they held the live sensor back once started."""
    naive = (start.astimezone(UTC).replace(tzinfo=None), end.astimezone(UTC).replace(tzinfo=None))
    with psycopg.connect(dagster_url) as conn:
        rows = conn.execute(RUN_PHASES, (*naive, heal)).fetchall()
    phases: dict[str, list[float]] = {
        "queued_s": [],
        "process_start_s": [],
        "to_step_s": [],
        "step_s": [],
    }
    for _, created, starting, started, step, done in rows:
        if None in (starting, started, step, done):
            continue
        phases["queued_s"].append((starting - created).total_seconds())
        phases["process_start_s"].append((started - starting).total_seconds())
        phases["to_step_s"].append((step - started).total_seconds())
        phases["step_s"].append((done - step).total_seconds())
    result: dict[str, Any] = {"runs": len(rows)}
    for name, values in phases.items():
        result[f"median_{name}"] = round(float(np.median(values)), 2) if values else None
    queued = phases["queued_s"]
    result["p90_queued_s"] = round(float(np.percentile(queued, 90)), 2) if queued else None
    if not heal:
        result["capture_wait_s"] = capture_waits(dagster_url, start, end)
    if heal:
        steps = phases["step_s"]
        result["max_step_s"] = round(max(steps), 2) if steps else None
        result["total_step_s"] = round(sum(steps), 2)
    return result


CAPTURE_WAITS = """
SELECT t.value, e.event
FROM runs r
JOIN run_tags t ON t.run_id = r.run_id AND t.key = 'kappa/asset'
 AND t.value IN ('fact_order', 'fact_payment')
JOIN event_logs e ON e.run_id = r.run_id AND e.dagster_event_type = 'ASSET_MATERIALIZATION'
WHERE r.create_timestamp >= %s AND r.create_timestamp < %s
  AND NOT EXISTS (SELECT 1 FROM run_tags h WHERE h.run_id = r.run_id AND h.key = 'kappa/heal')
"""


def _metadata_value(event: str, label: str) -> float | None:
    """The value of the metadata entry ``label`` of a stored materialisation event."""
    data = json.loads(event)["dagster_event"]["event_specific_data"]["materialization"]
    for entry in data.get("metadata_entries", []):
        if entry.get("label") == label:
            value = entry.get("entry_data", {}).get("value")
            return float(value) if value is not None else None
    return None


def capture_waits(dagster_url: str, start: datetime, end: datetime) -> dict[str, Any]:
    """Per fact: how long its live runs waited for change capture (the ``capture_wait_s`` of
    their materialisations): median, p90, and the share of runs that waited at all."""
    naive = (start.astimezone(UTC).replace(tzinfo=None), end.astimezone(UTC).replace(tzinfo=None))
    with psycopg.connect(dagster_url) as conn:
        rows = conn.execute(CAPTURE_WAITS, naive).fetchall()
    waits: dict[str, list[float]] = {}
    for asset, event in rows:
        found = _metadata_value(event, "capture_wait_s")
        if found is not None:
            waits.setdefault(asset, []).append(found)
    return {
        asset: {
            "runs": len(values),
            "median_s": round(float(np.median(values)), 2),
            "p90_s": round(float(np.percentile(values, 90)), 2),
            "share_waiting": round(sum(v > 0 for v in values) / len(values), 2),
        }
        for asset, values in sorted(waits.items())
    }


def measure(url: str, start: datetime, end: datetime, ledger: LedgerRecorder) -> dict[str, Any]:
    with psycopg.connect(url) as conn:
        ledger.load_into(conn)
        latencies = np.array(
            [r[0] for r in conn.execute(LATENCY, {"start": start, "end": end}).fetchall()]
        )
        # From the batches as they first committed: heal runs replace the ledger's.
        batches = conn.execute(
            "SELECT count(*), avg(b.received) FROM pg_temp.first_commits f "
            "LEFT JOIN kappa.batch_ledger b USING (asset, source, shard, start_position, "
            "end_position) WHERE f.committed_at >= %s AND f.committed_at < %s",
            (start, end),
        ).fetchone()
        # What low latency may cost: rows enriched before change capture covered them.
        provisional = conn.execute(
            "SELECT avg((enrichment = 'provisional')::int)::float8 FROM ("
            "SELECT enrichment FROM edw.fact_order WHERE broker_time >= %(start)s "
            "AND broker_time < %(end)s UNION ALL SELECT enrichment FROM edw.fact_payment "
            "WHERE broker_time >= %(start)s AND broker_time < %(end)s) f",
            {"start": start, "end": end},
        ).fetchone()
    if latencies.size == 0:
        raise RuntimeError("no event of the window reached the EDW")
    return {
        "freshness_p50_s": round(float(np.percentile(latencies, 50)), 2),
        "freshness_p95_s": round(float(np.percentile(latencies, 95)), 2),
        "freshness_max_s": round(float(latencies.max()), 2),
        "events": int(latencies.size),
        "batches_in_window": int(batches[0]) if batches else None,
        "avg_batch_received": round(float(batches[1]), 1) if batches and batches[1] else None,
        "provisional_share": round(float(provisional[0]), 4)
        if provisional and provisional[0] is not None
        else None,
    }


def produce_backlog(env: dict[str, str], count: int) -> None:
    """``count`` simulator events to the stack's topics at once, stamped now."""
    from itertools import islice

    from kafka import KafkaProducer

    from examples.shop import simulator
    from examples.shop.settings import ShopSettings
    from kappa.settings import Settings

    settings = Settings.from_env(env)
    config = simulator.SimulatorConfig.from_settings(settings, ShopSettings.from_env(env))
    # Another seed than the stack's simulator: the same seed makes the same event ids, which
    # the facts would drop as duplicates of the live events.
    config = dataclasses.replace(config, seed=config.seed + 1)
    began = time.monotonic()
    producer = KafkaProducer(bootstrap_servers=settings.resolved_bootstrap_servers, acks="all")
    try:
        simulator.produce(
            list(islice(simulator.generate(config, start=datetime.now(UTC), rate=1e6), count)),
            producer,
        )
    finally:
        producer.close()
    print(f"backlog of {count:,} events produced in {time.monotonic() - began:.1f} s", flush=True)


def during_backfill(
    args: argparse.Namespace,
    env: dict[str, str],
    ledger: LedgerRecorder,
    proc: subprocess.Popen[bytes],
) -> tuple[datetime, datetime, dict[str, Any]]:
    """A backfill of today's partition of both facts (their side tables with them), launched
    as ``kappa backfill`` launches one, while the stream goes on: the window of live events
    it measures is from its launch to its end."""
    from kappa.backfill import DONE, backfill_status, launch_backfill
    from kappa.catalog.ingests import topic_ingests
    from kappa.settings import Settings

    settings = Settings.from_env(env)
    partition = settings.windows.at(datetime.now(UTC)).key
    selection = [
        name
        for spec, _ in topic_ingests(settings)
        if spec.asset in TOPICS
        for name in (spec.asset, *(t.name for t in (spec.step.side_tables if spec.step else ())))
    ]
    ui = f"http://127.0.0.1:{env['KAPPA_UI_PORT']}"
    with psycopg.connect(ledger.url) as conn:
        row = conn.execute(
            "SELECT sum(end_position - start_position) FROM kappa.batch_ledger "
            "WHERE asset IN ('fact_order', 'fact_payment') AND partition_key = %s",
            (partition,),
        ).fetchone()
    held = int(row[0] or 0) if row else 0
    start = datetime.now(UTC)
    backfill_id = launch_backfill(ui, selection, [partition], title=f"bench: {partition}")
    print(
        f"backfill {backfill_id} of {partition} ({', '.join(selection)}; {held:,} events "
        "loaded in it so far) launched; the stream goes on",
        flush=True,
    )
    deadline = time.monotonic() + args.backfill_timeout
    status = backfill_status(ui, backfill_id)
    while status not in DONE:
        if proc.poll() is not None:
            raise RuntimeError(f"the stack exited ({proc.returncode}) during the backfill")
        if time.monotonic() >= deadline:
            raise RuntimeError(f"backfill {backfill_id} still {status} after the timeout")
        ledger.poll()
        time.sleep(2)
        status = backfill_status(ui, backfill_id)
    end = datetime.now(UTC)
    seconds = round((end - start) / timedelta(seconds=1), 1)
    print(f"backfill {backfill_id} {status} after {seconds} s", flush=True)
    return (
        start,
        end,
        {
            "backfill_partition": partition,
            "backfill_assets": selection,
            "backfill_events_approx": held,
            "backfill_s": seconds,
            "backfill_status": status,
        },
    )


def stack_processes(root_pid: int, home: Path) -> list[Any]:
    """The stack's processes: `kappa up` and everything under it, and the embedded
    PostgreSQL (pg_ctl daemonises it) with its backends."""
    import psutil

    roots = []
    with contextlib.suppress(psutil.NoSuchProcess):
        roots.append(psutil.Process(root_pid))
    for proc in psutil.process_iter(["cmdline"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            cmdline = proc.info["cmdline"] or []
            if cmdline and cmdline[0].endswith("postgres") and str(home / "pg") in cmdline:
                roots.append(proc)
    found: dict[int, Any] = {}
    for root in roots:
        found[root.pid] = root
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in root.children(recursive=True):
                found[child.pid] = child
    return list(found.values())


#: What a stack process is, by a fragment of its command line (first match wins).
ROLES = (
    # Before the workers: a code server's command line holds the instance's queue names.
    ("api grpc", "code servers (sensors)"),
    ("-Q kappa-live", "run workers (live)"),
    ("-Q kappa-backfill", "run workers (backfill)"),
    ("dagster-daemon", "Dagster daemon"),
    ("dagster-webserver", "Dagster webserver"),
    ("tansu", "broker"),
    ("simulator", "producers (simulators)"),
    ("mariadbd", "MariaDB"),
    ("postgres", "PostgreSQL"),
)


def stack_cpu_by_role(root_pid: int, home: Path) -> dict[str, float]:
    """CPU seconds the stack used so far, by role: its live processes' own time plus the
    time of the children they reaped (run processes, PostgreSQL backends)."""
    import psutil

    totals: dict[str, float] = {}
    for proc in stack_processes(root_pid, home):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            t = proc.cpu_times()
            command = " ".join(proc.cmdline())
            role = next((r for fragment, r in ROLES if fragment in command), "other")
            used = t.user + t.system + t.children_user + t.children_system
            totals[role] = totals.get(role, 0.0) + used
    return totals


def runs_created(dagster_url: str, start: datetime, end: datetime) -> int:
    """Runs of every kind created in the window (micro-batches of all assets, heal runs)."""
    naive = (start.astimezone(UTC).replace(tzinfo=None), end.astimezone(UTC).replace(tzinfo=None))
    with psycopg.connect(dagster_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM runs WHERE create_timestamp >= %s AND create_timestamp < %s",
            naive,
        ).fetchone()
    return int(row[0]) if row else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.freshness", description=__doc__)
    parser.add_argument("--duration", type=float, default=300.0, help="seconds measured (300)")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before (30)")
    parser.add_argument("--rate", type=float, default=200.0, help="events/s produced (200)")
    parser.add_argument("--sensor-interval", type=int, default=5)
    parser.add_argument(
        "--enrich-max-wait",
        type=float,
        default=None,
        help="KAPPA_ENRICH_MAX_WAIT_S of the stack (default: the product's default)",
    )
    parser.add_argument(
        "--catch-up", type=float, default=600.0, help="seconds allowed to load the window (600)"
    )
    parser.add_argument(
        "--heal-wait",
        type=float,
        default=180.0,
        help="seconds allowed, after catching up, for provisional rows to be healed (180)",
    )
    parser.add_argument(
        "--launchers",
        default="celery,process",
        help="KAPPA_RUN_LAUNCHER values measured one after the other (celery,process)",
    )
    parser.add_argument(
        "--backfill",
        action="store_true",
        help="after the window, backfill today's partition of both facts while the stream goes "
        "on, and measure the live events produced meanwhile (figures under during_backfill)",
    )
    parser.add_argument(
        "--backlog",
        type=int,
        default=0,
        help="events produced at once before the warm-up (loaded before the window starts), "
        "so that today's partition holds more than the window for --backfill (0)",
    )
    parser.add_argument(
        "--backfill-timeout", type=float, default=900.0, help="seconds allowed (900)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KAPPA_NAME=VALUE",
        help="a setting of the stack (repeatable), e.g. --set KAPPA_WORKERS=4",
    )
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "freshness.json")
    parser.add_argument("--latest", type=Path, default=RESULTS_DIR / "latest.json")
    args = parser.parse_args(argv)
    for assignment in args.set:
        if not assignment.startswith("KAPPA_") or "=" not in assignment:
            parser.error(f"--set {assignment!r}: expected KAPPA_NAME=VALUE")
    launchers = [name.strip() for name in args.launchers.split(",") if name.strip()]
    results: dict[str, Any] = {}
    for launcher in launchers:
        print(f"== run launcher {launcher} ==", flush=True)
        results[launcher] = measure_stack(args, launcher)
    write_results(args, results)
    return 0


def measure_stack(args: argparse.Namespace, launcher: str) -> dict[str, Any]:
    """One stack on ``launcher``, measured: its figures."""
    load_before = [round(x, 2) for x in os.getloadavg()]
    work = Path(tempfile.mkdtemp(prefix="kappa-bench-fresh-"))
    home = work / "home"  # `kappa up --reset` empties it: the stack's log lives beside it
    pg_port = free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith("KAPPA_") or k == "KAFKA_BOOTSTRAP_SERVERS")
    }
    env.update(
        {
            "KAPPA_HOME": str(home),
            "KAPPA_PG_PORT": str(pg_port),
            "KAPPA_BROKER_PORT": str(free_port()),
            "KAPPA_UI_PORT": str(free_port()),
            "KAPPA_SENSOR_INTERVAL_S": str(args.sensor_interval),
            "KAPPA_SIM_RATE": f"{args.rate:g}",
            "KAPPA_RUN_LAUNCHER": launcher,
        }
    )
    if args.enrich_max_wait is not None:
        env["KAPPA_ENRICH_MAX_WAIT_S"] = f"{args.enrich_max_wait:g}"
    for assignment in args.set:
        name, _, value = assignment.partition("=")
        env[name] = value
    url = f"postgresql://postgres@127.0.0.1:{pg_port}/kappa_edw"
    log_path = work / "stack.log"
    print(f"starting the stack (KAPPA_HOME={home}, log {log_path}) ...", flush=True)
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kappa.cli", "up", "--reset"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        _wait(lambda: _first_batch(url), 600, "the first batch of both facts", proc)
        if args.backlog:
            produce_backlog(env, args.backlog)
            ends = log_ends(env)
            _wait(lambda: covered(url, ends), args.catch_up, "the backlog to load", proc)
        print(f"first batches committed; warm-up {args.warmup:g} s", flush=True)
        time.sleep(args.warmup)
        start = datetime.now(UTC)
        roles_start = stack_cpu_by_role(proc.pid, home)
        cpu_start = sum(roles_start.values())
        print(f"measuring {args.duration:g} s at {args.rate:g} events/s ...", flush=True)
        tracker = ProvisionalTracker(url)
        ledger = LedgerRecorder(url)
        # Rows of the window only; the window's end is not known yet: sample up to now.
        until = time.monotonic() + args.duration
        while time.monotonic() < until:
            ledger.poll()
            tracker.sample(start, datetime.now(UTC) + timedelta(days=1))
            time.sleep(max(0.0, min(tracker.poll_s, until - time.monotonic())))
        end = datetime.now(UTC)
        roles_end = stack_cpu_by_role(proc.pid, home)
        cpu_window = sum(roles_end.values()) - cpu_start
        # A process that ended within the window is missing at its end: its time is lost
        # from its role, as from the total.
        cpu_by_role = {
            role: round(max(0.0, used - roles_start.get(role, 0.0)), 1)
            for role, used in sorted(roles_end.items(), key=lambda item: -item[1])
        }
        load_window = [round(x, 2) for x in os.getloadavg()]
        during = during_backfill(args, env, ledger, proc) if args.backfill else None
        # Everything produced in the window must land before it is measured: wait until
        # the ledger covers the log ends seen at the window's end.
        ends = log_ends(env)
        covered_after = time.monotonic()
        _wait(
            lambda: ledger.poll() or covered(url, ends),
            args.catch_up,
            "the runs to load the window",
            proc,
        )
        ledger.poll()
        figures = measure(url, start, end, ledger)
        if during is not None:
            b_start, b_end, info = during
            with_backfill = measure(url, b_start, b_end, ledger)
            with_backfill.update(info)
            with_backfill["p95_ratio_to_without"] = round(
                with_backfill["freshness_p95_s"] / figures["freshness_p95_s"], 2
            )
            figures["during_backfill"] = with_backfill
        figures["catch_up_s"] = round(time.monotonic() - covered_after, 1)
        # Then give the heal sensors time to re-derive what is still provisional.
        heal_deadline = time.monotonic() + args.heal_wait
        while tracker.sample(start, end) and time.monotonic() < heal_deadline:
            time.sleep(tracker.poll_s)
        figures.update(tracker.figures())
        dagster_url = url.replace("/kappa_edw", "/kappa_dagster")
        figures["run_phases"] = run_phases(dagster_url, start, end)
        # Heal runs asked for up to the end of the heal wait: they are what the window cost.
        figures["heal_runs"] = run_phases(dagster_url, start, datetime.now(UTC), heal=True)
        runs = runs_created(dagster_url, start, end)
        window_s = (end - start) / timedelta(seconds=1)
        figures.update(
            {
                "run_launcher": launcher,
                "stack_cpu_s": round(cpu_window, 1),
                "stack_cpu_share_of_one_core": round(cpu_window / window_s, 3),
                "stack_cpu_s_by_role": cpu_by_role,
                "runs_in_window": runs,
                "cpu_s_per_run": round(cpu_window / runs, 3) if runs else None,
                "load_average_before": load_before,
                "load_average_at_window_end": load_window,
            }
        )
    finally:
        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(90)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    produced = args.rate * (end - start) / timedelta(seconds=1)
    figures.update(
        {
            "duration_s": args.duration,
            "rate_eps": args.rate,
            "sensor_interval_s": args.sensor_interval,
            "enrich_max_wait_s": args.enrich_max_wait,
            "settings": dict(a.split("=", 1) for a in args.set),
            "expected_events_approx": round(produced),
            "window": [start.isoformat(timespec="seconds"), end.isoformat(timespec="seconds")],
            "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    )
    print(
        f"[{launcher}] freshness over {figures['events']:,} events: p50 "
        f"{figures['freshness_p50_s']} s, p95 {figures['freshness_p95_s']} s, max "
        f"{figures['freshness_max_s']} s; stack CPU {figures['stack_cpu_s']} s over "
        f"{window_s:.0f} s ({figures['stack_cpu_share_of_one_core']:.0%} of one core: "
        + ", ".join(f"{role} {used:g} s" for role, used in cpu_by_role.items())
        + "), "
        f"{figures['runs_in_window']} runs, {figures['cpu_s_per_run']} CPU s per run; "
        f"live runs queued median {figures['run_phases']['median_queued_s']} s, start "
        f"median {figures['run_phases']['median_process_start_s']} s, step median "
        f"{figures['run_phases']['median_step_s']} s; waited for change capture "
        f"{figures['run_phases']['capture_wait_s']}; provisional enrichment {figures['provisional_share']} at the end; "
        f"{figures['heal_runs']['runs']} heal runs; load average {load_window}",
        flush=True,
    )
    return figures


def write_results(args: argparse.Namespace, results: dict[str, Any]) -> None:
    """``results`` (figures by launcher) to ``--output``, merged into ``--latest``."""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    latest: dict[str, Any] = (
        json.loads(args.latest.read_text(encoding="utf-8")) if args.latest.exists() else {}
    )
    details = latest.setdefault("details", {})
    by_launcher = details.setdefault("freshness_by_launcher", {})
    for launcher, figures in results.items():
        by_launcher.setdefault(launcher, {})[f"{figures['rate_eps']:g}_eps"] = figures
    # The headline figures are the default launcher's (celery) when it was measured, at the
    # 200 events/s of the targets (a run at another rate only adds its figures by launcher).
    headline = results.get("celery") or next(iter(results.values()))
    if headline["rate_eps"] >= 200 or "freshness_p95_s" not in latest:
        latest["freshness_p50_s"] = headline["freshness_p50_s"]
        latest["freshness_p95_s"] = headline["freshness_p95_s"]
        details["freshness"] = headline
        details.get("notes", {}).pop("freshness", None)
    args.latest.write_text(json.dumps(latest, indent=2) + "\n", encoding="utf-8")
    for launcher, figures in results.items():
        print(
            f"{launcher:8} p50 {figures['freshness_p50_s']:6} s  p95 "
            f"{figures['freshness_p95_s']:6} s  CPU/run {figures['cpu_s_per_run']} s  stack "
            f"{figures['stack_cpu_share_of_one_core']:.0%} of one core at {figures['rate_eps']:g} ev/s"
        )
        during = figures.get("during_backfill")
        if during:
            print(
                f"{launcher:8} during a {during['backfill_s']} s backfill of "
                f"{during['backfill_partition']} (~{during['backfill_events_approx']:,} events): "
                f"p50 {during['freshness_p50_s']} s  p95 {during['freshness_p95_s']} s "
                f"({during['p95_ratio_to_without']}x without)"
            )
    if {"celery", "process"} <= results.keys():
        c, p = results["celery"], results["process"]
        print(
            f"celery/process: p95 {c['freshness_p95_s'] / p['freshness_p95_s']:.2f}, CPU per "
            f"run {(c['cpu_s_per_run'] or 0) / (p['cpu_s_per_run'] or 1):.2f}"
        )
    print(f"figures written to {args.output} and {args.latest}")


if __name__ == "__main__":
    sys.exit(main())
