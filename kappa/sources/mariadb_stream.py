"""The replication stream a MariaDB binlog read runs on: a non-blocking dump from a GTID, by
``mysql-replication``'s :class:`~pymysqlreplication.BinLogStreamReader`, on a connection that
frames the dump request correctly and counts the dumps the server was asked for.

Why the framing: mysql-replication (1.0.17) sends MariaDB's ``COM_BINLOG_DUMP`` as 15 bytes
(the command, position, flags, replica id and a four-byte empty file name) under a packet
header that declares 14. The server reads 14 and leaves one byte unread on the socket. A
non-blocking dump ends at the log's end with the server closing the connection, and a socket
closed with unread input is aborted, not shut down: the kernel answers with a TCP reset and
throws away what the server had written but the client had not received yet, the end of the
log and its EOF among it. The client sees error 2013 ("connection reset by peer"; nothing in
the server's log, the kernel's ``TCPAbortOnClose`` counter goes up), reconnects, and the dump
starts again from the first GTID. A log that the sockets' buffers hold whole had reached the
client before the reset, so small reads worked; anything larger (a few hundred kilobytes,
about a thousand rows) was restarted until a read happened to outrun the reset. With the
length declared right the server reads the whole request and ends the dump with a plain close.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pymysql
from pymysql.constants.COMMAND import COM_BINLOG_DUMP
from pymysqlreplication import BinLogStreamReader
from pymysqlreplication.event import MariadbGtidEvent, QueryEvent, XidEvent
from pymysqlreplication.row_event import DeleteRowsEvent, UpdateRowsEvent, WriteRowsEvent

from kappa.sources.mariadb_server import Connection

#: The events a read needs: transaction boundaries, DDL statements and row changes.
EVENTS = [MariadbGtidEvent, QueryEvent, XidEvent, WriteRowsEvent, UpdateRowsEvent, DeleteRowsEvent]


@dataclass
class Dumps:
    """How many binlog dumps one stream asked the server for: one, unless the connection was
    lost and the client started the dump again from the first GTID."""

    started: int = 0


def frame_dump_request(data: bytes) -> bytes:
    """``data`` (one packet as written to the socket) with its length set to what it carries
    when it is a ``COM_BINLOG_DUMP`` that declares one byte fewer; any other packet as is."""
    if len(data) > 4 and data[4] == COM_BINLOG_DUMP:
        declared = int.from_bytes(data[:3], "little")
        if declared == len(data) - 5:
            return (len(data) - 4).to_bytes(3, "little") + data[3:]
    return data


def is_dump_request(data: bytes) -> bool:
    return len(data) > 4 and data[4] == COM_BINLOG_DUMP


class _StreamConnection(Connection):
    """A pymysql connection whose dump requests are framed right and counted (with the
    shared default TLS context)."""

    def __init__(self, dumps: Dumps, **settings: Any) -> None:
        self._dumps = dumps  # before connecting: the handshake writes already
        super().__init__(**settings)

    def _write_bytes(self, data: bytes) -> None:
        if is_dump_request(data):
            self._dumps.started += 1
            data = frame_dump_request(data)
        super()._write_bytes(data)


def open_stream(
    settings: dict[str, Any], *, server_id: int, state: str
) -> tuple[BinLogStreamReader, Dumps]:
    """A non-blocking dump of the binlog after GTID ``state`` ("" for the beginning) as the
    replica ``server_id``, and the count of dumps it starts (it connects on first read)."""
    dumps = Dumps()

    def connect(**kwargs: Any) -> pymysql.connections.Connection:
        return _StreamConnection(dumps, **kwargs)

    stream = BinLogStreamReader(
        connection_settings=dict(settings),
        server_id=server_id,
        blocking=False,
        is_mariadb=True,
        auto_position=state,
        only_events=EVENTS,
        only_schemas=None,
        resume_stream=True,
        enable_logging=False,
        pymysql_wrapper=connect,
    )
    return stream, dumps
