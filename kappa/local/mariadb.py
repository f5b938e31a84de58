"""A local MariaDB server with the binlog settings change capture needs: its own data directory,
a free port, started from the installed ``mariadbd`` (Debian's ``mariadb-server``).

No server binary installed: :func:`find_mariadbd` answers None and the MariaDB source is off.
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kappa.exceptions import ConfigurationError
from kappa.local.processes import port_in_use

if TYPE_CHECKING:
    from kappa.settings import Settings

#: Where Debian installs the server; PATH is searched too.
_CANDIDATES = ("/usr/sbin/mariadbd", "/usr/libexec/mariadbd", "/usr/sbin/mysqld")

#: The server settings the binlog source needs (see kappa.sources.mariadb_server.check_server).
BINLOG_OPTIONS = (
    "--log-bin=binlog",
    "--binlog-format=ROW",
    "--binlog-row-image=FULL",
    "--binlog-row-metadata=FULL",
    "--server-id=1",
    "--gtid-domain-id=0",
    "--gtid-strict-mode=ON",
    "--log-slave-updates=ON",
)


def find_mariadbd() -> str | None:
    """The path of an installed MariaDB server binary, or None."""
    found = shutil.which("mariadbd")
    if found:
        return found
    for candidate in _CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class MariaDBServer:
    """A running ``mariadbd`` this process started."""

    datadir: Path
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"mysql://root@127.0.0.1:{self.port}/"

    def restart(self) -> None:
        """Stop the server cleanly and start it again on the same data directory and port."""
        self.stop()
        self.process = start_mariadb(self.datadir, port=self.port).process

    def stop(self, timeout: float = 30.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _install(binary: str, datadir: Path) -> None:
    install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if install_db is None:
        raise RuntimeError("mariadb-install-db is not installed beside mariadbd")
    datadir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            install_db,
            "--no-defaults",
            f"--datadir={datadir}",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
            "--user=root" if os.getuid() == 0 else f"--user={getpass.getuser()}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def start_mariadb(
    datadir: Path, *, port: int | None = None, binary: str | None = None, timeout: float = 60.0
) -> MariaDBServer:
    """Start (installing the data directory on first use) a server with the binlog on."""
    binary = binary or find_mariadbd()
    if binary is None:
        raise RuntimeError("no mariadbd binary is installed")
    datadir = datadir.resolve()
    if not (datadir / "mysql").is_dir():
        _install(binary, datadir)
    port = port or free_port()
    args = [
        binary,
        "--no-defaults",
        f"--datadir={datadir}",
        f"--port={port}",
        "--bind-address=127.0.0.1",
        f"--socket={datadir / 'mariadb.sock'}",
        f"--pid-file={datadir / 'mariadb.pid'}",
        f"--log-error={datadir / 'error.log'}",
        "--skip-name-resolve",
        *BINLOG_OPTIONS,
    ]
    if os.getuid() == 0:
        args.append("--user=root")
    # Its own session: Ctrl-C in the terminal of `kappa up` stops it through its owner, in order.
    process = subprocess.Popen(
        args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    server = MariaDBServer(datadir, port, process)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = (datadir / "error.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"mariadbd exited ({process.returncode}): {log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return server
        except OSError:
            time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"mariadbd did not listen on port {port} within {timeout:.0f}s")


@dataclass(frozen=True)
class LocalMariaDB:
    """What ``kappa up`` makes of the catalogue's MariaDB tables: the settings to add to the
    stack's environment, the server it started (None: given by ``KAPPA_MARIADB_URL``, or
    none), and what to tell the user."""

    env: dict[str, str]
    server: MariaDBServer | None = None
    message: str | None = None


def local_mariadb(settings: Settings, datadir: Path) -> LocalMariaDB:
    """The MariaDB server of the catalogue's ``engine: mariadb`` tables for the local stack.

    ``KAPPA_MARIADB_URL`` set: that server, nothing started. Else, with a ``mariadbd``
    installed: a server started on ``datadir`` (kept across restarts, so the binlog and the
    ledger's GTIDs stay in step) on ``KAPPA_MARIADB_PORT``, with the binlog settings capture
    needs. Else those tables are turned off (``KAPPA_CAPTURES_OFF``) and the message says so:
    the rest of the stack runs without them.
    """
    from kappa.sources.captured import OFF_SETTING, active_captures
    from kappa.sources.mariadb_server import URL_SETTING

    tables = [spec.name for spec in active_captures(settings) if spec.engine == "mariadb"]
    if not tables or settings.env.get(URL_SETTING, "").strip():
        return LocalMariaDB({})
    binary = find_mariadbd()
    if binary is None:
        off = [n for n in settings.env.get(OFF_SETTING, "").split(",") if n.strip()]
        return LocalMariaDB(
            {OFF_SETTING: ",".join([*off, *tables])},
            message=(
                f"{', '.join(tables)}: MariaDB source off, no mariadbd is installed "
                f"(Debian: mariadb-server) and {URL_SETTING} is not set"
            ),
        )
    # Something answering there would pass for the server's start (a closed port's
    # connections in TIME_WAIT do not count: the server binds with SO_REUSEADDR).
    if port_in_use(settings.mariadb_port):
        raise ConfigurationError(
            "KAPPA_MARIADB_PORT",
            f"127.0.0.1:{settings.mariadb_port} is in use: choose a free port for the "
            f"local MariaDB, or set {URL_SETTING} to a server of your own",
        )
    server = start_mariadb(datadir, port=settings.mariadb_port, binary=binary)
    return LocalMariaDB({URL_SETTING: server.url}, server=server)
