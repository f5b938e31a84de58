"""Captured OLTP tables as configuration (the ``tables:`` of ``catalog.yaml``), validated at
load time.

Every identifier is checked against a strict pattern and every column type against a short
list, so no SQL is ever built from an unchecked string; SQL is then composed with
``psycopg.sql.Identifier``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from kappa.catalog.files import SETTING, read_catalog
from kappa.exceptions import ConfigurationError
from kappa.setting_values import identifier

Mode = Literal["scd2", "current"]
Engine = Literal["postgresql", "mariadb"]

#: Engines a captured table may live in: PostgreSQL (triggers into change tables) or
#: MariaDB/MySQL (the binlog, see kappa.sources.mariadb_binlog).
ENGINES = ("postgresql", "mariadb")

#: Where a MariaDB table's first batch starts (``start:``): ``history``, the binlog must hold
#: the table's whole history (refused when earlier transactions were purged: rows they wrote
#: would never reach the EDW); ``oldest_retained``, from the oldest transaction the binlog
#: still holds, for a table created since or whose older rows the EDW does not need.
Start = Literal["history", "oldest_retained"]
STARTS = ("history", "oldest_retained")

#: Column types a captured column may have in the EDW (their JSON image is converted).
_TYPES = re.compile(
    r"^(text|integer|bigint|boolean|date|timestamptz|double precision"
    r"|numeric\(\d{1,2},\s?\d{1,2}\)|char\(\d{1,3}\))$"
)


@dataclass(frozen=True)
class QualifiedName:
    """``schema.table``, both parts validated identifiers."""

    schema: str
    table: str

    @classmethod
    def parse(cls, where: str, raw: Any) -> QualifiedName:
        if not isinstance(raw, str) or raw.count(".") != 1:
            raise ConfigurationError(SETTING, f"{where}: expected schema.table, got {raw!r}")
        schema, table = raw.split(".")
        return cls(
            identifier(f"{SETTING} {where}", schema), identifier(f"{SETTING} {where}", table)
        )

    def __str__(self) -> str:
        return f"{self.schema}.{self.table}"


@dataclass(frozen=True)
class Column:
    name: str
    sql_type: str


@dataclass(frozen=True)
class CaptureSpec:
    """One captured table: where its changes are, what they become in the EDW."""

    name: str
    source: QualifiedName
    keys: tuple[str, ...]
    columns: tuple[Column, ...]
    change_table: QualifiedName
    target: str
    mode: Mode
    #: Where the table lives; a ``mariadb`` table's ledger source is the table itself
    #: (``change_table`` equals ``source``).
    engine: Engine = "postgresql"
    #: A MariaDB table's first batch (see :data:`STARTS`).
    start: Start = "history"

    @property
    def asset(self) -> str:
        return self.target

    @property
    def value_columns(self) -> tuple[Column, ...]:
        return tuple(c for c in self.columns if c.name not in self.keys)


def _spec(index: int, entry: Any) -> CaptureSpec:
    where = f"tables[{index}]"
    if not isinstance(entry, dict):
        raise ConfigurationError(SETTING, f"{where}: expected a mapping")
    engine = entry.get("engine", "postgresql")
    if engine not in ENGINES:
        raise ConfigurationError(
            SETTING, f"{where}.engine: expected one of {', '.join(ENGINES)}, got {engine!r}"
        )
    if engine == "mariadb" and "change_table" in entry:
        raise ConfigurationError(
            SETTING,
            f"{where}.change_table: a mariadb table is read from the binlog and has no change "
            "table; remove the key",
        )
    start = entry.get("start", "history")
    if start not in STARTS:
        raise ConfigurationError(
            SETTING, f"{where}.start: expected one of {', '.join(STARTS)}, got {start!r}"
        )
    if start != "history" and engine != "mariadb":
        raise ConfigurationError(
            SETTING, f"{where}.start: only a mariadb table starts elsewhere than its history"
        )
    required: tuple[str, ...] = ("name", "source", "keys", "columns", "target", "mode")
    if engine == "postgresql":
        required += ("change_table",)
    missing = [k for k in required if k not in entry]
    if missing:
        raise ConfigurationError(SETTING, f"{where}: missing {', '.join(missing)}")
    name = identifier(f"{SETTING} {where}.name", str(entry["name"]))
    raw_columns = entry["columns"]
    if not isinstance(raw_columns, dict) or not raw_columns:
        raise ConfigurationError(SETTING, f"{where}.columns: expected a mapping of column: type")
    columns = []
    for column, sql_type in raw_columns.items():
        identifier(f"{SETTING} {where}.columns", str(column))
        if not isinstance(sql_type, str) or not _TYPES.match(sql_type.strip()):
            raise ConfigurationError(
                SETTING, f"{where}.columns.{column}: unsupported type {sql_type!r}"
            )
        columns.append(Column(str(column), sql_type.strip()))
    keys = entry["keys"]
    if not isinstance(keys, list) or not keys:
        raise ConfigurationError(SETTING, f"{where}.keys: expected a non-empty list")
    names = {c.name for c in columns}
    for key in keys:
        if key not in names:
            raise ConfigurationError(SETTING, f"{where}.keys: {key!r} is not one of the columns")
    mode = entry["mode"]
    if mode not in ("scd2", "current"):
        raise ConfigurationError(SETTING, f"{where}.mode: expected scd2 or current, got {mode!r}")
    source = QualifiedName.parse(f"{where}.source", entry["source"])
    return CaptureSpec(
        name=name,
        source=source,
        keys=tuple(keys),
        columns=tuple(columns),
        change_table=(
            QualifiedName.parse(f"{where}.change_table", entry["change_table"])
            if engine == "postgresql"
            else source
        ),
        target=identifier(f"{SETTING} {where}.target", str(entry["target"])),
        mode=mode,
        engine=engine,
        start=start,
    )


def load_captures(path: Path) -> list[CaptureSpec]:
    """Read and validate the catalogue's captured tables; fails naming the file and the entry."""
    document = read_catalog(path)
    if not isinstance(document.get("tables", []), list):
        raise ConfigurationError(SETTING, f"{path}: expected a top-level 'tables' list")
    try:
        specs = [_spec(i, entry) for i, entry in enumerate(document.get("tables", []))]
    except ConfigurationError as exc:
        # Name the file too: the entry's own message starts with the setting.
        detail = str(exc).removeprefix(SETTING).lstrip(": ")
        raise ConfigurationError(SETTING, f"{path}: {detail}") from None
    for attribute in ("name", "target", "change_table", "source"):
        values = [str(getattr(s, attribute)) for s in specs]
        duplicated = {v for v in values if values.count(v) > 1}
        if duplicated:
            raise ConfigurationError(
                SETTING, f"{path}: {attribute} used twice: {', '.join(sorted(duplicated))}"
            )
    return specs
