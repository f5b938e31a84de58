"""The field types of a stream's payload: an open, documented set, each with its SQL type and options.

A field's type is validated once, when the catalogue is loaded (:func:`field_type`); the
decoder then checks every message's value against it, whole columns at a time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from kappa.catalog.files import Where

#: Field types a payload field may have (the README's catalogue reference documents each).
FIELD_KINDS = (
    "text",
    "integer",
    "bigint",
    "numeric",
    "boolean",
    "timestamptz",
    "date",
    "uuid",
    "char",
    "enum",
    "jsonb",
)


#: Options each type accepts besides ``type``, ``nullable``, ``since`` and ``description``.
_OPTIONS: dict[str, tuple[str, ...]] = {
    "text": ("min_length", "max_length", "pattern"),
    "integer": ("min", "max"),
    "bigint": ("min", "max"),
    "numeric": ("min", "exclusive_min"),
    "boolean": (),
    "timestamptz": (),
    "date": (),
    "uuid": (),
    "char": ("pattern",),
    "enum": ("values",),
    "jsonb": (),
}


_COMMON = ("type", "nullable", "since", "description")


#: The range of each integer column: a value beyond it would fail the whole batch's COPY.
INTEGER_RANGES = {"integer": (-(2**31), 2**31 - 1), "bigint": (-(2**63), 2**63 - 1)}


#: Above 15 digits a double no longer carries every value of the column exactly, and the
#: exactness check (kappa/exact.py) relies on it.
MAX_NUMERIC_PRECISION = 15


MAX_CHAR_LENGTH = 255


_TYPE = re.compile(
    r"^\s*(?:(?P<kind>[a-z]+)|numeric\s*\(\s*(?P<p>\d+)\s*,\s*(?P<s>\d+)\s*\)"
    r"|char\s*\(\s*(?P<n>\d+)\s*\))\s*$"
)


@dataclass(frozen=True)
class FieldType:
    """The type of one payload field and the checks its values get."""

    kind: str
    precision: int | None = None  # numeric
    scale: int | None = None  # numeric
    length: int | None = None  # char
    min_length: int = 1  # text: non-empty unless declared otherwise
    max_length: int | None = None
    pattern: str | None = None
    minimum: int | Decimal | None = None  # integer, bigint, numeric
    maximum: int | None = None  # integer, bigint
    exclusive_min: Decimal | None = None  # numeric
    values: tuple[str, ...] = ()  # enum

    @property
    def sql_type(self) -> str:
        """The EDW column type, in the form ``information_schema`` is compared with."""
        if self.kind == "numeric":
            return f"numeric({self.precision},{self.scale})"
        if self.kind == "char":
            return f"char({self.length})"
        if self.kind == "enum":
            return "text"
        return self.kind

    def __str__(self) -> str:
        return "enum" if self.kind == "enum" else self.sql_type


@dataclass(frozen=True)
class PayloadField:
    """One field of an event's payload."""

    name: str
    type: FieldType
    nullable: bool = False
    #: The schema version that added the field (such a field is nullable).
    since: int | None = None
    description: str = ""

    @property
    def sql_type(self) -> str:
        return self.type.sql_type


#: Columns every fact row carries besides its payload fields, in table order.
ENVELOPE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("event_id", "uuid"),
    ("event_time", "timestamptz"),
    ("source", "text"),
    ("schema_version", "integer"),
)


#: Where the row came from in the log (deterministic, so replays reproduce them).
SOURCE_COLUMNS: tuple[tuple[str, str], ...] = (
    ("topic", "text"),
    ("kafka_partition", "integer"),
    ("kafka_offset", "bigint"),
    ("broker_time", "timestamptz"),
)


RESERVED_COLUMNS = {name for name, _ in ENVELOPE_COLUMNS + SOURCE_COLUMNS}


def _whole(where: Where, raw: Any, what: str, field_name: str, *, minimum: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise where.error(f"{what} must be a whole number >= {minimum}, got {raw!r}", field_name)
    return raw


def _decimal(where: Where, raw: Any, what: str, field_name: str) -> Decimal:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise where.error(f"{what} must be a number, got {raw!r}", field_name)
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise where.error(f"{what} must be a number, got {raw!r}", field_name) from None
    if not value.is_finite():
        raise where.error(f"{what} must be finite, got {raw!r}", field_name)
    return value


def _field_type(where: Where, name: str, spec: Any) -> tuple[FieldType, dict[str, Any]]:
    """A type spec (bare string or mapping) -> the type and the remaining common options."""
    options: dict[str, Any] = {}
    if isinstance(spec, dict):
        options = dict(spec)
        raw_type = options.pop("type", None)
        if raw_type is None:
            raise where.error("a mapping type spec needs 'type'", name)
    else:
        raw_type = spec
    if not isinstance(raw_type, str) or not (found := _TYPE.match(raw_type)):
        raise where.error(
            f"unknown type {raw_type!r} (one of: text, integer, bigint, numeric(p,s), boolean, "
            "timestamptz, date, uuid, char(n), enum, jsonb)",
            name,
        )
    kind = found.group("kind") or ("numeric" if found.group("p") else "char")
    if kind not in FIELD_KINDS or (kind in ("numeric", "char") and found.group("kind")):
        raise where.error(
            f"unknown type {raw_type!r} (one of: text, integer, bigint, numeric(p,s), boolean, "
            "timestamptz, date, uuid, char(n), enum, jsonb)",
            name,
        )
    common: dict[str, Any] = {
        k: options.pop(k) for k in ("nullable", "since", "description") if k in options
    }
    allowed = _OPTIONS[kind]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        permitted = ", ".join((*allowed, *_COMMON)) if allowed else ", ".join(_COMMON)
        raise where.error(
            f"option(s) {', '.join(map(str, unknown))} do not apply to {kind} "
            f"(allowed: {permitted})",
            name,
        )
    args: dict[str, Any] = {}
    if kind == "numeric":
        precision, scale = int(found.group("p")), int(found.group("s"))
        if not 1 <= precision <= MAX_NUMERIC_PRECISION or scale > precision:
            raise where.error(
                f"numeric({precision},{scale}): precision must be 1..{MAX_NUMERIC_PRECISION} "
                "and scale 0..precision",
                name,
            )
        args.update(precision=precision, scale=scale)
        for option, key in (("min", "minimum"), ("exclusive_min", "exclusive_min")):
            if option in options:
                args[key] = _decimal(where, options[option], option, name)
    elif kind == "char":
        length = int(found.group("n"))
        if not 1 <= length <= MAX_CHAR_LENGTH:
            raise where.error(f"char({length}): length must be 1..{MAX_CHAR_LENGTH}", name)
        args["length"] = length
    elif kind in INTEGER_RANGES:
        low, high = INTEGER_RANGES[kind]
        for option, key in (("min", "minimum"), ("max", "maximum")):
            if option in options:
                value = options[option]
                if isinstance(value, bool) or not isinstance(value, int):
                    raise where.error(f"{option} must be a whole number, got {value!r}", name)
                if not low <= value <= high:
                    raise where.error(f"{option} {value} is outside the {kind} range", name)
                args[key] = value
        if args.get("minimum", low) > args.get("maximum", high):
            raise where.error("min is above max", name)
    elif kind == "text":
        for option in ("min_length", "max_length"):
            if option in options:
                args[option] = _whole(where, options[option], option, name, minimum=0)
        if args.get("max_length") is not None and args.get("min_length", 1) > args["max_length"]:
            raise where.error("min_length is above max_length", name)
    elif kind == "enum":
        values = options.get("values")
        if (
            not isinstance(values, list)
            or not values
            or not all(isinstance(v, str) and v and "\x00" not in v for v in values)
            or len(set(values)) != len(values)
        ):
            raise where.error("enum needs 'values': a list of distinct non-empty strings", name)
        args["values"] = tuple(values)
    if "pattern" in options:
        pattern = options["pattern"]
        if not isinstance(pattern, str):
            raise where.error(f"pattern must be a string, got {pattern!r}", name)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise where.error(
                f"pattern {pattern!r} is not a regular expression: {exc}", name
            ) from None
        args["pattern"] = pattern
    return FieldType(kind, **args), common


def payload_field(where: Where, raw_name: Any, spec: Any, versions: frozenset[int]) -> PayloadField:
    name = where.identifier(raw_name, str(raw_name))
    if name in RESERVED_COLUMNS:
        raise where.error("is an envelope or source column of every fact table", name)
    kind, common = _field_type(where, name, spec)
    nullable = common.get("nullable", False)
    if not isinstance(nullable, bool):
        raise where.error(f"nullable must be true or false, got {nullable!r}", name)
    since = common.get("since")
    if since is not None:
        since = _whole(where, since, "since", name, minimum=1)
        if not nullable:
            raise where.error(
                f"since: {since} needs nullable: true (messages of earlier versions lack it)",
                name,
            )
        if since not in versions:
            raise where.error(f"since: {since} is not one of the schema_versions", name)
    description = common.get("description", "")
    if not isinstance(description, str):
        raise where.error("description must be a string", name)
    return PayloadField(name, kind, nullable=nullable, since=since, description=description)
