"""One setting's value, parsed and checked: numbers in a range, identifiers, topic names,
database URLs and broker lists. Each error names the setting; :mod:`kappa.settings` and
a project's own settings (``examples.shop.settings``) share these."""

from __future__ import annotations

import re

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from kappa.exceptions import ConfigurationError

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


def whole_number(name: str, raw: str, *, minimum: int, maximum: int) -> int:
    """``raw`` as an integer in [minimum, maximum]; errors name the setting ``name``."""
    try:
        value = int(raw)
    except ValueError:
        raise ConfigurationError(name, f"expected a whole number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigurationError(name, f"{value} is outside [{minimum}, {maximum}]")
    return value


def number(name: str, raw: str, *, minimum: float, maximum: float) -> float:
    """``raw`` as a number in [minimum, maximum]; errors name the setting ``name``."""
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(name, f"expected a number, got {raw!r}") from None
    if not minimum <= value <= maximum:
        raise ConfigurationError(name, f"{value} is outside [{minimum}, {maximum}]")
    return value


def identifier(name: str, raw: str) -> str:
    """Validate a SQL identifier from configuration (lower-case, no quoting needed)."""
    if not _IDENTIFIER.match(raw):
        raise ConfigurationError(
            name, f"{raw!r} is not a valid identifier (lower-case letters, digits, '_', max 63)"
        )
    return raw


def topic_name(name: str, raw: str) -> str:
    """Validate a Kafka topic name from configuration."""
    if not _TOPIC.match(raw):
        raise ConfigurationError(
            name, f"{raw!r} is not a legal topic name ([A-Za-z0-9._-], 1..249)"
        )
    return raw


def postgres_url(name: str, raw: str) -> str:
    """Validate a PostgreSQL URL and normalise it to a libpq URL (``postgresql://``)."""
    try:
        url = make_url(raw)
    except ArgumentError:
        raise ConfigurationError(
            name, "not a database URL (expected postgresql://user[:password]@host[:port]/database)"
        ) from None
    if url.get_backend_name() not in ("postgresql", "postgres"):
        raise ConfigurationError(name, f"expected a postgresql:// URL, got {url.drivername}://")
    if not url.database:
        raise ConfigurationError(name, "the URL names no database")
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def redact(url: str) -> str:
    """The URL with its password masked, for logs and messages."""
    try:
        parsed: URL = make_url(url)
    except ArgumentError:
        return "<unparseable URL>"
    return parsed.render_as_string(hide_password=True)


def bootstrap_servers(name: str, raw: str) -> str:
    """Validate a comma-separated list of host:port."""
    for server in raw.split(","):
        host, sep, port = server.strip().rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigurationError(name, f"{server.strip()!r} is not host:port")
    return raw
