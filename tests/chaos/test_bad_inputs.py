"""Bad events of every kind and bad CDC rows: each ends as the contract says, nothing stalls."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.chaos.conftest import record, trials
from tests.chaos.reference import Anomalies, Record, judge, outcomes
from tests.chaos.streams import Message, audit, drain, produce
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration

#: What the dead letter's reason must say, per kind (None: the message is valid, or a
#: duplicate, and is never dead-lettered): a pattern of the reason's stable category (the
#: check and the field it names, not the exact wording of the values), matched ignoring case.
KINDS: dict[str, str | None] = {
    "valid": None,
    "invalid JSON": r"\bJSON\b",
    "not UTF-8 (UTF-16)": r"\bJSON\b|UTF-8",
    "not UTF-8 (Latin-1 byte)": r"\bJSON\b|UTF-8",
    "not a JSON object": r"not an object",
    "missing field (event_id)": r"missing field 'event_id'",
    "missing field (event_time)": r"missing field 'event_time'",
    "missing field (payload.amount)": r"missing field '(payload\.)?amount'",
    "missing field (payload.card_id)": r"missing field '(payload\.)?card_id'",
    "wrong type (amount as string)": r"'(payload\.)?amount'",
    "wrong type (item_count 2.5)": r"'(payload\.)?item_count'.*integer",
    "wrong type (item_count true)": r"'(payload\.)?item_count'.*integer",
    "wrong type (schema_version '1')": r"schema_version",
    "wrong type (event_id 42)": r"'event_id'",
    "wrong type (source 42)": r"'source'.*string",
    "wrong type (status 1)": r"'(payload\.)?status'.*string",
    "unknown event_type": r"event_type",
    "event_type of the other topic": r"event_type",
    "unknown schema_version": r"schema_version",
    "oversize payload (> 1 MiB)": r"exceeds.*limit",
    "large valid payload (900 KiB)": None,
    "null key": r"no key",
    "key differs from customer_id": r"key does not match",
    "null value (tombstone)": r"null value",
    "duplicate (byte-identical resend)": None,
    "duplicate (same event_id, other payload)": None,
    "duplicate (event_id in upper case)": None,
    "event time 2 years in the past": r"'event_time'.*before the broker time",
    "event time 2 hours in the future": r"'event_time'.*after the broker time",
    "event time without a zone": r"'event_time'.*zone",
    "event time not a date (month 13)": r"'event_time'.*valid time",
    "amount out of range (1e15)": r"'(payload\.)?amount'",
    "amount negative": r"'(payload\.)?amount'",
    "item_count beyond integer (2**40)": r"'(payload\.)?item_count'.*range",
    "empty source string": r"'source'.*empty",
    "NUL character in a text field": r"'(payload\.)?order_id'.*NUL",
    "carriage return in a text field": None,
    "lone surrogate escape in a string": r"\bJSON\b|surrogate",
    "line break and quotes in a text field": None,
    "deeply nested JSON": r"\bJSON\b|depth|nest",
}


def _time(delta: timedelta = timedelta()) -> str:
    return (datetime.now(UTC) + delta).isoformat(timespec="milliseconds")


def order(customer: str, n: int, **changes) -> dict:
    envelope = {
        "event_id": str(uuid.uuid4()),
        "event_type": "order_placed",
        "event_time": _time(),
        "source": "order-service",
        "schema_version": 1,
        "payload": {
            "order_id": f"o-{n}",
            "customer_id": customer,
            "amount": 10.5 + n,
            "currency": "EUR",
            "item_count": 2,
            "channel": "web",
        },
    }
    for name, value in changes.items():
        target = envelope["payload"] if name in envelope["payload"] else envelope
        if value is _DROP:
            del target[name]
        else:
            target[name] = value
    return envelope


def payment(customer: str, n: int, **changes) -> dict:
    envelope = order(customer, n)
    envelope["event_type"] = "payment_attempted"
    envelope["source"] = "payment-service"
    envelope["payload"] = {
        "payment_id": f"p-{n}",
        "order_id": f"o-{n}",
        "customer_id": customer,
        "card_id": f"card-{customer}",
        "amount": 20.25,
        "currency": "EUR",
        "merchant_country": "DE",
        "status": "approved",
    }
    for name, value in changes.items():
        target = envelope["payload"] if name in envelope["payload"] else envelope
        if value is _DROP:
            del target[name]
        else:
            target[name] = value
    return envelope


_DROP = object()


def _j(envelope: object) -> bytes:
    return json.dumps(envelope).encode()


def catalogue(orders: str, payments: str) -> list[tuple[str, Message]]:
    """(kind, message) pairs: every kind of bad event the issue names, and a few poison
    candidates, each next to valid events of the same customer."""
    out: list[tuple[str, Message]] = []
    n = 0

    def add(
        kind: str, topic: str, key: bytes | None, value: bytes | None, skew_ms: int = 0
    ) -> None:
        out.append((kind, Message(topic, key, value, skew_ms)))

    for i in range(trials(2, 8)):
        customer = f"cx-{i:03d}"
        key = customer.encode()
        n += 1
        add("valid", orders, key, _j(order(customer, n)))
        add("valid", payments, key, _j(payment(customer, n)))
        text = _j(order(customer, n))
        add("invalid JSON", orders, key, text[: len(text) // 2])
        add("not UTF-8 (UTF-16)", orders, key, json.dumps(order(customer, n)).encode("utf-16"))
        add(
            "not UTF-8 (Latin-1 byte)",
            payments,
            key,
            _j(payment(customer, n)).replace(b"approved", b"appro\xe9ved"),
        )
        add("not a JSON object", orders, key, _j([order(customer, n)]))
        add("missing field (event_id)", orders, key, _j(order(customer, n, event_id=_DROP)))
        add("missing field (event_time)", payments, key, _j(payment(customer, n, event_time=_DROP)))
        add("missing field (payload.amount)", orders, key, _j(order(customer, n, amount=_DROP)))
        add(
            "missing field (payload.card_id)",
            payments,
            key,
            _j(payment(customer, n, card_id=_DROP)),
        )
        add("wrong type (amount as string)", orders, key, _j(order(customer, n, amount="10.50")))
        add("wrong type (item_count 2.5)", orders, key, _j(order(customer, n, item_count=2.5)))
        add("wrong type (item_count true)", orders, key, _j(order(customer, n, item_count=True)))
        add(
            "wrong type (schema_version '1')",
            payments,
            key,
            _j(payment(customer, n, schema_version="1")),
        )
        add("wrong type (event_id 42)", orders, key, _j(order(customer, n, event_id=42)))
        add("wrong type (source 42)", orders, key, _j(order(customer, n, source=42)))
        add("wrong type (status 1)", payments, key, _j(payment(customer, n, status=1)))
        add("unknown event_type", orders, key, _j(order(customer, n, event_type="order_cancelled")))
        add("event_type of the other topic", payments, key, _j(order(customer, n)))
        add("unknown schema_version", payments, key, _j(payment(customer, n, schema_version=2)))
        big = order(customer, n)
        big["payload"]["channel"] = "w" * (1024 * 1024 + 10)
        add("oversize payload (> 1 MiB)", orders, key, _j(big))
        near = order(customer, n)
        near["payload"]["channel"] = "w" * (900 * 1024)
        add("large valid payload (900 KiB)", orders, key, _j(near))
        add("null key", orders, None, _j(order(customer, n)))
        add("key differs from customer_id", payments, b"someone-else", _j(payment(customer, n)))
        add("null value (tombstone)", payments, key, None)
        original = order(customer, n)
        add("valid", orders, key, _j(original))
        add("duplicate (byte-identical resend)", orders, key, _j(original))
        add(
            "duplicate (same event_id, other payload)",
            orders,
            key,
            _j({**original, "source": "replayer"}),
        )
        add(
            "duplicate (event_id in upper case)",
            orders,
            key,
            _j({**original, "event_id": original["event_id"].upper()}),
        )
        add(
            "event time 2 years in the past",
            orders,
            key,
            _j(order(customer, n, event_time=_time(-timedelta(days=730)))),
        )
        add(
            "event time 2 hours in the future",
            payments,
            key,
            _j(payment(customer, n, event_time=_time(timedelta(hours=2)))),
        )
        add(
            "event time without a zone",
            orders,
            key,
            _j(order(customer, n, event_time="2026-01-01T10:00:00")),
        )
        add(
            "event time not a date (month 13)",
            orders,
            key,
            _j(order(customer, n, event_time="2026-13-01T10:00:00Z")),
        )
        add("amount out of range (1e15)", payments, key, _j(payment(customer, n, amount=1e15)))
        add("amount negative", orders, key, _j(order(customer, n, amount=-5)))
        add(
            "item_count beyond integer (2**40)",
            orders,
            key,
            _j(order(customer, n, item_count=2**40)),
        )
        add("empty source string", orders, key, _j(order(customer, n, source="")))
        add("NUL character in a text field", orders, key, _j(order(customer, n, order_id="o\x00x")))
        add(
            "carriage return in a text field",
            orders,
            key,
            _j(order(customer, n, channel="web\rapp")),
        )
        add(
            "lone surrogate escape in a string",
            orders,
            key,
            _j(order(customer, n, channel="\ud800")),
        )
        add(
            "line break and quotes in a text field",
            payments,
            key,
            _j(payment(customer, n, card_id='c"1,\n2')),
        )
        nested = b'{"event_id": "%s", "payload": {"x": ' % str(uuid.uuid4()).encode()
        add("deeply nested JSON", orders, key, nested + b"[" * 5000 + b"]" * 5000 + b"}}")
        n += 1
        add("valid", orders, key, _j(order(customer, n)))
        add("valid", payments, key, _j(payment(customer, n)))
    return out


def _reason(reason: str) -> str:
    """A dead letter's reason without the quoted values, short enough for the table."""
    return re.sub(r"'[^']*'|\([^)]*\)|\d[\w.+-]*", "", reason.split(":")[0]).strip()[:45]


def test_bad_events_of_every_kind_end_as_the_contract_says_and_no_partition_stalls(
    chaos_pipeline: Pipeline,
):
    pipeline = chaos_pipeline
    pairs = catalogue(
        pipeline.settings.stream("fact_order").topic, pipeline.settings.stream("fact_payment").topic
    )
    assert {kind for kind, _ in pairs} == set(KINDS), "every kind has its expected reason"
    records = produce(pipeline.env["KAFKA_BOOTSTRAP_SERVERS"], [m for _, m in pairs])
    kind_of = {
        (r.topic, r.partition, r.offset): kind for (kind, _), r in zip(pairs, records, strict=True)
    }
    report = drain(pipeline)

    by_kind: dict[str, list[Record]] = defaultdict(list)
    for r in records:
        by_kind[kind_of[(r.topic, r.partition, r.offset)]].append(r)
    topics = {
        pipeline.settings.stream("fact_order").topic: ("fact_order", "order_placed"),
        pipeline.settings.stream("fact_payment").topic: ("fact_payment", "payment_attempted"),
    }
    state = {}
    with psycopg.connect(pipeline.edw_url) as conn:
        for topic, (asset, _) in topics.items():
            state[topic] = outcomes(
                conn, edw="edw", meta="kappa", asset=asset, table=asset, topic=topic
            )
    total = Anomalies()
    for kind, members in by_kind.items():
        found = Anomalies()
        seen: Counter[str] = Counter()
        why: Counter[str] = Counter()
        for topic, (_, event_type) in topics.items():
            subset = [r for r in members if r.topic == topic]
            if not subset:
                continue
            rows, reasons, ends = state[topic]
            f, s = judge(
                subset, event_type, rows, reasons, ends, [r for r in records if r.topic == topic]
            )
            found += f
            seen += s
            given = [
                reasons[(r.partition, r.offset)]
                for r in subset
                if (r.partition, r.offset) in reasons
            ]
            why.update(_reason(reason) for reason in given)
            expected_reason = KINDS[kind]
            for reason in given:
                if expected_reason is None:
                    found.note("unexpected", 1, f"{kind}: dead-lettered ({reason})")
                elif not re.search(expected_reason, reason, flags=re.IGNORECASE):
                    found.note(
                        "unexpected",
                        1,
                        f"{kind}: reason {reason[:120]!r} is not /{expected_reason}/",
                    )
            if expected_reason is not None:
                # Every message of a bad kind is dead-lettered (none loaded, none dropped).
                missing = [
                    r
                    for r in subset
                    if r.offset < ends.get(r.partition, 0)
                    and (r.partition, r.offset) not in reasons
                ]
                if missing:
                    found.note("dead_letters_missing", len(missing), f"{kind}: not dead-lettered")
        outcome = ", ".join(f"{v} {k}" for k, v in sorted(seen.items()))
        if why:
            outcome += f" ({', '.join(sorted(why))})"
        record(f"bad event: {kind}", len(members), outcome, found)
        total += found
    whole = audit(pipeline, records, complete=True)
    record(
        "bad events: whole EDW vs reference",
        len(records),
        f"{report.runs} runs, {report.failed_runs} failed",
        whole,
    )
    print("\n".join(sorted(set(report.errors))))
    # Text with a carriage return, a line break, quotes and a comma arrives byte for byte.
    assert pipeline.query(
        "SELECT count(*) FROM edw.fact_order WHERE channel = %s", ("web\rapp",)
    ) != [(0,)]
    assert pipeline.query(
        "SELECT count(*) FROM edw.fact_payment WHERE card_id = %s", ('c"1,\n2',)
    ) != [(0,)]
    assert total.total == 0, total.details
    assert whole.total == 0, whole.details


CUSTOMER = {
    "customer_id": "k-1",
    "name": "Ada",
    "segment": "retail",
    "country": "DE",
    "credit_limit": 100.5,
}


def _customer(**changes) -> dict:
    row = {**CUSTOMER, **changes}
    return {k: v for k, v in row.items() if v is not _DROP}


#: (kind, op, before, after, valid?) for rows written straight into the change table.
CDC_ROWS = [
    ("valid insert", "I", None, _customer(customer_id="k-1"), True),
    ("unknown operation 'X'", "X", None, _customer(customer_id="k-2"), False),
    ("unknown operation 'T' (truncate)", "T", None, None, False),
    ("insert without an after image", "I", None, None, False),
    ("after image not an object (array)", "U", None, [1, 2], False),
    ("after image not an object (string)", "I", None, "customer", False),
    ("row image lacks a column", "I", None, _customer(customer_id="k-3", segment=_DROP), False),
    ("key column null", "I", None, _customer(customer_id=None), False),
    (
        "wrong type (credit_limit 'abc')",
        "U",
        None,
        _customer(customer_id="k-1", credit_limit="abc"),
        False,
    ),
    ("wrong type (name 42)", "I", None, _customer(customer_id="k-4", name=42), False),
    ("delete without a before image", "D", None, None, False),
    (
        "carriage return in a text column",
        "I",
        None,
        _customer(customer_id="k-5", name="A\rB"),
        True,
    ),
    (
        "valid update",
        "U",
        _customer(customer_id="k-1"),
        _customer(customer_id="k-1", name="Ada L."),
        True,
    ),
]


def test_bad_change_rows_are_dead_lettered_and_the_change_table_moves_on(chaos_pipeline: Pipeline):
    pipeline = chaos_pipeline
    reps = trials(1, 5)
    written: list[tuple[str, int, bool]] = []
    with psycopg.connect(pipeline.edw_url, autocommit=True) as conn:
        for rep in range(reps):
            for kind, op, before, after, valid in CDC_ROWS:

                def image(v, rep=rep):  # type: ignore[no-untyped-def]
                    if isinstance(v, dict) and v.get("customer_id"):
                        v = {**v, "customer_id": f"{v['customer_id']}-{rep}"}
                    return None if v is None else json.dumps(v)

                [(change_id,)] = conn.execute(
                    "INSERT INTO cdc.customers_changes (op, before, after) VALUES (%s, %s, %s) RETURNING change_id",
                    (op, image(before), image(after)),
                ).fetchall()
                written.append((kind, change_id, valid))
    report = drain(pipeline, ("dim_customer",))
    with psycopg.connect(pipeline.edw_url, autocommit=True) as conn:
        dead = dict(
            conn.execute(
                "SELECT position, reason FROM kappa.dead_letter WHERE asset = 'dim_customer'"
            ).fetchall()
        )
        versions = {
            r[0] for r in conn.execute("SELECT customer_sk FROM edw.dim_customer").fetchall()
        }
        pending = conn.execute(
            "SELECT count(*) FROM cdc.customers_changes WHERE xid >= "
            "(SELECT coalesce(max(end_position), 0) FROM kappa.ledger_head WHERE asset = 'dim_customer')::text::xid8"
        ).fetchone()
        names = {r[0] for r in conn.execute("SELECT name FROM edw.dim_customer").fetchall()}
    total = Anomalies()
    for kind, _, _, _, valid in CDC_ROWS:
        found = Anomalies()
        ids = [c for k, c, _ in written if k == kind]
        for change_id in ids:
            if valid and change_id not in versions:
                found.note(
                    "lost",
                    1,
                    f"change {change_id} valid but {'dead-lettered' if change_id in dead else 'missing'}",
                )
            elif not valid and change_id in versions:
                found.note("unexpected", 1, f"change {change_id} malformed but applied")
            elif not valid and change_id not in dead:
                found.note("dead_letters_missing", 1, f"change {change_id} dropped silently")
        why = sorted({_reason(dead[c]) for c in ids if c in dead})
        outcome = (
            f"{sum(c in versions for c in ids)} applied"
            if valid
            else f"{sum(c in dead for c in ids)} dead-lettered"
        ) + (f" ({', '.join(why)})" if why else "")
        record(f"bad CDC row: {kind}", len(ids), outcome, found)
        total += found
    total.note(
        "lost", int(pending[0]) if pending else 0, "changes left behind the ledger (stalled)"
    )
    assert not report.errors, report.errors
    assert any("\r" in (n or "") for n in names), "text with a carriage return arrives intact"
    assert total.total == 0, total.details
