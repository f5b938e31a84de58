"""Reading the catalogue file, and where in it an error is (file, stream, field)."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from kappa.exceptions import ConfigurationError
from kappa.setting_values import identifier

#: The setting that names the catalogue file.
SETTING = "KAPPA_CATALOG"


ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,127}$")


_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")


_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


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


class Where:
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


def duration(where: Where, raw: Any, key: str, default: timedelta) -> timedelta:
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
