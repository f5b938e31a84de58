"""Writing frames with COPY: rows, staging tables and dead letters, values never changed on the way."""

from __future__ import annotations

import csv
import io

import numpy as np
import pandas as pd
import psycopg
from psycopg import sql

from kappa.edw.types import BatchRecord, Schemas


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
