"""Reloading one time partition of a captured table from its change table (a backfill): the
change table's part of :func:`kappa.ingest.reprocess.reprocess_window`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

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
from kappa.edw.ledger import insert_ledger_row
from kappa.edw.poison import write_rows_isolated
from kappa.edw.types import BatchCounts, BatchRecord, Schemas
from kappa.exceptions import ReprocessError
from kappa.sources.base import TRANSACTIONS


@dataclass
class CaptureWindowReload:
    """What reloading one time partition of a captured table did."""

    received: int = 0
    loaded: int = 0
    dead_lettered: int = 0
    removed_rows: int = 0
    #: Extra writes it took to isolate changes the target refused (0: none refused).
    probes: int = 0


def reload_capture_window(
    conn: psycopg.Connection,
    schemas: Schemas,
    spec: CaptureSpec,
    record: BatchRecord,
    *,
    head_end: int,
    read: Callable[[int, int], pd.DataFrame],
    history: Callable[[list[tuple[str, ...]], int], pd.DataFrame],
) -> CaptureWindowReload:
    """Reload time partition ``record.partition_key`` of ``spec.asset``: transactions
    ``[record.start, record.end)``, which its ledger batches cover, inside the replacement's
    transaction (:func:`kappa.edw.window.replace_window` holds the head's lock and brings
    it up to date after). The batches, their dead letters and every row of the keys the
    transactions touched are replaced; the batches become one ledger row.

    ``read(start, end)`` gives the changes of transactions ``[start, end)``, ``history(keys,
    end)`` every change of ``keys`` below ``end`` (``head_end``: the ledger's end). Raises
    :class:`ReprocessError` when the change table no longer holds what the ledger loaded, or
    a batch of another partition lies inside; the transaction then changes nothing.
    """
    meta = sql.Identifier(schemas.meta)
    source, window = record.source, record.partition_key
    start, end = record.start, record.end

    def refuse(detail: str) -> ReprocessError:
        return ReprocessError(
            spec.asset, source, 0, window or "?", start, end, detail, positions=TRANSACTIONS.name
        )

    batches = conn.execute(
        sql.SQL(
            "SELECT start_position, end_position, received, watermark FROM {}.batch_ledger "
            "WHERE asset = %s AND source = %s AND shard = 0 AND partition_key = %s "
            "ORDER BY start_position"
        ).format(meta),
        (spec.asset, source, window),
    ).fetchall()
    result = CaptureWindowReload()
    foreign = conn.execute(
        sql.SQL(
            "SELECT start_position, end_position, partition_key FROM {}.batch_ledger "
            "WHERE asset = %s AND source = %s AND shard = 0 AND start_position >= %s "
            "AND start_position < %s AND partition_key IS DISTINCT FROM %s LIMIT 1"
        ).format(meta),
        (spec.asset, source, start, end, window),
    ).fetchone()
    if foreign is not None:
        raise refuse(
            f"ledger batch [{foreign[0]}, {foreign[1]}) of partition {foreign[2] or '(none)'} "
            "lies inside it: replay the asset from the beginning."
        )
    changes = read(start, end)
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
    keys = _touched_keys(conn, schemas, spec, stage, start, end)
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
        conn, schemas, spec, history(keys, head_end) if keys else changes.iloc[0:0]
    )
    rebuilt = validate_changes(spec, known).rows
    result.removed_rows = delete_keys(conn, schemas, spec, keys)

    def write(rows: pd.DataFrame) -> None:
        staged = stage_frame(conn, f"stage_{spec.name}", None, rows, columns_ddl=stage_ddl(spec))
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
    record = replace(record, watermark=batches[-1][3])
    counts = BatchCounts(
        received=len(changes),
        loaded=int(validated.rows["source_change_id"].nunique()) - len(isolated.refused),
        dead_lettered=write_dead_letters(conn, schemas, record, dead),
    )
    insert_ledger_row(conn, schemas, record, counts)
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
