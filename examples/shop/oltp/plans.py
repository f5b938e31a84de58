"""The shop's OLTP simulator, planned without a database: configuration and the transaction mix.

What each writer does is deterministic per seed: writer ``w`` draws every decision from its
own RNG (:func:`writer_rng`) through the pure :func:`plan_transaction`, so a test can replay
the plans without a database. Customers are the people of the event simulator:
``c-<index>`` gets the home country of :func:`examples.shop.simulator.customer_profile`, so
OLTP rows and events describe the same people.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from decimal import Decimal
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from examples.shop.simulator import COUNTRIES, customer_profile

if TYPE_CHECKING:
    from examples.shop.settings import ShopSettings

CUSTOMERS_TABLE: Final = "public.customers"
CALLS_TABLE: Final = "public.call_center_calls"

# -- the transaction mix ----------------------------------------------------------------------

_OPS_PER_TRANSACTION: Final = (1, 2, 3)
_OPS_WEIGHTS: Final = (60, 30, 10)
MAX_OPS: Final = max(_OPS_PER_TRANSACTION)
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
    #: Whether the writers insert calls: not when the catalogue captures the calls from
    #: another database (``examples.shop.calls`` writes them there).
    calls: bool = True

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
    def from_settings(cls, shop: ShopSettings, *, calls: bool = True) -> OltpConfig:
        """The configuration of the stack's OLTP simulator, from the validated settings.

        Uses the event simulator's customers and seed, so both simulators describe the same
        people (the settings refuse more writers than customers, naming the variable).
        """
        return cls(
            customers=shop.sim_customers,
            seed=shop.sim_seed,
            writers=shop.oltp_writers,
            calls=calls,
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


def plan_call(rng: random.Random, config: OltpConfig, number: int) -> InsertCall:
    """A call's reason, sentiment and duration; ``number`` makes its id unique per writer."""
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
            else (
                mix[kind] if known > 0 and (config.calls or kind is not OpKind.INSERT_CALL) else 0
            )
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
            operations.append(plan_call(rng, config, next_call))
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
