"""Schema evolution: what the catalogue asks of the existing fact tables, checked before anything
is written (new nullable fields are added; type changes and removed required fields are refused).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import psycopg
from psycopg import sql

from kappa.catalog.files import SETTING as CATALOG_SETTING
from kappa.catalog.streams import EventContract, fact_column_specs
from kappa.edw.types import Schemas
from kappa.exceptions import (
    ConfigurationError,
)


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
