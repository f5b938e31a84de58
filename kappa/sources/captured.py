"""The captured tables a deployment runs (the catalogue's, less those ``KAPPA_CAPTURES_OFF``
turns off), and the change source of one outside Dagster (the CLI), by its engine."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from kappa.catalog.captures import CaptureSpec, load_captures
from kappa.edw.connection import connect
from kappa.exceptions import ConfigurationError
from kappa.sources.base import ChangeSource
from kappa.sources.mariadb_binlog import BinlogTable
from kappa.sources.mariadb_server import URL_SETTING, ServerAddress, check_server
from kappa.sources.pg_capture import ChangeTable

if TYPE_CHECKING:
    from kappa.settings import Settings

#: Captured tables (catalogue ``name``) this deployment does not capture, comma-separated:
#: no capture asset, sensor or checks, nothing read from their source; their EDW target
#: stays (a step reading it sees what was loaded before). ``kappa up`` sets it for the
#: MariaDB tables when no MariaDB server is installed or given.
OFF_SETTING = "KAPPA_CAPTURES_OFF"


def captures_off(env: Mapping[str, str], captures: Sequence[CaptureSpec]) -> frozenset[str]:
    """The names in ``KAPPA_CAPTURES_OFF``; one that is not a captured table fails, naming
    the setting."""
    raw = env.get(OFF_SETTING, "")
    off = frozenset(name.strip() for name in raw.split(",") if name.strip())
    unknown = sorted(off - {spec.name for spec in captures})
    if unknown:
        known = ", ".join(spec.name for spec in captures) or "none"
        raise ConfigurationError(
            OFF_SETTING,
            f"{', '.join(unknown)} is not a captured table of the catalogue (tables: {known})",
        )
    return off


def active_captures(settings: Settings) -> list[CaptureSpec]:
    """The catalogue's captured tables less those turned off (``KAPPA_CAPTURES_OFF``)."""
    captures = load_captures(settings.catalog)
    off = captures_off(settings.env, captures)
    return [spec for spec in captures if spec.name not in off]


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


def cli_mariadb_url(settings: Settings) -> str:
    """The MariaDB server as a command outside the stack reaches it: ``KAPPA_MARIADB_URL``,
    else the local stack's own server (``kappa up`` started one in ``$KAPPA_HOME/mariadb``,
    on ``KAPPA_MARIADB_PORT``), else a :class:`ConfigurationError` naming the setting."""
    if (
        not settings.env.get(URL_SETTING, "").strip()
        and (settings.home / "mariadb" / "mysql").is_dir()
    ):
        return f"mysql://root@127.0.0.1:{settings.mariadb_port}/"
    return mariadb_url(settings.env)


@contextmanager
def open_change_source(spec: CaptureSpec, settings: Settings) -> Iterator[ChangeSource]:
    """``spec``'s change source, closed on exit: its change table in the PostgreSQL OLTP
    database, or the binlog of its MariaDB server (:func:`cli_mariadb_url`)."""
    if spec.engine == "mariadb":
        table = BinlogTable(ServerAddress.parse(cli_mariadb_url(settings)), spec)
        try:
            yield table
        finally:
            table.close()
        return
    with connect(settings.resolved_oltp_url, setting="KAPPA_OLTP_URL") as conn:
        yield ChangeTable(conn, spec)


def check_mariadb_tables(specs: Sequence[CaptureSpec], url: str) -> None:
    """Before a MariaDB table is captured: the server's binlog settings allow it (else
    :class:`~kappa.sources.mariadb_server.CaptureImpossibleError` names the setting) and each
    source table exists (else a :class:`ConfigurationError` naming the catalogue entry)."""
    with ServerAddress.parse(url).connect() as conn:
        check_server(conn)
        with conn.cursor() as cur:
            for spec in specs:
                cur.execute(
                    "SELECT count(*) FROM information_schema.tables "
                    "WHERE table_schema = %s AND table_name = %s",
                    (spec.source.schema, spec.source.table),
                )
                row = cur.fetchone()
                if not row or not row[0]:
                    raise ConfigurationError(
                        "KAPPA_CATALOG",
                        f"captured table {spec.source} ({spec.name}) does not exist in the "
                        f"MariaDB server of {URL_SETTING}",
                    )
