"""Idempotent administration of a PostgreSQL server: databases, reachability checks."""

from __future__ import annotations

import logging
import re

import psycopg
from psycopg import errors as pg_errors
from psycopg import sql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from kappa.exceptions import ConfigurationError
from kappa.local.processes import short_reason
from kappa.settings import redact

log = logging.getLogger(__name__)

_DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def libpq_url(url: str) -> str:
    """A SQLAlchemy-style URL (``postgresql+psycopg://``) as a libpq URL (``postgresql://``)."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        return url
    if parsed.drivername in ("postgresql", "postgres") or not parsed.drivername.startswith(
        ("postgresql+", "postgres+")
    ):
        return url
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def scrub(text: str, url: str) -> str:
    """``text`` with the URL's password (raw and percent-decoded) replaced by ``***``."""
    secrets: set[str] = set()
    try:
        password = make_url(url).password
    except ArgumentError:
        password = None
    if password:
        secrets.add(str(password))
    match = re.match(r"^[a-z0-9+]+://[^:/@]*:([^@/]*)@", url, re.IGNORECASE)
    if match and match.group(1):
        secrets.add(match.group(1))
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def ensure_database(server_url: str, name: str, *, setting: str = "database") -> bool:
    """Create database ``name`` on the server of ``server_url`` unless it exists.

    ``server_url`` may name a database or not (``postgres`` is used to connect). Returns
    whether the database was created. Safe against a concurrent creator. Errors are
    :class:`ConfigurationError` naming ``setting`` (with the URL's password masked).
    """
    if not _DATABASE_NAME.match(name):
        raise ConfigurationError(
            setting, f"{name!r} is not a valid database name (letters, digits, '_', max 63)"
        )
    admin_url = _with_database(server_url, "postgres", setting)
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            exists = conn.execute(
                "select 1 from pg_database where datname = %s", (name,)
            ).fetchone()
            if exists:
                return False
            try:
                conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
            except (pg_errors.DuplicateDatabase, pg_errors.UniqueViolation):
                return False
            log.info("created database %s on %s", name, redact(admin_url))
            return True
    except psycopg.Error as exc:
        raise ConfigurationError(
            setting,
            f"{redact(admin_url)}: cannot create database {name!r}: "
            f"{scrub(short_reason(exc), admin_url)}",
        ) from None


def _with_database(url: str, database: str, setting: str) -> str:
    """``url`` (libpq or SQLAlchemy style) pointing at ``database``."""
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigurationError(setting, "not a database URL") from None
    return parsed.set(drivername="postgresql", database=database).render_as_string(
        hide_password=False
    )


def check_postgres(setting_name: str, url: str, timeout_s: float = 5) -> None:
    """Connect to ``url`` and run ``select 1``; raise :class:`ConfigurationError` if that fails.

    The message names ``setting_name``, shows the URL with its password masked, and a short
    reason from the driver (never the password).
    """
    target = libpq_url(url)
    shown = redact(url)
    try:
        with psycopg.connect(
            target, connect_timeout=max(2, round(timeout_s)), autocommit=True
        ) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        raise ConfigurationError(
            setting_name, f"{shown}: {scrub(short_reason(exc), url)}"
        ) from None
    except (ValueError, TypeError) as exc:  # malformed conninfo
        raise ConfigurationError(
            setting_name, f"{shown}: {scrub(short_reason(exc), url)}"
        ) from None
