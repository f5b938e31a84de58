"""Connections to PostgreSQL (the EDW, the OLTP database), failing with the setting's name."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from kappa.exceptions import (
    ConfigurationError,
)
from kappa.settings import redact


@contextmanager
def connect(
    url: str, *, setting: str = "KAPPA_EDW_URL", statement_timeout_s: float | None = None
) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the EDW: every write goes through an explicit
    ``conn.transaction()``. A refused or malformed URL names ``setting``.
    ``statement_timeout_s`` bounds every statement (sensors must answer within 60 s)."""
    options = (
        f"-c statement_timeout={int(statement_timeout_s * 1000)}" if statement_timeout_s else ""
    )
    try:
        conn = psycopg.connect(
            url, connect_timeout=10, application_name="kappa-etl", autocommit=True, options=options
        )
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ConfigurationError(setting, f"cannot connect to {redact(url)}: {reason}") from None
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(setting, f"not a usable PostgreSQL URL: {exc}") from None
    try:
        yield conn
    finally:
        conn.close()
