"""The MariaDB binlog dump request as mysql-replication builds it, and as it goes on the wire
once :func:`kappa.sources.mariadb_stream.frame_dump_request` has framed it."""

from __future__ import annotations

import struct
from typing import Any

from pymysql.constants.COMMAND import COM_BINLOG_DUMP, COM_QUERY
from pymysqlreplication import BinLogStreamReader

from kappa.sources.mariadb_stream import frame_dump_request, is_dump_request


class _Cursor:
    def execute(self, *args: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _Connection:
    def cursor(self) -> _Cursor:
        return _Cursor()


def library_dump_request(server_id: int = 4242) -> bytes:
    """The bytes mysql-replication writes to ask a MariaDB server for a non-blocking dump."""
    reader = BinLogStreamReader(
        connection_settings={}, server_id=server_id, is_mariadb=True, auto_position="0-1-7"
    )
    reader._stream_connection = _Connection()  # type: ignore[attr-defined]
    return reader._BinLogStreamReader__set_mariadb_settings()  # type: ignore[attr-defined]


def declared(packet: bytes) -> int:
    return int.from_bytes(packet[:3], "little")


def test_the_dump_request_declares_the_length_it_carries_once_framed():
    sent = library_dump_request()
    assert is_dump_request(sent)
    framed = frame_dump_request(sent)
    # The payload: command, binlog position, flags (non-blocking), replica id, empty name.
    assert framed[4:] == (bytes([COM_BINLOG_DUMP]) + struct.pack("<IHI", 4, 1, 4242) + b"\0\0\0\0")
    assert declared(framed) == len(framed) - 4
    # What mysql-replication 1.0.17 declares: one byte short (the server leaves it unread).
    # A release that frames it right passes through unchanged.
    assert declared(sent) in (len(sent) - 5, len(sent) - 4)


def test_other_packets_and_a_right_dump_request_pass_unchanged():
    query = struct.pack("<I", 9)[:3] + b"\0" + bytes([COM_QUERY]) + b"SELECT 1"
    assert frame_dump_request(query) == query
    right = struct.pack("<I", 15)[:3] + b"\0" + bytes([COM_BINLOG_DUMP]) + bytes(14)
    assert frame_dump_request(right) == right
    assert frame_dump_request(b"\x01\0\0") == b"\x01\0\0"


def test_connections_without_tls_options_share_one_default_tls_context() -> None:
    import pymysql

    from kappa.sources.mariadb_server import Connection

    def unconnected(kind: type, **tls: object) -> pymysql.connections.Connection:
        return kind(host="127.0.0.1", defer_connect=True, **tls)

    first, second = unconnected(Connection), unconnected(Connection)
    assert first.ssl and not first._ssl_required  # TLS preferred, as pymysql's default
    assert first.ctx is second.ctx
    own = unconnected(Connection, ssl_verify_cert=True)  # options of its own: its own context
    assert own.ctx is not first.ctx and own._ssl_required
    stock = unconnected(pymysql.connections.Connection), unconnected(pymysql.connections.Connection)
    assert stock[0].ctx is not stock[1].ctx  # what pymysql does: a new context each time
