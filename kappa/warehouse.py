"""The EDW in PostgreSQL: schema, the batch ledger, and the exactly-once batch commit.

A batch's output rows, its dead letters and its ledger row commit in one transaction,
guarded by the ledger head of its shard (``SELECT ... FOR UPDATE``): a batch commits only if
the ledger ends exactly where the batch starts, so no two batches can cover the same
positions and a retried or duplicated run changes nothing.
"""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from kappa.catalog.files import SETTING as CATALOG_SETTING
from kappa.catalog.streams import EventContract, fact_column_specs
from kappa.decode.batch import DecodedBatch
from kappa.exceptions import (
    BatchSupersededError,
    ConfigurationError,
    LogResetError,
    ReprocessError,
)
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
    #: The time partition of the shard's last batch.
    partition_key: str | None = None


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
    # Types are from the catalogue's checked set (kappa/contracts.py), names identifiers.
    columns = sql.SQL(",\n  ").join(
        [
            sql.SQL("{} {}{}").format(
                sql.Identifier(c.name),
                sql.SQL(c.sql_type),
                sql.SQL(" NOT NULL" if c.not_null else ""),
            )
            for c in fact_column_specs(contract)
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
ALTER TABLE {meta}.ledger_head ADD COLUMN IF NOT EXISTS partition_key text;
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
CREATE INDEX IF NOT EXISTS batch_ledger_partition_idx
  ON {meta}.batch_ledger (asset, source, partition_key);
CREATE TABLE IF NOT EXISTS {meta}.checkpoint (
  asset text NOT NULL,
  source text NOT NULL,
  shard integer NOT NULL,
  partition_key text NOT NULL,
  position bigint NOT NULL,
  digest text NOT NULL,
  stale_reason text,
  run_id text NOT NULL,
  written_at timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (asset, source, shard, partition_key)
);
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


@dataclass(frozen=True)
class TableColumn:
    """A column of an existing EDW table, as ``information_schema`` describes it."""

    sql_type: str
    not_null: bool


def _canonical_type(
    data_type: str, length: int | None, precision: int | None, scale: int | None
) -> str:
    """``information_schema``'s description of a column type in the catalogue's spelling."""
    spelled = {
        "timestamp with time zone": "timestamptz",
        "character varying": "varchar",
    }.get(data_type, data_type)
    if data_type == "numeric" and precision is not None:
        return f"numeric({precision},{scale or 0})"
    if data_type == "character":
        return f"char({length})"
    return spelled


def table_columns(
    conn: psycopg.Connection, schema: str, table: str
) -> dict[str, TableColumn] | None:
    """The columns of ``schema.table`` (None when the table does not exist)."""
    rows = conn.execute(
        "SELECT column_name, data_type, character_maximum_length, numeric_precision, "
        "numeric_scale, is_nullable FROM information_schema.columns "
        "WHERE table_schema = %s AND table_name = %s ORDER BY ordinal_position",
        (schema, table),
    ).fetchall()
    if not rows:
        return None
    return {
        name: TableColumn(_canonical_type(data_type, length, precision, scale), nullable == "NO")
        for name, data_type, length, precision, scale, nullable in rows
    }


@dataclass(frozen=True)
class Evolution:
    """What bringing one stream's existing table to the catalogue takes."""

    contract: EventContract
    statements: tuple[sql.Composed, ...]
    changes: tuple[str, ...]


def plan_evolution(
    conn: psycopg.Connection, schemas: Schemas, contracts: Sequence[EventContract]
) -> list[Evolution]:
    """Compare every stream with its existing EDW table; reads only.

    A new nullable field becomes an ``ADD COLUMN IF NOT EXISTS`` and a field made nullable a
    ``DROP NOT NULL``. A changed type, a removed required field, a new required field or a
    field made required is refused: the check covers every stream before any is changed, so a
    refusal leaves every table as it was.
    """
    plans: list[Evolution] = []
    refusals: list[str] = []
    for contract in contracts:
        existing = table_columns(conn, schemas.edw, contract.table)
        if existing is None:
            continue  # created from the catalogue by ensure_schema
        where = f"{contract.catalog}: stream {contract.name}"
        table = sql.Identifier(schemas.edw, contract.table)
        statements: list[sql.Composed] = []
        changes: list[str] = []
        declared = {c.name: c for c in fact_column_specs(contract)}
        for column in declared.values():
            found = existing.get(column.name)
            if found is None:
                if column.not_null:
                    refusals.append(
                        f"{where}, field {column.name}: new field of type {column.sql_type} "
                        f"must be nullable (table {schemas.edw}.{contract.table} has rows "
                        "without it)"
                    )
                    continue
                statements.append(
                    sql.SQL("ALTER TABLE {} ADD COLUMN IF NOT EXISTS {} {}").format(
                        table, sql.Identifier(column.name), sql.SQL(column.sql_type)
                    )
                )
                changes.append(f"{contract.table}: add column {column.name} {column.sql_type}")
            elif found.sql_type != column.sql_type:
                refusals.append(
                    f"{where}, field {column.name}: the table's type is {found.sql_type}, the "
                    f"catalogue's is {column.sql_type} (a type change is not applied)"
                )
            elif found.not_null and not column.not_null:
                statements.append(
                    sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP NOT NULL").format(
                        table, sql.Identifier(column.name)
                    )
                )
                changes.append(f"{contract.table}: column {column.name} made nullable")
            elif column.not_null and not found.not_null:
                refusals.append(
                    f"{where}, field {column.name}: required in the catalogue, nullable in the "
                    f"table (its rows may hold NULL); declare it nullable: true"
                )
        derived = {name for name, _ in contract.derived}
        for name, found in existing.items():
            if name not in declared and name not in derived and found.not_null:
                refusals.append(
                    f"{where}, field {name}: the table's required column ({found.sql_type}) is "
                    "not in the catalogue; a removed field must stay declared (nullable: true "
                    "to stop requiring it)"
                )
        if statements:
            plans.append(Evolution(contract, tuple(statements), tuple(changes)))
    if refusals:
        raise ConfigurationError(CATALOG_SETTING, "; ".join(refusals))
    return plans


def ensure_schema(
    conn: psycopg.Connection, schemas: Schemas, contracts: Sequence[EventContract]
) -> list[str]:
    """Create schemas and tables that do not exist yet and evolve the existing fact tables to
    the catalogue (see :func:`plan_evolution`); running it again changes nothing. Returns
    the changes made to existing tables."""
    from kappa.heal import heal_ddl, heals  # heal builds on this module

    with conn.transaction():
        # Serialise concurrent bootstraps (stack start, tests in parallel) on one lock.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('kappa-etl:ensure_schema'))")
        # Every stream is checked before anything is written.
        plans = plan_evolution(conn, schemas, contracts)
        for schema in (schemas.edw, schemas.meta):
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL(_META_DDL).format(meta=sql.Identifier(schemas.meta)))
        for plan in plans:
            for statement in plan.statements:
                conn.execute(statement)
        for contract in contracts:
            conn.execute(_fact_ddl(schemas, contract))
            if heals(contract):
                conn.execute(heal_ddl(schemas, contract))
        conn.execute(
            sql.SQL(_FRAUD_ALERT_DDL).format(table=sql.Identifier(schemas.edw, "fraud_alert"))
        )
    return [change for plan in plans for change in plan.changes]


def read_head(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str, shard: int
) -> LedgerHead | None:
    """The ledger head of one shard, or None before its first batch."""
    row = conn.execute(
        sql.SQL(
            "SELECT epoch, end_position, batches, watermark, partition_key FROM {}.ledger_head "
            "WHERE asset = %s AND source = %s AND shard = %s"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source, shard),
    ).fetchone()
    if row is None:
        return None
    return LedgerHead(asset, source, shard, row[0], row[1], row[2], row[3], row[4])


def read_heads(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str
) -> dict[int, LedgerHead]:
    """The ledger heads of every shard of ``source`` for ``asset``."""
    rows = conn.execute(
        sql.SQL(
            "SELECT shard, epoch, end_position, batches, watermark, partition_key "
            "FROM {}.ledger_head WHERE asset = %s AND source = %s"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source),
    ).fetchall()
    return {r[0]: LedgerHead(asset, source, *r) for r in rows}


_SELECT_HEAD_FOR_UPDATE = (
    "SELECT epoch, end_position, batches, watermark, partition_key FROM {}.ledger_head "
    "WHERE asset = %s AND source = %s AND shard = %s FOR UPDATE"
)


def lock_head(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str, shard: int
) -> LedgerHead | None:
    """The ledger head of one shard, locked until the transaction ends (None: no head)."""
    row = conn.execute(
        sql.SQL(_SELECT_HEAD_FOR_UPDATE).format(sql.Identifier(schemas.meta)),
        (asset, source, shard),
    ).fetchone()
    return LedgerHead(asset, source, shard, *row) if row is not None else None


def _lock_head(conn: psycopg.Connection, schemas: Schemas, record: BatchRecord) -> LedgerHead:
    """The shard's head, locked; created at the batch's start for a shard's first batch."""
    head = lock_head(conn, schemas, record.asset, record.source, record.shard)
    if head is not None:
        return head
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
        ).format(sql.Identifier(schemas.meta)),
        (record.asset, record.source, record.shard, record.epoch, record.start),
    )
    head = lock_head(conn, schemas, record.asset, record.source, record.shard)
    assert head is not None
    return head


def _iso_utc(column: pd.Series) -> np.ndarray:
    """Zone-aware timestamps as ISO-8601 text in UTC (None for NaT), formatted by numpy in
    one pass: ``to_csv``'s ``date_format`` formats element by element, and the timestamp
    columns were most of the time a batch spent producing its COPY text."""
    values = column.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy("datetime64[us]")
    text = np.char.add(np.datetime_as_string(values, unit="us"), "+00:00").astype(object)
    text[np.isnat(values)] = None
    return text


#: What the csv writer puts for a missing value before it is turned into an unquoted empty
#: field (NULL). U+0000 cannot be in any value PostgreSQL accepts, so it marks only NULLs.
_NULL_MARK = "\x00"


def copy_frame(conn: psycopg.Connection, table: sql.Composable, frame: pd.DataFrame) -> None:
    if frame.empty:
        return
    zoned = [n for n, t in frame.dtypes.items() if isinstance(t, pd.DatetimeTZDtype)]
    if zoned:
        frame = frame.assign(**{str(name): _iso_utc(frame[name]) for name in zoned})
    buffer = io.StringIO()
    # "\r\n" line ends make the csv writer quote every field holding a "\r" or "\n"; with
    # "\n" alone a bare carriage return in a text value fails the whole COPY. Every value is
    # quoted so that an empty string stays an empty string: COPY reads only an unquoted
    # empty field as NULL.
    frame.to_csv(
        buffer,
        index=False,
        header=False,
        date_format="%Y-%m-%dT%H:%M:%S.%f%z",
        lineterminator="\r\n",
        quoting=csv.QUOTE_NONNUMERIC,
        na_rep=_NULL_MARK,
    )
    text = buffer.getvalue().replace(f'"{_NULL_MARK}"', "")
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in frame.columns)
    with conn.cursor().copy(
        sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(table, columns)
    ) as copy:
        copy.write(text)


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
        if record.partition_key is not None and record.partition_key != head.partition_key:
            # The shard's first batch of a time partition: checkpoint the state it starts from.
            write_checkpoint(conn, schemas, record, record.start)
        yield counts
        insert_ledger_row(conn, schemas, record, counts)
        conn.execute(
            sql.SQL(
                "UPDATE {}.ledger_head SET end_position = %s, batches = batches + 1, "
                "watermark = %s, partition_key = coalesce(%s, partition_key), "
                "updated_at = clock_timestamp() WHERE asset = %s AND source = %s AND shard = %s"
            ).format(meta),
            (
                record.end,
                record.watermark,
                record.partition_key,
                record.asset,
                record.source,
                record.shard,
            ),
        )


def insert_ledger_row(
    conn: psycopg.Connection, schemas: Schemas, record: BatchRecord, counts: BatchCounts
) -> None:
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.batch_ledger (asset, source, shard, epoch, start_position, "
            "end_position, run_id, partition_key, received, loaded, dead_lettered, deduplicated, "
            "watermark) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
        ).format(sql.Identifier(schemas.meta)),
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


# -- state checkpoints ------------------------------------------------------------------------
#
# A checkpoint marks the state of one shard at the start of a time partition: the position
# where the partition starts in that shard, and a digest of the state there. The state itself
# is the versions in ``{meta}.state`` (each stamped with the position of the batch that wrote
# it), so "restore the checkpoint" is "read every key as of that position". A digest is a
# chain: the digest at the previous checkpoint, then the final value of every key written
# since. Reprocessing a partition recomputes the digest at its end; when it differs from the
# digest the next partition was processed with, that partition (and everything after it) no
# longer follows from its predecessor: it is marked stale until reprocessed.


@dataclass(frozen=True)
class Checkpoint:
    asset: str
    source: str
    shard: int
    partition_key: str
    position: int
    digest: str
    stale_reason: str | None


def read_checkpoints(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str | None = None
) -> list[Checkpoint]:
    """Checkpoints of ``asset`` (of one source, or all), by shard and position."""
    rows = conn.execute(
        sql.SQL(
            "SELECT asset, source, shard, partition_key, position, digest, stale_reason "
            "FROM {}.checkpoint WHERE asset = %s AND (%s::text IS NULL OR source = %s) "
            "ORDER BY source, shard, position, partition_key"
        ).format(sql.Identifier(schemas.meta)),
        (asset, source, source),
    ).fetchall()
    return [Checkpoint(*row) for row in rows]


def state_digest_at(
    conn: psycopg.Connection, schemas: Schemas, asset: str, source: str, shard: int, position: int
) -> str:
    """Digest of the shard's state at ``position``, chained from the checkpoint before it."""
    meta = sql.Identifier(schemas.meta)
    base = conn.execute(
        sql.SQL(
            "SELECT position, digest FROM {}.checkpoint WHERE asset = %s AND source = %s "
            "AND shard = %s AND position < %s ORDER BY position DESC LIMIT 1"
        ).format(meta),
        (asset, source, shard, position),
    ).fetchone()
    since, chained = (base[0], base[1]) if base is not None else (-1, "")
    row = conn.execute(
        sql.SQL(
            "SELECT md5(coalesce(string_agg(store || '/' || key || '=' || value::text, ',' "
            "ORDER BY store, key), '')) FROM (SELECT DISTINCT ON (store, key) store, key, value "
            "FROM {}.state WHERE store LIKE %s AND shard = %s AND position > %s AND position <= %s "
            "ORDER BY store, key, position DESC) AS finals"
        ).format(meta),
        (f"{asset}/%", shard, since, position),
    ).fetchone()
    assert row is not None
    return hashlib.sha256(f"{chained}|{row[0]}".encode()).hexdigest()


def write_checkpoint(
    conn: psycopg.Connection, schemas: Schemas, record: BatchRecord, position: int
) -> str:
    """Checkpoint the state at ``position``, where ``record``'s partition starts in its shard
    (processed now with the state as it stands, so not stale)."""
    assert record.partition_key is not None
    digest = state_digest_at(conn, schemas, record.asset, record.source, record.shard, position)
    conn.execute(
        sql.SQL(
            "INSERT INTO {}.checkpoint (asset, source, shard, partition_key, position, digest, "
            "run_id) VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (asset, source, shard, partition_key) DO UPDATE SET "
            "position = excluded.position, digest = excluded.digest, stale_reason = NULL, "
            "run_id = excluded.run_id, written_at = clock_timestamp()"
        ).format(sql.Identifier(schemas.meta)),
        (
            record.asset,
            record.source,
            record.shard,
            record.partition_key,
            position,
            digest,
            record.run_id,
        ),
    )
    return digest


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
    stage = stage_frame(conn, f"stage_{contract.table}", fact, rows)
    counts.received = decoded.received
    counts.loaded = conn.execute(
        sql.SQL(
            "INSERT INTO {fact} SELECT * FROM {stage} ORDER BY kafka_offset "
            "ON CONFLICT (event_id) DO NOTHING"
        ).format(fact=fact, stage=stage)
    ).rowcount
    conn.execute(sql.SQL("DROP TABLE {}").format(stage))  # a transaction may hold several batches
    for table, frame in (side_tables or {}).items():
        copy_frame(conn, sql.Identifier(schemas.edw, table), frame)
    for store, values in (state or {}).items():
        assert cache is not None, "state without a cache to save it"
        cache.save(conn, store, record.shard, record.end, values)
    counts.dead_lettered = write_dead_letters(
        conn, schemas, record, decoded.dead_letters.rename(columns={"offset": "position"})
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
        conn.execute(sql.SQL("DELETE FROM {}.checkpoint WHERE asset = %s").format(meta), (asset,))
        conn.execute(sql.SQL("DELETE FROM {}.ledger_head WHERE asset = %s").format(meta), (asset,))
    return ReplayReset(rows=rows, dead_letters=dead, batches=batches)


def _delete_positions(
    conn: psycopg.Connection,
    schemas: Schemas,
    table: str,
    asset: str,
    topic: str,
    shard: int,
    start: int,
    end: int | None,
    side_tables: Sequence[str],
) -> tuple[int, int]:
    """Delete what ``asset`` loaded from ``topic[shard]`` positions ``[start, end)`` (``end``
    None: to the end): rows, side-table rows, dead letters, ledger batches, and the state
    versions those batches wrote. Returns (rows, batches) removed."""
    meta = sql.Identifier(schemas.meta)
    fact = sql.Identifier(schemas.edw, table)
    upper = end if end is not None else 2**63 - 1
    in_range = sql.SQL(
        "topic = %s AND kafka_partition = %s AND kafka_offset >= %s AND kafka_offset < %s"
    )
    args = (topic, shard, start, upper)
    for side in side_tables:
        conn.execute(
            sql.SQL(
                "DELETE FROM {side} WHERE event_id IN (SELECT event_id FROM {fact} WHERE {cond})"
            ).format(side=sql.Identifier(schemas.edw, side), fact=fact, cond=in_range),
            args,
        )
    rows = conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(fact, in_range), args).rowcount
    conn.execute(
        sql.SQL(
            "DELETE FROM {}.dead_letter WHERE asset = %s AND source = %s AND shard = %s "
            "AND position >= %s AND position < %s"
        ).format(meta),
        (asset, topic, shard, start, upper),
    )
    batches = conn.execute(
        sql.SQL(
            "DELETE FROM {}.batch_ledger WHERE asset = %s AND source = %s AND shard = %s "
            "AND start_position >= %s AND start_position < %s"
        ).format(meta),
        (asset, topic, shard, start, upper),
    ).rowcount
    conn.execute(
        sql.SQL(
            "DELETE FROM {}.state WHERE store LIKE %s AND shard = %s AND position > %s "
            "AND position <= %s"
        ).format(meta),
        (f"{asset}/%", shard, start, upper),
    )
    return rows, batches


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
    dead letters, ledger batches, state versions and checkpoints after that point go;
    everything before stays. Returns the restart offset of each partition that moved.
    """
    meta = sql.Identifier(schemas.meta)
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
            _delete_positions(conn, schemas, table, asset, topic, shard, start, None, side_tables)
            conn.execute(
                sql.SQL(
                    "DELETE FROM {}.checkpoint WHERE asset = %s AND source = %s AND shard = %s "
                    "AND position > %s"
                ).format(meta),
                (asset, topic, shard, start),
            )
            conn.execute(
                sql.SQL(
                    "UPDATE {meta}.ledger_head SET end_position = %s, updated_at = clock_timestamp(), "
                    "partition_key = (SELECT partition_key FROM {meta}.batch_ledger WHERE asset = %s "
                    "AND source = %s AND shard = %s AND end_position = %s) "
                    "WHERE asset = %s AND source = %s AND shard = %s"
                ).format(meta=meta),
                (start, asset, topic, shard, start, asset, topic, shard),
            )
            restarts[shard] = start
    return restarts


@dataclass
class WindowReplacement:
    """What :func:`replace_window` did to one shard."""

    removed_rows: int = 0
    removed_batches: int = 0
    new_end: int = 0
    #: The next partition whose starting state changed (it and those after it are stale).
    stale_from: str | None = None


@contextmanager
def replace_window(
    conn: psycopg.Connection,
    schemas: Schemas,
    *,
    table: str,
    record: BatchRecord,
    log_start: int,
    stateful: bool,
    side_tables: Sequence[str] = (),
    partition_start: int | None = None,
) -> Iterator[WindowReplacement]:
    """Replace what ``record.asset`` holds of one time partition in one shard, in one
    transaction: the partition is positions ``[record.start, record.end)``, or, with
    ``partition_start``, it starts there and only its part from ``record.start`` (where a
    ledger batch of it ends) is replaced: what precedes stays, the state is restored from
    the versions that batch wrote, and the checkpoint at the partition's start stays.

    Checks first, deletes nothing unless all pass: the ledger reaches the partition's start
    (its predecessor is loaded) or the partition is the shard's first; no ledger batch
    straddles a boundary; for a stateful asset the state checkpoint at the start exists.
    Then the partition's rows, side rows, dead letters, ledger batches and state versions
    go, the body reloads them (ledger rows included), and on the way out the head, the
    checkpoint at the start and the staleness of the next partition are brought up to date.
    """
    meta = sql.Identifier(schemas.meta)
    asset, source, shard = record.asset, record.source, record.shard
    window, start, end = record.partition_key or "?", record.start, record.end

    def refuse(detail: str) -> ReprocessError:
        return ReprocessError(asset, source, shard, window, start, end, detail)

    result = WindowReplacement(new_end=end)
    partial = partition_start is not None and partition_start < start
    opening = partition_start if partition_start is not None and partial else start
    with conn.transaction():
        head = lock_head(conn, schemas, asset, source, shard)
        if head is not None and head.epoch != record.epoch:
            raise LogResetError(
                asset,
                source,
                shard,
                f"was recreated: the ledger was written for source id {head.epoch or '-'} "
                f"up to position {head.end}, the source now has id {record.epoch or '-'}.",
            )
        loaded_before = (head is not None) and _ledger_reaches_before(conn, schemas, record)
        if head is None:
            if start > log_start:
                raise refuse(
                    f"the ledger holds nothing of this shard and the partition starts after the "
                    f"log start ({log_start}): reprocess the earlier partitions first."
                )
        elif head.end < start:
            raise refuse(
                f"the partition before it is not loaded: the ledger ends at {head.end}. "
                "Reprocess the earlier partitions first (a backfill runs them in order)."
            )
        first = conn.execute(
            sql.SQL(
                "SELECT min(start_position) FROM {}.batch_ledger WHERE asset = %s AND source = %s "
                "AND shard = %s AND partition_key = %s"
            ).format(meta),
            (asset, source, shard, window),
        ).fetchone()
        if first is not None and first[0] is not None and first[0] < log_start:
            raise refuse(
                f"the log now starts at {log_start}: offsets [{first[0]}, {log_start}) of this "
                "partition have expired (retention) and cannot be read again."
            )
        cut = min(head.end, end) if head is not None else start
        straddling = conn.execute(
            sql.SQL(
                "SELECT start_position, end_position FROM {}.batch_ledger WHERE asset = %s "
                "AND source = %s AND shard = %s AND ((start_position < %s AND end_position > %s) "
                "OR (start_position < %s AND end_position > %s)) LIMIT 1"
            ).format(meta),
            (asset, source, shard, start, start, cut, cut),
        ).fetchone()
        if straddling is not None:
            raise refuse(
                f"ledger batch [{straddling[0]}, {straddling[1]}) straddles a boundary of the "
                "partition (loaded before partitions were cut): replay the asset from the beginning."
            )
        if first is not None and first[0] is not None and first[0] != opening:
            raise refuse(
                f"the ledger has this partition starting at offset {first[0]}, the log at "
                f"{opening}: the log is not the one the partition was loaded from."
            )
        if partial:
            boundary = conn.execute(
                sql.SQL(
                    "SELECT 1 FROM {}.batch_ledger WHERE asset = %s AND source = %s "
                    "AND shard = %s AND partition_key = %s AND end_position = %s"
                ).format(meta),
                (asset, source, shard, window, start),
            ).fetchone()
            if boundary is None:
                raise refuse(
                    f"no ledger batch of the partition ends at offset {start}: only a batch "
                    "boundary has its state in the state versions, so a part of the partition "
                    "is re-derived from one."
                )
        elif stateful and loaded_before:
            mark = conn.execute(
                sql.SQL(
                    "SELECT 1 FROM {}.checkpoint WHERE asset = %s AND source = %s AND shard = %s "
                    "AND position = %s"
                ).format(meta),
                (asset, source, shard, start),
            ).fetchone()
            if mark is None:
                raise refuse(
                    f"no state checkpoint at offset {start} (the partition's start): the state "
                    "the partition starts from cannot be restored. Reprocess from an earlier "
                    "partition that has one, or replay the asset from the beginning."
                )
        if head is None:
            conn.execute(
                sql.SQL(
                    "INSERT INTO {}.ledger_head (asset, source, shard, epoch, end_position) "
                    "VALUES (%s, %s, %s, %s, %s)"
                ).format(meta),
                (asset, source, shard, record.epoch, start),
            )
        result.removed_rows, result.removed_batches = _delete_positions(
            conn, schemas, table, asset, source, shard, start, cut, side_tables
        )
        yield result
        old_end = head.end if head is not None else start
        result.new_end = max(old_end, end)
        conn.execute(
            sql.SQL(
                "UPDATE {meta}.ledger_head SET end_position = %s, updated_at = clock_timestamp(), "
                "partition_key = CASE WHEN %s THEN %s ELSE partition_key END, "
                "batches = (SELECT count(*) FROM {meta}.batch_ledger WHERE asset = %s "
                "AND source = %s AND shard = %s) WHERE asset = %s AND source = %s AND shard = %s"
            ).format(meta=meta),
            (result.new_end, end >= old_end, window, asset, source, shard, asset, source, shard),
        )
        if end > start and not partial:
            write_checkpoint(conn, schemas, record, start)
        if end < old_end:
            result.stale_from = _mark_next_stale(conn, schemas, record)


def _ledger_reaches_before(conn: psycopg.Connection, schemas: Schemas, record: BatchRecord) -> bool:
    """Whether the ledger holds a batch before the partition's start (state matters there)."""
    row = conn.execute(
        sql.SQL(
            "SELECT 1 FROM {}.batch_ledger WHERE asset = %s AND source = %s AND shard = %s "
            "AND start_position < %s LIMIT 1"
        ).format(sql.Identifier(schemas.meta)),
        (record.asset, record.source, record.shard, record.start),
    ).fetchone()
    return row is not None


def _mark_next_stale(conn: psycopg.Connection, schemas: Schemas, record: BatchRecord) -> str | None:
    """After reprocessing ``record``'s partition, mark the next one stale if the state it was
    processed with is not the state the partition now ends with. Returns its key if so."""
    meta = sql.Identifier(schemas.meta)
    following = conn.execute(
        sql.SQL(
            "SELECT partition_key, digest FROM {}.checkpoint WHERE asset = %s AND source = %s "
            "AND shard = %s AND position >= %s AND partition_key > %s "
            "ORDER BY position, partition_key LIMIT 1"
        ).format(meta),
        (record.asset, record.source, record.shard, record.end, record.partition_key),
    ).fetchone()
    if following is None:
        return None
    digest = state_digest_at(conn, schemas, record.asset, record.source, record.shard, record.end)
    if digest == following[1]:
        return None
    conn.execute(
        sql.SQL(
            "UPDATE {}.checkpoint SET stale_reason = %s WHERE asset = %s AND source = %s "
            "AND shard = %s AND partition_key = %s"
        ).format(meta),
        (
            f"the state at its start changed when partition {record.partition_key} was "
            f"reprocessed (run {record.run_id})",
            record.asset,
            record.source,
            record.shard,
            following[0],
        ),
    )
    return str(following[0])
