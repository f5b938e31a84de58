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
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from kappa.catalog.fields import (
    ENVELOPE_COLUMNS,
    RESERVED_COLUMNS,
    SOURCE_COLUMNS,
    PayloadField,
    payload_field,
)
from kappa.catalog.files import ENV_NAME, SETTING, Where, duration, read_catalog
from kappa.exceptions import ConfigurationError
from kappa.setting_values import topic_name
from kappa.steps.config import build_step_class

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


def resolve_step(dotted: str, *, directory: Path | None = None) -> type:
    """The step class at ``module:Class`` or ``module.Class``; ``directory`` (the
    catalogue's) is put first on ``sys.path`` and stays there, so the catalogue's own modules
    import as they do for the Dagster code location, whatever command loads the catalogue."""
    if directory is not None and str(directory) not in sys.path:
        sys.path.insert(0, str(directory))
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
    where: Where, raw: Any, config: Any, fields: tuple[PayloadField, ...]
) -> tuple[str | None, dict[str, Any], tuple[tuple[str, str], ...]]:
    if raw is None:
        if config is not None:
            raise where.error("config is given but no step", "config")
        return None, {}, ()
    if not isinstance(raw, str):
        raise where.error(f"expected module:Class, got {raw!r}", "step")
    try:
        step_class = resolve_step(raw, directory=where.path.resolve().parent)
    except ValueError as exc:
        raise where.error(f"{raw}: {exc}", "step") from None
    if not callable(getattr(step_class, "apply", None)):
        raise where.error(f"{raw} has no apply method", "step")
    config = {} if config is None else config
    if not isinstance(config, dict):
        raise where.error("expected a mapping", "config")
    # Built once here and dropped, so a config the step refuses (an unknown key, a wrong
    # type, a value out of bounds) fails when the catalogue loads, not at the first batch.
    build_step_class(step_class, config, catalog=where.path, stream=where.stream, dotted=raw)
    derived = []
    names = {f.name for f in fields} | RESERVED_COLUMNS
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
    where = Where(path, label)
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
        payload_field(where, raw_name, spec, schema_versions)
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
    if topic_env is not None and (not isinstance(topic_env, str) or not ENV_NAME.match(topic_env)):
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
        max_future_skew=duration(
            where, entry.get("max_future_skew"), "max_future_skew", timedelta(hours=1)
        ),
        max_age=duration(where, entry.get("max_age"), "max_age", timedelta(days=365)),
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
