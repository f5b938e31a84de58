"""Writing frames with COPY: rows, staging tables and dead letters, values never changed on the way."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

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
    columns = sql.SQL(", ").join(sql.Identifier(c) for c in frame.columns)
    pieces = copy_chunks(frame)
    if pieces is not None:
        with conn.cursor().copy(sql.SQL("COPY {} ({}) FROM STDIN").format(table, columns)) as copy:
            for piece in pieces:
                copy.write(piece)
        return
    with conn.cursor().copy(
        sql.SQL("COPY {} ({}) FROM STDIN WITH (FORMAT csv)").format(table, columns)
    ) as copy:
        copy.write(_csv_text(frame))


def _csv_text(frame: pd.DataFrame) -> str:
    """Any frame as COPY's CSV (the general path, for columns :func:`copy_text` does not
    format)."""
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
    return buffer.getvalue().replace(f'"{_NULL_MARK}"', "")


#: What COPY's text format reads as NULL.
_NULL = "\\N"
#: The characters COPY's text format gives a meaning to, and how a value writes them.
_ESCAPES = (("\\", "\\\\"), ("\t", "\\t"), ("\n", "\\n"), ("\r", "\\r"))


#: Rows formatted and sent per piece of a COPY: the text of a whole batch is never in
#: memory at once, and the server parses one piece while the next is formatted.
COPY_CHUNK_ROWS = 8192


def _text_kind(column: pd.Series) -> str | None:
    """How :func:`_text_fields` writes ``column`` in COPY's text format, decided over the
    whole column; None for a column it does not format (the CSV path takes the frame)."""
    dtype = column.dtype
    if isinstance(dtype, pd.DatetimeTZDtype):
        return "instant"
    if dtype == np.float64:
        return "double"
    if dtype.kind in "iu" and isinstance(dtype, np.dtype):
        return "integer"
    if isinstance(dtype, pd.Int64Dtype | pd.Int32Dtype | pd.Int16Dtype | pd.Int8Dtype):
        return "nullable integer"
    if isinstance(dtype, pd.BooleanDtype) or dtype == np.bool_:
        return "boolean"
    if isinstance(dtype, pd.StringDtype):
        return "text"
    if isinstance(dtype, np.dtype) and dtype.kind == "O":
        values = column.to_numpy(dtype=object)
        present = values[~pd.isna(values)].tolist()
        return "text" if all(type(v) is str for v in present) else None
    return None


def _text_fields(column: pd.Series, kind: str) -> list[str]:
    """One column as COPY text fields, built for the whole column at once."""
    if kind == "instant":
        zoned = _iso_utc(column)
        zoned[pd.isna(zoned)] = _NULL
        return zoned.tolist()
    if kind == "double":
        doubles = column.to_numpy()
        out = [repr(v) for v in doubles.tolist()]
        for index in np.flatnonzero(np.isnan(doubles)).tolist():
            out[index] = _NULL
        return out
    if kind == "integer":
        return [str(v) for v in column.to_numpy().tolist()]
    missing = column.isna().to_numpy(dtype=bool)
    whole = not missing.any()
    if whole and kind != "boolean":
        present = column.tolist()
    else:
        present = column.to_numpy(dtype=object, na_value=None)[~missing].tolist()
    if kind == "nullable integer":
        present = [str(v) for v in present]
    elif kind == "boolean":
        present = ["t" if v else "f" for v in present]
    else:
        joined = "".join(present)
        for char, escaped in _ESCAPES:
            if char in joined:
                present = [v.replace(char, escaped) for v in present]
    if whole:
        return present
    fields = np.full(len(missing), _NULL, dtype=object)
    fields[~missing] = present
    return fields.tolist()


def copy_chunks(frame: pd.DataFrame, rows: int = COPY_CHUNK_ROWS) -> Iterator[str] | None:
    """``frame`` as COPY's text format, ``rows`` rows per piece, column by column (no
    Python per field beyond one conversion per value): text escaped only in a column that
    holds a special character, doubles as their shortest repr (exactly the value, as the
    CSV path writes them), instants in UTC with microseconds. None when a column holds
    something else (objects other than strings, naive times, ...): the CSV path writes
    those. Every column is judged whole before the first piece, so a COPY that starts in
    this format ends in it."""
    kinds = [_text_kind(frame[name]) for name in frame.columns]
    checked = [kind for kind in kinds if kind is not None]
    if len(checked) < len(kinds):
        return None

    def pieces() -> Iterator[str]:
        for lo in range(0, len(frame), max(rows, 1)):
            part = frame.iloc[lo : lo + rows]
            columns = [
                _text_fields(part[name], kind)
                for name, kind in zip(frame.columns, checked, strict=True)
            ]
            lines = ["\t".join(fields) for fields in zip(*columns, strict=True)]
            lines.append("")
            yield "\n".join(lines)

    return pieces()


def copy_text(frame: pd.DataFrame) -> str | None:
    """``frame`` as COPY's text format in one string (see :func:`copy_chunks`)."""
    pieces = copy_chunks(frame, rows=max(len(frame), 1))
    return None if pieces is None else "".join(pieces)


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
