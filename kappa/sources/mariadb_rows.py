"""Row images of MariaDB's binlog row events as the change frame holds them (JSON text), and
the check that a row event's table still has every captured column in a type its EDW column
can hold."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

from pymysqlreplication.constants import FIELD_TYPE

from kappa.catalog.captures import SETTING, CaptureSpec
from kappa.sources.mariadb_server import CaptureImpossibleError

#: Column types of MariaDB a captured column of each EDW type may have.
COMPATIBLE = {
    "text": {"varchar", "char", "text", "tinytext", "mediumtext", "longtext", "enum", "set"},
    "integer": {"tinyint", "smallint", "mediumint", "int", "year"},
    "bigint": {"tinyint", "smallint", "mediumint", "int", "bigint", "year"},
    "boolean": {"tinyint", "bit"},
    "date": {"date"},
    "timestamptz": {"datetime", "timestamp"},
    "double precision": {"float", "double", "decimal", "tinyint", "smallint", "int", "bigint"},
    "numeric": {"decimal", "tinyint", "smallint", "mediumint", "int", "bigint"},
    "char": {"char", "varchar"},
}

#: The MariaDB type name of a binlog column type code.
_TYPE_NAMES = {
    FIELD_TYPE.TINY: "tinyint",
    FIELD_TYPE.SHORT: "smallint",
    FIELD_TYPE.INT24: "mediumint",
    FIELD_TYPE.LONG: "int",
    FIELD_TYPE.LONGLONG: "bigint",
    FIELD_TYPE.FLOAT: "float",
    FIELD_TYPE.DOUBLE: "double",
    FIELD_TYPE.DECIMAL: "decimal",
    FIELD_TYPE.NEWDECIMAL: "decimal",
    FIELD_TYPE.DATE: "date",
    FIELD_TYPE.NEWDATE: "date",
    FIELD_TYPE.DATETIME: "datetime",
    FIELD_TYPE.DATETIME2: "datetime",
    FIELD_TYPE.TIMESTAMP: "timestamp",
    FIELD_TYPE.TIMESTAMP2: "timestamp",
    FIELD_TYPE.YEAR: "year",
    FIELD_TYPE.VARCHAR: "varchar",
    FIELD_TYPE.VAR_STRING: "varchar",
    FIELD_TYPE.STRING: "char",
    FIELD_TYPE.BLOB: "text",
    FIELD_TYPE.TINY_BLOB: "text",
    FIELD_TYPE.MEDIUM_BLOB: "text",
    FIELD_TYPE.LONG_BLOB: "text",
    FIELD_TYPE.ENUM: "enum",
    FIELD_TYPE.SET: "set",
    FIELD_TYPE.BIT: "bit",
    FIELD_TYPE.TIME: "time",
    FIELD_TYPE.TIME2: "time",
    FIELD_TYPE.JSON: "json",
}


def to_json(image: dict[str, Any] | None) -> str | None:
    """A row image as the JSON text the change validation reads: decimals exact, times ISO
    (MariaDB's DATETIME and TIMESTAMP carry no zone: they are read as UTC)."""
    if image is None:
        return None
    exact: dict[str, str] = {}

    def plain(value: Any) -> Any:
        if isinstance(value, Decimal):
            token = f"\u0000{len(exact)}\u0000"
            exact[token] = format(value, "f")
            return token
        if isinstance(value, dt.datetime):
            return (value if value.tzinfo else value.replace(tzinfo=dt.UTC)).isoformat()
        if isinstance(value, dt.date | dt.time):
            return value.isoformat()
        if isinstance(value, dt.timedelta):
            return str(value)
        if isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, set | frozenset):
            return sorted(value)
        return value

    text = json.dumps({k: plain(v) for k, v in image.items()}, ensure_ascii=False)
    for token, digits in exact.items():
        text = text.replace(json.dumps(token), digits)
    return text


def type_name(column: Any) -> str:
    """The MariaDB type name of a binlog table map's column."""
    return _TYPE_NAMES.get(column.type, f"type {column.type}")


def check_columns(spec: CaptureSpec, transaction: str, event: Any) -> None:
    """Refuse a row event (of ``transaction``, ``domain-seq``) whose table lost a captured
    column or changed its type to one the EDW column cannot hold (an added column is simply
    not captured)."""
    table = event.table_map[event.table_id]
    present = {c.name: c for c in table.columns}
    for column in spec.columns:
        found = present.get(column.name)
        where = f"{spec.source}.{column.name} (transaction {transaction})"
        if found is None:
            raise CaptureImpossibleError(
                SETTING,
                f"{where}: the captured column was dropped or renamed in MariaDB; the "
                f"catalogue's {spec.name}.columns.{column.name} cannot be filled. "
                "Nothing was loaded from this transaction on.",
            )
        kind = column.sql_type.split("(")[0].strip()
        allowed = COMPATIBLE.get(kind, set())
        mysql_type = type_name(found)
        if allowed and mysql_type not in allowed:
            raise CaptureImpossibleError(
                SETTING,
                f"{where}: the captured column became {mysql_type} in MariaDB, which the "
                f"catalogue's {column.sql_type} cannot hold. Nothing was loaded from this "
                "transaction on.",
            )
