"""The OLTP side of the demo: source tables and a simulator of concurrent writers.

The captured tables of ``catalog.yaml`` need a source that behaves like a real OLTP
application, because that is what change capture has to survive (DESIGN.md §4.5): several
connections write at once, transactions commit out of the order they started in, some hold
their locks for a while before committing, some roll back, and the same row is updated
twice in one transaction. :class:`OltpWriters` produces exactly that against
``public.customers`` and ``public.call_center_calls``; the triggers and change tables that
capture it are installed elsewhere (``kappa.capture``), so this module never depends on them.

What each writer does is deterministic per seed: writer ``w`` draws every decision from its
own RNG (:func:`writer_rng`) through the pure :func:`plan_transaction`, so a test can replay
the plans without a database. Only the interleaving of the writers, and which existing
customer a plan's target resolves to, depend on timing. Customers are the people of the
event simulator: ``c-<index>`` gets the home country of
:func:`kappa.simulator.customer_profile`, so OLTP rows and events describe the same people.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Final

import psycopg

from kappa.exceptions import ConfigurationError, KappaError
from kappa.settings import redact
from kappa.simulator import COUNTRIES, customer_profile

if TYPE_CHECKING:
    from kappa.settings import Settings

logger = logging.getLogger("kappa.oltp")

CUSTOMERS_TABLE: Final = "public.customers"
CALLS_TABLE: Final = "public.call_center_calls"
APPLICATION_NAME: Final = "kappa-oltp-simulator"
"""``application_name`` of every simulator connection, so operators (and tests) can find them
in ``pg_stat_activity``."""

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

# -- the transaction mix ----------------------------------------------------------------------

_OPS_PER_TRANSACTION: Final = (1, 2, 3)
_OPS_WEIGHTS: Final = (60, 30, 10)
_MAX_OPS: Final = max(_OPS_PER_TRANSACTION)
_LONG_HOLD_SHARE: Final = 0.02
"""Share of transactions that stay open longer than ``max_hold_s``: the idle-in-transaction
writers whose changes a CDC poller must wait for, not skip."""
_LONG_HOLD_FACTOR: Final = 5.0
_DURATION_MIN_S: Final = 10
_DURATION_MAX_S: Final = 3600
_UPDATE_COLUMN_SHARE: Final = {"segment": 0.25, "country": 0.15, "credit_limit": 0.6}

_FIRST_NAMES: Final = (
    "Anna", "Ben", "Carla", "David", "Elif", "Farid", "Greta", "Hugo", "Ines", "Jonas",
    "Klara", "Luca", "Maja", "Noah", "Olga", "Pavel", "Quinn", "Rosa", "Sven", "Tariq",
    "Ula", "Vera", "Wim", "Yara", "Zoe",
)  # fmt: skip
_LAST_NAMES: Final = (
    "Adler", "Bauer", "Costa", "Dubois", "Evans", "Fischer", "García", "Hansen", "Ivanova",
    "Jansen", "Kowalski", "Lambert", "Moreau", "Nowak", "Okafor", "Peters", "Rossi",
    "Schmidt", "Thompson", "Usman", "Visser", "Weber", "Young", "Zimmermann",
)  # fmt: skip

# -- the writers' loop ------------------------------------------------------------------------

_PROGRESS_EVERY_S: Final = 10.0
_POLL_S: Final = 0.05
_MAX_LAG_S: Final = 1.0
"""A writer further behind its schedule than this drops the missed slots instead of
bursting to catch up: the rate is a pace, not a quota."""
_REFRESH_EVERY: Final = 20
_IDLE_S: Final = 0.1
_CONNECT_TIMEOUT_S: Final = 10


# -- configuration ----------------------------------------------------------------------------


@dataclass(frozen=True)
class OltpConfig:
    """What the OLTP simulator writes; rates are probabilities in [0, 1].

    Writer ``w`` of ``writers`` owns the customer indexes ``i`` with ``i % writers == w`` and
    is the only one to insert them, so concurrent writers never race for the same new id.
    ``max_hold_s`` bounds how long a transaction sleeps before it commits (or rolls back);
    about 2 % of transactions hold up to five times longer.
    """

    customers: int
    seed: int
    writers: int
    rollback_rate: float = 0.05
    max_hold_s: float = 0.2
    segments: tuple[str, ...] = ("retail", "smb", "enterprise")
    reasons: tuple[str, ...] = ("billing", "card_lost", "fraud_report", "delivery", "other")
    sentiments: tuple[str, ...] = ("positive", "neutral", "negative")

    def __post_init__(self) -> None:
        if self.customers < 1:
            raise ValueError(f"customers must be at least 1, got {self.customers}")
        if self.seed < 0:
            raise ValueError(f"seed must not be negative, got {self.seed}")
        if self.writers < 1:
            raise ValueError(f"writers must be at least 1, got {self.writers}")
        if self.writers > self.customers:
            raise ValueError(
                f"writers ({self.writers}) must not exceed customers ({self.customers}): "
                "each writer inserts its own share of the customer ids"
            )
        if not 0.0 <= self.rollback_rate <= 1.0:
            raise ValueError(f"rollback_rate must be in [0, 1], got {self.rollback_rate}")
        if not (math.isfinite(self.max_hold_s) and self.max_hold_s >= 0):
            raise ValueError(f"max_hold_s must be a finite number >= 0, got {self.max_hold_s}")
        for name in ("segments", "reasons", "sentiments"):
            values = getattr(self, name)
            if not values:
                raise ValueError(f"{name} must not be empty")
            if any(not isinstance(v, str) or not v.strip() for v in values):
                raise ValueError(f"{name} must be non-empty strings, got {values!r}")
            if len(set(values)) != len(values):
                raise ValueError(f"{name} has duplicates: {values!r}")

    @classmethod
    def from_settings(cls, settings: Settings) -> OltpConfig:
        """The configuration of the stack's OLTP simulator, from the validated settings.

        Uses the event simulator's customers and seed, so both simulators describe the same
        people. Too many writers for the customer pool is reported as a setting error.
        """
        if settings.oltp_writers > settings.sim_customers:
            raise ConfigurationError(
                "KAPPA_OLTP_WRITERS",
                f"{settings.oltp_writers} writers need at least as many customers "
                f"(KAPPA_SIM_CUSTOMERS is {settings.sim_customers}): each writer inserts "
                "its own share of the customer ids",
            )
        return cls(
            customers=settings.sim_customers,
            seed=settings.sim_seed,
            writers=settings.oltp_writers,
        )

    @property
    def bootstrap_customers(self) -> int:
        """Below this many customers, writers mostly insert customers.

        Updates and calls need someone to refer to; on an empty table the first
        transactions would otherwise be mostly no-ops. A tenth of the pool, at most 100
        (enough to spread updates), at least one per writer.
        """
        return min(self.customers, max(self.writers, min(self.customers // 10, 100)))


# -- pure planning ----------------------------------------------------------------------------


class OpKind(StrEnum):
    """The four kinds of operation a simulated transaction is made of."""

    INSERT_CUSTOMER = "insert_customer"
    UPDATE_CUSTOMER = "update_customer"
    DELETE_CUSTOMER = "delete_customer"
    INSERT_CALL = "insert_call"


#: The steady-state mix of operations (shares of all operations).
OPERATION_MIX: Final[dict[OpKind, int]] = {
    OpKind.INSERT_CUSTOMER: 15,
    OpKind.UPDATE_CUSTOMER: 30,
    OpKind.DELETE_CUSTOMER: 2,
    OpKind.INSERT_CALL: 53,
}
_BOOTSTRAP_MIX: Final[dict[OpKind, int]] = {
    OpKind.INSERT_CUSTOMER: 70,
    OpKind.UPDATE_CUSTOMER: 10,
    OpKind.DELETE_CUSTOMER: 0,
    OpKind.INSERT_CALL: 20,
}


@dataclass(frozen=True)
class CustomerRow:
    """A row of ``public.customers`` as first inserted (``updated_at`` is the database's)."""

    customer_id: str
    name: str
    segment: str
    country: str
    credit_limit: Decimal


@dataclass(frozen=True)
class InsertCustomer:
    row: CustomerRow
    kind: OpKind = field(default=OpKind.INSERT_CUSTOMER, init=False)


@dataclass(frozen=True)
class UpdateCustomer:
    """Set the non-``None`` columns of the transaction's target customer."""

    segment: str | None
    country: str | None
    credit_limit: Decimal | None
    kind: OpKind = field(default=OpKind.UPDATE_CUSTOMER, init=False)


@dataclass(frozen=True)
class DeleteCustomer:
    """Delete the transaction's target customer (always the last operation of a plan)."""

    kind: OpKind = field(default=OpKind.DELETE_CUSTOMER, init=False)


@dataclass(frozen=True)
class InsertCall:
    """A call of the transaction's target customer; ``number`` makes its id unique per writer."""

    number: int
    reason: str
    sentiment: str
    duration_s: int
    kind: OpKind = field(default=OpKind.INSERT_CALL, init=False)


Operation = InsertCustomer | UpdateCustomer | DeleteCustomer | InsertCall


@dataclass(frozen=True)
class TransactionPlan:
    """One transaction, decided before it touches the database.

    ``target`` is a customer id *hint* (``c-<index>``) shared by every operation on an
    existing customer; at execution it resolves to the first existing id at or after it
    (wrapping around). One target per transaction means a transaction locks at most one
    existing customer row, so concurrent writers cannot deadlock on each other.
    """

    operations: tuple[Operation, ...]
    target: str | None
    hold_s: float
    rollback: bool

    @property
    def kinds(self) -> tuple[OpKind, ...]:
        return tuple(op.kind for op in self.operations)


@dataclass(frozen=True)
class WriterState:
    """What a writer knows when it plans its next transaction.

    ``customers`` is its estimate of how many customers exist (its own writes plus a
    periodic count); ``free_indexes`` are the next customer indexes of its own share that it
    has not inserted yet, ascending (at most one transaction's worth); ``next_call`` numbers
    its next call.
    """

    customers: int
    free_indexes: tuple[int, ...]
    next_call: int = 0


def customer_id(index: int) -> str:
    """The id of customer ``index``, as the event simulator spells it."""
    return f"c-{index:05d}"


def writer_rng(seed: int, writer: int) -> random.Random:
    """The RNG of writer ``writer``: its decisions depend on (seed, writer) alone."""
    return random.Random(f"kappa-oltp-writer:{seed}:{writer}")


def _credit_limit(rng: random.Random, rank: int) -> Decimal:
    """A credit limit that grows with the segment's rank (retail < smb < enterprise)."""
    scale = 10 ** min(rank, 4)
    hundreds = rng.randint(5 * scale, 100 * scale)
    return Decimal(hundreds * 100).quantize(Decimal("0.01"))


def customer_row(config: OltpConfig, index: int) -> CustomerRow:
    """Customer ``index`` as first inserted: derived from (seed, index) alone.

    Whichever writer (or :func:`seed_customers`) inserts ``c-<index>``, and whenever, the
    row is the same, and its country is the home country the event simulator gives them.
    """
    rng = random.Random(f"kappa-oltp-customer:{config.seed}:{index}")
    segments = config.segments
    weights = [2 ** (len(segments) - 1 - rank) for rank in range(len(segments))]
    rank = rng.choices(range(len(segments)), weights=weights)[0]
    return CustomerRow(
        customer_id=customer_id(index),
        name=f"{rng.choice(_FIRST_NAMES)} {rng.choice(_LAST_NAMES)}",
        segment=segments[rank],
        country=customer_profile(config.seed, index).home_country,
        credit_limit=_credit_limit(rng, rank),
    )


def _update(rng: random.Random, config: OltpConfig) -> UpdateCustomer:
    changed = {name for name, share in _UPDATE_COLUMN_SHARE.items() if rng.random() < share}
    if not changed:
        changed = {"credit_limit"}
    segment = rng.choice(config.segments) if "segment" in changed else None
    rank = config.segments.index(segment) if segment is not None else rng.randrange(2)
    return UpdateCustomer(
        segment=segment,
        country=rng.choice(COUNTRIES) if "country" in changed else None,
        credit_limit=_credit_limit(rng, rank) if "credit_limit" in changed else None,
    )


def _call(rng: random.Random, config: OltpConfig, number: int) -> InsertCall:
    duration = round(rng.lognormvariate(5.5, 0.8))
    return InsertCall(
        number=number,
        reason=rng.choice(config.reasons),
        sentiment=rng.choice(config.sentiments),
        duration_s=min(_DURATION_MAX_S, max(_DURATION_MIN_S, duration)),
    )


def _hold(rng: random.Random, max_hold_s: float) -> float:
    if rng.random() < _LONG_HOLD_SHARE:
        return rng.uniform(max_hold_s, max_hold_s * _LONG_HOLD_FACTOR)
    return rng.uniform(0.0, max_hold_s)


def plan_transaction(rng: random.Random, state: WriterState, config: OltpConfig) -> TransactionPlan:
    """The next transaction of a writer: 1-3 operations, a hold time, commit or roll back.

    Pure: the same RNG state, writer state and config give the same plan. The operations
    follow :data:`OPERATION_MIX` (15 % new customers, 30 % updates, 2 % deletes, 53 %
    calls); below ``config.bootstrap_customers`` existing customers the mix leans to
    inserts (and with none at all, only inserts are possible). A delete ends the plan, so
    no operation refers to a customer its own transaction removed. The plan is empty only
    when the writer can do nothing: no customers to refer to and no ids of its own left.
    """
    count = rng.choices(_OPS_PER_TRANSACTION, weights=_OPS_WEIGHTS)[0]
    known = state.customers
    free = list(state.free_indexes)
    next_call = state.next_call
    operations: list[Operation] = []
    for _ in range(count):
        mix = _BOOTSTRAP_MIX if known < config.bootstrap_customers else OPERATION_MIX
        weights = [
            (mix[kind] if free else 0)
            if kind is OpKind.INSERT_CUSTOMER
            else (mix[kind] if known > 0 else 0)
            for kind in OpKind
        ]
        if not any(weights):
            break
        kind = rng.choices(list(OpKind), weights=weights)[0]
        if kind is OpKind.INSERT_CUSTOMER:
            operations.append(InsertCustomer(customer_row(config, free.pop(0))))
            known += 1
        elif kind is OpKind.UPDATE_CUSTOMER:
            operations.append(_update(rng, config))
        elif kind is OpKind.INSERT_CALL:
            operations.append(_call(rng, config, next_call))
            next_call += 1
        else:
            operations.append(DeleteCustomer())
            break
    needs_target = any(not isinstance(op, InsertCustomer) for op in operations)
    # Writers and seed_customers fill the ids lowest first, so the existing customers are
    # about the first `known` ids: a hint drawn from the whole pool would mostly fall past
    # the last of them and wrap to the first, making c-00000 everyone's caller.
    span = min(config.customers, max(known, 1))
    target = customer_id(rng.randrange(span)) if needs_target else None
    return TransactionPlan(
        operations=tuple(operations),
        target=target,
        hold_s=_hold(rng, config.max_hold_s),
        rollback=rng.random() < config.rollback_rate,
    )


# -- statistics -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OltpStats:
    """What the writers did. Row counts are rows changed by *committed* transactions.

    ``aborted`` counts transactions PostgreSQL rolled back itself (deadlock, serialization
    failure); ``skipped`` counts plans with nothing to do; ``missed`` counts operations in
    committed transactions that found no customer (deleted meanwhile, or none yet).
    Each counted row change is exactly one row-level trigger firing, so
    :attr:`changes_by_table` is what change capture must account for.
    """

    committed: int = 0
    rolled_back: int = 0
    aborted: int = 0
    skipped: int = 0
    customers_inserted: int = 0
    customers_updated: int = 0
    customers_deleted: int = 0
    calls_inserted: int = 0
    missed: int = 0

    def __add__(self, other: OltpStats) -> OltpStats:
        return OltpStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)}
        )

    @property
    def transactions(self) -> int:
        return self.committed + self.rolled_back + self.aborted + self.skipped

    @property
    def changes_by_table(self) -> dict[str, int]:
        """Committed row changes per source table (``schema.table``)."""
        return {
            CUSTOMERS_TABLE: self.customers_inserted
            + self.customers_updated
            + self.customers_deleted,
            CALLS_TABLE: self.calls_inserted,
        }


class _Tally:
    """The writers' shared running total."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = OltpStats()

    def add(self, stats: OltpStats) -> None:
        with self._lock:
            self._stats += stats

    def snapshot(self) -> OltpStats:
        with self._lock:
            return self._stats


# -- DDL and seeding --------------------------------------------------------------------------


def ensure_source_tables(conn: psycopg.Connection[Any]) -> None:
    """Create the captured source tables if they do not exist, and check those that do.

    Idempotent and safe to run from several processes at once: the advisory lock
    serialises concurrent ``CREATE TABLE IF NOT EXISTS`` (which can otherwise fail on the
    catalog's unique indexes). An existing table that lacks a column catalog.yaml relies on,
    or has it with another type, raises instead of failing later inside a trigger or a batch.
    ``conn`` must be in autocommit mode; the work runs in one transaction.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (_DDL_LOCK,))
        conn.execute(_CUSTOMERS_DDL)
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
            (list(_EXPECTED_COLUMNS),),
        ).fetchall()
    actual: dict[str, dict[str, str]] = {table: {} for table in _EXPECTED_COLUMNS}
    for table, column, sql_type in rows:
        actual[table][column] = sql_type
    problems = [
        f"public.{table}.{column} is {actual[table].get(column, 'missing')}, expected {expected}"
        for table, columns in _EXPECTED_COLUMNS.items()
        for column, expected in columns.items()
        if actual[table].get(column) != expected
    ]
    if problems:
        raise KappaError("the OLTP source tables exist with another shape: " + "; ".join(problems))


def _check_tables(conn: psycopg.Connection[Any]) -> None:
    missing = [
        table
        for table in (CUSTOMERS_TABLE, CALLS_TABLE)
        if conn.execute("SELECT to_regclass(%s)", (table,)).fetchone() == (None,)
    ]
    if missing:
        raise KappaError(
            f"{', '.join(missing)} not found in the OLTP database: create the source tables "
            "first (kappa.oltp.ensure_source_tables)"
        )


def _existing_indexes(conn: psycopg.Connection[Any], config: OltpConfig) -> set[int]:
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
        existing = _existing_indexes(conn, config)
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


# -- execution --------------------------------------------------------------------------------


class _RolledBack(Exception):
    """Raised inside a planned-rollback transaction so that psycopg rolls it back."""


_RESOLVE_SQL: Final = """
SELECT coalesce(
    (SELECT min(customer_id) FROM public.customers WHERE customer_id >= %s),
    (SELECT min(customer_id) FROM public.customers))
"""
_INSERT_CUSTOMER_SQL: Final = """
INSERT INTO public.customers (customer_id, name, segment, country, credit_limit)
VALUES (%s, %s, %s, %s, %s)
ON CONFLICT (customer_id) DO NOTHING
"""
_UPDATE_CUSTOMER_SQL: Final = """
UPDATE public.customers
SET segment = coalesce(%s::text, segment),
    country = coalesce(%s::char(2), country),
    credit_limit = coalesce(%s::numeric(12,2), credit_limit),
    updated_at = now()
WHERE customer_id = %s
"""
_DELETE_CUSTOMER_SQL: Final = "DELETE FROM public.customers WHERE customer_id = %s"
_INSERT_CALL_SQL: Final = """
INSERT INTO public.call_center_calls
    (call_id, customer_id, reason, sentiment, duration_s, called_at)
SELECT %s, customer_id, %s, %s, %s, now()
FROM public.customers WHERE customer_id = %s
"""


class _Writer:
    """One simulated OLTP client: its own connection, RNG, share of ids and call numbers."""

    def __init__(
        self, url: str, config: OltpConfig, index: int, run_token: str, tally: _Tally
    ) -> None:
        self._url = url
        self._config = config
        self._index = index
        self._run_token = run_token
        self._tally = tally
        self._rng = writer_rng(config.seed, index)
        self._taken: set[int] = set()
        self._cursor = index
        self._customers = 0
        self._next_call = 0
        self._since_refresh = 0

    def run(self, halt: threading.Event, *, budget: int | None, interval_s: float | None) -> None:
        """Run transactions until ``halt`` is set or ``budget`` of them are done.

        With ``interval_s`` transaction ``k`` starts no earlier than ``k * interval_s``
        after this writer's start (offset by its index so writers do not start in step).
        """
        with psycopg.connect(
            self._url,
            autocommit=True,
            application_name=APPLICATION_NAME,
            connect_timeout=_CONNECT_TIMEOUT_S,
        ) as conn:
            _check_tables(conn)
            self._taken = {
                i
                for i in _existing_indexes(conn, self._config)
                if i % self._config.writers == self._index
            }
            self._advance_cursor()
            self._refresh(conn)
            done = 0
            next_due = time.monotonic()
            if interval_s is not None:
                next_due += interval_s * self._index / self._config.writers
            while not halt.is_set() and (budget is None or done < budget):
                if interval_s is not None:
                    wait = next_due - time.monotonic()
                    if wait > 0 and halt.wait(wait):
                        break
                    next_due = max(next_due + interval_s, time.monotonic() - _MAX_LAG_S)
                self._transaction(conn, halt)
                done += 1

    def _advance_cursor(self) -> None:
        while self._cursor in self._taken:
            self._cursor += self._config.writers

    def _free_indexes(self) -> tuple[int, ...]:
        free: list[int] = []
        index = self._cursor
        while len(free) < _MAX_OPS and index < self._config.customers:
            if index not in self._taken:
                free.append(index)
            index += self._config.writers
        return tuple(free)

    def _refresh(self, conn: psycopg.Connection[Any]) -> None:
        row = conn.execute("SELECT count(*) FROM public.customers").fetchone()
        self._customers = int(row[0]) if row else 0
        self._since_refresh = 0

    def _transaction(self, conn: psycopg.Connection[Any], halt: threading.Event) -> None:
        state = WriterState(self._customers, self._free_indexes(), self._next_call)
        plan = plan_transaction(self._rng, state, self._config)
        self._next_call += sum(isinstance(op, InsertCall) for op in plan.operations)
        if not plan.operations:
            self._tally.add(OltpStats(skipped=1))
            self._refresh(conn)
            halt.wait(_IDLE_S)
            return
        counts = dict.fromkeys(
            ("customers_inserted", "customers_updated", "customers_deleted", "calls_inserted"),
            0,
        )
        missed = 0
        try:
            with conn.transaction():
                target: str | None = None
                resolved = False
                for op in plan.operations:
                    if isinstance(op, InsertCustomer):
                        row = op.row
                        cur = conn.execute(
                            _INSERT_CUSTOMER_SQL,
                            (row.customer_id, row.name, row.segment, row.country, row.credit_limit),
                        )
                        counts["customers_inserted"] += cur.rowcount
                        continue
                    if not resolved:
                        found = conn.execute(_RESOLVE_SQL, (plan.target,)).fetchone()
                        target = found[0] if found else None
                        resolved = True
                    if target is None:
                        missed += 1
                        continue
                    if isinstance(op, UpdateCustomer):
                        cur = conn.execute(
                            _UPDATE_CUSTOMER_SQL, (op.segment, op.country, op.credit_limit, target)
                        )
                        key = "customers_updated"
                    elif isinstance(op, DeleteCustomer):
                        cur = conn.execute(_DELETE_CUSTOMER_SQL, (target,))
                        key = "customers_deleted"
                    else:
                        call_id = (
                            f"call-{self._config.seed}-{self._run_token}-{self._index}-{op.number}"
                        )
                        cur = conn.execute(
                            _INSERT_CALL_SQL,
                            (call_id, op.reason, op.sentiment, op.duration_s, target),
                        )
                        key = "calls_inserted"
                    counts[key] += cur.rowcount
                    missed += cur.rowcount == 0
                if plan.hold_s > 0:
                    # Stopping cuts the hold short; the transaction still ends as planned.
                    halt.wait(plan.hold_s)
                if plan.rollback:
                    raise _RolledBack
        except _RolledBack:
            self._tally.add(OltpStats(rolled_back=1))
            return
        except psycopg.errors.TransactionRollback as exc:
            # Deadlock or serialization failure: PostgreSQL rolled it back, as it would for
            # a real application, which would retry. The simulator just moves on.
            logger.debug("oltp writer %d: transaction aborted: %s", self._index, exc)
            self._tally.add(OltpStats(aborted=1))
            return
        for op in plan.operations:
            if isinstance(op, InsertCustomer):
                # Taken either way: inserted now, or (conflict) by someone else before.
                self._taken.add(int(op.row.customer_id.removeprefix("c-")))
        self._advance_cursor()
        self._tally.add(OltpStats(committed=1, missed=missed, **counts))
        self._customers += counts["customers_inserted"] - counts["customers_deleted"]
        self._since_refresh += 1
        if (
            missed
            or self._customers < self._config.bootstrap_customers
            or self._since_refresh >= _REFRESH_EVERY
        ):
            self._refresh(conn)


def _run_token() -> str:
    """Distinguishes this run's call ids from an earlier run's with the same seed."""
    return f"{int(datetime.now(UTC).timestamp() * 1_000_000):x}"


def _log_progress(stats: OltpStats, rate: float) -> None:
    logger.info(
        "oltp: %d transactions (%d committed, %d rolled back, %d aborted), %.1f/s; "
        "customers +%d ~%d -%d, calls +%d",
        stats.transactions,
        stats.committed,
        stats.rolled_back,
        stats.aborted,
        rate,
        stats.customers_inserted,
        stats.customers_updated,
        stats.customers_deleted,
        stats.calls_inserted,
    )


class _Crew:
    """The writer threads of one run, and the first error any of them raised."""

    def __init__(self, url: str, config: OltpConfig) -> None:
        self.halt = threading.Event()
        self.tally = _Tally()
        self._errors: list[BaseException] = []
        token = _run_token()
        self._writers = [_Writer(url, config, w, token, self.tally) for w in range(config.writers)]
        self._threads: list[threading.Thread] = []

    def start(self, budgets: Sequence[int | None], interval_s: float | None) -> None:
        for writer, budget in zip(self._writers, budgets, strict=True):
            thread = threading.Thread(
                target=self._guarded,
                args=(writer, budget, interval_s),
                name=f"kappa-oltp-writer-{len(self._threads)}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()

    def _guarded(self, writer: _Writer, budget: int | None, interval_s: float | None) -> None:
        try:
            writer.run(self.halt, budget=budget, interval_s=interval_s)
        except BaseException as exc:
            self._errors.append(exc)
            self.halt.set()

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def finish(self) -> OltpStats:
        """Stop the writers, wait for them, raise the first failure or return the totals."""
        self.halt.set()
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]
        return self.tally.snapshot()

    def threads(self) -> Iterator[threading.Thread]:
        return iter(self._threads)


class OltpWriters:
    """``config.writers`` concurrent OLTP clients at ``rate`` transactions per second in all.

    The loop behind the stack's OLTP simulator. Each writer has its own connection
    (``application_name`` :data:`APPLICATION_NAME`) and paces itself to its share of the
    rate; a writer that falls behind (long holds, lock waits) does not burst to catch up.
    """

    def __init__(self, url: str, config: OltpConfig, *, rate: float) -> None:
        if not (math.isfinite(rate) and rate >= 0):
            raise ValueError(f"rate must be a finite number >= 0, got {rate}")
        self._url = url
        self._config = config
        self._rate = rate

    def run(self, stop: threading.Event) -> OltpStats:
        """Write until ``stop`` is set, then return what was written.

        On ``stop`` every writer ends its current transaction as planned (a hold is cut
        short) and closes its connection before this returns. A writer's error (lost
        connection, missing tables) stops the others and is raised here, so the operator
        sees it. A rate of 0 idles without connecting.
        """
        if self._rate == 0:
            logger.info("oltp simulator idle: rate is 0")
            stop.wait()
            return OltpStats()
        config = self._config
        logger.info(
            "oltp simulator: %d writers, %g transactions/s to %s, seed %d, %d customers",
            config.writers,
            self._rate,
            redact(self._url),
            config.seed,
            config.customers,
        )
        crew = _Crew(self._url, config)
        crew.start([None] * config.writers, interval_s=config.writers / self._rate)
        last_report = time.monotonic()
        last_total = 0
        try:
            while not stop.wait(_POLL_S):
                if crew.halt.is_set() or not crew.running:
                    break
                now = time.monotonic()
                if now - last_report >= _PROGRESS_EVERY_S:
                    stats = crew.tally.snapshot()
                    _log_progress(stats, (stats.transactions - last_total) / (now - last_report))
                    last_report, last_total = now, stats.transactions
        finally:
            stats = crew.finish()
        logger.info("oltp simulator stopped after %d transactions", stats.transactions)
        return stats


def run_transactions(url: str, config: OltpConfig, *, transactions: int) -> OltpStats:
    """Run ``transactions`` transactions over ``config.writers`` concurrent writers, unpaced.

    For tests: each writer runs its share as fast as it can, still with the planned holds
    and rollbacks, so a CDC poller running alongside sees real concurrency. Returns when all
    writers are done; the first writer error is raised after the others stopped.
    """
    if transactions < 0:
        raise ValueError(f"transactions must not be negative, got {transactions}")
    share, extra = divmod(transactions, config.writers)
    crew = _Crew(url, config)
    crew.start([share + (w < extra) for w in range(config.writers)], interval_s=None)
    for thread in crew.threads():
        thread.join()
    return crew.finish()
