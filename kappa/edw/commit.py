"""The exactly-once batch commit: rows, dead letters and the ledger row in one transaction.

A batch's output rows, its dead letters and its ledger row commit in one transaction,
guarded by the ledger head of its shard (``SELECT ... FOR UPDATE``): a batch commits only if
the ledger ends exactly where the batch starts, so no two batches can cover the same
positions and a retried or duplicated run changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pandas as pd
import psycopg
from psycopg import sql

from kappa.catalog.streams import EventContract
from kappa.decode.batch import DecodedBatch
from kappa.edw.copy import copy_frame, stage_frame, write_dead_letters
from kappa.edw.ledger import (
    ledger_transaction,
)
from kappa.edw.types import BatchCounts, BatchRecord, Schemas

if TYPE_CHECKING:
    from kappa.state import StateAccess


def commit_batch(
    conn: psycopg.Connection,
    schemas: Schemas,
    contract: EventContract,
    record: BatchRecord,
    decoded: DecodedBatch,
    *,
    rows: pd.DataFrame | None = None,
    side_tables: Mapping[str, pd.DataFrame] | None = None,
    state: Mapping[str, Mapping[str, Any]] | None = None,
    cache: StateAccess | None = None,
) -> BatchRecord:
    """Load one batch of events exactly once: fact rows (``rows``, the decoded rows unless a
    stateful step augmented them), its step's side tables, state, dead letters and the
    ledger row, in one transaction. State reaches the cache's memory only after commit.

    Returns the record with the final counts (``deduplicated`` includes events already in
    the EDW from earlier batches).
    """
    with ledger_transaction(conn, schemas, record) as counts:
        write_batch(
            conn,
            schemas,
            contract,
            record,
            decoded,
            counts,
            rows=rows,
            side_tables=side_tables,
            state=state,
            cache=cache,
        )
    for store, values in (state or {}).items():
        assert cache is not None
        cache.remember(store, record.shard, values)
    return replace(
        record,
        received=counts.received,
        loaded=counts.loaded,
        dead_lettered=counts.dead_lettered,
        deduplicated=counts.deduplicated,
    )


def write_batch(
    conn: psycopg.Connection,
    schemas: Schemas,
    contract: EventContract,
    record: BatchRecord,
    decoded: DecodedBatch,
    counts: BatchCounts,
    *,
    rows: pd.DataFrame | None = None,
    side_tables: Mapping[str, pd.DataFrame] | None = None,
    state: Mapping[str, Mapping[str, Any]] | None = None,
    cache: StateAccess | None = None,
) -> None:
    """Write one batch's output inside the caller's ledger transaction and fill ``counts``."""
    fact = sql.Identifier(schemas.edw, contract.table)
    rows = decoded.rows if rows is None else rows
    counts.received = decoded.received
    counts.loaded = load_rows(conn, fact, f"stage_{contract.table}", rows)
    for table, frame in (side_tables or {}).items():
        copy_frame(conn, sql.Identifier(schemas.edw, table), frame)
    for store, values in (state or {}).items():
        assert cache is not None, "state without a cache to save it"
        cache.save(conn, store, record.shard, record.end, values)
    counts.dead_lettered = write_dead_letters(
        conn, schemas, record, decoded.dead_letters.rename(columns={"offset": "position"})
    )


def load_rows(
    conn: psycopg.Connection, fact: sql.Identifier, stage_name: str, rows: pd.DataFrame
) -> int:
    """Append ``rows`` (unique ``event_id`` within them) to ``fact`` in offset order; returns
    how many were new.

    One pass: COPY straight into the fact table inside a savepoint. The batch's events
    already in the EDW were dropped before its step, so that is the whole write nearly
    always; only if the COPY meets an ``event_id`` the table holds (a batch of another
    shard committed the same event meanwhile, or a stateless asset, which does not look
    first) is it rolled back and the rows go through a staging table and ``INSERT ...
    ON CONFLICT (event_id) DO NOTHING``, which settles the duplicates in the statement that
    writes.
    """
    if rows.empty:
        return 0
    ordered = rows.sort_values("kafka_offset", kind="stable")
    try:
        with conn.transaction():
            copy_frame(conn, fact, ordered)
    except psycopg.errors.UniqueViolation as exc:
        if "event_id" not in (exc.diag.message_detail or ""):
            raise
    else:
        return len(ordered)
    stage = stage_frame(conn, stage_name, fact, ordered)
    loaded = conn.execute(
        sql.SQL(
            "INSERT INTO {fact} SELECT * FROM {stage} ORDER BY kafka_offset "
            "ON CONFLICT (event_id) DO NOTHING"
        ).format(fact=fact, stage=stage)
    ).rowcount
    conn.execute(sql.SQL("DROP TABLE {}").format(stage))  # a transaction may hold several batches
    return loaded
