"""Starts the local stack's processes in their own process groups and stops them together."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

from kappa.local.processes import (
    LocalStackError,
)

log = logging.getLogger(__name__)


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
    #: Started again when it dies (run workers), instead of ending :meth:`Supervisor.wait`.
    restart: bool = False
    env: dict[str, str] | None = None
    cwd: str | None = None
    started_at: float = 0.0
    restarts: int = 0
    #: Seconds between SIGTERM and SIGKILL when stopping it (None: the supervisor's).
    grace_s: float | None = None


class Supervisor:
    """Runs child processes, each in its own process group, and stops them cleanly.

    Ctrl-C in a terminal reaches only the supervisor (children are in other process groups);
    :meth:`wait` returns and the caller calls :meth:`stop_all`, which stops the children in
    reverse start order: SIGTERM to the group, then SIGKILL after the grace period.
    A child started with ``restart=True`` is started again when it dies (what is left of its
    process group killed first), at most once per :attr:`RESTART_BACKOFF_S`.
    """

    RESTART_BACKOFF_S = 5.0

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
        restart: bool = False,
        grace_s: float | None = None,
    ) -> int:
        """Start ``argv`` as ``name`` (stdout and stderr appended to ``log_path``); return its pid.

        ``env`` replaces the environment when given (merge with ``os.environ`` yourself);
        ``restart``: start it again whenever it dies; ``grace_s``: its own stop grace.
        """
        with self._lock:
            if any(c.name == name for c in self._children):
                raise ValueError(f"a child named {name!r} is already supervised")
            log_file: IO[bytes] | None = None
            if log_path is not None:
                log_path = Path(log_path)
                log_path.parent.mkdir(parents=True, exist_ok=True)
                log_file = log_path.open("ab")
            child_env = dict(env) if env is not None else None
            child_cwd = str(cwd) if cwd is not None else None
            try:
                proc = _popen(name, list(argv), log_file, child_env, child_cwd)
            except LocalStackError:
                if log_file is not None:
                    log_file.close()
                raise
            self._children.append(
                _Child(
                    name,
                    list(argv),
                    log_path,
                    proc,
                    log_file,
                    restart=restart,
                    env=child_env,
                    cwd=child_cwd,
                    started_at=time.monotonic(),
                    grace_s=grace_s,
                )
            )
            log.info("started %s (pid %s)", name, proc.pid)
            return proc.pid

    def restarts(self, name: str) -> int:
        """How many times ``name`` was started again after dying."""
        return self._child(name).restarts

    def restart_dead(self) -> list[str]:
        """Start again the restartable children found dead; returns their names."""
        restarted: list[str] = []
        with self._lock:
            for child in self._children:
                if not child.restart:
                    continue
                code = _peek_exit(child.proc)
                if code is None:
                    continue
                if time.monotonic() - child.started_at < self.RESTART_BACKOFF_S:
                    continue  # died right after starting: not more often than the backoff
                # Its pool processes outlive a killed leader in its group: end them first
                # (the leader is not reaped yet, so its pid is still the group's).
                _signal_group(child.proc.pid, signal.SIGKILL)
                child.proc.wait()
                log.warning(
                    "%s (pid %s) died (%s); starting it again", child.name, child.proc.pid, code
                )
                child.proc = _popen(child.name, child.argv, child.log_file, child.env, child.cwd)
                child.started_at = time.monotonic()
                child.restarts += 1
                restarted.append(child.name)
        return restarted

    def exited(self) -> SupervisorExit | None:
        """The first child found dead (without reaping it), or None when all are alive;
        restartable children are not reported (:meth:`restart_dead` starts them again)."""
        for child in list(self._children):
            if child.restart:
                continue
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
                self.restart_dead()
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
            own = child.grace_s if child.grace_s is not None else grace
            codes[child.name] = self._stop_child(child, min(own, grace))
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


def _popen(
    name: str,
    argv: list[str],
    log_file: IO[bytes] | None,
    env: dict[str, str] | None,
    cwd: str | None,
) -> subprocess.Popen[bytes]:
    try:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log_file if log_file is not None else None,
            stderr=subprocess.STDOUT if log_file is not None else None,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        raise LocalStackError(f"cannot start {name} ({argv[0]}): {exc}") from None


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
