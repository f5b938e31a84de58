"""The catalogue's ``local:`` section: what only the local stack runs besides the engine.

``kappa init --local`` and ``kappa up`` call ``prepare`` against the OLTP database before the
capture triggers are installed (a project's source tables, say) and ``seed`` right after
them (so what it writes is captured); ``kappa up`` starts each of ``producers`` as
``python -m <module>`` under its supervisor. Modules named here are imported and run with
the catalogue's directory on ``sys.path`` and as the working directory, the way Dagster's
``working_directory`` loads a code location, so a project's own packages need no install.

Everything is validated when the section is loaded; an error names the catalogue file and
the key.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kappa.catalog.files import SETTING, read_catalog
from kappa.exceptions import ConfigurationError

_KEYS = ("prepare", "seed", "producers")
_PRODUCER_KEYS = ("name", "module")
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PRODUCER_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
#: The supervisor's own processes: a producer of the same name would hide one of them.
RESERVED_NAMES = ("daemon", "webserver")

#: A ``local.prepare`` or ``local.seed`` callable, wrapped: returns the lines to print.
Hook = Callable[..., list[str]]


@dataclass(frozen=True)
class Producer:
    """A process ``kappa up`` runs: ``python -m module``, its log in ``logs/<name>.log``."""

    name: str
    module: str


@dataclass(frozen=True)
class LocalSection:
    """The validated ``local:`` section (empty when the catalogue has none)."""

    #: The catalogue file.
    path: Path
    prepare: str | None = None
    seed: str | None = None
    producers: tuple[Producer, ...] = ()

    def hook(self, key: str) -> Hook | None:
        """The callable named by ``prepare`` or ``seed``, imported from the catalogue's
        directory; None when the key is not set."""
        dotted = getattr(self, key)
        if dotted is None:
            return None
        module_name, _, attribute = dotted.partition(":")
        with in_directory(self.directory):
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                raise ConfigurationError(
                    SETTING, f"{self.path}: local.{key}: cannot import {module_name}: {exc}"
                ) from None
        found = getattr(module, attribute, None)
        if not callable(found):
            raise ConfigurationError(
                SETTING, f"{self.path}: local.{key}: {module_name} has no callable {attribute}"
            )
        directory = self.directory

        def call(*args: Any, **kwargs: Any) -> list[str]:
            with in_directory(directory):
                messages = found(*args, **kwargs)
            return [str(m) for m in messages or ()]

        return call

    @property
    def directory(self) -> Path:
        """Where the named modules are imported from and run in."""
        return self.path.resolve().parent


@contextlib.contextmanager
def in_directory(directory: Path) -> Iterator[None]:
    """``directory`` first on ``sys.path`` and as the working directory, for the duration."""
    entry = str(directory)
    added = entry not in sys.path
    if added:
        sys.path.insert(0, entry)
    previous = Path.cwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(previous)
        # A module imported from here stays imported (and importable by its name).
        if added and entry in sys.path:
            sys.path.remove(entry)


def _callable_name(path: Path, key: str, raw: Any) -> str:
    if not isinstance(raw, str) or raw.count(":") != 1:
        raise ConfigurationError(
            SETTING, f"{path}: local.{key}: expected module:function, got {raw!r}"
        )
    module_name, attribute = raw.split(":")
    if not _MODULE.match(module_name) or not attribute.isidentifier():
        raise ConfigurationError(SETTING, f"{path}: local.{key}: {raw!r} is not module:function")
    return raw


def _producer(path: Path, index: int, raw: Any, directory: Path) -> Producer:
    where = f"{path}: local.producers[{index}]"
    if not isinstance(raw, dict):
        raise ConfigurationError(SETTING, f"{where}: expected a mapping with name and module")
    unknown = sorted(set(map(str, raw)) - set(_PRODUCER_KEYS))
    if unknown:
        raise ConfigurationError(SETTING, f"{where}: unknown key(s) {', '.join(unknown)}")
    missing = [k for k in _PRODUCER_KEYS if k not in raw]
    if missing:
        raise ConfigurationError(SETTING, f"{where}: missing {', '.join(missing)}")
    name, module = raw["name"], raw["module"]
    if not isinstance(name, str) or not _PRODUCER_NAME.match(name):
        raise ConfigurationError(
            SETTING, f"{where}, name: {name!r} is not a process name (a-z, 0-9, '-', '_')"
        )
    if name in RESERVED_NAMES:
        raise ConfigurationError(SETTING, f"{where}, name: {name!r} is one of kappa up's own")
    if not isinstance(module, str) or not _MODULE.match(module):
        raise ConfigurationError(SETTING, f"{where}, module: {module!r} is not a module name")
    with in_directory(directory):
        try:
            found = importlib.util.find_spec(module)
        except ImportError as exc:
            raise ConfigurationError(
                SETTING, f"{where}, module: cannot import {module}: {exc}"
            ) from None
    if found is None:
        raise ConfigurationError(
            SETTING, f"{where}, module: {module} is not found from {directory}"
        )
    return Producer(name, module)


def load_local(path: Path) -> LocalSection:
    """Read and validate the catalogue's ``local:`` section."""
    directory = path.resolve().parent
    document = read_catalog(path)
    raw = document.get("local")
    if raw is None:
        return LocalSection(path)
    if not isinstance(raw, dict):
        raise ConfigurationError(SETTING, f"{path}: local: expected a mapping")
    unknown = sorted(set(map(str, raw)) - set(_KEYS))
    if unknown:
        raise ConfigurationError(SETTING, f"{path}: local: unknown key(s) {', '.join(unknown)}")
    hooks = {
        key: _callable_name(path, key, raw[key]) if raw.get(key) is not None else None
        for key in ("prepare", "seed")
    }
    entries = raw.get("producers") or []
    if not isinstance(entries, list):
        raise ConfigurationError(SETTING, f"{path}: local.producers: expected a list")
    producers = tuple(_producer(path, i, e, directory) for i, e in enumerate(entries))
    names = [p.name for p in producers]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigurationError(
            SETTING, f"{path}: local.producers: {', '.join(twice)} named twice"
        )
    return LocalSection(path, prepare=hooks["prepare"], seed=hooks["seed"], producers=producers)
