"""Event streams as configuration: the ``streams:`` section of the catalogue (``catalog.yaml``).

An :class:`EventContract` is one declared stream: its topic, the envelope's accepted
``event_type`` and ``schema_version`` values, the payload fields with their types, and the
optional stateful step. The decoder validates any batch against it, and the warehouse
derives the fact table from it. Everything is validated once, when the catalogue is loaded:
identifiers against the same pattern as every other SQL name, types against the documented
set below, so the SQL built from a stream is only ever composed from checked names.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import yaml

from kappa.exceptions import ConfigurationError
from kappa.settings import identifier, topic_name

#: The setting that names the catalogue file.
SETTING = "KAPPA_CATALOG"

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
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")
_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}
_STREAM_KEYS = (
    "name",
    "topic",
    "topic_env",
    "key_field",
    "event_types",
    "schema_versions",
    "description",
    "fields",
    "step",
    "config",
    "max_message_bytes",
    "max_future_skew",
    "max_age",
)
_REQUIRED_KEYS = ("name", "key_field", "event_types", "schema_versions", "fields")
#: Types a key field may have: the message key is compared with its text.
_KEY_KINDS = ("text", "char", "uuid", "enum", "integer", "bigint")


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


@dataclass(frozen=True)
class EventContract:
    """One stream: what a valid message on its topic looks like, and where it lands."""

    name: str
    topic: str
    event_types: tuple[str, ...]
    schema_versions: frozenset[int]
    fields: tuple[PayloadField, ...]
    key_field: str
    description: str = ""
    topic_env: str | None = None
    step: str | None = None
    step_config: Mapping[str, Any] = field(default_factory=dict, compare=False)
    max_message_bytes: int = 1024 * 1024
    max_future_skew: timedelta = timedelta(hours=1)
    max_age: timedelta = timedelta(days=365)
    #: Columns the stream's step adds (nullable), after the decoded ones: the step class's
    #: ``derived_columns``.
    derived: tuple[tuple[str, str], ...] = ()
    #: The catalogue file the stream was declared in (named by every error about it).
    catalog: Path | None = field(default=None, compare=False)

    @property
    def table(self) -> str:
        """The EDW table (and Dagster asset) of the stream."""
        return self.name

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields)

    def field(self, name: str) -> PayloadField:
        for candidate in self.fields:
            if candidate.name == name:
                return candidate
        raise KeyError(f"stream {self.name!r} has no field {name!r}")


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
_RESERVED = {name for name, _ in ENVELOPE_COLUMNS + SOURCE_COLUMNS}


@dataclass(frozen=True)
class FactColumn:
    name: str
    sql_type: str
    not_null: bool


def fact_column_specs(contract: EventContract) -> list[FactColumn]:
    """The decoded columns of the fact table, in the order the decoder emits them, with
    whether each is NOT NULL; ``contract.derived`` follows them in the table."""
    envelope = [FactColumn(n, t, True) for n, t in ENVELOPE_COLUMNS]
    payload = [FactColumn(f.name, f.sql_type, not f.nullable) for f in contract.fields]
    source = [FactColumn(n, t, True) for n, t in SOURCE_COLUMNS]
    return envelope[:1] + payload + envelope[1:] + source


def fact_columns(contract: EventContract) -> list[tuple[str, str]]:
    """The decoded columns of the fact table (name, SQL type), in the order the decoder
    emits them; ``contract.derived`` follows them in the table."""
    return [(c.name, c.sql_type) for c in fact_column_specs(contract)]


# -- loading ----------------------------------------------------------------------------------


def read_catalog(path: Path) -> dict[str, Any]:
    """The catalogue document, parsed (errors name the setting and the file)."""
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigurationError(SETTING, f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigurationError(SETTING, f"{path} is not valid YAML: {exc}") from None
    if not isinstance(document, dict):
        raise ConfigurationError(SETTING, f"{path}: expected a mapping with 'streams' and 'tables'")
    # ``local:`` is the local stack's (kappa.local.catalog); the engine never reads it.
    unknown = sorted(set(document) - {"streams", "tables", "local"})
    if unknown:
        raise ConfigurationError(
            SETTING, f"{path}: unknown top-level key(s) {', '.join(map(str, unknown))}"
        )
    return document


class _Where:
    """Builds errors naming the file, the stream and the field."""

    def __init__(self, path: Path, stream: str) -> None:
        self.path = path
        self.stream = stream

    def error(self, problem: str, field_name: str | None = None) -> ConfigurationError:
        where = f"{self.path}: stream {self.stream}"
        if field_name is not None:
            where += f", field {field_name}"
        return ConfigurationError(SETTING, f"{where}: {problem}")

    def identifier(self, raw: Any, field_name: str) -> str:
        try:
            return identifier(SETTING, str(raw))
        except ConfigurationError as exc:
            raise self.error(exc.problem, field_name) from None


def _whole(where: _Where, raw: Any, what: str, field_name: str, *, minimum: int) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < minimum:
        raise where.error(f"{what} must be a whole number >= {minimum}, got {raw!r}", field_name)
    return raw


def _decimal(where: _Where, raw: Any, what: str, field_name: str) -> Decimal:
    if isinstance(raw, bool) or not isinstance(raw, int | float | str):
        raise where.error(f"{what} must be a number, got {raw!r}", field_name)
    try:
        value = Decimal(str(raw))
    except InvalidOperation:
        raise where.error(f"{what} must be a number, got {raw!r}", field_name) from None
    if not value.is_finite():
        raise where.error(f"{what} must be finite, got {raw!r}", field_name)
    return value


def _field_type(where: _Where, name: str, spec: Any) -> tuple[FieldType, dict[str, Any]]:
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


def _payload_field(
    where: _Where, raw_name: Any, spec: Any, versions: frozenset[int]
) -> PayloadField:
    name = where.identifier(raw_name, str(raw_name))
    if name in _RESERVED:
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


def _duration(where: _Where, raw: Any, key: str, default: timedelta) -> timedelta:
    if raw is None:
        return default
    if isinstance(raw, int) and not isinstance(raw, bool) and raw > 0:
        return timedelta(seconds=raw)
    found = _DURATION.match(raw) if isinstance(raw, str) else None
    if not found or int(found.group(1)) == 0:
        raise where.error(
            f"expected a positive duration (seconds, or like 90s, 15m, 1h, 365d), got {raw!r}",
            key,
        )
    return timedelta(**{_UNITS[found.group(2)]: int(found.group(1))})


def resolve_step(dotted: str) -> type:
    """The step class at ``module:Class`` or ``module.Class``."""
    module_name, sep, attribute = dotted.partition(":")
    if not sep:
        module_name, _, attribute = dotted.rpartition(".")
    if not module_name or not attribute:
        raise ValueError("expected module:Class or module.Class")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name}: {exc}") from None
    found = getattr(module, attribute, None)
    if not inspect.isclass(found):
        raise ValueError(f"{module_name} has no class {attribute}")
    return found


def _step(
    where: _Where, raw: Any, config: Any, fields: tuple[PayloadField, ...]
) -> tuple[str | None, dict[str, Any], tuple[tuple[str, str], ...]]:
    if raw is None:
        if config is not None:
            raise where.error("config is given but no step", "config")
        return None, {}, ()
    if not isinstance(raw, str):
        raise where.error(f"expected module:Class, got {raw!r}", "step")
    try:
        step_class = resolve_step(raw)
    except ValueError as exc:
        raise where.error(f"{raw}: {exc}", "step") from None
    if not callable(getattr(step_class, "apply", None)):
        raise where.error(f"{raw} has no apply method", "step")
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise where.error("expected a mapping", "config")
    if not hasattr(step_class, "from_catalog"):
        try:
            inspect.signature(step_class).bind(**config)
        except TypeError as exc:
            raise where.error(f"{raw} does not take this config: {exc}", "config") from None
    derived = []
    names = {f.name for f in fields} | _RESERVED
    for column in getattr(step_class, "derived_columns", ()):
        column_name, sql_type = column
        where.identifier(column_name, f"step {raw} derived column")
        if column_name in names:
            raise where.error(f"{raw} derives column {column_name!r}, a field already", "step")
        names.add(column_name)
        derived.append((column_name, str(sql_type)))
    return raw, config, tuple(derived)


def _stream(path: Path, index: int, entry: Any, env: Mapping[str, str]) -> EventContract:
    if not isinstance(entry, dict):
        raise ConfigurationError(SETTING, f"{path}: streams[{index}]: expected a mapping")
    label = str(entry.get("name", f"streams[{index}]"))
    where = _Where(path, label)
    missing = [k for k in _REQUIRED_KEYS if k not in entry]
    if missing:
        raise where.error(f"missing {', '.join(missing)}")
    unknown = sorted(set(map(str, entry)) - set(_STREAM_KEYS))
    if unknown:
        raise where.error(f"unknown key(s) {', '.join(unknown)}")
    name = where.identifier(entry["name"], "name")
    event_types = entry["event_types"]
    if (
        not isinstance(event_types, list)
        or not event_types
        or not all(isinstance(t, str) and t for t in event_types)
    ):
        raise where.error("expected a non-empty list of event type names", "event_types")
    versions = entry["schema_versions"]
    if (
        not isinstance(versions, list)
        or not versions
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in versions)
    ):
        raise where.error("expected a non-empty list of whole numbers >= 1", "schema_versions")
    schema_versions = frozenset(versions)
    raw_fields = entry["fields"]
    if not isinstance(raw_fields, dict) or not raw_fields:
        raise where.error("expected an ordered mapping of field: type", "fields")
    fields = tuple(
        _payload_field(where, raw_name, spec, schema_versions)
        for raw_name, spec in raw_fields.items()
    )
    key_field = str(entry["key_field"])
    key = next((f for f in fields if f.name == key_field), None)
    if key is None:
        raise where.error(f"{key_field!r} is not one of the fields", "key_field")
    if key.nullable or key.type.kind not in _KEY_KINDS:
        raise where.error(
            f"{key_field!r} must be a required field of type {', '.join(_KEY_KINDS)}", "key_field"
        )
    topic_env = entry.get("topic_env")
    if topic_env is not None and (not isinstance(topic_env, str) or not _ENV_NAME.match(topic_env)):
        raise where.error(f"{topic_env!r} is not an environment variable name", "topic_env")
    try:
        topic = topic_name(SETTING, str(entry.get("topic", name)))
    except ConfigurationError as exc:
        raise where.error(exc.problem, "topic") from None
    if topic_env is not None and env.get(topic_env, "").strip():
        # The environment names the topic (the setting is validated as any other).
        topic = topic_name(topic_env, env[topic_env].strip())
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise where.error("expected a string", "description")
    step, config, derived = _step(where, entry.get("step"), entry.get("config"), fields)
    max_bytes = entry.get("max_message_bytes", 1024 * 1024)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise where.error(
            f"expected a whole number of bytes >= 1, got {max_bytes!r}", "max_message_bytes"
        )
    return EventContract(
        name=name,
        topic=topic,
        event_types=tuple(event_types),
        schema_versions=schema_versions,
        fields=fields,
        key_field=key_field,
        description=description.strip(),
        topic_env=topic_env,
        step=step,
        step_config=config,
        max_message_bytes=max_bytes,
        max_future_skew=_duration(
            where, entry.get("max_future_skew"), "max_future_skew", timedelta(hours=1)
        ),
        max_age=_duration(where, entry.get("max_age"), "max_age", timedelta(days=365)),
        derived=derived,
        catalog=path,
    )


def load_streams(path: Path, env: Mapping[str, str] | None = None) -> tuple[EventContract, ...]:
    """Read and validate the ``streams:`` of the catalogue; every error names the file, the
    stream and the field. ``env`` supplies the topics named by ``topic_env``."""
    document = read_catalog(path)
    raw = document.get("streams", [])
    if not isinstance(raw, list):
        raise ConfigurationError(SETTING, f"{path}: 'streams' must be a list")
    streams = tuple(_stream(path, i, entry, env or {}) for i, entry in enumerate(raw))
    by_name: dict[str, EventContract] = {}
    by_topic: dict[str, EventContract] = {}
    for stream in streams:
        if stream.name in by_name:
            raise ConfigurationError(SETTING, f"{path}: stream {stream.name} is declared twice")
        by_name[stream.name] = stream
        other = by_topic.get(stream.topic)
        if other is not None:
            how = f" (from {stream.topic_env})" if stream.topic_env else ""
            raise ConfigurationError(
                SETTING,
                f"{path}: streams {other.name} and {stream.name} both read topic "
                f"{stream.topic!r}{how}: each stream needs its own topic",
            )
        by_topic[stream.topic] = stream
    tables = document.get("tables") or []
    targets = {t.get("target") for t in tables if isinstance(t, dict)}
    for stream in streams:
        if stream.name in targets:
            raise ConfigurationError(
                SETTING,
                f"{path}: stream {stream.name}: name is also a table's target (one EDW table each)",
            )
    return streams


def stream(streams: Any, name: str) -> EventContract:
    """The stream ``name`` of the catalogue (``streams``: the loaded streams or the settings)."""
    loaded = getattr(streams, "streams", streams)
    for candidate in loaded:
        if candidate.name == name:
            return candidate
    raise KeyError(f"the catalogue declares no stream {name!r}")
