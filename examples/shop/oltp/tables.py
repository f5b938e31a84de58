"""The shop's OLTP source tables: their DDL, seeding, and the catalogue's ``local:`` hooks.

``catalog.yaml`` names :func:`prepare` (run by ``kappa init --local`` and ``kappa up`` before
the capture triggers are installed) and :func:`seed` (run right after them, so the seeded
customers are captured and reach ``dim_customer``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Final

import psycopg

from examples.shop.oltp.plans import (
    CALLS_TABLE,
    CUSTOMERS_TABLE,
    OltpConfig,
    customer_id,
    customer_row,
)
from kappa.exceptions import KappaError

if TYPE_CHECKING:
    from kappa.settings import Settings

_DDL_LOCK: Final = "kappa-etl:oltp"

_CUSTOMERS_DDL: Final = """
CREATE TABLE IF NOT EXISTS public.customers (
    customer_id text PRIMARY KEY,
    name text NOT NULL,
    segment text NOT NULL,
    country char(2) NOT NULL,
    credit_limit numeric(12,2) NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
)
"""
_CALLS_DDL: Final = """
CREATE TABLE IF NOT EXISTS public.call_center_calls (
    call_id text PRIMARY KEY,
    customer_id text NOT NULL,
    reason text NOT NULL,
    sentiment text NOT NULL,
    duration_s integer NOT NULL,
    called_at timestamptz NOT NULL
)
"""
_CALLS_INDEX_DDL: Final = (
    "CREATE INDEX IF NOT EXISTS call_center_calls_customer_id_idx "
    "ON public.call_center_calls (customer_id)"
)

#: The columns the rest of the project relies on (catalog.yaml), as ``format_type`` spells
#: them. Extra columns are fine: a real OLTP table has more than anyone captures.
_EXPECTED_COLUMNS: Final[dict[str, dict[str, str]]] = {
    "customers": {
        "customer_id": "text",
        "name": "text",
        "segment": "text",
        "country": "character(2)",
        "credit_limit": "numeric(12,2)",
        "updated_at": "timestamp with time zone",
    },
    "call_center_calls": {
        "call_id": "text",
        "customer_id": "text",
        "reason": "text",
        "sentiment": "text",
        "duration_s": "integer",
        "called_at": "timestamp with time zone",
    },
}


def ensure_source_tables(conn: psycopg.Connection[Any], *, calls: bool = True) -> None:
    """Create the captured source tables if they do not exist, and check those that do.

    Idempotent and safe to run from several processes at once: the advisory lock
    serialises concurrent ``CREATE TABLE IF NOT EXISTS`` (which can otherwise fail on the
    catalog's unique indexes). An existing table that lacks a column catalog.yaml relies on,
    or has it with another type, raises instead of failing later inside a trigger or a batch.
    ``conn`` must be in autocommit mode; the work runs in one transaction.
    """
    expected = {t: c for t, c in _EXPECTED_COLUMNS.items() if calls or t != "call_center_calls"}
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_DDL_LOCK,))
        conn.execute(_CUSTOMERS_DDL)
        if calls:
            conn.execute(_CALLS_DDL)
            conn.execute(_CALLS_INDEX_DDL)
        rows = conn.execute(
            """
            SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod)
            FROM pg_attribute a
            JOIN pg_class c ON c.oid = a.attrelid
            JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relname = ANY(%s)
              AND a.attnum > 0 AND NOT a.attisdropped
            """,
            (list(expected),),
        ).fetchall()
    actual: dict[str, dict[str, str]] = {table: {} for table in expected}
    for table, column, sql_type in rows:
        actual[table][column] = sql_type
    problems = [
        f"public.{table}.{column} is {actual[table].get(column, 'missing')}, expected {wanted}"
        for table, columns in expected.items()
        for column, wanted in columns.items()
        if actual[table].get(column) != wanted
    ]
    if problems:
        raise KappaError("the OLTP source tables exist with another shape: " + "; ".join(problems))


def check_tables(conn: psycopg.Connection[Any], *, calls: bool = True) -> None:
    missing = [
        table
        for table in (CUSTOMERS_TABLE, *([CALLS_TABLE] if calls else []))
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,)
    ]
    if missing:
        raise KappaError(
            f"{', '.join(missing)} not found in the OLTP database: create the source tables "
            "first (examples.shop.oltp.ensure_source_tables, run by `kappa init --local`)"
        )


def existing_indexes(conn: psycopg.Connection[Any], config: OltpConfig) -> set[int]:
    """Indexes of the existing customers whose ids the simulator could have written."""
    indexes: set[int] = set()
    for (cid,) in conn.execute(
        "SELECT customer_id FROM public.customers WHERE customer_id LIKE %s", ("c-%",)
    ):
        digits = cid.removeprefix("c-")
        if digits.isdigit() and customer_id(int(digits)) == cid:
            indexes.add(int(digits))
    return {i for i in indexes if i < config.customers}


_INSERT_CUSTOMERS_SQL: Final = """
INSERT INTO public.customers (customer_id, name, segment, country, credit_limit)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::char(2)[], %s::numeric(12,2)[])
ON CONFLICT (customer_id) DO NOTHING
"""


def seed_customers(conn: psycopg.Connection[Any], config: OltpConfig, count: int) -> int:
    """Insert up to ``count`` customers that do not exist yet, lowest ids first; return how many.

    One transaction and one statement (arrays unnested server-side), so a stack start or a
    test gets a populated table at once instead of waiting for the writers' bootstrap.
    Ids taken concurrently are skipped, never duplicated. ``conn`` must be in autocommit.
    """
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    with conn.transaction():
        existing = existing_indexes(conn, config)
        indexes = [i for i in range(config.customers) if i not in existing][:count]
        if not indexes:
            return 0
        rows = [customer_row(config, i) for i in indexes]
        cursor = conn.execute(
            _INSERT_CUSTOMERS_SQL,
            (
                [r.customer_id for r in rows],
                [r.name for r in rows],
                [r.segment for r in rows],
                [r.country for r in rows],
                [r.credit_limit for r in rows],
            ),
        )
        return cursor.rowcount


def seed_demo_customers(
    conn: psycopg.Connection[Any], config: OltpConfig, total: int, *, top_up: bool
) -> int | None:
    """Seed the demo customers at a stack's start: ``total`` of them into an empty
    ``public.customers`` (the first start); into a table with rows only when ``top_up``
    asks (``--seed``: lowest missing ids first, until ``total`` exist).

    Returns how many were inserted, or None when the table had rows and ``top_up`` was not
    asked: then nothing is written, so a restart leaves the source data as it was. The
    table lock makes two starts at once seed once. ``conn`` must be in autocommit.
    """
    with conn.transaction():
        conn.execute("LOCK TABLE public.customers IN SHARE ROW EXCLUSIVE MODE")
        row = conn.execute("SELECT count(*) FROM public.customers").fetchone()
        existing = int(row[0]) if row is not None else 0
        if existing and not top_up:
            return None
        return seed_customers(conn, config, max(total - existing, 0))


# -- the catalogue's local hooks --------------------------------------------------------------


def prepare(settings: Settings, conn: psycopg.Connection[Any]) -> list[str]:
    """``local.prepare``: the shop's source tables, before ``kappa up`` installs their capture
    triggers (which refuse a table that does not exist): customers in PostgreSQL, and the
    calls where the catalogue captures them from (the call centre's MariaDB, unless off)."""
    from examples.shop.calls import calls_capture, ensure_calls_table
    from kappa.sources.captured import active_captures, mariadb_url
    from kappa.sources.mariadb_server import ServerAddress

    spec = calls_capture(settings)
    in_postgres = spec is None or spec.engine == "postgresql"
    ensure_source_tables(conn, calls=in_postgres)
    if spec is None or in_postgres:
        return []
    if spec.name not in {c.name for c in active_captures(settings)}:
        return [f"{spec.source} (MariaDB) not created: {spec.name} is off"]
    ensure_calls_table(ServerAddress.parse(mariadb_url(settings.env)), spec)
    return [f"{spec.source} ready in MariaDB"]


def seed(settings: Settings, conn: psycopg.Connection[Any], *, top_up: bool) -> list[str]:
    """``local.seed``: most simulated customers exist from the start (the writers insert the
    rest over time); run after the capture triggers, so the seed reaches ``dim_customer``.

    Only an empty ``customers`` table is seeded, unless ``top_up`` (``--seed``) asks: a
    restart writes nothing to the source tables.
    """
    from examples.shop.settings import ShopSettings

    shop = ShopSettings.from_env(settings.env)
    config = OltpConfig.from_settings(shop)
    seeded = seed_demo_customers(conn, config, shop.sim_customers * 9 // 10, top_up=top_up)
    if seeded is None:
        return ["customers has rows already: not seeded (`--seed` tops it up)"]
    return [f"{seeded} customer(s) seeded"]
