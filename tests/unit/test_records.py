"""The record-batch reader against kafka-python's own, on the same bytes.

Every case is parsed twice, by kafka-python's ``PartitionRecords`` and by
:class:`kappa.sources.records.RowPartitionRecords`, and the records kept must be the same
(offset, timestamp, key, value), in order, with the same next fetch position.
"""

from __future__ import annotations

import struct
from collections import namedtuple
from typing import Any

import pytest
from kafka.consumer.fetcher import Fetcher, IsolationLevel
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from kafka.record.memory_records import MemoryRecords
from kafka.record.util import calc_crc32c
from kafka.structs import TopicPartition

from kappa.sources import records

TP = TopicPartition("t", 0)
Aborted = namedtuple("Aborted", "producer_id first_offset")

_CRC_AT = 17  # base offset (8), length (4), leader epoch (4), magic (1)
_ATTRIBUTES_AT = 21


def batch(
    base: int,
    entries: list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]],
    *,
    codec: int = 0,
    producer: int = -1,
    transactional: bool = False,
    extra_attributes: int = 0,
) -> bytes:
    """A v2 batch of ``(timestamp, key, value, headers)`` at offset ``base``."""
    builder = DefaultRecordBatchBuilder(
        magic=2,
        compression_type=codec,
        is_transactional=transactional,
        producer_id=producer,
        producer_epoch=0 if producer >= 0 else -1,
        base_sequence=0 if producer >= 0 else -1,
        batch_size=1 << 30,
    )
    for delta, (timestamp, key, value, headers) in enumerate(entries):
        builder.append(delta, timestamp=timestamp, key=key, value=value, headers=headers)
    data = builder.build()
    struct.pack_into(">q", data, 0, base)
    if extra_attributes:
        (attributes,) = struct.unpack_from(">h", data, _ATTRIBUTES_AT)
        struct.pack_into(">h", data, _ATTRIBUTES_AT, attributes | extra_attributes)
        struct.pack_into(">I", data, _CRC_AT, calc_crc32c(memoryview(data)[_ATTRIBUTES_AT:]))
    return bytes(data)


def marker(offset: int, producer: int, *, abort: bool) -> bytes:
    """A transaction's control batch: key (version, type 0 abort / 1 commit)."""
    key = struct.pack(">hh", 0, 0 if abort else 1)
    return batch(
        offset,
        [(1_700_000_000_000, key, struct.pack(">hi", 0, 0), [])],
        producer=producer,
        transactional=True,
        extra_attributes=DefaultRecordBatch.CONTROL_MASK,
    )


def read(cls: Any, raw: bytes, *, fetch_offset: int = 0, **kw: Any) -> tuple[list[Any], int]:
    part = cls(fetch_offset, TP, MemoryRecords(raw), **kw)
    rows = part.take()
    if cls is Fetcher.PartitionRecords:
        rows = [(r.offset, r.timestamp, r.key, r.value) for r in rows]
    return rows, part.next_fetch_offset


def both(raw: bytes, **kw: Any) -> list[Any]:
    stock = read(Fetcher.PartitionRecords, raw, **kw)
    ours = read(records.RowPartitionRecords, raw, **kw)
    assert ours == stock
    return ours[0]


def plain(n: int, *, t0: int = 1_700_000_000_000, size: int = 40) -> list[Any]:
    return [(t0 + 997 * i, b"k%d" % i, b"v" * (size + i), []) for i in range(n)]


def test_lengths_of_every_varint_width() -> None:
    # one-, two- and three-byte lengths and timestamp deltas; offsets deltas past 63
    entries = [*plain(150, size=1), (1_700_000_000_000 + 10**7, b"x" * 70, b"y" * 20_000, [])]
    rows = both(batch(5, entries))
    assert len(rows) == 151 and rows[-1][0] == 155 and len(rows[-1][3]) == 20_000


def test_null_keys_values_headers_and_earlier_timestamps() -> None:
    entries = [
        (1_700_000_000_000, None, b"a", [("trace", b"1"), ("empty", None)]),
        (1_699_999_999_000, b"k", None, []),  # a timestamp before the batch's first
        (1_700_000_000_500, None, None, [("h" * 300, b"z" * 300)]),
        (1_700_000_000_600, b"", b"", []),
    ]
    rows = both(batch(0, entries))
    assert [r[2] for r in rows] == [None, b"k", None, b""]
    assert rows[1][1] == 1_699_999_999_000


def test_several_batches_compressed_and_a_fetch_inside_one() -> None:
    raw = batch(0, plain(10)) + batch(10, plain(10), codec=DefaultRecordBatch.CODEC_GZIP)
    raw += batch(20, plain(3))
    assert len(both(raw)) == 23
    rows = both(raw, fetch_offset=14)  # inside the compressed batch: its first records go
    assert rows[0][0] == 14 and len(rows) == 9


def test_log_append_time_takes_the_batch_time() -> None:
    entries = plain(4)
    raw = batch(0, entries, extra_attributes=DefaultRecordBatch.TIMESTAMP_TYPE_MASK)
    rows = both(raw)
    assert {r[1] for r in rows} == {entries[-1][0]}


def test_read_committed_leaves_out_aborted_transactions_and_markers() -> None:
    raw = (
        batch(0, plain(3), producer=7, transactional=True)  # aborted below
        + marker(3, 7, abort=True)
        + batch(4, plain(2), producer=8, transactional=True)
        + marker(6, 8, abort=False)
        + batch(7, plain(2))
        + batch(9, plain(1), producer=7, transactional=True)  # 7's next transaction
        + marker(10, 7, abort=False)
    )
    kw: dict[str, Any] = {
        "isolation_level": IsolationLevel.READ_COMMITTED,
        "aborted_transactions": [Aborted(producer_id=7, first_offset=0)],
    }
    rows = both(raw, **kw)
    assert [r[0] for r in rows] == [4, 5, 7, 8, 9]
    # read_uncommitted keeps the aborted records and still drops the markers
    assert [r[0] for r in both(raw)] == [0, 1, 2, 4, 5, 7, 8, 9]


def test_take_in_pieces_keeps_the_position() -> None:
    raw = batch(0, plain(10)) + batch(10, plain(10))
    part = records.RowPartitionRecords(0, TP, MemoryRecords(raw))
    first = part.take(7)
    assert [r[0] for r in first] == list(range(7)) and part.next_fetch_offset == 7
    rest = part.take(100)
    assert [r[0] for r in rest] == list(range(7, 20)) and part.next_fetch_offset == 20


def _tampered(raw: bytes, at: int, value: int) -> bytes:
    data = bytearray(raw)
    data[at] = value
    return bytes(data)


def test_corrupt_records_are_errors_not_wrong_rows() -> None:
    raw = batch(0, plain(3))
    first_record = DefaultRecordBatch.HEADER_STRUCT.size
    # the first record's length, one byte too long; the CRC check off, so the parser sees it
    longer = _tampered(raw, first_record, raw[first_record] + 2)
    part = records.RowPartitionRecords(0, TP, MemoryRecords(longer), check_crcs=False)
    with pytest.raises(CorruptRecordError):
        part.take()
    # with the CRC check on, the batch is refused before its records are read
    part = records.RowPartitionRecords(0, TP, MemoryRecords(longer))
    with pytest.raises(CorruptRecordError, match="CRC"):
        part.take()


def test_installs_into_a_consumer_of_this_kafka_python() -> None:
    class Consumer:
        _fetcher = Fetcher.__new__(Fetcher)

    consumer = Consumer()
    assert records.install(consumer) is True
    assert consumer._fetcher.PartitionRecords is records.RowPartitionRecords
    assert Fetcher.PartitionRecords is not records.RowPartitionRecords  # not global
    assert records.install(object()) is False
