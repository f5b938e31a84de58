"""Names from configuration, validated before any SQL or client call is built from them.

No dependency but the error type: the catalogue and the settings both validate with these.
"""

from __future__ import annotations

import re

from kappa.exceptions import ConfigurationError

_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


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
