"""Replacing one time partition of a captured table from its change table (a backfill)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd
import psycopg
from psycopg import sql

from kappa.catalog.captures import CaptureSpec
from kappa.changes.merge import (
    delete_keys,
    merge,
    without_dead_letters,
)
from kappa.changes.target import (
    stage_ddl,
    written_by,
)
from kappa.changes.validate import (
    change_dead_letters,
    validate_changes,
)
from kappa.edw.copy import stage_frame, write_dead_letters
from kappa.edw.ledger import insert_ledger_row, lock_head
from kappa.edw.poison import write_rows_isolated
from kappa.edw.types import BatchCounts, BatchRecord, Schemas
from kappa.exceptions import ReprocessError
from kappa.sources.base import TRANSACTIONS, check_continuity


@dataclass
class CaptureWindowReplacement:
    """What replacing one time partition of a captured table did."""

    start: int = 0
    end: int = 0
    received: int = 0
    loaded: int = 0
    dead_lettered: int = 0
    removed_rows: int = 0
    #: Extra writes it took to isolate changes the target refused (0: none refused).
    probes: int = 0


def replace_capture_window(
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: CaptureSpec,
    *,
    epoch: str,
    window: str,
    run_id: str,
    read: Callable[[int, int], pd.DataFrame],
    history: Callable[[list[tuple[str, ...]], int], pd.DataFrame],
) -> CaptureWindowReplacement | None:
    """Replace time partition ``window`` of ``spec.asset`` in one transaction: its ledger
    batches, dead letters and every row of the keys its transactions touched.

    ``read(start, end)`` gives the changes of transactions ``[start, end)``, ``history(keys,
    end)`` every change of ``keys`` below ``end``. Returns None when the ledger holds no batch
    of the partition (nothing became visible in it). Raises :class:`LogResetError` for a
    recreated change table and :class:`ReprocessError` when the change table no longer holds
    what the ledger loaded; in both cases nothing is changed.
    """
    meta = sql.Identifier(schemas.meta)
    source = str(spec.change_table)
    with conn.transaction():
        head = lock_head(conn, schemas, spec.asset, source, 0)
        if head is None:
            return None
        check_continuity(spec.asset, source, 0, head, None, epoch, positions=TRANSACTIONS)
        batches = conn.execute(
            sql.SQL(
                "SELECT start_position, end_position, received, watermark FROM {}.batch_ledger "
                "WHERE asset = %s AND source = %s AND shard = 0 AND partition_key = %s "
                "ORDER BY start_position"
            ).format(meta),
            (spec.asset, source, window),
        ).fetchall()
        if not batches:
            return None
        result = CaptureWindowReplacement(start=batches[0][0], end=batches[-1][1])

        def refuse(detail: str) -> ReprocessError:
            return ReprocessError(
                spec.asset,
                source,
                0,
                window,
                result.start,
                result.end,
                detail,
                positions=TRANSACTIONS.name,
            )

        foreign = conn.execute(
            sql.SQL(
                "SELECT start_position, end_position, partition_key FROM {}.batch_ledger "
                "WHERE asset = %s AND source = %s AND shard = 0 AND start_position >= %s "
                "AND start_position < %s AND partition_key IS DISTINCT FROM %s LIMIT 1"
            ).format(meta),
            (spec.asset, source, result.start, result.end, window),
        ).fetchone()
        if foreign is not None:
            raise refuse(
                f"ledger batch [{foreign[0]}, {foreign[1]}) of partition {foreign[2] or '(none)'} "
                "lies inside it: replay the asset from the beginning."
            )
        changes = read(result.start, result.end)
        expected = sum(int(b[2]) for b in batches)
        if len(changes) != expected:
            raise refuse(
                f"the change table holds {len(changes)} changes of these transactions, the ledger "
                f"loaded {expected}: changes were purged or rewritten and cannot be read again."
            )
        validated = validate_changes(spec, changes)
        stage = stage_frame(
            conn, f"stage_{spec.name}", None, validated.rows, columns_ddl=stage_ddl(spec)
        )
        keys = _touched_keys(conn, schemas, spec, stage, result.start, result.end)
        change_ids = [int(c) for c in changes["change_id"]]
        conn.execute(
            sql.SQL(
                "DELETE FROM {}.dead_letter WHERE asset = %s AND source = %s AND shard = 0 "
                "AND position = ANY(%s)"
            ).format(meta),
            (spec.asset, source, change_ids),
        )
        conn.execute(
            sql.SQL(
                "DELETE FROM {}.batch_ledger WHERE asset = %s AND source = %s AND shard = 0 "
                "AND partition_key = %s"
            ).format(meta),
            (spec.asset, source, window),
        )
        conn.execute(sql.SQL("DROP TABLE {}").format(stage))
        # Every touched key is rebuilt from its whole history (less the changes dead-lettered
        # by other partitions' batches), the changes the target refuses isolated.
        known = without_dead_letters(
            conn, schemas, spec, history(keys, head.end) if keys else changes.iloc[0:0]
        )
        rebuilt = validate_changes(spec, known).rows
        result.removed_rows = delete_keys(conn, schemas, spec, keys)

        def write(rows: pd.DataFrame) -> None:
            staged = stage_frame(
                conn, f"stage_{spec.name}", None, rows, columns_ddl=stage_ddl(spec)
            )
            if not rows.empty:
                merge(conn, schemas, spec, staged)
            conn.execute(sql.SQL("DROP TABLE {}").format(staged))

        isolated = write_rows_isolated(conn, rebuilt, "source_change_id", write)
        elsewhere = sorted(set(isolated.refused) - set(change_ids))
        if elsewhere:
            raise refuse(
                f"the target now refuses changes of other partitions (change ids "
                f"{', '.join(map(str, elsewhere[:5]))}): reprocess those partitions, or replay "
                "the asset from the beginning."
            )
        refusals = changes[changes["change_id"].isin(list(isolated.refused))]
        dead = pd.concat(
            [
                validated.dead_letters,
                change_dead_letters(
                    refusals, [isolated.refused[int(c)] for c in refusals["change_id"]]
                ),
            ],
            ignore_index=True,
        )
        record = BatchRecord(
            spec.asset,
            source,
            0,
            epoch,
            result.start,
            result.end,
            run_id,
            window,
            watermark=batches[-1][3],
        )
        counts = BatchCounts(
            received=len(changes),
            loaded=int(validated.rows["source_change_id"].nunique()) - len(isolated.refused),
            dead_lettered=write_dead_letters(conn, schemas, record, dead),
        )
        insert_ledger_row(conn, schemas, record, counts)
        conn.execute(
            sql.SQL(
                "UPDATE {meta}.ledger_head SET updated_at = clock_timestamp(), batches = "
                "(SELECT count(*) FROM {meta}.batch_ledger WHERE asset = %s AND source = %s "
                "AND shard = 0) WHERE asset = %s AND source = %s AND shard = 0"
            ).format(meta=meta),
            (spec.asset, source, spec.asset, source),
        )
        result.received, result.loaded, result.dead_lettered, result.probes = (
            counts.received,
            counts.loaded,
            counts.dead_lettered,
            isolated.probes,
        )
    return result


def _touched_keys(
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: CaptureSpec,
    stage: sql.Identifier,
    start: int,
    end: int,
) -> list[tuple[str, ...]]:
    """The keys (as text) of the staged changes, and of the target rows that transactions
    ``[start, end)`` wrote or closed (a change that is now a dead letter still touched its key)."""
    keys = sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in spec.keys)
    rows = conn.execute(
        sql.SQL(
            "SELECT {keys} FROM {stage} UNION SELECT {keys} FROM {target} WHERE {written}"
        ).format(
            keys=keys,
            stage=stage,
            target=sql.Identifier(schemas.edw, spec.target),
            written=written_by(spec),
        ),
        {"start": start, "end": end},
    ).fetchall()
    return sorted(tuple(row) for row in rows)
