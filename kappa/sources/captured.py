"""The change source of a captured table outside Dagster (the CLI), by the engine the
catalogue names for it."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from kappa.catalog.captures import CaptureSpec
from kappa.edw.connection import connect
from kappa.exceptions import ConfigurationError
from kappa.sources.base import ChangeSource
from kappa.sources.mariadb_binlog import BinlogTable
from kappa.sources.mariadb_server import URL_SETTING, ServerAddress
from kappa.sources.pg_capture import ChangeTable


def mariadb_url(env: Mapping[str, str] | None = None) -> str:
    """The MariaDB server of the ``engine: mariadb`` tables, or a :class:`ConfigurationError`
    naming the setting."""
    url = (os.environ if env is None else env).get(URL_SETTING, "").strip()
    if not url:
        raise ConfigurationError(
            URL_SETTING,
            "the catalogue captures tables with engine: mariadb; set it to the server "
            "(mysql://user:password@host:port/)",
        )
    ServerAddress.parse(url)
    return url


@contextmanager
def open_change_source(spec: CaptureSpec, *, oltp_url: str) -> Iterator[ChangeSource]:
    """``spec``'s change source, closed on exit: its change table in the PostgreSQL OLTP
    database at ``oltp_url``, or the binlog of the server in ``KAPPA_MARIADB_URL``."""
    if spec.engine == "mariadb":
        table = BinlogTable(ServerAddress.parse(mariadb_url()), spec)
        try:
            yield table
        finally:
            table.close()
        return
    with connect(oltp_url, setting="KAPPA_OLTP_URL") as conn:
        yield ChangeTable(conn, spec)
