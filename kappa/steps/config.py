"""A stream's ``config:`` mapping as a step reads it: typed, bounded, and every refusal
naming the catalogue file, the stream and the key."""

from __future__ import annotations

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
