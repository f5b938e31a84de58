"""The EDW in PostgreSQL: schema, the batch ledger, and the exactly-once batch commit.

A batch's output rows, its dead letters and its ledger row commit in one transaction,
guarded by the ledger head of its shard (``SELECT ... FOR UPDATE``): a batch commits only if
the ledger ends exactly where the batch starts, so no two batches can cover the same
positions and a retried or duplicated run changes nothing.
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import pandas as pd
import psycopg
from psycopg import sql

from kappa.contracts import EventContract, fact_columns
from kappa.decode import DecodedBatch
from kappa.exceptions import BatchSupersededError, ConfigurationError, LogResetError
from kappa.settings import redact

if TYPE_CHECKING:
    from kappa.state import StateAccess


@dataclass(frozen=True)
class Schemas:
    """Where the EDW tables (``edw``) and the machinery tables (``meta``) live."""

    edw: str = "edw"
    meta: str = "kappa"


@dataclass(frozen=True)
class LedgerHead:
    """Where a shard's ledger ends: the next batch starts at ``end``."""

    asset: str
    source: str
    shard: int
    epoch: str
    end: int
    batches: int
    watermark: datetime | None = None


@dataclass(frozen=True)
class BatchRecord:
    """The coordinates and counts of one committed batch (one ledger row)."""

    asset: str
    source: str
    shard: int
    epoch: str
    start: int
    end: int
    run_id: str
    partition_key: str | None = None
    #: Filled in by the commit (see :class:`BatchCounts`).
    received: int = 0
    loaded: int = 0
    dead_lettered: int = 0
    deduplicated: int = 0
    watermark: datetime | None = None
    #: Planned with no ledger head (the shard's first batch): only then may one be created.
    fresh: bool = False


@contextmanager
def connect(
    url: str, *, setting: str = "KAPPA_EDW_URL", statement_timeout_s: float | None = None
) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the EDW: every write goes through an explicit
    ``conn.transaction()``. A refused or malformed URL names ``setting``.
    ``statement_timeout_s`` bounds every statement (sensors must answer within 60 s)."""
    options = (
        f"-c statement_timeout={int(statement_timeout_s * 1000)}" if statement_timeout_s else ""
    )
    try:
        conn = psycopg.connect(
            url, connect_timeout=10, application_name="kappa-etl", autocommit=True, options=options
        )
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConfigurationError(setting, f"cannot connect to {redact(url)}: {reason}") from None
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(setting, f"not a usable PostgreSQL URL: {exc}") from None
    try:
        yield conn
    finally:
        conn.close()


def _fact_ddl(schemas: Schemas, contract: EventContract) -> sql.Composed:
    columns = sql.SQL(",\n  ").join(
        [
            sql.SQL("{} {} NOT NULL").format(sql.Identifier(name), sql.SQL(sql_type))
            for name, sql_type in fact_columns(contract)
        ]
        + [
            sql.SQL("{} {}").format(sql.Identifier(name), sql.SQL(sql_type))
            for name, sql_type in contract.derived
        ]
    )
    table = sql.Identifier(schemas.edw, contract.table)
    return sql.SQL(
        """
CREATE TABLE IF NOT EXISTS {table} (
  {columns},
  PRIMARY KEY (event_id)
);
CREATE INDEX IF NOT EXISTS {position_index} ON {table} (topic, kafka_partition, kafka_offset);
CREATE INDEX IF NOT EXISTS {time_index} ON {table} (event_time);
{derived}
"""
    ).format(
        derived=sql.SQL("\n").join(
            sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {};").format(
                table, sql.Identifier(name), sql.SQL(sql_type)
            )
            for name, sql_type in contract.derived
        ),
        table=table,
        columns=columns,
        position_index=sql.Identifier(f"{contract.table}_position_idx"),
        time_index=sql.Identifier(f"{contract.table}_event_time_idx"),
    )


_META_DDL = """
CREATE TABLE IF NOT EXISTS {meta}.ledger_head (
  asset text NOT NULL,
  source text NOT NULL,
  shard integer NOT NULL,
  epoch text NOT NULL DEFAULT '',
  end_position bigint NOT NULL,
  batches bigint NOT NULL DEFAULT 0,
  updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (asset, source, shard)
);
ALTER TABLE {meta}.ledger_head ADD COLUMN IF NOT EXISTS watermark timestamptz;
CREATE TABLE IF NOT EXISTS {meta}.batch_ledger (
  batch_id bigserial PRIMARY KEY,
  asset text NOT NULL,
  source text NOT NULL,
  shard integer NOT NULL,
  epoch text NOT NULL DEFAULT '',
  start_position bigint NOT NULL,
  end_position bigint NOT NULL,
  run_id text NOT NULL,
  partition_key text,
  received integer NOT NULL,
  loaded integer NOT NULL,
  dead_lettered integer NOT NULL,
  deduplicated integer NOT NULL,
  committed_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  CHECK (end_position > start_position),
  CHECK (received = loaded + dead_lettered + deduplicated),
  UNIQUE (asset, source, shard, epoch, start_position)
);
ALTER TABLE {meta}.batch_ledger ADD COLUMN IF NOT EXISTS watermark timestamptz;
CREATE TABLE IF NOT EXISTS {meta}.state (
  store text NOT NULL,
  shard integer NOT NULL,
  key text NOT NULL,
  position bigint NOT NULL,
  value jsonb NOT NULL,
  PRIMARY KEY (store, shard, key, position)
);
CREATE TABLE IF NOT EXISTS {meta}.dead_letter (
  dead_letter_id bigserial PRIMARY KEY,
  asset text NOT NULL,
  source text NOT NULL,
  shard integer NOT NULL,
  epoch text NOT NULL DEFAULT '',
  position bigint NOT NULL,
  broker_time timestamptz,
  raw_key bytea,
  raw_value bytea,
  reason text NOT NULL,
  run_id text NOT NULL,
  dead_lettered_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  UNIQUE (asset, source, shard, epoch, position)
);
"""


_FRAUD_ALERT_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
  event_id uuid NOT NULL,
  rule text NOT NULL,
  score numeric(4, 3) NOT NULL,
  evidence jsonb NOT NULL,
  customer_id text NOT NULL,
  event_time timestamptz NOT NULL,
  topic text NOT NULL,
  kafka_partition integer NOT NULL,
  kafka_offset bigint NOT NULL,
  PRIMARY KEY (event_id, rule)
);
"""


def ensure_schema(
    conn: psycopg.Connection, schemas: Schemas, contracts: Sequence[EventContract]
) -> None:
    """Create schemas and tables that do not exist yet; running it again changes nothing."""
    with conn.transaction():
        # Serialise concurrent bootstraps (stack start, tests in parallel) on one lock.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('kappa-etl:ensure_schema'))")
        for schema in (schemas.edw, schemas.meta):
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL(_META_DDL).format(meta=sql.Identifier(schemas.meta)))
        for contract in contracts:
            conn.execute(_fact_ddl(schemas, contract))
        conn.execute(
            sql.SQL(_FRAUD_ALERT_DDL).format(table=sql.Identifier(schemas.edw, "fraud_alert"))
        )


def read_head(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str, shard: int
) -> LedgerHead | None:
    """The ledger head of one shard, or None before its first batch."""
    row = conn.execute(
        sql.SQL(
            "SELECT epoch, end_position, batches, watermark FROM {}.ledger_head "
            "WHERE asset = %s AND source = %s AND shard = %s"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source, shard),
    ).fetchone()
    if row is None:
        return None
    return LedgerHead(
        asset, source, shard, epoch=row[0], end=row[1], batches=row[2], watermark=row[3]
    )


def read_heads(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str
) -> dict[int, LedgerHead]:
    """The ledger heads of every shard of ``source`` for ``asset``."""
    rows = conn.execute(
        sql.SQL(
            "SELECT shard, epoch, end_position, batches FROM {}.ledger_head "
            "WHERE asset = %s AND source = %s"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source),
    ).fetchall()
    return {r[0]: LedgerHead(asset, source, r[0], epoch=r[1], end=r[2], batches=r[3]) for r in rows}


def _lock_head(conn: psycopg.Connection, schemas: Schemas, record: BatchRecord) -> LedgerHead:
    meta = sql.Identifier(schemas.meta)
    select = sql.SQL(
        "SELECT epoch, end_position, batches FROM {}.ledger_head "
        "WHERE asset = %s AND source = %s AND shard = %s FOR UPDATE"
    ).format(meta)
    key = (record.asset, record.source, record.shard)
    row = conn.execute(select, key).fetchone()
    if row is None:
        if not record.fresh:
            # The head this batch was planned from is gone: the ledger was reset (replay).
            raise BatchSupersededError(
                f"{record.asset}: {record.source}[{record.shard}] ledger was reset while this "
                f"batch [{record.start}, {record.end}) ran; the next batch starts afresh"
            )
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.ledger_head (asset, source, shard, epoch, end_position) "
                "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING"
            ).format(meta),
            (*key, record.epoch, record.start),
        )
        row = conn.execute(select, key).fetchone()
    assert row is not None
    return LedgerHead(record.asset, record.source, record.shard, row[0], row[1], row[2])


def copy_frame(conn: psycopg.Connection, table: sql.Composable, frame: pd.DataFrame) -> None:
    if frame.empty:
        return
    buffer = io.StringIO()
    # "\r\n" line ends make the csv writer quote every field holding a "\r" or "\n"; with
    # "\n" alone a bare carriage return in a text value fails the whole COPY.
    frame.to_csv(
        buffer,
        index=False,
        header=False,
        date_format="%Y-%m-%dT%H:%M:%S.%f%z",
        lineterminator="\r\n",
    )
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in frame.columns)
    with conn.cursor().copy(
        sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(table, columns)
    ) as copy:
        copy.write(buffer.getvalue())


@dataclass
class BatchCounts:
    """Counts a batch's writer fills in inside :func:`ledger_transaction`."""

    received: int = 0
    loaded: int = 0
    dead_lettered: int = 0

    @property
    def deduplicated(self) -> int:
        return self.received - self.loaded - self.dead_lettered


@contextmanager
def ledger_transaction(
    conn: psycopg.Connection, schemas: Schemas, record: BatchRecord
) -> Iterator[BatchCounts]:
    """One transaction for a batch's output and its ledger row, or for nothing.

    Locks the shard's ledger head; the body writes the output and fills the counts; on the
    way out the ledger row and the new head are written in the same transaction. Raises
    :class:`BatchSupersededError` if the ledger no longer ends where the batch starts and
    :class:`LogResetError` if the ledger belongs to another incarnation of the source; in
    both cases nothing is written.
    """
    meta = sql.Identifier(schemas.meta)
    counts = BatchCounts()
    with conn.transaction():
        head = _lock_head(conn, schemas, record)
        if head.epoch != record.epoch:
            raise LogResetError(
                record.asset,
                record.source,
                record.shard,
                f"was recreated: the ledger was written for source id {head.epoch or '-'} "
                f"up to position {head.end}, the source now has id {record.epoch or '-'}.",
            )
        if head.end != record.start:
            raise BatchSupersededError(
                f"{record.asset}: {record.source}[{record.shard}] ledger ends at {head.end}, "
                f"batch starts at {record.start}; another run committed first"
            )
        yield counts
        conn.execute(
            sql.SQL(
                "INSERT INTO {}.batch_ledger (asset, source, shard, epoch, start_position, "
                "end_position, run_id, partition_key, received, loaded, dead_lettered, deduplicated, "
                "watermark) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
            ).format(meta),
            (
                record.asset,
                record.source,
                record.shard,
                record.epoch,
                record.start,
                record.end,
                record.run_id,
                record.partition_key,
                counts.received,
                counts.loaded,
                counts.dead_lettered,
                counts.deduplicated,
                record.watermark,
            ),
        )
        conn.execute(
            sql.SQL(
                "UPDATE {}.ledger_head SET end_position = %s, batches = batches + 1, "
                "watermark = %s, updated_at = clock_timestamp() "
                "WHERE asset = %s AND source = %s AND shard = %s"
            ).format(meta),
            (record.end, record.watermark, record.asset, record.source, record.shard),
        )


def write_dead_letters(
    conn: psycopg.Connection, schemas: Schemas, record: BatchRecord, dead: pd.DataFrame
) -> int:
    """COPY dead letters (``position``, ``broker_time``, ``key``, ``value``, ``reason``)."""
    if dead.empty:
        return 0
    with conn.cursor().copy(
        sql.SQL(
            "COPY {}.dead_letter (asset, source, shard, epoch, position, broker_time, "
            "raw_key, raw_value, reason, run_id) FROM STDIN"
        ).format(sql.Identifier(schemas.meta))
    ) as copy:
        for position, broker_time, key, value, reason in dead.itertuples(index=False):
            copy.write_row(
                (
                    record.asset,
                    record.source,
                    record.shard,
                    record.epoch,
                    int(position),
                    None if pd.isna(broker_time) else broker_time.to_pydatetime(),
                    key,
                    value,
                    reason,
                    record.run_id,
                )
            )
    return len(dead)


def stage_frame(
    conn: psycopg.Connection,
    name: str,
    like: sql.Composable | None,
    frame: pd.DataFrame,
    columns_ddl: sql.Composable | None = None,
) -> sql.Identifier:
    """A temporary table (dropped at commit) holding ``frame``, loaded with COPY."""
    stage = sql.Identifier(name)
    if like is not None:
        conn.execute(
            sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS) ON COMMIT DROP").format(
                stage, like
            )
        )
    else:
        assert columns_ddl is not None
        conn.execute(sql.SQL("CREATE TEMP TABLE {} ({}) ON COMMIT DROP").format(stage, columns_ddl))
    copy_frame(conn, stage, frame)
    return stage


def existing_event_ids(
    conn: psycopg.Connection, schemas: Schemas, contract: EventContract, ids: list[str]
) -> set[str]:
    """Which of ``ids`` the fact table holds already (one query for the whole batch)."""
    if not ids:
        return set()
    rows = conn.execute(
        sql.SQL("SELECT event_id::text FROM {} WHERE event_id = ANY(%s::uuid[])").format(
            sql.Identifier(schemas.edw, contract.table)
        ),
        (ids,),
    ).fetchall()
    return {r[0] for r in rows}


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
    stateful step augmented them), side tables (fraud alerts), state, dead letters and the
    ledger row, in one transaction. State reaches the cache's memory only after commit.

    Returns the record with the final counts (``deduplicated`` includes events already in
    the EDW from earlier batches).
    """
    fact = sql.Identifier(schemas.edw, contract.table)
    rows = decoded.rows if rows is None else rows
    with ledger_transaction(conn, schemas, record) as counts:
        stage = stage_frame(conn, f"stage_{contract.table}", fact, rows)
        counts.received = decoded.received
        counts.loaded = conn.execute(
            sql.SQL(
                "INSERT INTO {fact} SELECT * FROM {stage} ORDER BY kafka_offset "
                "ON CONFLICT (event_id) DO NOTHING"
            ).format(fact=fact, stage=stage)
        ).rowcount
        for table, frame in (side_tables or {}).items():
            copy_frame(conn, sql.Identifier(schemas.edw, table), frame)
        for store, values in (state or {}).items():
            assert cache is not None, "state without a cache to save it"
            cache.save(conn, store, record.shard, record.end, values)
        counts.dead_lettered = write_dead_letters(
            conn, schemas, record, decoded.dead_letters.rename(columns={"offset": "position"})
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


@dataclass(frozen=True)
class ReplayReset:
    """What :func:`reset_for_replay` removed."""

    rows: int
    dead_letters: int
    batches: int


def reset_for_replay(
    conn: psycopg.Connection,
    schemas: Schemas,
    table: str,
    asset: str,
    *,
    side_tables: Sequence[str] = (),
) -> ReplayReset:
    """Forget everything ``asset`` loaded, in one transaction, so it reloads from the log start.

    Rows, side-table rows (fraud alerts of its events), state, dead letters and ledger go
    together: the EDW never holds rows or state the ledger does not account for.
    """
    meta = sql.Identifier(schemas.meta)
    fact = sql.Identifier(schemas.edw, table)
    with conn.transaction():
        # Stop batches of this asset from committing meanwhile: they wait on the heads, then
        # find them gone and give up (see _lock_head).
        conn.execute(
            sql.SQL("SELECT 1 FROM {}.ledger_head WHERE asset = %s FOR UPDATE").format(meta),
            (asset,),
        )
        for side in side_tables:
            conn.execute(
                sql.SQL(
                    "DELETE FROM {side} WHERE event_id IN (SELECT event_id FROM {fact})"
                ).format(side=sql.Identifier(schemas.edw, side), fact=fact)
            )
        rows = conn.execute(sql.SQL("DELETE FROM {}").format(fact)).rowcount
        conn.execute(
            sql.SQL("DELETE FROM {}.state WHERE store LIKE %s").format(meta), (f"{asset}/%",)
        )
        dead = conn.execute(
            sql.SQL("DELETE FROM {}.dead_letter WHERE asset = %s").format(meta), (asset,)
        ).rowcount
        batches = conn.execute(
            sql.SQL("DELETE FROM {}.batch_ledger WHERE asset = %s").format(meta), (asset,)
        ).rowcount
        conn.execute(sql.SQL("DELETE FROM {}.ledger_head WHERE asset = %s").format(meta), (asset,))
    return ReplayReset(rows=rows, dead_letters=dead, batches=batches)


def rewind_topic_asset(
    conn: psycopg.Connection,
    schemas: Schemas,
    table: str,
    asset: str,
    topic: str,
    offsets: Mapping[int, int],
    *,
    side_tables: Sequence[str] = (),
) -> dict[int, int]:
    """Rewind ``asset`` so it reloads each partition from ``offsets`` on, in one transaction.

    Each partition restarts at the start of the ledger batch holding its offset (a batch
    boundary, where the state versions tell the state as it stood). Rows, side-table rows,
    dead letters, ledger batches and state versions after that point go; everything before
    stays. Returns the restart offset of each partition that moved.
    """
    meta = sql.Identifier(schemas.meta)
    fact = sql.Identifier(schemas.edw, table)
    restarts: dict[int, int] = {}
    with conn.transaction():
        heads = conn.execute(
            sql.SQL(
                "SELECT shard, end_position FROM {}.ledger_head WHERE asset = %s AND source = %s FOR UPDATE"
            ).format(meta),
            (asset, topic),
        ).fetchall()
        for shard, _ in heads:
            if shard not in offsets:
                continue
            row = conn.execute(
                sql.SQL(
                    "SELECT min(start_position) FROM {}.batch_ledger "
                    "WHERE asset = %s AND source = %s AND shard = %s AND end_position > %s"
                ).format(meta),
                (asset, topic, shard, offsets[shard]),
            ).fetchone()
            if row is None or row[0] is None:
                continue  # the ledger has not reached that offset: nothing to rewind
            start = int(row[0])
            in_range = sql.SQL("topic = %s AND kafka_partition = %s AND kafka_offset >= %s")
            for side in side_tables:
                conn.execute(
                    sql.SQL(
                        "DELETE FROM {side} WHERE event_id IN (SELECT event_id FROM {fact} WHERE {cond})"
                    ).format(side=sql.Identifier(schemas.edw, side), fact=fact, cond=in_range),
                    (topic, shard, start),
                )
            conn.execute(
                sql.SQL("DELETE FROM {} WHERE {}").format(fact, in_range), (topic, shard, start)
            )
            for statement in (
                "DELETE FROM {}.dead_letter WHERE asset = %s AND source = %s AND shard = %s AND position >= %s",
                "DELETE FROM {}.batch_ledger WHERE asset = %s AND source = %s AND shard = %s AND start_position >= %s",
            ):
                conn.execute(sql.SQL(statement).format(meta), (asset, topic, shard, start))
            conn.execute(
                sql.SQL(
                    "DELETE FROM {}.state WHERE store LIKE %s AND shard = %s AND position > %s"
                ).format(meta),
                (f"{asset}/%", shard, start),
            )
            conn.execute(
                sql.SQL(
                    "UPDATE {}.ledger_head SET end_position = %s, updated_at = clock_timestamp() "
                    "WHERE asset = %s AND source = %s AND shard = %s"
                ).format(meta),
                (start, asset, topic, shard),
            )
            restarts[shard] = start
    return restarts
