"""The offset sensor's cursor: small, JSON, readable in the UI."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass


@dataclass
class OffsetCursor:
    """The sensor's cursor, readable in the UI.

    ``generation`` is fixed when a cursor starts empty and ``seq`` counts the runs requested
    since; both go into run keys, so a key is never reused after a cursor reset (Dagster
    would silently launch nothing) yet a tick evaluated twice asks for the same key.
    ``log_end`` is the last observed end offset per partition (observations only on change).
    """

    generation: str
    seq: int
    log_end: dict[str, int]

    @classmethod
    def parse(cls, raw: str | None) -> OffsetCursor:
        if raw:
            data = json.loads(raw)
            return cls(data["generation"], data["seq"], data.get("log_end", {}))
        return cls(generation=format(time.time_ns() // 1_000_000, "x"), seq=0, log_end={})

    def dump(self) -> str:
        return json.dumps(
            {"generation": self.generation, "seq": self.seq, "log_end": self.log_end},
            sort_keys=True,
        )
