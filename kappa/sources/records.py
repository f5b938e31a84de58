"""Kafka record batches parsed straight into the four values the pipeline keeps of a record.

kafka-python's fetcher turns every record into two objects (its ``DefaultRecord``, then a
``ConsumerRecord`` of thirteen fields) through seven function calls for the varints: about
4 µs a record, two thirds of a micro-batch's read stage. The pipeline keeps four values of a
record (offset, timestamp, key, value), so :class:`RowPartitionRecords` reads each message
format v2 batch in one loop into ``(offset, timestamp, key, value)`` tuples (about 1.4 µs).

What stays kafka-python's: the network, fetch sessions, errors and positions, batch headers,
CRC checks, decompression and the aborted-transaction bookkeeping (``read_committed``).
Only the loop over a batch's records is this module's, and it obeys the same rules: records
of aborted transactions and control batches are skipped, log-append-time topics take the
batch's time, records before the fetch position (inside a compressed batch) are dropped,
and a record whose lengths do not add up is a ``CorruptRecordError``. Legacy batches (message
format 0 and 1) are read through kafka-python's own records.

:func:`install` puts it into one consumer (not globally); it reports False, and the consumer
keeps kafka-python's records, when this kafka-python's fetcher does not have the shape it
was written against.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch
from kafka.record.util import decode_varint

#: A record as the pipeline keeps it.
Row = tuple[int, int, bytes | None, bytes | None]

_CONTROL = DefaultRecordBatch.CONTROL_MASK
_LOG_APPEND_TIME = DefaultRecordBatch.TIMESTAMP_TYPE_MASK
_READ_COMMITTED = 1  # kafka-python's IsolationLevel.READ_COMMITTED
#: The v2 batch header as ``batch_rows`` indexes it: base offset [0], attributes [5], first
#: and max timestamps [7] and [8], record count [12].
_HEADER = ">qiibIhiqqqhii"


def batch_rows(batch: DefaultRecordBatch, data: bytes, pos: int) -> list[Row]:
    """The records of one v2 batch whose (uncompressed) record bytes start at ``data[pos]``.

    Varints are zigzag-encoded; the one-byte form (values -64 to 63) is decoded inline, a
    function call per field being most of a record's cost, longer ones by kafka-python's
    ``decode_varint``.
    """
    header = batch._header_data
    base_offset = header[0]
    first_timestamp = header[7]
    batch_time = header[8] if header[5] & _LOG_APPEND_TIME else None
    rows: list[Row] = []
    append = rows.append
    try:
        for _ in range(header[12]):
            b = data[pos]
            if b < 0x80:
                length, pos = (b >> 1) ^ -(b & 1), pos + 1
            else:
                length, pos = decode_varint(data, pos)
            start = pos
            pos += 1  # attributes: unused by format v2
            b = data[pos]
            if b < 0x80:
                timestamp_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
            else:
                timestamp_delta, pos = decode_varint(data, pos)
            b = data[pos]
            if b < 0x80:
                offset_delta, pos = (b >> 1) ^ -(b & 1), pos + 1
            else:
                offset_delta, pos = decode_varint(data, pos)
            b = data[pos]
            if b < 0x80:
                size, pos = (b >> 1) ^ -(b & 1), pos + 1
            else:
                size, pos = decode_varint(data, pos)
            key = None
            if size >= 0:
                key, pos = data[pos : pos + size], pos + size
            b = data[pos]
            if b < 0x80:
                size, pos = (b >> 1) ^ -(b & 1), pos + 1
            else:
                size, pos = decode_varint(data, pos)
            value = None
            if size >= 0:
                value, pos = data[pos : pos + size], pos + size
            if data[pos]:  # headers: the pipeline keeps none of them
                headers, pos = decode_varint(data, pos)
                pos = _skip_headers(data, pos, headers)
            else:
                pos += 1
            if pos - start != length or pos > len(data):
                raise CorruptRecordError(
                    f"record at offset {base_offset + offset_delta}: its length says "
                    f"{length} bytes, its fields take {pos - start}"
                )
            append(
                (
                    base_offset + offset_delta,
                    first_timestamp + timestamp_delta if batch_time is None else batch_time,
                    key,
                    value,
                )
            )
    except IndexError:
        raise CorruptRecordError(
            f"record batch at offset {base_offset}: the records run past its end"
        ) from None
    if pos != len(data):
        raise CorruptRecordError(
            f"record batch at offset {base_offset}: {len(data) - pos} bytes after its "
            f"{header[12]} records"
        )
    return rows


def _skip_headers(data: bytes, pos: int, count: int) -> int:
    if count < 0:
        raise CorruptRecordError(f"a record says it has {count} headers")
    for _ in range(count):
        for _field in (0, 1):
            size, pos = decode_varint(data, pos)
            if size > 0:
                pos += size
    return pos


class RowPartitionRecords(Fetcher.PartitionRecords):
    """A fetched partition's records as :data:`Row` tuples instead of ``ConsumerRecord``."""

    def _maybe_skip_record(self, record: Row) -> bool:
        return record[0] < self.fetch_offset

    def _unpack_records(
        self, tp: Any, records: Any, key_deserializer: Any, value_deserializer: Any
    ) -> Iterator[Row]:
        read_committed = self.isolation_level == _READ_COMMITTED
        last = None
        batch = records.next_batch()
        while batch is not None:
            last = batch
            if self.check_crcs and not batch.validate_crc():
                raise CorruptRecordError(
                    f"record batch of {tp} at offset {batch.base_offset} failed its CRC check"
                )
            if batch.magic < 2:
                for record in batch:
                    self.next_fetch_offset = record.offset + 1
                    yield (record.offset, record.timestamp, record.key, record.value)
                batch = records.next_batch()
                continue
            self.leader_epoch = batch.leader_epoch
            # The transaction bookkeeping first: a control batch's abort marker closes one.
            aborted = read_committed and batch.has_producer_id() and self._skips(batch)
            if aborted or batch.attributes & _CONTROL:
                self.next_fetch_offset = batch.next_offset
            else:
                iter(batch)  # decompresses the records in place
                rows = batch_rows(batch, bytes(batch._buffer), batch._pos)
                self.bytes_read += batch.size_in_bytes
                self.records_read += len(rows)
                for row in rows:
                    self.next_fetch_offset = row[0] + 1  # a take() may stop inside the batch
                    yield row
            batch = records.next_batch()
        if last is not None and last.magic >= 2:
            # Format v2 keeps a batch's last offset when compaction removed its last record:
            # the next fetch starts after the batch, not inside it.
            self.next_fetch_offset = last.next_offset
        self.drain()

    def _skips(self, batch: DefaultRecordBatch) -> bool:
        """read_committed: whether a producer's batch is left out (an abort marker, which
        also closes the producer's aborted transaction, or a batch of one)."""
        self._consume_aborted_transactions_up_to(batch.last_offset)
        if self._contains_abort_marker(batch):
            self.aborted_producer_ids.discard(batch.producer_id)
            return True
        return bool(self._is_batch_aborted(batch))


def install(consumer: Any) -> bool:
    """Make ``consumer``'s polls return :data:`Row` tuples; False (nothing changed) when this
    kafka-python's fetcher or record batches do not have the shape this module reads."""
    fetcher = getattr(consumer, "_fetcher", None)
    stock = getattr(type(fetcher), "PartitionRecords", None)
    needed = ("_consume_aborted_transactions_up_to", "_contains_abort_marker", "_is_batch_aborted")
    shaped = (
        stock is Fetcher.PartitionRecords
        and all(hasattr(stock, name) for name in needed)
        and {"_buffer", "_pos", "_header_data"} <= set(DefaultRecordBatch.__slots__)
        and DefaultRecordBatch.HEADER_STRUCT.format == _HEADER
    )
    if not shaped:
        return False
    fetcher.PartitionRecords = RowPartitionRecords  # type: ignore[union-attr]
    return True
