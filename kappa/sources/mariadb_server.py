"""The MariaDB (MySQL-compatible) server a binlog source reads: its address, from
``KAPPA_MARIADB_URL``, and the settings row capture needs, refused by name."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar
from urllib.parse import unquote, urlsplit

import pymysql

from kappa.exceptions import ConfigurationError

#: The setting that names the MariaDB server (``mysql://user:password@host:port/``).
URL_SETTING = "KAPPA_MARIADB_URL"

#: What the server must be set to for row capture, and why each matters.
REQUIRED_SETTINGS = {
    "log_bin": ("1", "the binlog must be on (log_bin)"),
    "binlog_format": ("ROW", "only ROW events carry the changed rows"),
    "binlog_row_image": ("FULL", "updates and deletes must carry every column"),
    "binlog_row_metadata": (
        "FULL",
        "row events must name their columns, or a DDL change "
        "would be decoded with the wrong column names",
    ),
}


class Connection(pymysql.connections.Connection):
    """pymysql's connection, its default TLS context built once per process.

    Given no TLS option, pymysql prefers TLS (used when the server offers it) and builds a
    new ``SSLContext`` for every connection, loading the system's CA bundle each time.
    Binlog reads connect twice per read (control and dump), and a batch waiting for
    capture reads every half second: sampled on the running stack, a third of a run
    worker's CPU and a sixth of the code server's went to ``SSLContext.load_default_certs``.
    That default context (no CA: no certificate or host check) is the same every time, so
    it is shared; a connection given TLS options builds its own, as before.
    """

    _default_tls: ClassVar[ssl.SSLContext | None] = None
    _tls_lock: ClassVar[threading.Lock] = threading.Lock()

    def _create_ssl_ctx(self, sslp: Any) -> ssl.SSLContext:
        if not isinstance(sslp, dict) or sslp:
            return super()._create_ssl_ctx(sslp)
        with Connection._tls_lock:
            if Connection._default_tls is None:
                Connection._default_tls = super()._create_ssl_ctx({})
            return Connection._default_tls


class CaptureImpossibleError(ConfigurationError):
    """The server's settings or schema make row capture impossible; names the setting."""


@dataclass(frozen=True)
class ServerAddress:
    host: str
    port: int
    user: str
    password: str

    @classmethod
    def parse(cls, url: str) -> ServerAddress:
        parts = urlsplit(url)
        if parts.scheme not in ("mysql", "mariadb") or not parts.hostname:
            raise ConfigurationError(
                URL_SETTING,
                # Not the URL itself: it may hold a password.
                "expected mysql://user:password@host:port/, got a URL with scheme "
                f"{parts.scheme!r} and host {parts.hostname!r}",
            )
        return cls(
            parts.hostname,
            parts.port or 3306,
            unquote(parts.username or "root"),
            unquote(parts.password or ""),
        )

    def settings(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "connect_timeout": 10,
        }

    def connect(self, **extra: Any) -> pymysql.connections.Connection:
        return Connection(**self.settings(), autocommit=True, **extra)


def _variables(conn: pymysql.connections.Connection, names: Iterable[str]) -> dict[str, str]:
    wanted = {n.lower() for n in names}
    with conn.cursor() as cur:
        cur.execute("SELECT variable_name, variable_value FROM information_schema.global_variables")
        found = {str(k).lower(): str(v) for k, v in cur.fetchall()}
    return {k: v for k, v in found.items() if k in wanted}


def check_server(conn: pymysql.connections.Connection) -> int:
    """Raise :class:`CaptureImpossibleError` naming the first server setting that makes row
    capture impossible; returns the server's GTID domain."""
    found = _variables(conn, [*REQUIRED_SETTINGS, "gtid_domain_id"])
    for name, (wanted, why) in REQUIRED_SETTINGS.items():
        value = found.get(name)
        if value is None or value.upper() not in (wanted, "ON" if wanted == "1" else wanted):
            raise CaptureImpossibleError(
                name,
                f"the MariaDB server has {name}={value}, change capture needs {name}="
                f"{'ON' if wanted == '1' else wanted}: {why}",
            )
    return int(found.get("gtid_domain_id", "0"))


def domain_seqs(state: str, domain: int) -> dict[int, int]:
    """``server_id: seq`` of ``domain`` in a GTID list ``d-s-n,d-s-n``."""
    seqs: dict[int, int] = {}
    for gtid in filter(None, (g.strip() for g in state.split(","))):
        d, s, n = (int(p) for p in gtid.split("-"))
        if d == domain:
            seqs[s] = max(n, seqs.get(s, 0))
    return seqs
