"""Change capture from a real MariaDB binlog: whole transactions, exactly once, against an
independent reference built from the writers' own log of committed changes."""

from __future__ import annotations

import itertools
import random
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from kappa.catalog.captures import CaptureSpec, load_captures
from kappa.changes.target import ensure_target
from kappa.edw.connection import connect
from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.exceptions import ConfigurationError, LogResetError
from kappa.ingest.binlog import run_binlog_batch
from kappa.partitions import TimeWindows
from kappa.sources.mariadb_binlog import BinlogTable
from kappa.sources.mariadb_server import ServerAddress
from tests.integration.mariadb import mysql

pytestmark = pytest.mark.integration

SCHEMAS = Schemas()

CATALOG = """
tables:
  - name: calls
    engine: mariadb
    source: {db}.calls
    keys: [call_id]
    columns:
      call_id: text
      customer_id: text
      reason: text
      duration_s: integer
      called_at: timestamptz
    target: {target}
    mode: {mode}
"""

DDL = (
    "CREATE TABLE calls (call_id varchar(40) PRIMARY KEY, customer_id varchar(40) NOT NULL, "
    "reason varchar(40), duration_s int, called_at datetime(6) NOT NULL) ENGINE=InnoDB"
)


def spec_for(
    tmp_path: Path, db: str, *, mode: str = "scd2", target: str = "dim_call"
) -> CaptureSpec:
    path = tmp_path / "catalog.yaml"
    path.write_text(CATALOG.format(db=db, mode=mode, target=target))
    (spec,) = load_captures(path)
    return spec


def prepare(address: ServerAddress, db: str, edw_url: str, spec: CaptureSpec) -> None:
    conn = mysql(address, db)
    with conn.cursor() as cur:
        cur.execute(DDL)
    conn.commit()
    conn.close()
    with connect(edw_url) as edw:
        ensure_schema(edw, SCHEMAS, [])
        ensure_target(edw, SCHEMAS, spec)


def drain_source(source: BinlogTable, edw_url: str, *, max_changes: int = 10_000):
    """Batches of ``source`` until one commits nothing (its outcomes); closes the source."""
    outcomes = []
    try:
        with connect(edw_url) as edw:
            while True:
                outcome = run_binlog_batch(
                    source, edw, SCHEMAS, requested_end=None, run_id="test", max_changes=max_changes
                )
                outcomes.append(outcome)
                if outcome.status != "committed":
                    return outcomes
    finally:
        source.close()


def drain(address: ServerAddress, spec: CaptureSpec, edw_url: str, *, max_changes: int = 10_000):
    return drain_source(BinlogTable(address, spec), edw_url, max_changes=max_changes)


def ledger(edw_url: str, spec: CaptureSpec) -> list[tuple[int, int, int]]:
    with connect(edw_url) as edw:
        return [
            tuple(r)
            for r in edw.execute(
                "SELECT start_position, end_position, received FROM kappa.batch_ledger "
                "WHERE asset = %s ORDER BY start_position",
                (spec.asset,),
            ).fetchall()
        ]


def versions(edw_url: str, spec: CaptureSpec) -> dict[str, list[tuple]]:
    with connect(edw_url) as edw:
        rows = edw.execute(
            f"SELECT call_id, customer_id, reason, duration_s, is_current FROM edw.{spec.target} "
            "ORDER BY call_id, source_change_id"
        ).fetchall()
    found: dict[str, list[tuple]] = {}
    for call_id, customer, reason, duration, current in rows:
        found.setdefault(call_id, []).append((customer, reason, duration, current))
    return found


def test_a_batch_takes_whole_committed_transactions_exactly_once(
    tmp_path, mariadb_db, database_url
):
    address, db = mariadb_db
    spec = spec_for(tmp_path, db)
    prepare(address, db, database_url, spec)
    w = mysql(address, db)
    with w.cursor() as cur:
        for i in range(5):
            cur.execute(
                "INSERT INTO calls VALUES (%s, 'c-1', 'billing', %s, '2026-01-01 10:00:00')",
                (f"k-{i}", i),
            )
    w.commit()
    with w.cursor() as cur:
        cur.execute("UPDATE calls SET reason = 'fraud' WHERE call_id = 'k-1'")
        cur.execute("DELETE FROM calls WHERE call_id = 'k-2'")
    w.commit()
    w.close()
    outcomes = drain(address, spec, database_url, max_changes=2)
    committed = [o for o in outcomes if o.status == "committed"]
    # A batch of at most 2 rows cannot split the first transaction (5 rows): it takes it whole.
    assert [o.received for o in committed] == [5, 2]
    assert outcomes[-1].status == "already loaded"
    found = versions(database_url, spec)
    assert found["k-1"] == [("c-1", "billing", 1, False), ("c-1", "fraud", 1, True)]
    assert found["k-2"] == [("c-1", "billing", 2, False)]
    rows = ledger(database_url, spec)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(rows)), rows
    # Run again: nothing new, nothing doubled.
    assert drain(address, spec, database_url)[-1].status == "already loaded"
    assert versions(database_url, spec) == found


READER = """
import sys, time
from pathlib import Path
from kappa.catalog.captures import load_captures
from kappa.edw.connection import connect
from kappa.edw.types import Schemas
from kappa.ingest.binlog import run_binlog_batch
from kappa.sources.mariadb_binlog import BinlogTable
from kappa.sources.mariadb_server import ServerAddress

(spec,) = load_captures(Path(sys.argv[1]))
source = BinlogTable(ServerAddress.parse(sys.argv[2]), spec)
with connect(sys.argv[3]) as edw:
    while True:
        out = run_binlog_batch(source, edw, Schemas(), requested_end=None, run_id="reader",
                               max_changes=7)
        if out.status != "committed":
            time.sleep(0.05)
"""


class Writer(threading.Thread):
    """Random transactions on its own keys; after each commit, the changes it made go to its
    log (the independent reference)."""

    def __init__(
        self, address: ServerAddress, db: str, name: str, seed: int, stop: threading.Event
    ):
        super().__init__(daemon=True)
        self.conn = mysql(address, db)
        self.name_ = name
        self.rng = random.Random(seed)
        self.stop = stop
        self.live: dict[str, tuple] = {}
        self.log: list[tuple[str, tuple | None]] = []
        self.next = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self.transaction()
                time.sleep(self.rng.random() * 0.01)
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.conn.close()

    def transaction(self) -> None:
        changes: list[tuple[str, tuple | None]] = []
        live = dict(self.live)
        with self.conn.cursor() as cur:
            for _ in range(self.rng.randint(1, 4)):
                roll = self.rng.random()
                if roll < 0.45 or not live:
                    key = f"{self.name_}-{self.next}"
                    self.next += 1
                    image = (f"cust-{self.rng.randint(1, 9)}", "billing", self.rng.randint(1, 999))
                    cur.execute(
                        "INSERT INTO calls (call_id, customer_id, reason, duration_s, called_at) "
                        "VALUES (%s, %s, %s, %s, UTC_TIMESTAMP(6))",
                        (key, *image),
                    )
                elif roll < 0.85:
                    key = self.rng.choice(sorted(live))
                    customer, _, duration = live[key]
                    image = (customer, self.rng.choice(["billing", "fraud", "sales"]), duration + 1)
                    cur.execute(
                        "UPDATE calls SET reason = %s, duration_s = %s WHERE call_id = %s",
                        (image[1], image[2], key),
                    )
                else:
                    key = self.rng.choice(sorted(live))
                    image = None
                    cur.execute("DELETE FROM calls WHERE call_id = %s", (key,))
                if image is None:
                    live.pop(key)
                else:
                    live[key] = image
                changes.append((key, image))
        if self.rng.random() < 0.1:
            self.conn.rollback()  # never committed: must never appear
            return
        self.conn.commit()
        self.live = live
        self.log.extend(changes)


def reference(logs: list[list[tuple[str, tuple | None]]]) -> dict[str, list[tuple]]:
    """Each key's SCD2 versions from the writers' logs: one per insert or update, the last
    one current unless the key was deleted."""
    expected: dict[str, list[tuple]] = {}
    for log in logs:
        for key, image in log:
            history = expected.setdefault(key, [])
            if history and history[-1][3]:
                history[-1] = (*history[-1][:3], False)
            if image is not None:
                history.append((*image, True))
    return expected


def test_concurrent_writers_a_long_transaction_and_a_killed_reader_give_the_reference(
    tmp_path, mariadb_db, mariadb_server, database_url
):
    import signal
    import subprocess
    import sys

    address, db = mariadb_db
    spec = spec_for(tmp_path, db)
    prepare(address, db, database_url, spec)
    script = tmp_path / "reader.py"
    script.write_text(READER)

    def reader() -> subprocess.Popen:
        return subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(tmp_path / "catalog.yaml"),
                mariadb_server.url,
                database_url,
            ],
            cwd=Path(__file__).resolve().parents[2],
            stdout=subprocess.DEVNULL,
            stderr=open(tmp_path / "reader.log", "ab"),
        )

    # A transaction open across two reader kills: its rows come after all it saw commit.
    long_open = mysql(address, db)
    with long_open.cursor() as cur:
        cur.execute(
            "INSERT INTO calls (call_id, customer_id, reason, duration_s, called_at) "
            "VALUES ('long-1', 'cust-0', 'billing', 5, UTC_TIMESTAMP(6))"
        )
    stop = threading.Event()
    writers: list[Writer] = []

    def start_writers(prefix: str) -> None:
        stop.clear()
        batch = [
            Writer(address, db, f"{prefix}{i}", seed=len(writers) + i, stop=stop) for i in range(3)
        ]
        writers.extend(batch)
        for w in batch:
            w.start()

    def stop_writers() -> None:
        stop.set()
        for w in writers:
            w.join(30)

    start_writers("a")
    rng = random.Random(7)
    kills = 0
    process = reader()
    try:
        for round_ in range(4):
            time.sleep(0.6 + rng.random() * 0.6)
            process.send_signal(signal.SIGKILL)  # at any instant, mid-batch as likely as not
            process.wait()
            kills += 1
            if round_ == 1:
                with long_open.cursor() as cur:
                    cur.execute("UPDATE calls SET reason = 'sales' WHERE call_id = 'long-1'")
                long_open.commit()
                long_open.close()
                # An added column: rows carry it from now on; it is simply not captured.
                ddl = mysql(address, db)
                with ddl.cursor() as cur:
                    cur.execute("ALTER TABLE calls ADD COLUMN note varchar(20) NULL")
                ddl.close()
            if round_ == 2:
                # The server restarts (writers paused, so each knows what it committed).
                stop_writers()
                mariadb_server.restart()
                start_writers("b")
            process = reader()
        time.sleep(1.0)
    finally:
        stop_writers()
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert [w.error for w in writers if w.error is not None] == []
    drain(address, spec, database_url, max_changes=50)
    expected = reference(
        [w.log for w in writers]
        + [[("long-1", ("cust-0", "billing", 5)), ("long-1", ("cust-0", "sales", 5))]]
    )
    assert kills == 4 and sum(len(w.log) for w in writers) > 100
    assert versions(database_url, spec) == expected
    rows = ledger(database_url, spec)
    assert len(rows) > 4
    assert all(a[1] == b[0] for a, b in itertools.pairwise(rows)), "gap or overlap"


def dim_rows(edw_url: str, spec: CaptureSpec) -> list[tuple]:
    with connect(edw_url) as edw:
        return edw.execute(f"SELECT * FROM edw.{spec.target} ORDER BY 1").fetchall()


def write(address: ServerAddress, db: str, statements: list[str]) -> None:
    conn = mysql(address, db)
    with conn.cursor() as cur:
        for statement in statements:
            cur.execute(statement)
    conn.commit()
    conn.close()


def test_a_backfilled_partition_gives_the_rows_of_the_live_batches(
    tmp_path, mariadb_db, database_url
):
    from kappa.ingest.capture import ChangeWindowLoader
    from kappa.ingest.reprocess import reprocess_window

    address, db = mariadb_db
    spec = spec_for(tmp_path, db)
    prepare(address, db, database_url, spec)
    source = BinlogTable(address, spec)
    insert = "INSERT INTO calls VALUES ('{k}', 'c-1', 'billing', {d}, '2026-01-01 10:00:00')"
    with connect(database_url) as edw:
        for day, keys in (("2026-01-01", ["a", "b"]), ("2026-01-02", ["c"])):
            write(address, db, [insert.format(k=k, d=i) for i, k in enumerate(keys)])
            write(address, db, ["UPDATE calls SET reason = 'fraud' WHERE call_id = 'a'"])
            for _ in range(3):  # batches of one transaction each
                run_binlog_batch(
                    source,
                    edw,
                    SCHEMAS,
                    requested_end=None,
                    run_id="live",
                    max_changes=1,
                    partition_key=day,
                )
        write(address, db, ["DELETE FROM calls WHERE call_id = 'b'"])
        run_binlog_batch(
            source,
            edw,
            SCHEMAS,
            requested_end=None,
            run_id="live",
            max_changes=1,
            partition_key="2026-01-03",
        )
        live = dim_rows(database_url, spec)
        live_ledger = ledger(database_url, spec)
        (outcome,) = reprocess_window(
            source,
            edw,
            SCHEMAS,
            spec.asset,
            TimeWindows("daily", datetime(2026, 1, 1, tzinfo=UTC)).window("2026-01-01"),
            ChangeWindowLoader(source, edw, SCHEMAS, spec),
            run_id="backfill",
        )
    source.close()
    assert outcome.status == "replaced" and outcome.received == 3
    assert dim_rows(database_url, spec) == live
    # The partition's batches became one batch over the same positions; the others are kept.
    after = ledger(database_url, spec)
    assert after[0] == (live_ledger[0][0], live_ledger[1][1], 3)
    assert after[1:] == live_ledger[2:]


def test_an_incompatible_ddl_change_is_refused_by_name_and_nothing_is_loaded(
    tmp_path, mariadb_db, database_url
):
    from kappa.sources.mariadb_server import CaptureImpossibleError

    address, db = mariadb_db
    spec = spec_for(tmp_path, db)
    prepare(address, db, database_url, spec)
    write(address, db, ["INSERT INTO calls VALUES ('a', 'c-1', 'billing', 3, '2026-01-01')"])
    drain(address, spec, database_url)
    before = (dim_rows(database_url, spec), ledger(database_url, spec))
    write(address, db, ["ALTER TABLE calls MODIFY duration_s varchar(10)"])
    write(address, db, ["INSERT INTO calls VALUES ('b', 'c-1', 'billing', 'long', '2026-01-01')"])
    with pytest.raises(CaptureImpossibleError, match=rf"{db}\.calls\.duration_s .*became varchar"):
        drain(address, spec, database_url)
    write(address, db, ["ALTER TABLE calls DROP COLUMN reason"])
    with pytest.raises(CaptureImpossibleError):
        drain(address, spec, database_url)
    assert (dim_rows(database_url, spec), ledger(database_url, spec)) == before


def test_a_purged_binlog_position_is_refused_by_name_and_nothing_is_touched(
    tmp_path, mariadb_db, database_url
):
    address, db = mariadb_db
    spec = spec_for(tmp_path, db)
    prepare(address, db, database_url, spec)
    write(address, db, ["INSERT INTO calls VALUES ('a', 'c-1', 'billing', 3, '2026-01-01')"])
    drain(address, spec, database_url)
    before = (dim_rows(database_url, spec), ledger(database_url, spec))
    write(address, db, ["INSERT INTO calls VALUES ('b', 'c-1', 'billing', 3, '2026-01-01')"])
    admin = address.connect()
    with admin.cursor() as cur:
        cur.execute("FLUSH BINARY LOGS")
        # A file the crash-recovery checkpoint still names stays until InnoDB moves past it.
        for _ in range(50):
            cur.execute("SHOW BINARY LOGS")
            files = cur.fetchall()
            cur.execute("PURGE BINARY LOGS TO %s", (files[-1][0],))
            cur.execute("SHOW BINARY LOGS")
            if len(cur.fetchall()) == 1:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the server kept its older binlog files")
    admin.close()
    with pytest.raises(LogResetError, match=r"expired GTID sequence numbers \[\d+, \d+\)"):
        drain(address, spec, database_url)
    assert (dim_rows(database_url, spec), ledger(database_url, spec)) == before

    # A capture starting now, with no ledger: the purged transactions wrote 'a' and 'b',
    # which the binlog can no longer give. Refused by name, nothing written; with `start:
    # oldest_retained` the table is taken from the oldest transaction kept ('c', after).
    fresh = spec_for(tmp_path, db, target="dim_call_new")
    with connect(database_url) as edw:
        ensure_target(edw, SCHEMAS, fresh)
    with pytest.raises(ConfigurationError, match=r"transactions \[1, \d+\) were purged") as refused:
        drain(address, fresh, database_url)
    assert "start: oldest_retained" in str(refused.value)
    assert ledger(database_url, fresh) == []
    path = tmp_path / "catalog.yaml"
    path.write_text(
        path.read_text().replace("mode: scd2", "mode: scd2\n    start: oldest_retained")
    )
    (retained,) = load_captures(path)
    assert retained.start == "oldest_retained"
    write(address, db, ["INSERT INTO calls VALUES ('c', 'c-1', 'billing', 3, '2026-01-01')"])
    drain(address, retained, database_url)
    assert list(versions(database_url, retained)) == ["c"]


@pytest.mark.parametrize(
    ("setting", "value"), [("binlog_format", "MIXED"), ("binlog_row_image", "MINIMAL")]
)
def test_server_settings_that_make_capture_impossible_are_named(
    tmp_path, mariadb_db, setting, value
):
    address, db = mariadb_db
    spec = spec_for(tmp_path, db)
    admin = address.connect()
    with admin.cursor() as cur:
        cur.execute(f"SELECT @@global.{setting}")
        (previous,) = cur.fetchone()
        cur.execute(f"SET GLOBAL {setting} = %s", (value,))
    try:
        with pytest.raises(ConfigurationError, match=rf"^{setting}: .*{setting}={value}"):
            BinlogTable(address, spec)
    finally:
        with admin.cursor() as cur:
            cur.execute(f"SET GLOBAL {setting} = %s", (previous,))
        admin.close()


def test_a_row_its_target_cannot_hold_is_dead_lettered_and_the_rest_loads(
    tmp_path, mariadb_db, database_url
):
    """``duration_s`` is a MariaDB int, the catalogue's column numeric(4,1): 12345 does not
    fit. That change goes to the dead letters with its reason; the rest of its transaction
    and the next ones load, and the ledger counts it."""
    address, db = mariadb_db
    path = tmp_path / "catalog.yaml"
    path.write_text(
        CATALOG.format(db=db, mode="current", target="fact_call").replace(
            "duration_s: integer", 'duration_s: "numeric(4,1)"'
        )
    )
    (spec,) = load_captures(path)
    prepare(address, db, database_url, spec)
    w = mysql(address, db)
    with w.cursor() as cur:
        cur.executemany(
            "INSERT INTO calls VALUES (%s, 'c-1', 'billing', %s, '2026-01-01 10:00:00')",
            [("k-1", 60), ("k-2", 12345), ("k-3", 7)],
        )
    w.commit()
    with w.cursor() as cur:
        cur.execute("UPDATE calls SET duration_s = 61 WHERE call_id = 'k-1'")
    w.commit()
    w.close()
    outcomes = [o for o in drain(address, spec, database_url) if o.status == "committed"]
    assert sum(o.received for o in outcomes) == 4
    assert sum(o.dead_lettered for o in outcomes) == 1
    with connect(database_url) as edw:
        rows = edw.execute("SELECT call_id, duration_s FROM edw.fact_call ORDER BY 1").fetchall()
        dead = edw.execute(
            "SELECT source, reason FROM kappa.dead_letter WHERE asset = 'fact_call'"
        ).fetchall()
    assert rows == [("k-1", 61), ("k-3", 7)]
    [(source, reason)] = dead
    assert source == f"{db}.calls"
    assert "duration_s" in reason, reason


def test_a_batch_planned_before_later_transactions_still_records_its_completeness(
    tmp_path, mariadb_db, database_url
):
    """A run loads the range its sensor planned a few seconds before, so in a live stream the
    binlog has moved on by then. The batch must still say how far the target is complete (the
    as-of lookups wait for it): up to the first change of the table it left out. Before, such
    a batch kept its predecessor's completeness, none at all from the first one on, and every
    payment looking up call-centre calls loaded provisional."""
    address, db = mariadb_db
    spec = spec_for(tmp_path, db)
    prepare(address, db, database_url, spec)

    def insert(key: str) -> None:
        write(
            address,
            db,
            [f"INSERT INTO calls VALUES ('{key}', 'c-1', 'billing', 1, '2026-01-01 10:00:00')"],
        )

    insert("k-0")
    insert("k-1")
    source = BinlogTable(address, spec)
    try:
        first = source.bounds([0])[0].start
        planned = source.plan_end(first, max_changes=10_000)  # the sensor's plan: both inserts
        time.sleep(1.1)  # binlog times are whole seconds
        between = datetime.now(UTC)
        insert("k-2")  # written after the plan, before the run
        written = datetime.now(UTC)  # its binlog second lies in [between, written]
        with connect(database_url) as edw:
            out = run_binlog_batch(
                source, edw, SCHEMAS, requested_end=planned, run_id="run", max_changes=10_000
            )
            assert (out.status, out.start, out.end, out.received) == (
                "committed",
                first,
                planned,
                2,
            )
            (watermark,) = edw.execute(
                "SELECT watermark FROM kappa.ledger_head WHERE asset = %s", (spec.asset,)
            ).fetchone()
        assert watermark is not None
        # Complete up to the left-out insert, which the batch does not hold.
        assert watermark <= datetime.now(UTC)
        # (binlog times are whole seconds: the insert's may be the second after ``between``)
        assert watermark.replace(microsecond=0) <= written.replace(microsecond=0)
        assert watermark >= between.replace(microsecond=0) - timedelta(seconds=1)
        # The next batch takes it and is complete up to its own planning.
        with connect(database_url) as edw:
            nxt = run_binlog_batch(
                source, edw, SCHEMAS, requested_end=None, run_id="run", max_changes=10_000
            )
            assert (nxt.start, nxt.received) == (planned, 1)
            (later,) = edw.execute(
                "SELECT watermark FROM kappa.ledger_head WHERE asset = %s", (spec.asset,)
            ).fetchone()
        assert later > watermark
    finally:
        source.close()


def test_pending_changes_are_told_by_value_from_the_binlog_past_the_ledger(
    tmp_path, mariadb_db, database_url
):
    """A fact batch's as-of lookup waits only for the customers whose changes are in the
    binlog and not loaded yet: the binlog read from the ledger to its end names them, with the
    earliest change time of each (from the before image too: an update moving a row away from
    a customer changes what that customer had)."""
    address, db = mariadb_db
    spec = spec_for(tmp_path, db)
    prepare(address, db, database_url, spec)
    write(
        address,
        db,
        ["INSERT INTO calls VALUES ('k-0', 'c-0', 'billing', 1, '2026-01-01 10:00:00')"],
    )
    source = BinlogTable(address, spec)
    other = BinlogTable(address, spec)
    try:
        first = source.bounds([0])[0].start
        loaded = source.plan_end(first, max_changes=10_000)
        assert source.pending_since(loaded, "customer_id", ["c-0", "c-1"]) == {}
        before = datetime.now(UTC).replace(microsecond=0)
        write(
            address,
            db,
            [
                "INSERT INTO calls VALUES ('k-1', 'c-1', 'billing', 1, '2026-01-01 10:00:00')",
                "UPDATE calls SET customer_id = 'c-2' WHERE call_id = 'k-0'",
            ],
        )
        found = source.pending_since(loaded, "customer_id", ["c-0", "c-1", "c-3"])
        assert set(found) == {"c-0", "c-1"}
        assert all(before <= at <= datetime.now(UTC) for at in found.values())
        # Every reader has its own replica id: two dumps at once do not end each other.
        assert source.reader_id != other.reader_id
        assert other.pending_since(first, "customer_id", ["c-2"]) == {"c-2": found["c-0"]}
    finally:
        source.close()
        other.close()
