"""Set-up shared by the benchmarks: a fresh database, the EDW's dimensions, machine facts.

``populate_edw`` fills ``dim_customer`` (SCD type 2) and ``fact_call_center_call`` for the
customers of the simulator, so that as-of enrichment and the fraud rules have something to
find; ``bench_database`` gives a fresh database on an embedded or an existing server.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
import random
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

from bench.demo import BENCH_CATALOG, ORDER_PLACED, PAYMENT_ATTEMPTED
from examples.shop.oltp import ensure_source_tables
from examples.shop.simulator import COUNTRIES, customer_profile
from kappa.catalog.captures import CaptureSpec, load_captures
from kappa.changes.target import ensure_target
from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.exact import round_half_even_div
from kappa.local.pg_admin import ensure_database
from kappa.local.postgres import EmbeddedPostgres
from kappa.local.processes import free_port
from kappa.sources.pg_capture import install_capture

SEGMENTS = ("retail", "smb", "enterprise")
CALL_REASONS = ("card_lost", "travel_notice", "billing", "address_change")
#: Share of later customer versions that move the customer to another country.
MOVE_SHARE = 0.1
#: Every UNKNOWN_EVERY-th customer has no dimension row (enrichment: unknown_customer).
UNKNOWN_EVERY = 50


@dataclass(frozen=True)
class Edw:
    schemas: Schemas
    customers: CaptureSpec
    calls: CaptureSpec
    versions: int
    call_rows: int


def populate_edw(
    conn: psycopg.Connection, customers: int, seed: int, first: datetime, last: datetime
) -> Edw:
    """Schemas, 1-3 SCD2 versions per known customer and calls, for events in [first, last].

    The same database serves as the OLTP database (``--oltp-url`` of ``bench.pipeline``):
    its change tables are installed and stay empty, nothing waits past the capture.

    The first version of each customer is valid long before the events; later versions
    start shortly before or during the events (a change of segment, sometimes a move to
    another country), so the as-of join matters.
    """
    schemas = Schemas()
    specs = {s.name: s for s in load_captures(BENCH_CATALOG)}
    ensure_schema(conn, schemas, [ORDER_PLACED, PAYMENT_ATTEMPTED])
    # The database is the OLTP side too: its captured tables and (empty) change tables, so
    # completeness is read from a real OLTP horizon per batch, as a run reads it.
    ensure_source_tables(conn)
    for spec in specs.values():
        install_capture(conn, spec)
        ensure_target(conn, schemas, spec)
    rng = random.Random(f"kappa-bench-edw:{seed}")
    span = (last - first).total_seconds()
    versions: list[tuple[Any, ...]] = []
    surrogate = itertools.count(1)
    for index in range(customers):
        if index % UNKNOWN_EVERY == UNKNOWN_EVERY - 1:
            continue
        profile = customer_profile(seed, index)
        changes = sorted(
            first + timedelta(seconds=rng.uniform(-span, span))
            for _ in range(rng.choice((1, 2, 3)) - 1)
        )
        starts = [first - timedelta(days=400), *changes]
        country, segment = profile.home_country, rng.choice(SEGMENTS)
        credit_limit = rng.choice((500, 1000, 2500, 10000))
        for number, valid_from in enumerate(starts):
            if number:
                segment = rng.choice(SEGMENTS)
                if rng.random() < MOVE_SHARE:
                    country = rng.choice([c for c in COUNTRIES if c != country])
            valid_to = starts[number + 1] if number + 1 < len(starts) else None
            sk = next(surrogate)
            versions.append(
                (
                    sk,
                    profile.customer_id,
                    f"Customer {index}",
                    segment,
                    country,
                    credit_limit,
                    valid_from,
                    valid_to,
                    valid_to is None,
                    sk,
                    sk,
                    "U" if number else "I",
                )
            )
    calls = []
    for number in range(customers // 2):
        called_at = first + timedelta(seconds=rng.uniform(-72 * 3600, span))
        calls.append(
            (
                f"call-{number:06d}",
                f"c-{rng.randrange(customers):05d}",
                rng.choice(CALL_REASONS),
                rng.choice(("positive", "neutral", "negative")),
                rng.randint(30, 1800),
                called_at,
                number + 1,
                number + 1,
                called_at,
            )
        )
    dim = sql.Identifier(schemas.edw, specs["customers"].target)
    fact_call = sql.Identifier(schemas.edw, specs["call_center_calls"].target)
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} (customer_sk, customer_id, name, segment, country, credit_limit, "
                "valid_from, valid_to, is_current, source_xid, source_change_id, change_op) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ).format(dim),
            versions,
        )
        cur.executemany(
            sql.SQL(
                "INSERT INTO {} (call_id, customer_id, reason, sentiment, duration_s, called_at, "
                "source_xid, source_change_id, changed_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ).format(fact_call),
            calls,
        )
        # The per-message look-up of a customer's latest call needs this index to be fair;
        # the product's bulk look-up uses it too.
        cur.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (customer_id, called_at)").format(
                sql.Identifier("bench_call_customer_time_idx"), fact_call
            )
        )
    conn.execute(sql.SQL("ANALYZE {}").format(dim))
    conn.execute(sql.SQL("ANALYZE {}").format(fact_call))
    return Edw(
        schemas=schemas,
        customers=specs["customers"],
        calls=specs["call_center_calls"],
        versions=len(versions),
        call_rows=len(calls),
    )


# -- the per-message (row by row) design --------------------------------------------------

#: State of the per-message path, in a schema of its own.
PER_MESSAGE_DDL = """
CREATE SCHEMA IF NOT EXISTS bench;
CREATE TABLE bench.customer_stats (
  store text NOT NULL,
  customer_id text NOT NULL,
  n bigint NOT NULL,
  amount_sum bigint NOT NULL,
  amount_sumsq bigint NOT NULL,
  PRIMARY KEY (store, customer_id)
);
CREATE TABLE bench.payment_seen (
  payment_id text NOT NULL,
  card_id text NOT NULL,
  event_time timestamptz NOT NULL
);
CREATE INDEX ON bench.payment_seen (card_id, event_time);
"""


def per_message_statements(conn: psycopg.Connection, edw: Edw) -> dict[str, str]:
    dim = sql.Identifier(edw.schemas.edw, edw.customers.target)
    calls = sql.Identifier(edw.schemas.edw, edw.calls.target)
    statements = {
        "customer": sql.SQL(
            "SELECT customer_sk, country FROM {} WHERE customer_id = %s "
            "AND valid_from <= %s AND (valid_to IS NULL OR valid_to > %s)"
        ).format(dim),
        # Reads and advances the running statistics in one round trip (row-locked).
        "stats": sql.SQL(
            "INSERT INTO bench.customer_stats AS s (store, customer_id, n, amount_sum, "
            "amount_sumsq) VALUES (%s, %s, 1, %s, %s) ON CONFLICT (store, customer_id) DO "
            "UPDATE SET n = s.n + 1, amount_sum = s.amount_sum + excluded.amount_sum, "
            "amount_sumsq = s.amount_sumsq + excluded.amount_sumsq "
            "RETURNING n, amount_sum, amount_sumsq"
        ),
        "velocity": sql.SQL(
            "SELECT count(*) FROM bench.payment_seen WHERE card_id = %s "
            "AND event_time BETWEEN %s AND %s"
        ),
        "seen": sql.SQL(
            "INSERT INTO bench.payment_seen (payment_id, card_id, event_time) VALUES (%s, %s, %s)"
        ),
        "call": sql.SQL(
            "SELECT call_id FROM {} WHERE customer_id = %s AND called_at BETWEEN %s AND %s "
            "ORDER BY called_at DESC, call_id DESC LIMIT 1"
        ).format(calls),
    }
    return {name: statement.as_string(conn) for name, statement in statements.items()}


def stats_before(after: tuple[int, int, int], cents: int) -> tuple[int, float | None, float | None]:
    """Count, mean and sample deviation before this event, as :func:`running_stats` has them."""
    n, total, sumsq = after
    n, total, sumsq = n - 1, total - cents, sumsq - cents * cents
    mean = (total / n) / 100.0 if n > 0 else None
    stddev = (
        math.sqrt(max((sumsq - float(total) * total / n) / (n - 1), 0.0)) / 100.0 if n > 1 else None
    )
    return n, mean, stddev


def stored_mean_before(after: tuple[int, int, int], cents: int) -> float | None:
    """The mean before this event as the fact stores it: integer cents rounded half to even
    (exact, as :func:`running_stats` rounds it), in currency units."""
    n, total = after[0] - 1, after[1] - cents
    return round_half_even_div(total, n) / 100.0 if n > 0 else None


# -- PostgreSQL -------------------------------------------------------------------------------


def database_url(server_url: str, database: str) -> str:
    return (
        make_url(server_url)
        .set(drivername="postgresql", database=database)
        .render_as_string(hide_password=False)
    )


@contextmanager
def bench_database(pg_url: str | None) -> Iterator[tuple[str, str]]:
    """(URL of a fresh database, where it lives); everything started here is stopped after."""
    name = f"kappa_bench_{uuid.uuid4().hex[:12]}"
    if pg_url:
        ensure_database(pg_url, name, setting="--pg-url")
        try:
            yield database_url(pg_url, name), "existing server"
        finally:
            with psycopg.connect(database_url(pg_url, "postgres"), autocommit=True) as admin:
                admin.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )
        return
    # Not under a per-user temp folder a test session may lock down: run as root, the server
    # runs as another user and needs every parent directory traversable.
    state = Path(tempfile.mkdtemp(prefix="kappa-bench-"))
    server = EmbeddedPostgres(
        state / "pgdata", free_port(), log_path=state / "pgdata" / "server.log"
    )
    try:
        server.start()
        ensure_database(server.base_url, name, setting="embedded PostgreSQL")
        yield server.url(name), "embedded"
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


def machine_facts() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    physical = None
    try:
        import psutil  # the bench extra

        memory_gib = round(psutil.virtual_memory().total / 2**30, 1)
        physical = psutil.cpu_count(logical=False)
    except ImportError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "physical_cores": physical,
        "cpu_model": cpu,
        "memory_gib": memory_gib,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
