"""Small process and port helpers shared by the local stack's servers."""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
from pathlib import Path

from kappa.exceptions import KappaError

log = logging.getLogger(__name__)


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


def tail_log(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file, for error messages."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc.strerror})"
    tail = text.splitlines()[-lines:]
    if not tail:
        return f"(log {path} is empty)"
    return "\n".join(f"    {line}" for line in tail)


def short_reason(exc: BaseException) -> str:
    """The first meaningful lines of a driver error, on one line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    reason = " ".join(lines[:2]) if lines else type(exc).__name__
    return reason[:300]


def terminate(proc: subprocess.Popen[bytes], grace_s: float, what: str) -> None:
    """SIGTERM ``proc`` and reap it; SIGKILL it when it is still there after ``grace_s``."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %s) ignored SIGTERM; killing it", what, proc.pid)
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def crash(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGKILL ``proc`` (when running) and reap it: a crash, for fault tests."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(10)
