"""What every source hands the engine, whatever it is read from: positions, bounds, raw records.

No client library here (neither kafka-python nor psycopg), so decoding and the steps can be
imported and tested without either.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: The timestamp of a record that carries none.
NO_TIMESTAMP = -1


@dataclass(frozen=True)
class LogBounds:
    """The positions a topic partition holds: ``start`` (first retained) to ``end`` (exclusive)."""

    start: int
    end: int


@dataclass
class RawBatch:
    """The records of one topic partition with offsets in ``[start, end)``, as read.

    Offsets are sparse (transaction markers, compaction): ``len(offsets)`` may be less than
    ``end - start``, never more.
    """

    topic: str
    partition: int
    start: int
    end: int
    offsets: list[int] = field(default_factory=list)
    timestamps: list[int] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.offsets)
