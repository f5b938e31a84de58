"""The shop's call centre: its own system on MariaDB, and a simulator of its clients.

In a real shop the call-centre software is often a separate product on its own database;
``catalog.yaml`` captures its ``call_center_calls`` from MariaDB's binlog (``engine:
mariadb``), and the fraud step reads the calls as before. ``python -m examples.shop.calls``
(the catalogue's producer ``calls-simulator``) runs concurrent writers: each transaction
logs one to three calls of existing customers, a few stay open for a while before they
commit, and some roll back, which is what binlog capture has to get right. When the
catalogue captures the calls from PostgreSQL instead, or the MariaDB table is off, it idles.
"""

from __future__ import annotations

import logging
import random
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Final

import pymysql

from examples.shop.oltp.plans import OltpConfig, customer_id, plan_call
from examples.shop.process import run_producer
from examples.shop.settings import ShopSettings
from kappa.catalog.captures import CaptureSpec, load_captures
from kappa.settings import Settings, redact
from kappa.sources.captured import active_captures, mariadb_url
from kappa.sources.mariadb_server import ServerAddress

logger = logging.getLogger("examples.shop.calls")

#: The captured table of the calls (its ``name`` in the catalogue).
CAPTURE: Final = "call_center_calls"
WRITERS: Final = 2
_ROLLBACK_RATE: Final = 0.05
_LONG_HOLD_SHARE: Final = 0.05
_PROGRESS_EVERY_S: Final = 10.0


def calls_capture(settings: Settings) -> CaptureSpec | None:
    """The catalogue's capture of the calls, or None when it has none."""
    return next((c for c in load_captures(settings.catalog) if c.name == CAPTURE), None)


def calls_in_postgres(settings: Settings) -> bool:
    """Whether the OLTP database's writers insert the calls (they are captured from there)."""
    spec = calls_capture(settings)
    return spec is not None and spec.engine == "postgresql"


def ensure_calls_table(address: ServerAddress, spec: CaptureSpec) -> None:
    """The call centre's database and table in MariaDB (idempotent)."""
    database, table = spec.source.schema, spec.source.table
    with address.connect() as conn, conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE IF NOT EXISTS `{database}`")
        cur.execute(
            f"CREATE TABLE IF NOT EXISTS `{database}`.`{table}` ("
            "call_id varchar(80) PRIMARY KEY, customer_id varchar(20) NOT NULL, "
            "reason varchar(40) NOT NULL, sentiment varchar(20) NOT NULL, "
            "duration_s int NOT NULL, called_at datetime(6) NOT NULL, KEY (customer_id)"
            ") ENGINE=InnoDB"
        )


class CallWriters:
    """``WRITERS`` concurrent clients of the call centre's table at ``rate`` transactions/s."""

    def __init__(self, address: ServerAddress, spec: CaptureSpec, config: OltpConfig) -> None:
        self.address = address
        # Identifiers the catalogue validated (letters, digits, underscores), quoted.
        self.insert = (
            f"INSERT INTO `{spec.source.schema}`.`{spec.source.table}` "  # noqa: S608
            "(call_id, customer_id, reason, sentiment, duration_s, called_at) "
            "VALUES (%s, %s, %s, %s, %s, UTC_TIMESTAMP(6))"
        )
        self.config = config
        self.token = f"{int(datetime.now(UTC).timestamp() * 1_000_000):x}"
        self.committed = 0
        self.calls = 0
        self.rolled_back = 0
        self._lock = threading.Lock()

    def run(self, stop: threading.Event, *, rate: float) -> None:
        errors: list[BaseException] = []
        halt = threading.Event()

        def guarded(index: int) -> None:
            try:
                self._write(index, halt, interval_s=WRITERS / rate)
            except BaseException as exc:
                errors.append(exc)
                halt.set()

        threads = [
            threading.Thread(target=guarded, args=(w,), name=f"calls-writer-{w}", daemon=True)
            for w in range(WRITERS)
        ]
        for thread in threads:
            thread.start()
        last = time.monotonic()
        while not stop.wait(0.2) and not halt.is_set():
            if time.monotonic() - last >= _PROGRESS_EVERY_S:
                last = time.monotonic()
                logger.info(
                    "calls: %d transactions committed (%d calls), %d rolled back",
                    self.committed,
                    self.calls,
                    self.rolled_back,
                )
        halt.set()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]

    def _write(self, index: int, halt: threading.Event, *, interval_s: float) -> None:
        rng = random.Random(f"{self.config.seed}-calls-{index}")
        known = max(1, self.config.customers * 9 // 10)  # the seeded customers
        number = 0
        conn = pymysql.connect(**self.address.settings(), autocommit=False)
        with conn:
            next_due = time.monotonic() + interval_s * index / WRITERS
            while not halt.is_set():
                if halt.wait(max(0.0, next_due - time.monotonic())):
                    break
                next_due = max(next_due + interval_s, time.monotonic() - 1.0)
                count = rng.choice((1, 1, 2, 3))
                with conn.cursor() as cur:
                    for _ in range(count):
                        call = plan_call(rng, self.config, number)
                        number += 1
                        cur.execute(
                            self.insert,
                            (
                                f"call-{self.config.seed}-{self.token}-{index}-{call.number}",
                                customer_id(rng.randrange(known)),
                                call.reason,
                                call.sentiment,
                                call.duration_s,
                            ),
                        )
                if rng.random() < _LONG_HOLD_SHARE:
                    halt.wait(rng.uniform(0.5, 2.0))  # a transaction left open a while
                if rng.random() < _ROLLBACK_RATE:
                    conn.rollback()
                    with self._lock:
                        self.rolled_back += 1
                    continue
                conn.commit()
                with self._lock:
                    self.committed += 1
                    self.calls += count


def _write(settings: Settings, shop: ShopSettings, stop: threading.Event) -> None:
    if shop.calls_rate == 0:
        logger.info("calls simulator idle: KAPPA_CALLS_RATE is 0")
        stop.wait()
        return
    spec = calls_capture(settings)
    if spec is None or spec.engine != "mariadb":
        logger.info("calls simulator idle: the catalogue does not capture %s from MariaDB", CAPTURE)
        stop.wait()
        return
    if spec.name not in {c.name for c in active_captures(settings)}:
        logger.info("calls simulator idle: %s is off (no MariaDB server)", CAPTURE)
        stop.wait()
        return
    url = mariadb_url(settings.env)
    logger.info(
        "calls simulator: %d writers, %g transactions/s to %s (%s)",
        WRITERS,
        shop.calls_rate,
        redact(url),
        spec.source,
    )
    CallWriters(ServerAddress.parse(url), spec, OltpConfig.from_settings(shop)).run(
        stop, rate=shop.calls_rate
    )


if __name__ == "__main__":
    sys.exit(run_producer("examples.shop.calls", _write))
