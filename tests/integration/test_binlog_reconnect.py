"""A binlog read whose replication stream the server drops mid-batch: the client connects
again, the server sends the binlog again from the batch's first GTID, and the target still
gets every committed change once."""

from __future__ import annotations

import itertools
import time
from typing import Any

import pytest

import kappa.sources.mariadb_binlog as mariadb_binlog
from kappa.ingest.outcome import BatchOutcome
from kappa.sources.mariadb_binlog import BinlogTable
from kappa.sources.mariadb_server import ServerAddress
from kappa.sources.mariadb_stream import Dumps
from tests.integration.mariadb import mysql
from tests.integration.test_binlog import drain_source, ledger, prepare, spec_for, versions

pytestmark = pytest.mark.integration

#: Rows written: the first half inserts keys, the second half updates each once.
CHANGES = 600
PER_TRANSACTION = 10
#: Rows a batch takes at most (whole transactions): a batch of 50 transactions, then 10.
BATCH = 500
#: Bytes of a column that is not captured. A non-blocking dump is sent to the log's end, and
#: the reader gets what the server wrote before its dump was killed: on loopback some 4 MB
#: (the server's socket send buffer) beyond what it had read. Rows this wide make the first
#: batch about 11 MB of binlog, so its read loses the stream well before its last
#: transaction.
PADDING = 16_000
#: The dump of a read is killed once this many row events of it have reached the reader.
KILL_AFTER_ROW_EVENTS = 15

DDL = (
    "CREATE TABLE calls (call_id varchar(40) PRIMARY KEY, customer_id varchar(40) NOT NULL, "
    "reason varchar(40), duration_s int, called_at datetime(6) NOT NULL, padding longtext) "
    "ENGINE=InnoDB"
)


def dump_threads(address: ServerAddress) -> list[int]:
    with address.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT id FROM information_schema.processlist WHERE command = 'Binlog Dump'")
        return [int(row[0]) for row in cur.fetchall()]


def kill_dumps(address: ServerAddress) -> int:
    """Kill the server's Binlog Dump threads (the test's reader has the only one) and wait
    until they are gone."""
    threads = dump_threads(address)
    with address.connect() as conn, conn.cursor() as cur:
        for thread in threads:
            cur.execute(f"KILL {thread}")
    deadline = time.monotonic() + 10
    while set(threads) & set(dump_threads(address)):
        assert time.monotonic() < deadline, "the killed dump thread did not go away"
        time.sleep(0.01)
    return len(threads)


class KilledOnce:
    """A replication stream whose first dump the server kills after a few row events."""

    def __init__(self, stream: Any, address: ServerAddress, kills: list[int]) -> None:
        self.stream = stream
        self.address = address
        self.kills = kills

    def __iter__(self) -> Any:
        rows = 0
        for event in self.stream:
            if type(event).__name__.endswith("RowsEvent"):
                rows += 1
                if rows == KILL_AFTER_ROW_EVENTS:
                    self.kills.append(kill_dumps(self.address))
            yield event

    def close(self) -> None:
        self.stream.close()


def write_wide_rows(address: ServerAddress, db: str) -> dict[str, list[tuple]]:
    """The test's writes (transactions of inserts, then of updates, on a table with a wide
    column that is not captured); each key's SCD2 versions they give."""
    keys = [f"k-{i:05d}" for i in range(CHANGES // 2)]
    rows = [(k, f"c-{i % 7}", "billing", i) for i, k in enumerate(keys)]
    rows += [(k, f"c-{i % 5}", "fraud", i + 1) for i, k in enumerate(keys)]
    w = mysql(address, db)
    with w.cursor() as cur:
        cur.execute("DROP TABLE calls")  # the same, with the wide column
        cur.execute(DDL)
        for at in range(0, len(rows), PER_TRANSACTION):
            cur.executemany(
                "INSERT INTO calls VALUES (%s, %s, %s, %s, UTC_TIMESTAMP(6), "
                f"REPEAT('x', {PADDING})) "
                "ON DUPLICATE KEY UPDATE customer_id = VALUES(customer_id), "
                "reason = VALUES(reason), duration_s = VALUES(duration_s)",
                rows[at : at + PER_TRANSACTION],
            )
            w.commit()
    w.close()
    return {
        k: [(f"c-{i % 7}", "billing", i, False), (f"c-{i % 5}", "fraud", i + 1, True)]
        for i, k in enumerate(keys)
    }


def drain(source: BinlogTable, edw_url: str, batch: int) -> list[BatchOutcome]:
    return drain_source(source, edw_url, max_changes=batch)


def test_a_log_larger_than_the_socket_buffers_is_read_in_one_dump(
    tmp_path, mariadb_db, database_url
):
    """The server ends a non-blocking dump by closing the connection; with the dump request
    framed right that close is orderly and the reader gets the log's end (with the request
    one byte short, the server reset the connection, the tail still in its buffers was
    lost and every read of a log this size was started again, often many times)."""
    address, db = mariadb_db
    spec = spec_for(tmp_path, db)
    prepare(address, db, database_url, spec)
    expected = write_wide_rows(address, db)
    source = BinlogTable(address, spec)
    outcomes = drain(source, database_url, CHANGES)
    assert [o.received for o in outcomes if o.status == "committed"] == [CHANGES]
    assert source.dumps == 1
    assert versions(database_url, spec) == expected


def test_a_dump_lost_mid_batch_is_sent_again_and_the_target_gets_each_change_once(
    tmp_path, mariadb_db, database_url, monkeypatch
):
    address, db = mariadb_db
    spec = spec_for(tmp_path, db)
    prepare(address, db, database_url, spec)
    expected = write_wide_rows(address, db)
    kills: list[int] = []
    reads: list[Dumps] = []
    opened = mariadb_binlog.open_stream

    def open_stream(*args: Any, **kwargs: Any) -> Any:
        stream, dumps = opened(*args, **kwargs)
        reads.append(dumps)
        return KilledOnce(stream, address, kills), dumps

    monkeypatch.setattr(mariadb_binlog, "open_stream", open_stream)
    source = BinlogTable(address, spec)
    outcomes = drain(source, database_url, BATCH)

    committed = [o for o in outcomes if o.status == "committed"]
    assert outcomes[-1].status == "already loaded"
    # Each committed change applied and counted once: none doubled, none lost.
    assert [o.received for o in committed] == [BATCH, CHANGES - BATCH]
    assert versions(database_url, spec) == expected
    ranges = ledger(database_url, spec)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), "gap or overlap"
    assert sum(r[2] for r in ranges) == CHANGES
    # And the stream was lost: one read per batch (the last, of an empty range, reads
    # nothing). The first batch's dump was killed before its last transaction reached the
    # reader, which was sent the binlog again from the batch's first GTID: two dumps. (The
    # second batch is short: its dump may have sent all and ended before the kill.)
    assert len(kills) == 2 and kills[0] == 1, kills
    assert [d.started for d in reads][:1] == [2] and all(d.started <= 2 for d in reads)
    assert source.dumps == sum(d.started for d in reads)
