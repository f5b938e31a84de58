"""A stream's ``config:`` mapping as a step reads it: typed, bounded, and every refusal
naming the catalogue file, the stream and the key."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

from kappa.catalog.files import SETTING
from kappa.exceptions import ConfigurationError


class StepConfig:
    """Read each key once with its type and bounds; :meth:`done` refuses keys nobody read
    (a misspelt threshold would otherwise silently keep its default)."""

    def __init__(
        self, values: Mapping[str, Any], *, catalog: Path | str = "", stream: str = ""
    ) -> None:
        self.values = dict(values)
        self.catalog = catalog
        self.stream = stream
        self._read: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigurationError:
        return ConfigurationError(
            SETTING, f"{self.catalog}: stream {self.stream}, config key {key}: {problem}"
        )

    def _raw(self, key: str) -> Any:
        self._read.add(key)
        return self.values.get(key)

    def integer(self, key: str, default: int, *, minimum: int, maximum: int) -> int:
        raw = self._raw(key)
        if raw is None:
            return default
        if not isinstance(raw, int) or isinstance(raw, bool) or not minimum <= raw <= maximum:
            raise self.error(key, f"expected a whole number in [{minimum}, {maximum}], got {raw!r}")
        return raw

    def number(self, key: str, default: float, *, minimum: float, maximum: float) -> float:
        raw = self._raw(key)
        if raw is None:
            return default
        if (
            not isinstance(raw, int | float)
            or isinstance(raw, bool)
            or not minimum <= raw <= maximum
        ):
            raise self.error(key, f"expected a number in [{minimum}, {maximum}], got {raw!r}")
        return float(raw)

    def seconds(self, key: str, default: timedelta, *, maximum: timedelta) -> timedelta:
        """A duration given as whole seconds (>= 1)."""
        top = int(maximum.total_seconds())
        return timedelta(
            seconds=self.integer(key, int(default.total_seconds()), minimum=1, maximum=top)
        )

    def done(self) -> None:
        unknown = sorted(set(map(str, self.values)) - self._read)
        if unknown:
            raise self.error(", ".join(unknown), f"unknown; known: {', '.join(sorted(self._read))}")


def build_step_class(
    step_class: type, values: Mapping[str, Any], *, catalog: Path | str, stream: str, dotted: str
) -> Any:
    """The step ``step_class`` configured by a stream's ``config:`` mapping, or a
    :class:`ConfigurationError` naming the catalogue file, the stream and the key.

    ``Class.from_catalog(StepConfig)`` where the class defines it (each key read with its
    type and bounds; keys nobody read refused); else ``Class(**config)``: the keys must be
    the constructor's parameters, each value of the type its annotation says (``int``,
    ``float``, ``str``, ``bool`` or a union of them with ``None``; other annotations are the
    constructor's to check), and what the constructor raises names the stream too.
    """
    factory = getattr(step_class, "from_catalog", None)
    if factory is not None:
        config = StepConfig(values, catalog=catalog, stream=stream)
        step = factory(config)
        config.done()
        return step
    where = f"{catalog}: stream {stream}"
    try:
        inspect.signature(step_class).bind(**values)
    except TypeError as exc:
        raise ConfigurationError(
            SETTING, f"{where}, field config: {dotted} does not take this config: {exc}"
        ) from None
    try:
        hints = typing.get_type_hints(step_class.__init__)  # type: ignore[misc]
    except Exception:  # annotations it cannot resolve here: the constructor checks alone
        hints = {}
    for key, value in values.items():
        expected = _plain_types(hints.get(key))
        if expected is not None and not any(_is(value, kind) for kind in expected):
            names = " or ".join(
                "null" if kind is type(None) else kind.__name__ for kind in expected
            )
            raise ConfigurationError(
                SETTING, f"{where}, config key {key}: expected {names}, got {value!r}"
            )
    try:
        return step_class(**values)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            SETTING, f"{where}, field config: {dotted} refuses this config: {exc}"
        ) from None


_PLAIN: tuple[type, ...] = (bool, int, float, str, type(None))


def _plain_types(hint: Any) -> tuple[type, ...] | None:
    """The plain types an annotation allows (None: not only plain types, so not checked)."""
    if hint is None:
        return None
    kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else None
    if kinds is None and typing.get_origin(hint) is typing.Union:
        kinds = typing.get_args(hint)
    kinds = kinds if kinds is not None else (hint,)
    return kinds if all(kind in _PLAIN for kind in kinds) else None


def _is(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # a whole number is a number
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, kind)
