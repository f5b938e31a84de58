"""One micro-batch of a captured table, whatever engine it lives in: the engine's loader over
its :class:`~kappa.sources.base.ChangeSource` (a PostgreSQL change table, a MariaDB binlog)."""

from __future__ import annotations

import psycopg

from kappa.edw.types import Schemas
from kappa.ingest.binlog import run_binlog_batch
from kappa.ingest.capture import run_capture_batch
from kappa.ingest.outcome import BatchOutcome
from kappa.sources.base import ChangeSource
from kappa.sources.mariadb_binlog import BinlogTable
from kappa.sources.pg_capture import ChangeTable


def run_change_batch(
    source: ChangeSource,
    edw: psycopg.Connection,
    schemas: Schemas,
    *,
    requested_end: int | None,
    run_id: str,
    max_changes: int,
    partition_key: str | None = None,
) -> BatchOutcome:
    """Apply the next committed transactions of ``source``'s table, bounded by
    ``requested_end`` (see :func:`kappa.ingest.capture.run_capture_batch` and
    :func:`kappa.ingest.binlog.run_binlog_batch`)."""
    if isinstance(source, BinlogTable):
        return run_binlog_batch(
            source,
            edw,
            schemas,
            requested_end=requested_end,
            run_id=run_id,
            max_changes=max_changes,
            partition_key=partition_key,
        )
    if isinstance(source, ChangeTable):
        return run_capture_batch(
            source.conn,
            edw,
            schemas,
            source.spec,
            requested_end=requested_end,
            run_id=run_id,
            max_changes=max_changes,
            partition_key=partition_key,
        )
    raise TypeError(f"no micro-batch loader for a change source of type {type(source).__name__}")
