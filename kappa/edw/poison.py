"""Isolating the records the database refuses, so one poison record never stalls a shard.

Validation can never be complete (a CHECK constraint, a trigger, a type the decoder does
not know): when writing a batch fails with a data error (SQLSTATE class 22, data exception,
or 23, integrity violation) the batch is bisected in savepoints to find the records the
database refuses. Only the failing part is split, so one poison record among n costs at
most 2*ceil(log2 n) probes (each a savepoint-wrapped write of a sub-batch). The probes are
rolled back; the refused records become dead letters carrying the database's own message,
and the rest is written again as a whole (a stateful step re-run on the survivors first, so
no refused record is counted in state). Any other error (a lost connection, a server gone)
still fails the batch, which is then retried. If no single record is refused (the failure
needs several rows together), the batch fails with the original error; if the database
refuses every record of a batch (of three or more), or more than ``MAX_REFUSED_RECORDS`` and 1 % of it, the
table is at fault, not the data: the batch fails with :class:`MassRefusalError`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from kappa.catalog.streams import EventContract
from kappa.decode.batch import DecodedBatch
from kappa.edw.commit import write_batch
from kappa.edw.copy import copy_frame, stage_frame
from kappa.edw.ledger import ledger_transaction
from kappa.edw.types import BatchCounts, BatchRecord, Schemas
from kappa.exceptions import MassRefusalError
from kappa.sources.base import RawBatch
from kappa.state import StateAccess
from kappa.steps.api import StepOutput

#: How the reason of a record the database refused starts.
REFUSED_PREFIX = "refused by the database"
#: SQLSTATE classes of errors caused by the data written, not by the server or the link.
DATA_ERROR_CLASSES = ("22", "23")
#: Refused records one batch may dead-letter: at least this many, or 1 % of the batch. Past
#: that the table refuses everything (a broken migration, a constraint), and dead-lettering
#: the whole log would hide it and cost a probe per record: the batch fails instead.
MAX_REFUSED_RECORDS = 16


def is_data_error(exc: BaseException) -> bool:
    """Whether ``exc`` is the database refusing the data (class 22 or 23)."""
    return isinstance(exc, psycopg.Error) and (exc.sqlstate or "")[:2] in DATA_ERROR_CLASSES


def database_message(exc: psycopg.Error) -> str:
    """The database's own words for a refusal, with its SQLSTATE and detail."""
    diag = exc.diag
    primary = diag.message_primary or str(exc).strip().splitlines()[0]
    detail = f" ({diag.message_detail})" if diag.message_detail else ""
    return f"{REFUSED_PREFIX} [{exc.sqlstate}]: {primary}{detail}"


class NoSingleRecordError(Exception):
    """Bisection found a part that fails only as a whole: no one record is to blame."""


@dataclass
class Refusals:
    """What a bisection found: refused items (index into what was bisected) with the
    database's message, and how many probes it took."""

    refused: dict[int, str]
    probes: int


def bisect_refused(
    conn: psycopg.Connection, size: int, write: Callable[[int, int], None], error: psycopg.Error
) -> Refusals:
    """Find which of items ``[0, size)`` the database refuses, given that writing them all
    failed with the data error ``error``; ``write(lo, hi)`` writes items ``[lo, hi)``.

    Runs inside the caller's transaction; everything the probes wrote is rolled back.
    Raises ``error`` when no single item is refused, and any non-data error at once.
    """
    found = Refusals({}, 0)
    limit = max(MAX_REFUSED_RECORDS, size // 100)

    def probe(lo: int, hi: int) -> psycopg.Error | None:
        found.probes += 1
        try:
            with conn.transaction():
                write(lo, hi)
        except psycopg.Error as exc:
            if not is_data_error(exc):
                raise
            return exc
        return None

    def search(lo: int, hi: int, failure: psycopg.Error) -> None:
        if hi - lo == 1:
            found.refused[lo] = database_message(failure)
            if len(found.refused) > limit or (size > 2 and len(found.refused) == size):
                raise MassRefusalError(limit, size, found.refused[min(found.refused)])
            return
        mid = (lo + hi) // 2
        left = probe(lo, mid)
        if left is not None:
            search(lo, mid, left)
        # Written after the left half (its good part kept), as the whole batch would be.
        right = probe(mid, hi)
        if right is not None:
            search(mid, hi, right)
        if left is None and right is None:
            raise NoSingleRecordError

    try:
        with conn.transaction(force_rollback=True):
            search(0, size, error)
    except NoSingleRecordError:
        raise error from None
    return found


@dataclass
class IsolatedRows:
    """Rows as finally written, the refused ones by key with the database's message, and
    the probes it took."""

    rows: pd.DataFrame
    refused: dict[int, str]
    probes: int = 0


def write_rows_isolated(
    conn: psycopg.Connection,
    rows: pd.DataFrame,
    key: str,
    write: Callable[[pd.DataFrame], None],
) -> IsolatedRows:
    """``write(rows)`` in a savepoint; when the database refuses some, bisect over the
    distinct values of ``rows[key]`` (in order of appearance: several rows of one key, such
    as both halves of a key-changing update, stand or fall together), then write the rest.
    For sources without a stateful step (change captures)."""
    result = IsolatedRows(rows, {})
    for _ in range(len(rows) + 1):
        try:
            with conn.transaction():
                write(result.rows)
            return result
        except psycopg.Error as exc:
            if not is_data_error(exc) or result.rows.empty:
                raise
            current = result.rows
            keys = pd.unique(current[key])

            def part(lo: int, hi: int, current: pd.DataFrame = current, keys: Any = keys) -> None:
                write(current[current[key].isin(keys[lo:hi])])

            found = bisect_refused(conn, len(keys), part, exc)
            result.probes += found.probes
            refused = {int(keys[i]): why for i, why in found.refused.items()}
            result.refused.update(refused)
            result.rows = current[~current[key].isin(list(refused))].reset_index(drop=True)
    raise AssertionError("unreachable: every round refuses at least one key")


# -- event batches -----------------------------------------------------------------------------


#: Re-runs a stateful step on the surviving records (same prior state, same completeness).
Rerun = Callable[[DecodedBatch], StepOutput]


@dataclass
class IsolatedLoad:
    """A batch as finally written: the decoded batch with refused records moved to its dead
    letters, the step's output on the survivors, and the probes it took (0: no refusal)."""

    decoded: DecodedBatch
    output: StepOutput | None
    probes: int = 0


def refuse_rows(decoded: DecodedBatch, raw: RawBatch, offsets: Mapping[int, str]) -> DecodedBatch:
    """``decoded`` with the rows at ``offsets`` moved to its dead letters (raw key and
    value from ``raw``), each with its reason."""
    if not offsets:
        return decoded
    index = {offset: i for i, offset in enumerate(raw.offsets)}
    at = [index[o] for o in offsets]
    refused = pd.DataFrame(
        {
            "offset": np.asarray(list(offsets), dtype=np.int64),
            "broker_time": pd.to_datetime(
                pd.Series([raw.timestamps[i] for i in at], dtype="int64"), unit="ms", utc=True
            ),
            "key": [raw.keys[i] for i in at],
            "value": [raw.values[i] for i in at],
            "reason": list(offsets.values()),
        }
    )
    dead = (
        pd.concat([decoded.dead_letters, refused], ignore_index=True)
        if not decoded.dead_letters.empty
        else refused
    )
    keep = ~decoded.rows["kafka_offset"].isin(list(offsets)).to_numpy()
    return replace(
        decoded,
        rows=decoded.rows[keep].reset_index(drop=True),
        dead_letters=dead.sort_values("offset", kind="stable").reset_index(drop=True),
    )


def _probe_writer(
    conn: psycopg.Connection,
    schemas: Schemas,
    contract: EventContract,
    rows: pd.DataFrame,
    side_tables: Mapping[str, pd.DataFrame],
) -> Callable[[int, int], None]:
    """Writes rows ``[lo, hi)`` (in log order, as the batch write does) and the side-table
    rows of their events."""
    fact = sql.Identifier(schemas.edw, contract.table)
    row_of = {event_id: i for i, event_id in enumerate(rows["event_id"].astype(str))}
    owners = {
        name: frame["event_id"].astype(str).map(row_of).to_numpy(dtype=float, na_value=np.nan)
        for name, frame in side_tables.items()
    }

    def write(lo: int, hi: int) -> None:
        stage = stage_frame(conn, f"probe_{contract.table}", fact, rows.iloc[lo:hi])
        conn.execute(
            sql.SQL(
                "INSERT INTO {fact} SELECT * FROM {stage} ORDER BY kafka_offset "
                "ON CONFLICT (event_id) DO NOTHING"
            ).format(fact=fact, stage=stage)
        )
        conn.execute(sql.SQL("DROP TABLE {}").format(stage))
        for name, frame in side_tables.items():
            mine = (owners[name] >= lo) & (owners[name] < hi)
            copy_frame(conn, sql.Identifier(schemas.edw, name), frame[mine])

    return write


def write_isolated(
    conn: psycopg.Connection,
    schemas: Schemas,
    contract: EventContract,
    record: BatchRecord,
    raw: RawBatch,
    decoded: DecodedBatch,
    counts: BatchCounts,
    *,
    output: StepOutput | None = None,
    rerun: Rerun | None = None,
    cache: StateAccess | None = None,
) -> IsolatedLoad:
    """:func:`~kappa.edw.commit.write_batch` inside the caller's ledger transaction, with
    the records the database refuses isolated into dead letters (see the module docstring).
    ``rerun`` recomputes a stateful step's output for the survivors."""
    load = IsolatedLoad(decoded, output)
    # Each round removes at least one record, so this ends; usually after one or two.
    for _ in range(len(decoded.rows) + 1):
        try:
            with conn.transaction():
                write_batch(
                    conn,
                    schemas,
                    contract,
                    record,
                    load.decoded,
                    counts,
                    rows=load.output.rows if load.output else None,
                    side_tables=load.output.side_tables if load.output else None,
                    state=load.output.state if load.output else None,
                    cache=cache,
                )
            return load
        except psycopg.Error as exc:
            if not is_data_error(exc):
                raise
            rows = load.output.rows if load.output else load.decoded.rows
            if rows.empty:
                raise
            sides = load.output.side_tables if load.output else {}
            found = bisect_refused(
                conn, len(rows), _probe_writer(conn, schemas, contract, rows, sides), exc
            )
            load.probes += found.probes
            offsets = rows["kafka_offset"].to_numpy(dtype=np.int64)
            load.decoded = refuse_rows(
                load.decoded, raw, {int(offsets[i]): why for i, why in found.refused.items()}
            )
            if load.output is not None:
                assert rerun is not None, "a stateful step's output without a way to re-run it"
                load.output = rerun(load.decoded)
    raise AssertionError("unreachable: every round refuses at least one record")


def commit_isolated(
    conn: psycopg.Connection,
    schemas: Schemas,
    contract: EventContract,
    record: BatchRecord,
    raw: RawBatch,
    decoded: DecodedBatch,
    *,
    output: StepOutput | None = None,
    rerun: Rerun | None = None,
    cache: StateAccess | None = None,
) -> tuple[BatchRecord, IsolatedLoad]:
    """:func:`~kappa.edw.commit.commit_batch` with refused records isolated: the batch's
    output, dead letters, state and ledger row in one transaction; state reaches the
    cache's memory only after commit. Returns the record with its final counts."""
    with ledger_transaction(conn, schemas, record) as counts:
        load = write_isolated(
            conn,
            schemas,
            contract,
            record,
            raw,
            decoded,
            counts,
            output=output,
            rerun=rerun,
            cache=cache,
        )
    for store, values in (load.output.state if load.output else {}).items():
        assert cache is not None
        cache.remember(store, record.shard, values)
    final = replace(
        record,
        received=counts.received,
        loaded=counts.loaded,
        dead_lettered=counts.dead_lettered,
        deduplicated=counts.deduplicated,
    )
    return final, load
