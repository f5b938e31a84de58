"""The persistent event store, read through the Kafka API with kafka-python.

Positions are tracked by the project (the ledger), never by consumer groups: partitions are
assigned explicitly and read from an explicit offset, so there are no group joins, no
committed offsets and no ``auto_offset_reset`` jumping over lost data (it is ``none``: an
offset the log no longer holds is an error).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from operator import itemgetter
from types import TracebackType
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka import errors as kafka_errors

from kappa.exceptions import (
    ConfigurationError,
    EventStoreTimeoutError,
    KappaError,
    OffsetOutOfRangeError,
)
from kappa.sources import records
from kappa.sources.base import NO_TIMESTAMP, OFFSETS, LogBounds, RawBatch

#: What kafka-python raises when no broker answers: 3.x times out bootstrapping, older
#: releases raised NoBrokersAvailable.
_UNREACHABLE: tuple[type[Exception], ...] = tuple(
    error
    for error in (
        getattr(kafka_errors, "NoBrokersAvailable", None),
        kafka_errors.KafkaTimeoutError,
        kafka_errors.KafkaConnectionError,
    )
    if error is not None
)


class UnknownTopicError(KappaError):
    """The topic does not exist on the event store."""

    def __init__(self, topic: str, bootstrap_servers: str) -> None:
        self.topic = topic
        super().__init__(f"topic {topic!r} does not exist on {bootstrap_servers}")


class EventStore:
    """A small, synchronous client for what the pipeline needs from a Kafka-API log.

    Every call is bounded by ``timeout_s``. ``setting`` names the configuration that points
    here, so connection failures say which setting to fix.
    """

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        timeout_s: float = 5.0,
        setting: str = "KAFKA_BOOTSTRAP_SERVERS",
        client_id: str = "kappa-etl",
        max_partition_fetch_bytes: int = 8 * 1024 * 1024,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.timeout_s = timeout_s
        self.setting = setting
        timeout_ms = max(int(timeout_s * 1000), 200)
        try:
            self._consumer = KafkaConsumer(
                bootstrap_servers=bootstrap_servers.split(","),
                client_id=client_id,
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="none",
                isolation_level="read_committed",
                request_timeout_ms=timeout_ms + 500,
                bootstrap_timeout_ms=timeout_ms,
                fetch_max_wait_ms=100,
                fetch_max_bytes=64 * 1024 * 1024,
                max_partition_fetch_bytes=max_partition_fetch_bytes,
                connections_max_idle_ms=max(540_000, timeout_ms * 4),
            )
        except _UNREACHABLE:
            raise ConfigurationError(
                setting, f"no broker answered at {bootstrap_servers} within {timeout_s:g} s"
            ) from None
        #: Whether polls return ``(offset, timestamp, key, value)`` rows (kappa.sources.records)
        #: rather than kafka-python's ConsumerRecord objects.
        self.rows = records.install(self._consumer)
        self._admin: Any = None

    def __enter__(self) -> EventStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._consumer.close(autocommit=False)
        if self._admin is not None:
            self._admin.close()

    # -- metadata ---------------------------------------------------------------------------

    def partitions(self, topic: str) -> list[int]:
        """The partition ids of ``topic``; :class:`UnknownTopicError` when it does not exist."""
        parts = self._consumer.partitions_for_topic(topic)
        if not parts:
            # A fresh metadata request: the cached view may predate the topic's creation.
            self._consumer.topics()
            parts = self._consumer.partitions_for_topic(topic)
        if not parts:
            raise UnknownTopicError(topic, self.bootstrap_servers)
        return sorted(parts)

    def topic_id(self, topic: str) -> str | None:
        """The broker's id of the topic (changes when the topic is recreated), if it has one."""
        if self._admin is None:
            try:
                self._admin = KafkaAdminClient(
                    bootstrap_servers=self.bootstrap_servers.split(","),
                    client_id="kappa-etl-admin",
                    request_timeout_ms=max(int(self.timeout_s * 1000), 200),
                )
            except _UNREACHABLE:
                raise ConfigurationError(
                    self.setting, f"no broker answered at {self.bootstrap_servers}"
                ) from None
        try:
            described = self._admin.describe_topics([topic])
        except kafka_errors.UnknownTopicOrPartitionError:
            raise UnknownTopicError(topic, self.bootstrap_servers) from None
        for entry in described:
            if entry.get("name") == topic:
                if entry.get("error_code"):
                    raise UnknownTopicError(topic, self.bootstrap_servers)
                raw = entry.get("topic_id")
                text = str(raw) if raw else ""
                return None if not text or set(text) <= {"0", "-"} else text
        raise UnknownTopicError(topic, self.bootstrap_servers)

    def log_bounds(self, topic: str, partitions: Iterable[int]) -> dict[int, LogBounds]:
        """First retained offset and end offset (last stable offset) of each partition.

        The end comes from ListOffsets and is confirmed by the high watermark of a bounded
        fetch at that position. Some Kafka-API brokers (the local Tansu build among them)
        answer ListOffsets with the base offset of the last record batch plus one, which
        under-reports the end whenever producers batch; the fetch response's high watermark
        is right on every broker, and on a broker whose ListOffsets is right the probe
        returns no records.
        """
        tps = [TopicPartition(topic, p) for p in partitions]
        timeout_ms = int(self.timeout_s * 1000)
        try:
            starts = self._consumer.beginning_offsets(tps, timeout_ms=timeout_ms)
            listed = self._consumer.end_offsets(tps, timeout_ms=timeout_ms)
        except kafka_errors.KafkaTimeoutError:
            raise EventStoreTimeoutError(
                f"{topic}: the broker at {self.bootstrap_servers} did not report offsets "
                f"within {self.timeout_s:g} s"
            ) from None
        ends = self._probe_high_watermarks({tp: listed[tp] for tp in tps})
        return {tp.partition: LogBounds(start=starts[tp], end=ends[tp]) for tp in tps}

    def _probe_high_watermarks(self, positions: dict[TopicPartition, int]) -> dict[Any, int]:
        consumer = self._consumer
        consumer.assign(list(positions))
        for tp, offset in positions.items():
            consumer.seek(tp, offset)
        ends: dict[Any, int] = dict(positions)
        pending = set(positions)
        deadline = time.monotonic() + self.timeout_s
        while pending and time.monotonic() < deadline:
            consumer.poll(timeout_ms=100, max_records=1, update_offsets=False)
            for tp in list(pending):
                hw = consumer.highwater(tp)
                if hw is not None:
                    ends[tp] = max(ends[tp], hw)
                    pending.discard(tp)
        consumer.assign([])
        if pending:
            # Falling back to ListOffsets alone could under-report the end (see above) and
            # look like a lost log: say that the broker did not answer instead.
            shards = ", ".join(
                f"{tp.topic}[{tp.partition}]" for tp in sorted(pending, key=lambda t: t.partition)
            )
            raise EventStoreTimeoutError(
                f"{shards}: no fetch response confirmed the log end within {self.timeout_s:g} s"
            )
        return ends

    def offsets_for_times(
        self, topic: str, partitions: Iterable[int], ts_ms: int
    ) -> dict[int, int]:
        """Earliest offset whose timestamp is >= ``ts_ms``, or the log end when there is none."""
        found = self.boundaries(topic, partitions, ts_ms)
        missing = [p for p, offset in found.items() if offset is None]
        ends = self.log_bounds(topic, missing) if missing else {}
        return {p: offset if offset is not None else ends[p].end for p, offset in found.items()}

    def boundaries(
        self,
        topic: str,
        partitions: Iterable[int],
        ts_ms: int,
        *,
        floor: Mapping[int, int] | None = None,
        bounds: Mapping[int, LogBounds] | None = None,
    ) -> dict[int, int | None]:
        """Earliest offset whose timestamp is >= ``ts_ms`` per partition; None where the log
        holds no such record yet (some brokers answer that as offset 0 with timestamp -1).

        The broker's answer (``offsets_for_times``) is checked against the records around
        it; a broker whose time index disagrees with its records gets a binary search over
        record timestamps instead (which assumes they do not go backwards). ``floor[p]``:
        an offset known to be at or below the answer (the ledger head), to search less.
        ``bounds``: the log bounds, when the caller has just read them.
        """
        tps = [TopicPartition(topic, p) for p in partitions]
        if not tps:
            return {}
        found = self._consumer.offsets_for_times(
            {tp: ts_ms for tp in tps}, timeout_ms=int(self.timeout_s * 1000)
        )
        if bounds is None or any(tp.partition not in bounds for tp in tps):
            bounds = self.log_bounds(topic, [tp.partition for tp in tps])
        result: dict[int, int | None] = {}
        for tp in tps:
            p = tp.partition
            hit = found.get(tp)
            no_record = hit is None or hit.timestamp == NO_TIMESTAMP
            answer = None if no_record else hit.offset
            if self._confirms(topic, p, ts_ms, answer, bounds[p]):
                result[p] = answer
            else:
                low = max(bounds[p].start, (floor or {}).get(p, bounds[p].start))
                result[p] = self._search(topic, p, ts_ms, low, bounds[p].end)
        return result

    def _record_at_or_after(
        self, topic: str, partition: int, offset: int, end: int
    ) -> tuple[int, int] | None:
        """(offset, timestamp) of the first record at or after ``offset`` (before ``end``)."""
        stop = min(end, offset + 64)
        if stop <= offset:
            return None
        batch = self.fetch(topic, partition, offset, stop)
        if not batch.offsets:
            return None
        return int(batch.offsets[0]), int(batch.timestamps[0])

    def _confirms(
        self, topic: str, partition: int, ts_ms: int, answer: int | None, bounds: LogBounds
    ) -> bool:
        """Whether the record at ``answer`` is at or after ``ts_ms`` and the one before not."""
        if answer is None or not bounds.start <= answer < bounds.end:
            return False  # "none yet" is confirmed by the search, from the floor
        # The record at the answer and the one before it, in one fetch (each costs a
        # round trip to the broker).
        around = self.fetch(topic, partition, max(bounds.start, answer - 1), answer + 1)
        stamps = dict(zip(around.offsets, around.timestamps, strict=True))
        if answer not in stamps or stamps[answer] < ts_ms:
            return False
        return answer == bounds.start or stamps.get(answer - 1, ts_ms - 1) < ts_ms

    def _search(self, topic: str, partition: int, ts_ms: int, low: int, high: int) -> int | None:
        """First offset in ``[low, high)`` whose record's timestamp is >= ``ts_ms``."""
        if low >= high:
            return None
        tail = self.fetch(topic, partition, max(low, high - 64), high)
        if tail.timestamps and max(tail.timestamps) < ts_ms:
            # The live case (the open window has no record past its end yet): one fetch, not
            # log2(lag) of them.
            return None
        found: int | None = None
        while low < high:
            middle = (low + high) // 2
            record = self._record_at_or_after(topic, partition, middle, high)
            if record is None:
                high = middle
            elif record[1] >= ts_ms:
                found, high = record[0], middle
            else:
                low = record[0] + 1
        return found

    def timestamp_at(self, topic: str, partition: int, offset: int) -> int:
        """The broker timestamp (ms) of the record at ``offset`` (or the next one there is)."""
        batch = self.fetch(topic, partition, offset, offset + 1)
        if not batch.timestamps:
            raise OffsetOutOfRangeError(topic, partition, offset, offset + 1, "no record there")
        return int(batch.timestamps[0])

    # -- data -------------------------------------------------------------------------------

    def fetch(self, topic: str, partition: int, start: int, end: int) -> RawBatch:
        """Read every record with an offset in ``[start, end)``.

        Raises :class:`OffsetOutOfRangeError` when the log no longer holds ``start`` and
        :class:`EventStoreTimeoutError` when the records do not arrive within the timeout
        (measured from the last progress, so a large batch is not cut short).
        """
        batch = RawBatch(topic=topic, partition=partition, start=start, end=end)
        if end <= start:
            return batch
        tp = TopicPartition(topic, partition)
        consumer = self._consumer
        consumer.assign([tp])
        consumer.seek(tp, start)
        position = start
        last_progress = time.monotonic()
        try:
            while position < end:
                # No more records than the range holds: the client parses what it returns,
                # and a fetch returns up to max_partition_fetch_bytes past the range.
                wanted = min(50_000, end - position)
                rows = consumer.poll(timeout_ms=200, max_records=wanted).get(tp, [])
                if rows and not self.rows:
                    rows = [(r.offset, r.timestamp, r.key, r.value) for r in rows]
                if rows and rows[-1][0] >= end:
                    rows = rows[: bisect_left(rows, end, key=itemgetter(0))]
                if rows:
                    offsets, timestamps, keys, values = zip(*rows, strict=True)
                    batch.offsets.extend(offsets)
                    batch.timestamps.extend(timestamps)
                    batch.keys.extend(keys)
                    batch.values.extend(values)
                new_position = consumer.position(tp, timeout_ms=int(self.timeout_s * 1000))
                if new_position is not None and new_position > position:
                    position = new_position
                    last_progress = time.monotonic()
                elif time.monotonic() - last_progress > self.timeout_s:
                    raise EventStoreTimeoutError(
                        f"{topic}[{partition}]: no records arrived past offset {position} within "
                        f"{self.timeout_s:g} s while reading [{start}, {end}) "
                        f"(high watermark {consumer.highwater(tp)})"
                    )
        except kafka_errors.OffsetOutOfRangeError:
            raise OffsetOutOfRangeError(
                topic, partition, start, end, "the log no longer holds these offsets"
            ) from None
        finally:
            consumer.assign([])
        return batch


class TopicPartitions:
    """One topic of an event store as a :class:`~kappa.sources.base.Source`: shards are its
    partitions, positions its offsets, the epoch its topic id."""

    positions = OFFSETS

    def __init__(self, store: EventStore, topic: str) -> None:
        self.store = store
        self.name = topic

    def shards(self) -> list[int]:
        return self.store.partitions(self.name)

    def shard_name(self, shard: int) -> str:
        return f"{self.name}[{shard}]"

    def epoch(self) -> str:
        return self.store.topic_id(self.name) or ""

    def bounds(self, shards: Iterable[int]) -> dict[int, LogBounds]:
        return self.store.log_bounds(self.name, shards)

    def read(self, shard: int, start: int, end: int) -> RawBatch:
        return self.store.fetch(self.name, shard, start, end)

    def count(self, shard: int, start: int, end: int) -> int:
        # Offsets are sparse (transaction markers): the records are counted, not the offsets.
        return len(self.read(shard, start, end))

    def behind(self, shard: int, end: int, bounds: LogBounds) -> int:
        return max(0, bounds.end - max(end, bounds.start))

    def locate(
        self,
        shards: Iterable[int],
        ts_ms: int,
        *,
        floor: Mapping[int, int] | None = None,
        bounds: Mapping[int, LogBounds] | None = None,
    ) -> dict[int, int | None]:
        return self.store.boundaries(self.name, shards, ts_ms, floor=floor, bounds=bounds)
