"""Change capture from a MariaDB (MySQL-compatible) server's binlog, as a
:class:`~kappa.sources.base.Source`.

Positions are GTID sequence numbers of one replication domain (``domain-server-seq``, the
``seq`` part): the server numbers every committed transaction of a domain consecutively, in
commit order, and writes each one to the binlog as one event group. So the range ``[start,
end)`` names whole committed transactions with no gap and no overlap, whatever binlog file
holds them, across restarts and file rotation; a file name and byte offset would name the
same events, but only within one server's files (a purge or a rebuilt server renames them),
and would not tell a transaction boundary from the middle of one. The first position not
written yet is ``seq + 1`` of ``@@gtid_binlog_pos``: the binlog holds only committed
transactions, so everything below it is final (a transaction still open has no GTID yet;
it delays nothing and is picked up once it commits).

A batch reads the binlog from the GTID before ``start`` (the server finds it, or refuses:
purged), keeps the row events of the captured table and turns them into the change frame
every change loader takes (``change_id``, ``xid``, ``op``, ``change_time``, ``before``,
``after``): ``xid`` is the GTID sequence number, ``change_id`` orders rows within it.
The replication stream is :mod:`kappa.sources.mariadb_stream`'s; row images and the check of
the captured columns are :mod:`kappa.sources.mariadb_rows`'.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import pymysql
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import MariadbGtidEvent, QueryEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, WriteRowsEvent

from kappa.catalog.captures import SETTING, CaptureSpec
from kappa.exceptions import LogResetError
from kappa.sources.base import LogBounds, Positions
from kappa.sources.mariadb_rows import check_columns, to_json
from kappa.sources.mariadb_server import (
    CaptureImpossibleError,
    ServerAddress,
    check_server,
    domain_seqs,
)
from kappa.sources.mariadb_stream import open_stream
from kappa.sources.pg_capture import CaptureLag

_LOG = logging.getLogger(__name__)

#: Binlog GTID sequence numbers; the log's identity is the server's GTID domain.
GTIDS = Positions("GTID sequence numbers", "GTID domain", "the server now has")

#: Rows the lag counts at most when no batch was planned from the same position.
LAG_ROWS = 10_000

#: Rows a by-value completeness question reads past the ledger at most: a capture further
#: behind than this answers for every value at once (the common rule).
PENDING_ROWS = 10_000

#: Replica ids of readers: the server ends a dump when another replica registers with the
#: same id, so every reader (each partition of a run has its own) takes one of its own.
_READER_IDS = random.SystemRandom()

#: Rows one transaction may hold: change ids are ``seq * ROWS_PER_TRANSACTION + row``.
ROWS_PER_TRANSACTION = 1 << 24


@dataclass
class _Read:
    start: int
    end: int
    frame: pd.DataFrame
    #: The last sequence number read (whole transactions up to it are in ``frame``).
    last: int
    changes: int = 0
    columns: dict[str, str] = field(default_factory=dict)


_COLUMNS = ["change_id", "xid", "op", "change_time", "before", "after"]


class BinlogTable:
    """One captured MariaDB table as a :class:`~kappa.sources.base.Source`: one shard (0),
    positions are GTID sequence numbers of the server's domain, the epoch the domain.

    The ledger names it by the captured table (``database.table``).
    """

    positions = GTIDS

    def __init__(self, address: ServerAddress, spec: CaptureSpec, *, reader_id: int = 0) -> None:
        self.address = address
        self.spec = spec
        self.name = str(spec.change_table)
        self._conn = address.connect()
        self.domain = check_server(self._conn)
        # A replica's id on the server: unique per reader, never the server's own. A shared
        # id would make concurrent readers (the partitions of a fact run asking for
        # completeness, a capture run) end each other's dumps, each then starting again.
        self.reader_id = reader_id or self._new_reader_id()
        self._cache: _Read | None = None
        #: Binlog dumps the reads asked the server for: one per read, and one more each time
        #: the stream was lost and the dump started again from the read's first GTID.
        self.dumps = 0

    def _new_reader_id(self) -> int:
        with self._conn.cursor() as cur:
            cur.execute("SELECT @@server_id")
            row = cur.fetchone()
        own = int(row[0]) if row else 0
        while True:
            candidate = _READER_IDS.randrange(1 << 20, 1 << 32)
            if candidate != own:
                return candidate

    def close(self) -> None:
        self._conn.close()

    # -- the Source protocol ------------------------------------------------------------
    def shards(self) -> list[int]:
        return [0]

    def shard_name(self, shard: int) -> str:
        return self.name

    def epoch(self) -> str:
        return f"{self.domain}"

    def bounds(self, shards: Iterable[int]) -> dict[int, LogBounds]:
        start, end = self._bounds()
        return {shard: LogBounds(start, end) for shard in shards}

    def read(self, shard: int, start: int, end: int) -> pd.DataFrame:
        cached = self._cache
        if cached is not None and cached.start == start and cached.last >= end - 1:
            frame = cached.frame
            return frame[frame["xid"] < end].reset_index(drop=True)
        return self._read(start, end).frame

    def count(self, shard: int, start: int, end: int) -> int:
        return len(self.read(shard, start, end))

    def behind(self, shard: int, end: int, bounds: LogBounds) -> int:
        # Transactions, not rows: counting rows would read the binlog.
        return max(0, bounds.end - end)

    # -- planning -----------------------------------------------------------------------
    def _bounds(self) -> tuple[int, int]:
        """(first retained, first not written) GTID sequence numbers of the domain."""
        with self._conn.cursor() as cur:
            cur.execute("SELECT @@global.gtid_binlog_pos")
            row = cur.fetchone()
            current = domain_seqs(str(row[0] if row else ""), self.domain)
            cur.execute("SHOW BINARY LOGS")
            files = cur.fetchall()
            first = 1
            if files:
                cur.execute("SHOW BINLOG EVENTS IN %s LIMIT 3", (files[0][0],))
                for event in cur.fetchall():
                    if event[2] == "Gtid_list":
                        listed = str(event[5]).strip("[]")
                        before = domain_seqs(listed, self.domain)
                        first = max(before.values(), default=0) + 1
        return first, max(current.values(), default=0) + 1

    def plan_end(self, start: int, *, max_changes: int) -> int:
        """Where a batch starting at ``start`` ends: whole transactions, at most
        ``max_changes`` rows of the table unless one transaction alone holds more, never past
        what the binlog holds. Equals ``start`` when nothing is ready. The rows read are kept
        for :meth:`read`."""
        _, end = self._bounds()
        if end <= start:
            return start
        read = self._read(start, end, max_changes=max_changes)
        return read.end

    def _connect_state(self, start: int) -> str:
        """The GTID after which the server sends the binlog: the one before ``start``."""
        if start <= 1:
            return ""
        with self._conn.cursor() as cur:
            cur.execute("SELECT @@global.gtid_binlog_state")
            row = cur.fetchone()
        servers = domain_seqs(str(row[0] if row else ""), self.domain)
        # The server that wrote the transaction before `start`: the one whose last GTID is at
        # or after it (one writer at a time per domain; the latest one that got that far).
        candidates = [s for s, n in servers.items() if n >= start - 1]
        server = min(candidates, key=lambda s: servers[s]) if candidates else next(iter(servers))
        return f"{self.domain}-{server}-{start - 1}"

    def _read(self, start: int, end: int, *, max_changes: int | None = None) -> _Read:
        """Rows of the captured table by transactions ``[start, end)``; with ``max_changes``
        stop at the first transaction boundary past that many rows (``end`` lowered)."""
        spec = self.spec
        schema, table = spec.source.schema, spec.source.table
        state = self._connect_state(start)
        stream, dumps = open_stream(self.address.settings(), server_id=self.reader_id, state=state)
        # Rows by transaction. The replication client reconnects by itself when the stream is
        # lost (errors 2006, 2013: a killed dump thread, a restarted server, the network) and
        # the server then sends the binlog again from the start GTID: a transaction seen
        # before is collected again from its first row, never twice.
        by_seq: dict[int, list[tuple]] = {}
        current: list[tuple] = []
        collected = 0
        seq = start - 1
        in_range = False
        standalone = False
        try:
            for event in self._events(stream, start, state):
                if isinstance(event, MariadbGtidEvent):
                    if event.domain_id != self.domain:
                        in_range = False
                        continue
                    seq = int(event.gtid_seq_no)
                    if seq >= end or (
                        max_changes is not None and collected >= max_changes and seq > start
                    ):
                        end = seq
                        break
                    if seq < start:
                        in_range = False
                        continue
                    collected -= len(by_seq.pop(seq, ()))
                    by_seq[seq] = current = []
                    in_range = True
                    # A group flagged standalone (DDL) is one statement with no COMMIT.
                    standalone = bool(event.flags & 1)
                    continue
                if not in_range:
                    continue
                if isinstance(event, QueryEvent):
                    self._check_ddl(event, seq)
                if isinstance(event, XidEvent) or (
                    isinstance(event, QueryEvent)
                    and (standalone or str(event.query).strip().upper() == "COMMIT")
                ):
                    # The transaction before `end` is whole: stop here rather than read on
                    # to the log's end.
                    if seq >= end - 1:
                        break
                    continue
                if isinstance(event, QueryEvent):
                    continue
                if event.schema != schema or event.table != table:
                    continue
                check_columns(spec, f"{self.domain}-{seq}", event)
                at = dt.datetime.fromtimestamp(event.timestamp, dt.UTC)
                for row in event.rows:
                    if isinstance(event, WriteRowsEvent):
                        op, before, after = "I", None, row["values"]
                    elif isinstance(event, DeleteRowsEvent):
                        op, before, after = "D", row["values"], None
                    else:
                        op, before, after = "U", row["before_values"], row["after_values"]
                    index = len(current)
                    if index >= ROWS_PER_TRANSACTION:
                        raise CaptureImpossibleError(
                            SETTING,
                            f"{spec.source}: transaction {self.domain}-{seq} changes more than "
                            f"{ROWS_PER_TRANSACTION} rows of the captured table",
                        )
                    current.append(
                        (
                            seq * ROWS_PER_TRANSACTION + index,
                            seq,
                            op,
                            at,
                            to_json(before),
                            to_json(after),
                        )
                    )
                    collected += 1
        finally:
            stream.close()
            self.dumps += dumps.started
            if dumps.started > 1:
                _LOG.warning(
                    "%s: the replication stream was lost %d times reading GTIDs [%d, %d); "
                    "each time the dump started again from %s",
                    self.name,
                    dumps.started - 1,
                    start,
                    end,
                    state or "the beginning",
                )
        rows = [row for key in sorted(by_seq) for row in by_seq[key]]
        frame = pd.DataFrame(rows, columns=_COLUMNS)
        if not frame.empty:
            frame["change_time"] = pd.to_datetime(frame["change_time"], utc=True)
        frame = frame[frame["xid"] < end].reset_index(drop=True) if not frame.empty else frame
        read = _Read(start, max(end, start), frame, last=max(end, start) - 1, changes=len(frame))
        self._cache = read
        return read

    def _events(self, stream: BinLogStreamReader, start: int, state: str) -> Iterable[Any]:
        try:
            yield from stream
        except pymysql.err.OperationalError as exc:
            code = exc.args[0] if exc.args else None
            if code == 1236:  # ER_MASTER_FATAL_ERROR_READING_BINLOG: purged or unknown GTID
                raise LogResetError(
                    self.spec.asset,
                    self.name,
                    0,
                    f"needs the binlog from GTID {state or 'the beginning'} (position {start}), "
                    f"which the server no longer has: {exc.args[1] if len(exc.args) > 1 else exc}.",
                ) from None
            raise

    # -- history and lag ----------------------------------------------------------------
    def key_history(self, keys: list[tuple[str, ...]], end: int) -> pd.DataFrame:
        """Every change of ``keys`` (compared as text) by transactions below ``end``, read
        from the oldest retained transaction, in change-id order."""
        start, _ = self._bounds()
        frame = self._read(start, end).frame
        wanted = set(keys)

        def key_of(row: Any) -> tuple[str, ...]:
            image = json.loads(row.after if isinstance(row.after, str) else row.before)
            return tuple(str(image.get(k)) for k in self.spec.keys)

        if frame.empty:
            return frame
        mask = [key_of(r) in wanted for r in frame.itertuples(index=False)]
        return frame[mask].sort_values("change_id").reset_index(drop=True)

    def lag(self, loaded_until: int) -> CaptureLag:
        """The table's rows in the transactions past ``loaded_until``, counted up to the bound
        of the batch last planned (the binlog holds committed transactions only, so every one
        of them is ready), the age of the oldest, and the transactions open on the server
        (they commit later; none holds a committed one back)."""
        _, end = self._bounds()
        cached = self._cache
        if end > loaded_until and (cached is None or cached.start != loaded_until):
            cached = self._read(loaded_until, end, max_changes=LAG_ROWS)
        frame = cached.frame if cached is not None and end > loaded_until else None
        rows = 0 if frame is None else len(frame)
        oldest = None
        if rows:
            first = frame["change_time"].min()  # type: ignore[index]
            oldest = round((dt.datetime.now(dt.UTC) - first.to_pydatetime()).total_seconds(), 1)
        with self._conn.cursor() as cur:
            cur.execute(
                "SELECT trx_mysql_thread_id, trx_state, "
                "TIMESTAMPDIFF(MICROSECOND, trx_started, NOW(6)) / 1e6 "
                "FROM information_schema.innodb_trx ORDER BY trx_started LIMIT 5"
            )
            holders = [
                {"thread": t, "state": state, "open_for_s": round(float(age), 1)}
                for t, state, age in cur.fetchall()
            ]
        return CaptureLag(
            horizon=end,
            pending_changes=rows,
            ready_changes=rows,
            oldest_pending_age_s=oldest,
            holding_back=holders,
            horizon_name="binlog_end_gtid_seq",
        )

    def complete_until(self) -> dt.datetime:
        return self.open_since()

    def pending_since(
        self, loaded_until: int, column: str, values: list[str]
    ) -> dict[str, dt.datetime] | None:
        """For each of ``values`` that a committed change past ``loaded_until`` has as
        ``column`` in its before or after image (compared as text): the earliest such
        change's time. Reads the binlog from the ledger to its end (a few transactions in a
        live stream; the rows are kept for the next plan); None when more than
        :data:`PENDING_ROWS` rows wait, so the caller applies the common rule."""
        _, end = self._bounds()
        if end <= loaded_until:
            return {}
        cached = self._cache
        if cached is not None and cached.start == loaded_until and cached.last >= end - 1:
            frame = cached.frame[cached.frame["xid"] < end]
        else:
            read = self._read(loaded_until, end, max_changes=PENDING_ROWS)
            if read.end < end:
                return None
            frame = read.frame
        wanted = set(values)
        found: dict[str, dt.datetime] = {}
        for before, after, at in zip(
            frame["before"], frame["after"], frame["change_time"], strict=True
        ):
            for image in (before, after):
                if not isinstance(image, str):  # no image (NaN in the frame)
                    continue
                # Numbers as their literals, as PostgreSQL's ->> gives them.
                value = json.loads(image, parse_int=str, parse_float=str).get(column)
                if value is None:
                    continue
                text = value if isinstance(value, str) else json.dumps(value)
                if text in wanted:
                    when = at.to_pydatetime()
                    if text not in found or when < found[text]:
                        found[text] = when
        return found

    def open_since(self) -> dt.datetime:
        """A time before which every change still to come lies: now, or the start of the
        oldest transaction open on the server (its rows carry their statements' times)."""
        with self._conn.cursor() as cur:
            cur.execute(
                "SELECT UTC_TIMESTAMP(6), (SELECT min(trx_started) FROM information_schema.innodb_trx), "
                "TIMESTAMPDIFF(MICROSECOND, UTC_TIMESTAMP(6), NOW(6))"
            )
            now, oldest, offset_us = cur.fetchone()
        now = now.replace(tzinfo=dt.UTC)
        if oldest is None:
            return now
        # trx_started is in the server's time zone.
        oldest = (oldest - dt.timedelta(microseconds=int(offset_us))).replace(tzinfo=dt.UTC)
        return min(now, oldest)

    def _check_ddl(self, event: Any, seq: int) -> None:
        """A DDL statement is checked when the table's next row event arrives (its table map
        carries the new columns); nothing to do here but keep the hook for the log."""
        return None
