"""The stateful steps of the event facts: enrichment, running statistics, fraud detection.

A step runs between decode and load. It reads state for all keys of the batch in bulk
through the :class:`~kappa.state.StateCache`, looks dimension versions and call-centre
calls up once per batch (never per message), and returns the augmented rows, the state to
save and any side table rows; the warehouse writes all of it in the batch's transaction.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import pandas as pd
import psycopg
from psycopg import sql

from kappa.catalog.captures import CaptureSpec
from kappa.edw.ledger import read_head
from kappa.edw.types import Schemas
from kappa.sources import pg_capture
from kappa.state import State, StateAccess
from kappa.transforms import (
    FraudRules,
    enrich_as_of,
    fraud_alerts,
    running_stats,
    to_cents,
    velocity,
)

if TYPE_CHECKING:
    from kappa.settings import Settings


@dataclass
class StepOutput:
    rows: pd.DataFrame
    state: dict[str, dict[str, State]] = field(default_factory=dict)
    side_tables: dict[str, pd.DataFrame] = field(default_factory=dict)


class Dimensions(Protocol):
    """What stateful steps need from the CDC side, in bulk."""

    def watermark(self, customer_ids: Sequence[str] = ()) -> Completeness | None:
        """Up to when every change is loaded (per customer of ``customer_ids``, when given);
        None when that is not known."""
        ...

    def customer_versions(self, customer_ids: list[str]) -> pd.DataFrame: ...

    def calls(
        self, customer_ids: list[str], since: pd.Timestamp, until: pd.Timestamp
    ) -> pd.DataFrame: ...


#: The column that ties both captured tables to the events (customer versions, calls).
CUSTOMER_COLUMN = "customer_id"
#: Change times are microseconds: "just before a change" is one microsecond before it.
_JUST_BEFORE = pd.Timedelta(microseconds=1)


@dataclass(frozen=True)
class Completeness:
    """Up to when change capture has loaded every change: ``until`` for every customer but
    those in ``pending``, which have a committed change not loaded yet and are complete only
    up to just before their earliest such change."""

    until: pd.Timestamp
    pending: Mapping[str, pd.Timestamp] = field(default_factory=dict)

    def marks(self, customers: pd.Series) -> pd.Series:
        """Per row of ``customers`` (row-aligned), the time its customer is complete up to."""
        until = pd.Timestamp(self.until).tz_convert("UTC")
        marks = pd.Series(until, index=customers.index, dtype="datetime64[ns, UTC]")
        if self.pending:
            earliest = pd.to_datetime(customers.astype(str).map(self.pending), utc=True)
            marks = earliest.where(earliest.notna() & (earliest < until), marks)
        return marks


VERSION_COLUMNS = ["customer_id", "customer_sk", "segment", "country", "valid_from", "valid_to"]


class VersionCache:
    """Customer versions of ``dim_customer`` in memory for a run, refreshed incrementally.

    Before each lookup the dimension's ledger end is read (one row); if change capture has
    moved since the last lookup, the customers whose versions were inserted or closed by
    the transactions since are dropped from memory and reloaded on demand. Reading the
    ledger before the versions means memory is never older than the position it records.
    """

    def __init__(self) -> None:
        self._versions: dict[str, list[tuple]] = {}
        self._synced_at: int | None = None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def versions(
        self, edw: psycopg.Connection, schemas: Schemas, spec: CaptureSpec, customer_ids: list[str]
    ) -> pd.DataFrame:
        table = sql.Identifier(schemas.edw, spec.target)
        head = read_head(edw, schemas, spec.asset, str(spec.change_table), 0)
        position = head.end if head is not None else 0
        with self._lock:
            if self._synced_at is not None and position != self._synced_at:
                changed = edw.execute(
                    sql.SQL(
                        "SELECT DISTINCT customer_id FROM {} "
                        "WHERE source_xid >= %s OR closed_by_xid >= %s"
                    ).format(table),
                    (self._synced_at, self._synced_at),
                ).fetchall()
                for (customer,) in changed:
                    self._versions.pop(customer, None)
            self._synced_at = position
            missing = [c for c in customer_ids if c not in self._versions]
            self.hits += len(customer_ids) - len(missing)
            self.misses += len(missing)
        if missing:
            rows = edw.execute(
                sql.SQL(
                    "SELECT customer_id, customer_sk, segment, country, valid_from, valid_to "
                    "FROM {} WHERE customer_id = ANY(%s)"
                ).format(table),
                (missing,),
            ).fetchall()
            loaded: dict[str, list[tuple]] = {c: [] for c in missing}
            for row in rows:
                loaded[row[0]].append(row)
            with self._lock:
                self._versions.update(loaded)
        with self._lock:
            found = [row for c in customer_ids for row in self._versions.get(c, ())]
        frame = pd.DataFrame(found, columns=VERSION_COLUMNS)
        for column in ("valid_from", "valid_to"):
            frame[column] = pd.to_datetime(frame[column], utc=True)
        return frame


class WarehouseDimensions:
    """Dimension versions and calls from the EDW; completeness from the OLTP horizon.

    The watermark is the time up to which ``dim_customer`` and ``fact_call_center_call``
    hold every change: if nothing committed waits past a capture's ledger, it is now,
    bounded by the start of the oldest transaction still writing; otherwise it is what the
    capture's last batch recorded. Asked for some customers, it is per customer: now (so
    bounded) for a customer none of whose changes waits, just before the earliest waiting
    change for one that has some (a change's version is never valid before its change
    time). A committed change not loaded yet holds back only its own customer's events.
    """

    def __init__(
        self,
        edw: psycopg.Connection,
        schemas: Schemas,
        *,
        oltp: psycopg.Connection | None,
        customers: CaptureSpec | None,
        calls: CaptureSpec | None,
        versions: VersionCache | None = None,
    ) -> None:
        self.version_cache = versions or VersionCache()
        self.edw = edw
        self.schemas = schemas
        self.oltp = oltp
        self.captures = [c for c in (customers, calls) if c is not None]
        self.customers = customers
        self.calls_spec = calls

    def watermark(self, customer_ids: Sequence[str] = ()) -> Completeness | None:
        if self.oltp is None or not self.captures:
            return None
        until = pd.Timestamp(pg_capture.complete_until(self.oltp))
        pending: dict[str, pd.Timestamp] = {}
        for spec in self.captures:
            head = read_head(self.edw, self.schemas, spec.asset, str(spec.change_table), 0)
            loaded_until = head.end if head is not None else 0
            if customer_ids and head is not None:
                # Only these customers' changes waiting past the ledger hold them back (a
                # range scan from the ledger end; before the capture's first batch that would
                # be the whole change table, on every batch: the common rule applies then).
                since = pg_capture.pending_since(
                    self.oltp, spec, loaded_until, CUSTOMER_COLUMN, list(customer_ids)
                )
                for customer, earliest in since.items():
                    mark = pd.Timestamp(earliest) - _JUST_BEFORE
                    pending[customer] = min(pending.get(customer, mark), mark)
            elif pg_capture.plan_end(self.oltp, spec, loaded_until, max_changes=1) > loaded_until:
                # Changes wait: complete only as far as the capture's last batch recorded.
                if head is None or head.watermark is None:
                    return None
                until = min(until, pd.Timestamp(head.watermark))
        return Completeness(until, pending)

    def customer_versions(self, customer_ids: list[str]) -> pd.DataFrame:
        if self.customers is None or not customer_ids:
            return pd.DataFrame(columns=VERSION_COLUMNS)
        return self.version_cache.versions(self.edw, self.schemas, self.customers, customer_ids)

    def calls(
        self, customer_ids: list[str], since: pd.Timestamp, until: pd.Timestamp
    ) -> pd.DataFrame:
        columns = ["customer_id", "call_id", "reason", "called_at"]
        if self.calls_spec is None or not customer_ids:
            return pd.DataFrame(columns=columns)
        rows = self.edw.execute(
            sql.SQL(
                "SELECT customer_id, call_id, reason, called_at FROM {} "
                "WHERE customer_id = ANY(%s) AND called_at BETWEEN %s AND %s"
            ).format(sql.Identifier(self.schemas.edw, self.calls_spec.target)),
            (customer_ids, since.to_pydatetime(), until.to_pydatetime()),
        ).fetchall()
        frame = pd.DataFrame(rows, columns=columns)
        frame["called_at"] = pd.to_datetime(frame["called_at"], utc=True)
        return frame


class WaitBudget:
    """Time left to wait for change capture, shared by every batch that draws on it.

    A live batch has its own; a backfill has one for its whole window (every chunk of every
    topic partition), so a window whose events are newer than change capture pays the wait
    once, not once per chunk and partition.
    """

    def __init__(
        self,
        seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.clock = clock
        self.sleep = sleep
        self.deadline = clock() + max(0.0, seconds)

    def remaining(self) -> float:
        """Seconds left before the deadline (never negative)."""
        return max(0.0, self.deadline - self.clock())


def wait_for_dimensions(
    dimensions: Dimensions,
    rows: pd.DataFrame,
    *,
    max_wait_s: float = 0.0,
    sleep: Callable[[float], None] = time.sleep,
    budget: WaitBudget | None = None,
) -> Completeness | None:
    """Wait (bounded by ``budget``, or ``max_wait_s`` from now) until change capture has
    loaded every change of the rows' customers up to each row's event time."""
    budget = budget if budget is not None else WaitBudget(max_wait_s, sleep=sleep)
    customers = rows[CUSTOMER_COLUMN].astype(str) if CUSTOMER_COLUMN in rows else None
    ids = sorted(set(customers)) if customers is not None else []
    while True:
        completeness = dimensions.watermark(ids)
        if completeness is not None:
            marks = (
                completeness.marks(customers)
                if customers is not None
                else pd.Series(completeness.until, index=rows.index)
            )
            if bool((pd.to_datetime(rows["event_time"], utc=True) <= marks).all()):
                return completeness
        left = budget.remaining()
        if left <= 0:
            return completeness
        budget.sleep(min(0.5, left))


def completeness_marks(completeness: Completeness | None, rows: pd.DataFrame) -> pd.Series | None:
    """Per row (row-aligned), the time its customer's dimensions are complete up to."""
    if completeness is None:
        return None
    return completeness.marks(rows[CUSTOMER_COLUMN])


class StatefulStep(Protocol):
    """A transform with state, between decode and load; ``side_tables`` are the EDW tables
    it writes besides the fact (rows keyed by the fact's event_id)."""

    side_tables: tuple[str, ...]

    def apply(
        self,
        conn: psycopg.Connection,
        cache: StateAccess,
        dimensions: Dimensions,
        shard: int,
        rows: pd.DataFrame,
        completeness: Completeness | None,
    ) -> StepOutput: ...


class OrderEnrichment:
    """Orders: the customer as of the event time, and the customer's order statistics before it."""

    store = "order_stats"
    side_tables: tuple[str, ...] = ()
    #: Columns the step adds to the fact (nullable), after the decoded ones.
    derived_columns: tuple[tuple[str, str], ...] = (
        ("customer_sk", "bigint"),
        ("customer_segment", "text"),
        ("customer_country", "text"),
        ("enrichment", "text"),
        ("customer_orders_before", "integer"),
        ("customer_avg_amount_before", "numeric(14, 2)"),
        ("customer_stddev_amount_before", "double precision"),
    )

    def apply(
        self,
        conn: psycopg.Connection,
        cache: StateAccess,
        dimensions: Dimensions,
        shard: int,
        rows: pd.DataFrame,
        completeness: Completeness | None,
    ) -> StepOutput:
        customers = rows["customer_id"].astype(object).tolist()
        enriched = enrich_as_of(
            rows,
            dimensions.customer_versions(sorted(set(customers))),
            completeness_marks(completeness, rows),
        )
        prior = cache.get_many(conn, self.store, shard, customers)
        stats = running_stats(rows["customer_id"], to_cents(rows["amount"]), prior)
        out = rows.reset_index(drop=True).assign(
            customer_sk=enriched["customer_sk"],
            customer_segment=enriched["customer_segment"],
            customer_country=enriched["customer_country"],
            enrichment=enriched["enrichment"],
            customer_orders_before=stats.count_before,
            customer_avg_amount_before=stats.mean_cents_before,
            customer_stddev_amount_before=pd.Series(stats.stddev_before).round(4),
        )
        return StepOutput(rows=out, state={self.store: stats.after})


class PaymentFraud:
    """Payments: the customer as of the event time, and the fraud rules."""

    side_tables: tuple[str, ...] = ("fraud_alert",)
    #: Columns the step adds to the fact (nullable), after the decoded ones.
    derived_columns: tuple[tuple[str, str], ...] = (
        ("customer_sk", "bigint"),
        ("customer_country", "text"),
        ("enrichment", "text"),
        ("fraud_score", "numeric(4, 3)"),
    )

    def __init__(self, rules: FraudRules) -> None:
        self.rules = rules

    @classmethod
    def from_catalog(cls, settings: Settings, config: Mapping[str, object]) -> PaymentFraud:
        """The step of a catalogue stream: its rules from the KAPPA_FRAUD_* settings."""
        from kappa.catalog.ingests import fraud_rules  # the catalogue builds steps from this module

        return cls(fraud_rules(settings))

    def apply(
        self,
        conn: psycopg.Connection,
        cache: StateAccess,
        dimensions: Dimensions,
        shard: int,
        rows: pd.DataFrame,
        completeness: Completeness | None,
    ) -> StepOutput:
        rows = rows.reset_index(drop=True)
        customers = rows["customer_id"].astype(object).tolist()
        distinct = sorted(set(customers))
        enriched = enrich_as_of(
            rows, dimensions.customer_versions(distinct), completeness_marks(completeness, rows)
        )
        stats_prior = cache.get_many(conn, "payment_stats", shard, customers)
        stats = running_stats(rows["customer_id"], to_cents(rows["amount"]), stats_prior)
        cards_prior = cache.get_many(
            conn, "card_velocity", shard, rows["card_id"].astype(object).tolist()
        )
        counts, cards = velocity(rows, cards_prior, self.rules)
        calls = pd.DataFrame(columns=["customer_id", "call_id", "reason", "called_at"])
        if not rows.empty:
            calls = dimensions.calls(
                distinct,
                rows["event_time"].min() - pd.Timedelta(self.rules.geo_call_window),
                rows["event_time"].max(),
            )
        alerts = fraud_alerts(
            rows,
            enriched=enriched,
            stats=stats,
            velocity_counts=counts,
            calls=calls,
            rules=self.rules,
        )
        alerts = alerts.merge(
            rows[["event_id", "topic", "kafka_partition", "kafka_offset"]],
            on="event_id",
            how="left",
        )
        top = (
            alerts.groupby("event_id")["score"].max()
            if not alerts.empty
            else pd.Series(dtype=float)
        )
        out = rows.assign(
            customer_sk=enriched["customer_sk"],
            customer_country=enriched["customer_country"],
            enrichment=enriched["enrichment"],
            fraud_score=rows["event_id"].map(top).astype(float),
        )
        return StepOutput(
            rows=out,
            state={"payment_stats": stats.after, "card_velocity": cards},
            side_tables={"fraud_alert": alerts},
        )
