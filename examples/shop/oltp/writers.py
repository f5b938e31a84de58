"""The shop's OLTP writers: a simulator of concurrent clients of its source tables.

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
:func:`examples.shop.simulator.customer_profile`, so OLTP rows and events describe the same people.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import psycopg

from examples.shop.oltp.plans import (
    MAX_OPS,
    DeleteCustomer,
    InsertCall,
    InsertCustomer,
    OltpConfig,
    UpdateCustomer,
    WriterState,
    plan_transaction,
    writer_rng,
)
from examples.shop.oltp.stats import OltpStats, Tally
from examples.shop.oltp.tables import check_tables, existing_indexes
from kappa.settings import redact

logger = logging.getLogger("examples.shop.oltp")

APPLICATION_NAME: Final = "kappa-oltp-simulator"
"""``application_name`` of every simulator connection, so operators (and tests) can find them
in ``pg_stat_activity``."""

_PROGRESS_EVERY_S: Final = 10.0
_POLL_S: Final = 0.05
_MAX_LAG_S: Final = 1.0
"""A writer further behind its schedule than this drops the missed slots instead of
bursting to catch up: the rate is a pace, not a quota."""
_REFRESH_EVERY: Final = 20
_IDLE_S: Final = 0.1
_CONNECT_TIMEOUT_S: Final = 10


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
        self, url: str, config: OltpConfig, index: int, run_token: str, tally: Tally
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
            check_tables(conn, calls=self._config.calls)
            self._taken = {
                i
                for i in existing_indexes(conn, self._config)
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
        while len(free) < MAX_OPS and index < self._config.customers:
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
        self.tally = Tally()
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
