"""The fast path of decode_batch against the general path: the same rows (values, dtypes,
order), the same dead letters with the same reasons, the same duplicate count, on valid
simulator batches and on adversarial messages mixed into them."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from itertools import islice
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pandas.testing import assert_frame_equal

import kappa.decode.batch as batch_module
from examples.shop.simulator import SimulatorConfig, generate
from kappa.catalog.streams import EventContract, load_streams
from kappa.decode.batch import DecodedBatch, decode_batch
from kappa.decode.fast import decode_fast
from kappa.sources.base import RawBatch
from tests.demo import ORDER_PLACED, PAYMENT_ATTEMPTED
from tests.unit.test_decode import order

BROKER = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)
BROKER_MS = int(BROKER.timestamp() * 1000)


def raw(values: list[bytes | None], keys: list[bytes | None], topic: str = "orders") -> RawBatch:
    n = len(values)
    return RawBatch(
        topic=topic,
        partition=1,
        start=500,
        end=500 + 2 * n,
        offsets=list(range(500, 500 + 2 * n, 2)),
        timestamps=[BROKER_MS + i for i in range(n)],
        keys=keys,
        values=values,
    )


def both(batch: RawBatch, contract: EventContract) -> tuple[DecodedBatch, DecodedBatch]:
    """(general path, fast path) of the same batch, checked equal."""
    batch_module._FAST = False
    try:
        general = decode_batch(batch, contract)
    finally:
        batch_module._FAST = True
    fast = decode_batch(batch, contract)
    assert_frame_equal(fast.rows, general.rows)
    assert_frame_equal(fast.dead_letters, general.dead_letters)
    assert fast.duplicates_in_batch == general.duplicates_in_batch
    return general, fast


def accepted(batch: RawBatch, contract: EventContract) -> int:
    fast = decode_fast(batch, contract)
    assert fast is not None
    return len(fast.positions)


def simulated(topic: str, n: int, seed: int = 3) -> tuple[list[bytes | None], list[bytes | None]]:
    config = SimulatorConfig(
        topic_orders="orders",
        topic_payments="payments",
        customers=50,
        seed=seed,
        duplicate_rate=0.0,
        late_rate=0.05,
        invalid_rate=0.0,
    )
    start = BROKER - timedelta(minutes=30)
    messages = islice((m for m in generate(config, start=start, rate=200) if m.topic == topic), n)
    pairs = [(m.value, m.key) for m in messages]
    return [v for v, _ in pairs], [k for _, k in pairs]


def _amount(literal: bytes) -> bytes:
    return orjson.dumps(order(7, payload={"amount": "AMOUNT"})).replace(b'"AMOUNT"', literal)


UPPER_ID = "6F9619FF-8B86-D011-B42D-00C04FC964FF"

#: Messages (value, key) each of which the fast path must refuse or decode exactly as the
#: general path does: wrong types, bool for int, non-ASCII digits, NUL characters, long
#: number literals, missing and extra fields, upper-case UUIDs, offsets and fractions.
ADVERSARIAL: list[tuple[bytes | None, bytes | None]] = [
    (orjson.dumps(order(1)), b"c-00001"),
    (orjson.dumps(order(2, schema_version=True)), b"c-00001"),
    (orjson.dumps(order(3, schema_version=1.0)), b"c-00001"),
    (orjson.dumps(order(4, schema_version="1")), b"c-00001"),
    (orjson.dumps(order(5, schema_version=2)), b"c-00001"),
    (orjson.dumps(order(6, payload={"item_count": True})), b"c-00001"),
    (orjson.dumps(order(7, payload={"item_count": 2.0})), b"c-00001"),
    (orjson.dumps(order(8, payload={"item_count": 0})), b"c-00001"),
    (orjson.dumps(order(9, payload={"item_count": 2**31})), b"c-00001"),
    (orjson.dumps(order(10, payload={"item_count": "2"})), b"c-00001"),
    (orjson.dumps(order(11, payload={"amount": True})), b"c-00001"),
    (orjson.dumps(order(12, payload={"amount": "19.99"})), b"c-00001"),
    (orjson.dumps(order(13, payload={"amount": 0})), b"c-00001"),
    (orjson.dumps(order(14, payload={"amount": -1.5})), b"c-00001"),
    (orjson.dumps(order(15, payload={"amount": 19.999})), b"c-00001"),
    (orjson.dumps(order(16, payload={"amount": 1e12})), b"c-00001"),
    (orjson.dumps(order(17, payload={"amount": 20})), b"c-00001"),
    (_amount(b"19.990000000000000001"), b"c-00001"),
    (_amount(b"1234567890123.45"), b"c-00001"),
    (_amount(b"12345678901234.5"), b"c-00001"),
    (_amount(b"1.5e1"), b"c-00001"),
    (_amount(b"1e400"), b"c-00001"),
    (_amount(b"123456789012345678901234567890"), b"c-00001"),
    (_amount(b"-0"), b"c-00001"),
    (_amount(b"1" * 400), b"c-00001"),
    (_amount(b"1" * 400 + b".5"), b"c-00001"),
    (_amount(b"null"), b"c-00001"),
    (_amount(b'{"cents": 1999}'), b"c-00001"),
    (_amount(b"[19.99]"), b"c-00001"),
    (_amount(b"0.1e1"), b"c-00001"),
    (_amount(b"199900000000e-10"), b"c-00001"),
    (_amount(b"1999000000000000e-14"), b"c-00001"),
    (_amount(b"[" * 2000 + b"]" * 2000), b"c-00001"),
    (
        orjson.dumps(order(80, payload={"item_count": "ITEMS"})).replace(b'"ITEMS"', b"2" * 25),
        b"c-00001",
    ),
    (orjson.dumps(order(81, schema_version="V")).replace(b'"V"', b"1" * 25), b"c-00001"),
    (orjson.dumps(order(82, payload={"item_count": 2**63})), b"c-00001"),
    (orjson.dumps(order(18, event_id=UPPER_ID)), b"c-00001"),
    (orjson.dumps(order(19, event_id="{" + UPPER_ID + "}")), b"c-00001"),
    (orjson.dumps(order(20, event_id=UPPER_ID[:-1])), b"c-00001"),
    (orjson.dumps(order(21, event_id="\u0660" + UPPER_ID[1:])), b"c-00001"),
    (orjson.dumps(order(22, event_id="\x00" + UPPER_ID[1:])), b"c-00001"),
    (orjson.dumps(order(23, event_id=UPPER_ID[:-1] + "\x00")), b"c-00001"),
    (orjson.dumps(order(24, event_id="\uff26" + UPPER_ID[1:])), b"c-00001"),
    (orjson.dumps(order(25, event_id=UPPER_ID.replace("-", "_"))), b"c-00001"),
    (orjson.dumps(order(26, event_id=123)), b"c-00001"),
    (orjson.dumps(order(27, event_time="2026-11-26T05:59:00Z")), b"c-00001"),
    (orjson.dumps(order(28, event_time="2026-11-26T05:59:00.1Z")), b"c-00001"),
    (orjson.dumps(order(29, event_time="2026-11-26T05:59:00.123456789Z")), b"c-00001"),
    (orjson.dumps(order(30, event_time="2026-11-26T05:59:00.1234567+01:00")), b"c-00001"),
    (orjson.dumps(order(31, event_time="2026-11-26T05:59+01:00")), b"c-00001"),
    (orjson.dumps(order(32, event_time="2026-11-26T05:59:00+0100")), b"c-00001"),
    (orjson.dumps(order(33, event_time="2026-11-26T05:59:00-05:30")), b"c-00001"),
    (orjson.dumps(order(34, event_time="2026-11-26T05:59:00")), b"c-00001"),
    (orjson.dumps(order(35, event_time="\uff12\uff10\uff12\uff16-11-26T05:59:00Z")), b"c-00001"),
    (orjson.dumps(order(36, event_time="2026-11-2\u0666T05:59:00Z")), b"c-00001"),
    # The broker-time bounds (an hour ahead, a year behind), on and just past them.
    (orjson.dumps(order(136, event_time="2026-11-26T07:00:00Z")), b"c-00001"),
    (orjson.dumps(order(137, event_time="2026-11-26T07:00:00.5Z")), b"c-00001"),
    (orjson.dumps(order(138, event_time="2025-11-26T06:00:00Z")), b"c-00001"),
    (orjson.dumps(order(139, event_time="2025-11-26T05:59:59Z")), b"c-00001"),
    (orjson.dumps(order(140, event_time="1999-01-01T00:00:00Z")), b"c-00001"),
    (orjson.dumps(order(37, event_time="2026-02-30T05:59:00Z")), b"c-00001"),
    (orjson.dumps(order(38, event_time="2026-11-26T24:00:00Z")), b"c-00001"),
    (orjson.dumps(order(39, event_time="2026-11-26T05:59:60Z")), b"c-00001"),
    (orjson.dumps(order(40, event_time="2026-11-26T05:59:00+25:00")), b"c-00001"),
    (orjson.dumps(order(41, event_time="2026-11-26t05:59:00Z")), b"c-00001"),
    (orjson.dumps(order(42, event_time="2026-11-26 05:59:00Z")), b"c-00001"),
    (orjson.dumps(order(43, event_time="2026-11-26T08:00:00Z")), b"c-00001"),
    (orjson.dumps(order(44, event_time="2024-11-26T05:59:00Z")), b"c-00001"),
    (orjson.dumps(order(45, event_time="2026-11-26T05:59:00.\x00Z")), b"c-00001"),
    (orjson.dumps(order(46, event_time=1764136740)), b"c-00001"),
    (orjson.dumps(order(47, source="")), b"c-00001"),
    (orjson.dumps(order(48, source="a\x00b")), b"c-00001"),
    (orjson.dumps(order(49, source=5)), b"c-00001"),
    (orjson.dumps(order(50, source=None)), b"c-00001"),
    (orjson.dumps(order(51, event_type="order_cancelled")), b"c-00001"),
    (orjson.dumps(order(52, extra="field")), b"c-00001"),
    (orjson.dumps(order(53, payload={"extra": [1, 2]})), b"c-00001"),
    (orjson.dumps(order(54, payload={"channel": None})), b"c-00001"),
    (orjson.dumps(order(55, payload={"channel": ""})), b"c-00001"),
    (orjson.dumps(order(56, payload={"channel": "w\x00b"})), b"c-00001"),
    (orjson.dumps(order(57, payload={"currency": "eur"})), b"c-00001"),
    (orjson.dumps(order(58, payload={"currency": "EURO"})), b"c-00001"),
    (orjson.dumps(order(59, payload={"currency": "E\x00R"})), b"c-00001"),
    (orjson.dumps(order(60, payload={"currency": "ÉUR"})), b"c-00001"),
    (orjson.dumps(order(61, payload={"customer_id": "c-0000\u0661"})), "c-0000\u0661".encode()),
    (orjson.dumps(order(62, payload={"customer_id": "c-00002"})), b"c-00001"),
    (orjson.dumps(order(63)), None),
    (orjson.dumps(order(64)), b"\xff\xfe"),
    (orjson.dumps(order(65, payload={"customer_id": "\ufffd"})), b"\xff"),
    (orjson.dumps({k: v for k, v in order(66).items() if k != "source"}), b"c-00001"),
    (orjson.dumps({**order(67), "payload": {"order_id": "o-67"}}), b"c-00001"),
    (orjson.dumps({**order(68), "payload": None}), b"c-00001"),
    (orjson.dumps([order(69)]), b"c-00001"),
    (b"{not json", b"c-00001"),
    (b"\xef\xbb\xbf" + orjson.dumps(order(70)), b"c-00001"),
    (orjson.dumps(order(71)) + b" x", b"c-00001"),
    (orjson.dumps(order(72)).replace(b"order-service", b"order-\\u0000service"), b"c-00001"),
    (orjson.dumps(order(73)).replace(b"order-service", b"order-\\ud800service"), b"c-00001"),
    (orjson.dumps(order(74)).replace(b'"source"', b'"source":"x","source"'), b"c-00001"),
    (orjson.dumps(order(75)).replace(b'"source"', b'"source":"","source"'), b"c-00001"),
    (
        orjson.dumps(order(76)).replace(
            b'"source":"order-service"', b'"source":"order-service","source":""'
        ),
        b"c-00001",
    ),
    (orjson.dumps(order(77)).replace(b":", b": \n\t "), b"c-00001"),
    (orjson.dumps(order(83)).replace(b',"source"', b',\f"source"'), b"c-00001"),
    (orjson.dumps(order(84)).replace(b',"source"', b',\xc2\xa0"source"'), b"c-00001"),
    (orjson.dumps(order(85)).replace(b'"web"', b'"web",'), b"c-00001"),
    (orjson.dumps(order(86)).replace(b'"web"', b'"w\\u0065b"'), b"c-00001"),
    (orjson.dumps(order(87)).replace(b'"EUR"', b'"\\u0045UR"'), b"c-00001"),
    (orjson.dumps(order(88)).replace(b'"web"', b'"\\ud83d\\ude00"'), b"c-00001"),
    (orjson.dumps(order(89)).replace(b'"web"', b'"w\\qb"'), b"c-00001"),
    (orjson.dumps(order(92, source="order\x7fservice")), b"c-00001"),
    (orjson.dumps(order(93)) + b"\x1a", b"c-00001"),
    (None, b"c-00001"),
    (b"", b"c-00001"),
    (orjson.dumps(order(78, payload={"order_id": "o-" + "x" * (2 * 1024 * 1024)})), b"c-00001"),
    (orjson.dumps(order(1)), b"c-00001"),  # a duplicate of the first
    (orjson.dumps(order(79, event_id=UPPER_ID.lower())), b"c-00001"),  # duplicate of 18's id
]


def test_valid_simulator_batches_take_the_fast_path_with_the_same_outcome():
    for topic, contract in (("orders", ORDER_PLACED), ("payments", PAYMENT_ATTEMPTED)):
        values, keys = simulated(topic, 600)
        batch = raw(values, keys, topic)
        general, _ = both(batch, contract)
        assert general.dead_letters.empty and len(general.rows) == 600
        assert accepted(batch, contract) == 600


def test_each_adversarial_message_gets_the_general_paths_outcome():
    for value, key in ADVERSARIAL:
        both(raw([value], [key]), ORDER_PLACED)


def test_adversarial_messages_among_valid_ones_keep_order_reasons_and_dedup():
    values, keys = simulated("orders", 200)
    for i, (value, key) in enumerate(ADVERSARIAL):
        at = (i * 7) % (len(values) + 1)
        values.insert(at, value)
        keys.insert(at, key)
    general, _ = both(raw(values, keys), ORDER_PLACED)
    assert len(general.dead_letters) > 50 and general.duplicates_in_batch >= 2
    assert "'event_time' is not a valid time" in set(general.dead_letters["reason"])


def test_a_nanosecond_instant_on_the_general_path_gives_every_row_its_unit():
    values, keys = simulated("orders", 20)
    fine = order(1, event_time="2026-11-26T05:59:00.123456789Z")
    general, _ = both(raw([*values, orjson.dumps(fine)], [*keys, b"c-00001"]), ORDER_PLACED)
    assert str(general.rows["event_time"].dtype) == "datetime64[ns, UTC]"


def test_rows_the_fast_path_refuses_are_left_to_the_general_path():
    batch = raw([v for v, _ in ADVERSARIAL], [k for _, k in ADVERSARIAL])
    fast = decode_fast(batch, ORDER_PLACED)
    assert fast is not None
    general, _ = both(batch, ORDER_PLACED)
    # Accepted: only messages the general path loads too, never one it dead-letters.
    dead = set(general.dead_letters["offset"].tolist())
    assert not dead & {batch.offsets[i] for i in fast.positions.tolist()}
    assert 0 < len(fast.positions) < len(ADVERSARIAL)


FIELD_CATALOG = """
streams:
  - name: fact_probe
    key_field: probe_id
    event_types: [probe_read]
    schema_versions: [1, 2]
    fields:
      probe_id: {type: text, max_length: 8, pattern: "p-[0-9]+"}
      note: {type: text, min_length: 0, nullable: true}
      tag: {type: text, min_length: 3}
      small: {type: integer, min: -5, max: 5}
      big: bigint
      price: {type: "numeric(6,3)", min: 0}
      ok: boolean
      at: timestamptz
      day: date
      ref: uuid
      code: {type: char(2), pattern: "[A-Z]{2}"}
      level: {type: enum, values: [low, high]}
      later: {type: integer, nullable: true, since: 2}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> EventContract:
    path: Path = tmp_path_factory.mktemp("catalog") / "catalog.yaml"
    path.write_text(FIELD_CATALOG)
    [stream] = load_streams(path)
    return stream


def probe_payload(**overrides: object) -> dict:
    values: dict = {
        "probe_id": "p-1",
        "note": "",
        "tag": "abc",
        "small": -5,
        "big": 2**40 + 1,
        "price": 12.345,
        "ok": False,
        "at": "2026-11-26T05:00:00.123456+01:00",
        "day": "2024-02-29",
        "ref": UPPER_ID,
        "code": "DE",
        "level": "high",
    }
    values.update(overrides)
    return values


def probe_message(n: int, body: dict, *, version: int = 1) -> bytes:
    return orjson.dumps(
        {
            "event_id": f"00000000-0000-4000-8000-{n:012d}",
            "event_type": "probe_read",
            "event_time": "2026-11-26T05:59:00Z",
            "source": "probe",
            "schema_version": version,
            "payload": body,
        }
    )


PROBE_VARIANTS = [
    {},
    {"note": None},
    {"note": "n\x00"},
    {"note": 5},
    {"tag": "ab"},
    {"small": 6},
    {"small": -6},
    {"small": True},
    {"big": 2**62 + 1},
    {"big": -(2**53)},
    {"big": 2**63 - 1},
    {"big": -(2**63)},
    {"big": 2**63},
    {"big": 1.0},
    {"price": 1000.0},
    {"price": 1.2345},
    {"price": -0.0},
    {"ok": 1},
    {"ok": None},
    {"ok": True},
    {"at": "2026-11-26T05:00:00.1234567+01:00"},
    {"at": "2026-11-26T05:00:00Z"},
    {"at": 5},
    {"day": "2023-02-29"},
    {"day": "2024-2-29"},
    {"ref": UPPER_ID.lower()},
    {"ref": UPPER_ID[:-1] + "G"},
    {"code": "de"},
    {"code": "DEU"},
    {"level": "medium"},
    {"level": "LOW"},
    {"later": 3},
    {"later": "3"},
    {"probe_id": "p-123456"},
    {"probe_id": "p-12345678"},
    {"probe_id": "p-x"},
]


def test_every_field_type_gets_the_general_paths_outcome(probe):
    values = [probe_message(i, probe_payload(**v)) for i, v in enumerate(PROBE_VARIANTS)]
    values += [
        probe_message(100 + i, probe_payload(**v), version=2) for i, v in enumerate(PROBE_VARIANTS)
    ]
    keys: list[bytes | None] = [b"p-1"] * len(values)
    batch = raw(values, keys, "probes")
    general, _ = both(batch, probe)
    assert 0 < len(general.rows) < len(values)
    assert accepted(batch, probe) > 0
    for value in values:
        both(raw([value], [b"p-1"], "probes"), probe)


_TEXT = st.text(alphabet=st.sampled_from("0123456789abcdefABCDEF-:T.Z+ \x00\u0660é"), max_size=40)
_SCALAR = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**40), max_value=2**40),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    _TEXT,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [
                    "event_id",
                    "event_time",
                    "source",
                    "schema_version",
                    "amount",
                    "item_count",
                    "currency",
                    "channel",
                    "customer_id",
                ]
            ),
            _SCALAR,
        ),
        max_size=12,
    ),
    st.randoms(use_true_random=False),
)
def test_random_field_values_get_the_general_paths_outcome(changes, rng: random.Random):
    values, keys = simulated("orders", 30, seed=5)
    for name, value in changes:
        at = rng.randrange(len(values))
        envelope = orjson.loads(values[at])  # type: ignore[arg-type]
        if name in envelope:
            envelope[name] = value
        else:
            envelope["payload"][name] = value
        values[at] = orjson.dumps(envelope)
    both(raw(values, keys), ORDER_PLACED)


def test_keys_holding_nul_never_line_up_with_other_rows_keys():
    # Joined, these keys and payload keys read the same ("c-1\0c-2" both ways); row by row
    # neither matches, and both rows are dead letters on either path.
    first = orjson.dumps(order(90, payload={"customer_id": "c-1\x00c-2"}))
    second = orjson.dumps(order(91, payload={"customer_id": "c-3"}))
    general, _ = both(raw([first, second], [b"c-1", b"c-2\x00c-3"]), ORDER_PLACED)
    assert general.rows.empty and len(general.dead_letters) == 2
    values, keys = simulated("orders", 5)
    shifted = [*keys[1:], keys[0]]
    general, _ = both(raw(values, shifted), ORDER_PLACED)
    assert len(general.dead_letters) == 5 - sum(a == b for a, b in zip(keys, shifted, strict=True))


def test_bad_messages_at_chunk_boundaries_leave_the_other_chunks_whole():
    values, keys = simulated("orders", 2100, seed=9)
    for at, value in ((1023, None), (1024, b"{not json"), (2050, orjson.dumps([1]))):
        values[at] = value
    values[5] = orjson.dumps(order(5, payload={"order_id": "o-" + "x" * (2 * 1024 * 1024)}))
    general, _ = both(raw(values, keys), ORDER_PLACED)
    assert len(general.dead_letters) == 4 and len(general.rows) == 2096
    assert accepted(raw(values, keys), ORDER_PLACED) == 2096


def test_a_missing_key_never_matches_a_missing_key_field(probe):
    # `later` is nullable: as the key field, a message without it and without a key.
    from dataclasses import replace

    contract = replace(probe, key_field="later")
    values = [probe_message(1, probe_payload()), probe_message(2, probe_payload(later=3))]
    general, _ = both(raw(values, [None, b"3"], "probes"), contract)
    assert general.rows["later"].tolist() == [3]
