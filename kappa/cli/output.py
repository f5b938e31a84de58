"""What the commands share: output lines, steps, tables, ages and the times they parse."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from kappa.catalog.ingests import topic_ingests
from kappa.exceptions import ConfigurationError
from kappa.settings import REPO_ROOT, Settings


def repo_root() -> Path:
    """The folder with ``workspace.yaml``: the source tree (editable install) or the cwd."""
    for candidate in (REPO_ROOT, Path.cwd()):
        if (candidate / "workspace.yaml").exists():
            return candidate
    raise ConfigurationError("workspace.yaml", "not found next to the kappa package nor in the cwd")


def say(message: str) -> None:
    print(message, flush=True)


@contextmanager
def step(title: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"  • {title} ...", end="", flush=True)
    try:
        yield
    except BaseException:
        print(" failed", flush=True)
        raise
    print(f" ok ({time.monotonic() - started:.1f} s)", flush=True)


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Columns padded to their widest cell, for terminals and runbooks."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, *rows]:
        say("  ".join(str(v).ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def compact_age(seconds: float | None) -> str:
    """A compact age, one word: 42s, 7min, 3h, 2d."""
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def shorten(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def timestamp(text: str) -> datetime:
    """An ISO-8601 time with a zone, for --from."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO-8601 time") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no zone (add Z or +00:00)")
    return moment


def utc_time(text: str) -> datetime:
    """An ISO-8601 date or time, UTC unless it names a zone, for partition bounds."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        try:  # an hourly partition key, as the UI and the checks show them
            moment = datetime.strptime(text, "%Y-%m-%d-%H:%M").replace(tzinfo=UTC)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not an ISO-8601 date or time, nor a partition key"
            ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def loaded_topics(settings: Settings) -> dict[str, str]:
    """Each loaded topic, with the setting that names it (a stream's topic_env, else the
    catalogue)."""
    return {spec.topic: setting for spec, setting in topic_ingests(settings)}
