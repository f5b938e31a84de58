"""An independent reference for the chaos suite: what the EDW must hold, from what was produced.

Deliberately a separate, simple implementation (plain Python, one message at a time) of the
data contract in the README and DESIGN.md §3, sharing no code with ``kappa.decode``: a
message is valid when its value is a UTF-8 JSON object with the envelope and payload fields
of the right types, a key equal to ``payload.customer_id``, at most 1 MiB, and an event time
neither more than 365 days before nor more than one hour after its broker time. The first
copy (lowest offset) of each ``event_id`` is the row; later copies are deduplicated.

:func:`audit` compares a deployment's EDW with that reference and counts every anomaly:
rows lost, rows duplicated (a second copy of an event loaded), rows that should not be
there, dead letters missing or extra, ledger gaps and overlaps, and running statistics that
disagree with the rows the ledger says were loaded.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal

import psycopg

MAX_BYTES = 1024 * 1024
MAX_FUTURE = timedelta(hours=1)
MAX_AGE = timedelta(days=365)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DATE_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}")


def _text(v: object) -> bool:
    return isinstance(v, str) and v != "" and "\x00" not in v


def _amount(v: object) -> bool:
    return (
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 < v < 1e12
    )


def _count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 2**31 - 1


def _code(length: int):  # type: ignore[no-untyped-def]
    return lambda v: (
        isinstance(v, str) and len(v) == length and v.isascii() and v.isupper() and v.isalpha()
    )


#: The two contracts, written out by hand: event type and payload field checks.
CONTRACTS = {
    "order_placed": {
        "order_id": _text,
        "customer_id": _text,
        "amount": _amount,
        "currency": _code(3),
        "item_count": _count,
        "channel": _text,
    },
    "payment_attempted": {
        "payment_id": _text,
        "order_id": _text,
        "customer_id": _text,
        "card_id": _text,
        "amount": _amount,
        "currency": _code(3),
        "merchant_country": _code(2),
        "status": lambda v: v in ("approved", "declined"),
    },
}


@dataclass(frozen=True)
class Record:
    """One message as the broker acknowledged it."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes | None


def _event_time(raw: object) -> datetime | None:
    if not isinstance(raw, str) or not _DATE_TIME.match(raw):
        return None
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def valid_event(record: Record, event_type: str) -> dict | None:
    """The envelope when ``record`` is a valid event of ``event_type``, else None."""
    value = record.value
    if value is None or len(value) > MAX_BYTES:
        return None
    try:
        envelope = json.loads(value.decode("utf-8"))
        # A lone surrogate (\ud800) is no Unicode text: it cannot be stored either.
        json.dumps(envelope, ensure_ascii=False).encode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError, ValueError, RecursionError):
        return None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("payload"), dict):
        return None
    event_id = envelope.get("event_id")
    if not (isinstance(event_id, str) and _UUID.match(event_id)):
        return None
    if envelope.get("event_type") != event_type or not _text(envelope.get("source")):
        return None
    version = envelope.get("schema_version")
    if not (isinstance(version, int) and not isinstance(version, bool) and version == 1):
        return None
    moment = _event_time(envelope.get("event_time"))
    if moment is None:
        return None
    broker = datetime.fromtimestamp(record.timestamp_ms / 1000, tz=UTC)
    if moment - broker > MAX_FUTURE or broker - moment > MAX_AGE:
        return None
    payload = envelope["payload"]
    for name, check in CONTRACTS[event_type].items():
        if name not in payload or not check(payload[name]):
            return None
    if record.key is None or record.key.decode("utf-8", "replace") != payload["customer_id"]:
        return None
    return envelope


@dataclass
class Expected:
    """What one topic's fact must hold."""

    rows: dict[str, tuple[int, int]] = field(
        default_factory=dict
    )  # event_id -> (partition, offset)
    cents: dict[str, int] = field(default_factory=dict)  # event_id -> amount in cents
    customer: dict[str, str] = field(default_factory=dict)  # event_id -> customer_id
    dead: set[tuple[int, int]] = field(default_factory=set)  # (partition, offset)
    received: Counter[int] = field(default_factory=Counter)
    deduplicated: Counter[int] = field(default_factory=Counter)


def expected(records: Iterable[Record], topic: str, event_type: str) -> Expected:
    out = Expected()
    for record in sorted(
        (r for r in records if r.topic == topic), key=lambda r: (r.partition, r.offset)
    ):
        out.received[record.partition] += 1
        envelope = valid_event(record, event_type)
        if envelope is None:
            out.dead.add((record.partition, record.offset))
            continue
        event_id = str(uuid.UUID(envelope["event_id"]))
        if event_id in out.rows:
            out.deduplicated[record.partition] += 1
            continue
        out.rows[event_id] = (record.partition, record.offset)
        amount = Decimal(repr(envelope["payload"]["amount"])).quantize(
            Decimal("0.01"), rounding=ROUND_HALF_EVEN
        )
        out.cents[event_id] = int(amount * 100)
        out.customer[event_id] = envelope["payload"]["customer_id"]
    return out


@dataclass
class Anomalies:
    """Everything that differs from the reference, counted."""

    lost: int = 0
    duplicated: int = 0
    unexpected: int = 0
    dead_letters_missing: int = 0
    dead_letters_extra: int = 0
    ledger_gaps: int = 0
    ledger_overlaps: int = 0
    ledger_counts: int = 0
    state: int = 0
    details: list[str] = field(default_factory=list)

    def __iadd__(self, other: Anomalies) -> Anomalies:
        for name in self.counted():
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.details.extend(other.details)
        return self

    @staticmethod
    def counted() -> tuple[str, ...]:
        return (
            "lost",
            "duplicated",
            "unexpected",
            "dead_letters_missing",
            "dead_letters_extra",
            "ledger_gaps",
            "ledger_overlaps",
            "ledger_counts",
            "state",
        )

    @property
    def other(self) -> int:
        return sum(getattr(self, n) for n in self.counted() if n not in ("lost", "duplicated"))

    @property
    def total(self) -> int:
        return self.lost + self.duplicated + self.other

    def note(self, kind: str, count: int, text: str) -> None:
        if count:
            setattr(self, kind, getattr(self, kind) + count)
            self.details.append(f"{kind}: {text}")

    def describe(self) -> str:
        parts = [f"{n}={getattr(self, n)}" for n in self.counted() if getattr(self, n)]
        return ", ".join(parts) or "none"


def audit_topic(
    conn: psycopg.Connection,
    *,
    edw: str,
    meta: str,
    asset: str,
    table: str,
    topic: str,
    event_type: str,
    records: Iterable[Record],
    complete: bool,
) -> Anomalies:
    """Compare one fact with the reference, over the offsets the ledger covers.

    ``complete``: the ledger must cover every produced record (after a drain); otherwise
    only consistency within the covered prefix is checked (after a kill, mid-stream).
    """
    records = list(records)
    ref = expected(records, topic, event_type)
    found = Anomalies()
    # -- the ledger: contiguous spans from the first offset, counts adding up -------------
    spans: dict[int, list[tuple]] = defaultdict(list)
    for row in conn.execute(
        f"SELECT shard, start_position, end_position, received, loaded, dead_lettered, deduplicated "
        f"FROM {meta}.batch_ledger WHERE asset = %s AND source = %s ORDER BY shard, start_position",
        (asset, topic),
    ).fetchall():
        spans[row[0]].append(row[1:])
    heads = dict(
        conn.execute(
            f"SELECT shard, end_position FROM {meta}.ledger_head WHERE asset = %s AND source = %s",
            (asset, topic),
        ).fetchall()
    )
    log_ends: dict[int, int] = defaultdict(int)
    by_partition: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        if r.topic == topic:
            log_ends[r.partition] = max(log_ends[r.partition], r.offset + 1)
            by_partition[r.partition].append(r)
    covered: dict[int, int] = {}
    for partition in sorted(set(log_ends) | set(spans)):
        batches = spans.get(partition, [])
        position = 0
        for start, end, received, loaded, dead, dedup in batches:
            if start > position:
                found.note(
                    "ledger_gaps", 1, f"{topic}[{partition}] [{position}, {start}) never loaded"
                )
            elif start < position:
                found.note(
                    "ledger_overlaps", 1, f"{topic}[{partition}] [{start}, {position}) loaded twice"
                )
            if received != loaded + dead + dedup:
                found.note(
                    "ledger_counts", 1, f"{topic}[{partition}] batch [{start}, {end}) counts"
                )
            in_range = sum(1 for r in by_partition[partition] if start <= r.offset < end)
            if in_range != received:
                found.note(
                    "ledger_counts",
                    1,
                    f"{topic}[{partition}] batch [{start}, {end}) received {received}, produced {in_range}",
                )
            position = max(position, end)
        if heads.get(partition, 0) != position:
            found.note(
                "ledger_counts",
                1,
                f"{topic}[{partition}] head {heads.get(partition)} != ledger end {position}",
            )
        covered[partition] = position
        if complete and position != log_ends.get(partition, 0):
            found.note(
                "lost",
                sum(1 for eid, (p, o) in ref.rows.items() if p == partition and o >= position),
                f"{topic}[{partition}] ledger ends at {position}, log at {log_ends.get(partition, 0)}",
            )

    def is_covered(partition: int, offset: int) -> bool:
        return offset < covered.get(partition, 0)

    # -- rows: first copies of the covered offsets, nothing else ----------------------------
    edw_rows = conn.execute(
        f"SELECT event_id::text, kafka_partition, kafka_offset, customer_id, "
        f"(amount * 100)::bigint FROM {edw}.{table} WHERE topic = %s",
        (topic,),
    ).fetchall()
    loaded = {r[0]: (r[1], r[2]) for r in edw_rows}
    lost = [e for e, (p, o) in ref.rows.items() if is_covered(p, o) and e not in loaded]
    found.note("lost", len(lost), f"{table}: {lost[:3]} ...")
    for event_id, (p, o) in loaded.items():
        want = ref.rows.get(event_id)
        if want is None:
            found.note(
                "unexpected", 1, f"{table}: {event_id} at {topic}[{p}]@{o} is no valid event"
            )
        elif want != (p, o):
            found.note(
                "duplicated", 1, f"{table}: {event_id} loaded from {p}@{o}, first copy {want}"
            )
        elif not is_covered(p, o):
            found.note("unexpected", 1, f"{table}: {event_id} at {p}@{o} beyond the ledger")
    # -- dead letters: exactly the invalid covered offsets --------------------------------
    dead = {
        (int(r[0]), int(r[1]))
        for r in conn.execute(
            f"SELECT shard, position FROM {meta}.dead_letter WHERE asset = %s AND source = %s",
            (asset, topic),
        ).fetchall()
    }
    want_dead = {(p, o) for p, o in ref.dead if is_covered(p, o)}
    found.note(
        "dead_letters_missing", len(want_dead - dead), f"{topic}: {sorted(want_dead - dead)[:5]}"
    )
    found.note(
        "dead_letters_extra", len(dead - want_dead), f"{topic}: {sorted(dead - want_dead)[:5]}"
    )
    # -- state: each customer's running count and sum are those of its loaded rows ---------
    store = {"fact_order": "order_stats", "fact_payment": "payment_stats"}.get(asset)
    if store is not None:
        per_customer: dict[tuple[int, str], list[int]] = defaultdict(lambda: [0, 0])
        for event_id, (p, o) in ref.rows.items():
            if is_covered(p, o):
                acc = per_customer[(p, ref.customer[event_id])]
                acc[0] += 1
                acc[1] += ref.cents[event_id]
        state = {
            (int(r[0]), r[1]): (int(r[2]), int(r[3]))
            for r in conn.execute(
                f"SELECT DISTINCT ON (shard, key) shard, key, (value->>'n')::bigint, "
                f"(value->>'sum')::numeric FROM {meta}.state WHERE store = %s "
                "ORDER BY shard, key, position DESC",
                (f"{asset}/{store}",),
            ).fetchall()
        }
        wrong = [
            k
            for k in set(per_customer) | set(state)
            if tuple(per_customer.get(k, (0, 0))) != state.get(k, (0, 0))
        ]
        found.note(
            "state", len(wrong), f"{asset}/{store}: {wrong[:3]} disagree with the loaded rows"
        )
        ends = {(p, e) for p, batches in spans.items() for _, e, *_ in batches}
        stray = conn.execute(
            f"SELECT DISTINCT shard, position FROM {meta}.state WHERE store LIKE %s",
            (f"{asset}/%",),
        ).fetchall()
        off_ledger = [s for s in stray if (int(s[0]), int(s[1])) not in ends]
        found.note(
            "state",
            len(off_ledger),
            f"{asset}: state versions at {off_ledger[:3]} are no batch end",
        )
        if asset == "fact_order":
            # Each order carries the customer's order count before it: the loaded rows of
            # that customer at lower offsets of its partition.
            seen: Counter[tuple[int, str]] = Counter()
            before = {}
            for event_id, (p, _) in sorted(ref.rows.items(), key=lambda kv: kv[1]):
                key = (p, ref.customer[event_id])
                before[event_id] = seen[key]
                seen[key] += 1
            carried = conn.execute(
                f"SELECT event_id::text, customer_orders_before FROM {edw}.{table} WHERE topic = %s",
                (topic,),
            ).fetchall()
            bad = [e for e, n in carried if e in before and n != before[e]]
            found.note("state", len(bad), f"{table}: customer_orders_before wrong for {bad[:3]}")
    if asset == "fact_payment":
        orphans = conn.execute(
            f"SELECT count(*) FROM {edw}.fraud_alert a WHERE a.topic = %s AND NOT EXISTS "
            f"(SELECT 1 FROM {edw}.{table} f WHERE f.event_id = a.event_id)",
            (topic,),
        ).fetchone()
        found.note(
            "unexpected", int(orphans[0]) if orphans else 0, "fraud alerts without their payment"
        )
    return found


def outcomes(
    conn: psycopg.Connection, *, edw: str, meta: str, asset: str, table: str, topic: str
) -> tuple[dict[tuple[int, int], str], dict[tuple[int, int], str], dict[int, int]]:
    """What became of each offset of ``topic``: ``row`` (a fact row came from it) or ``dead``
    (with the reasons by offset), and the ledger end per partition; a covered offset that is
    neither was deduplicated."""
    rows = {
        (int(p), int(o)): "row"
        for p, o in conn.execute(
            f"SELECT kafka_partition, kafka_offset FROM {edw}.{table} WHERE topic = %s", (topic,)
        ).fetchall()
    }
    reasons = {
        (int(p), int(o)): reason
        for p, o, reason in conn.execute(
            f"SELECT shard, position, reason FROM {meta}.dead_letter WHERE asset = %s AND source = %s",
            (asset, topic),
        ).fetchall()
    }
    ends = {
        int(p): int(e)
        for p, e in conn.execute(
            f"SELECT shard, end_position FROM {meta}.ledger_head WHERE asset = %s AND source = %s",
            (asset, topic),
        ).fetchall()
    }
    return rows, reasons, ends


def judge(
    records: Iterable[Record],
    event_type: str,
    rows: dict[tuple[int, int], str],
    reasons: dict[tuple[int, int], str],
    ends: dict[int, int],
    all_records: Iterable[Record],
) -> tuple[Anomalies, Counter[str]]:
    """Anomalies among ``records`` (a subset of ``all_records``, which fixes first copies),
    and what became of them (``loaded``, ``deduplicated``, ``dead-lettered``, ``not reached``)."""
    records = list(records)
    records_topic = records[0].topic
    ref = expected(all_records, records_topic, event_type)
    firsts = set(ref.rows.values())
    found = Anomalies()
    seen: Counter[str] = Counter()
    for r in records:
        assert r.topic == records_topic
        at = (r.partition, r.offset)
        want = "dead" if at in ref.dead else "row" if at in firsts else "dedup"
        if r.offset >= ends.get(r.partition, 0):
            seen["not reached"] += 1
            if want == "row":
                found.note(
                    "lost",
                    1,
                    f"{r.topic}[{r.partition}]@{r.offset} never loaded (partition stalled)",
                )
            else:
                found.note(
                    "dead_letters_missing", 1, f"{r.topic}[{r.partition}]@{r.offset} never reached"
                )
            continue
        got = "row" if at in rows else "dead" if at in reasons else "dedup"
        seen[{"row": "loaded", "dead": "dead-lettered", "dedup": "deduplicated"}[got]] += 1
        if got == want:
            continue
        if want == "row":
            found.note("lost", 1, f"{r.topic}[{r.partition}]@{r.offset} valid but {got}")
        elif want == "dedup" and got == "row":
            found.note("duplicated", 1, f"{r.topic}[{r.partition}]@{r.offset} second copy loaded")
        elif want == "dead" and got == "row":
            found.note("unexpected", 1, f"{r.topic}[{r.partition}]@{r.offset} invalid but loaded")
        elif want == "dead":
            found.note(
                "dead_letters_missing",
                1,
                f"{r.topic}[{r.partition}]@{r.offset} invalid, dropped silently",
            )
        else:
            found.note(
                "dead_letters_extra",
                1,
                f"{r.topic}[{r.partition}]@{r.offset} duplicate dead-lettered",
            )
    return found, seen
