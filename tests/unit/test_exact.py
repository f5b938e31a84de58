"""Exact number checks: a value is loaded as written or refused with its reason."""

from decimal import Decimal, localcontext

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from kappa.decode.batch import decode_batch
from kappa.exact import NumericType, long_literals, round_half_even_div
from tests.demo import ORDER_PLACED
from tests.unit.test_decode import batch, with_amount

AMOUNT = NumericType(14, 2)


@st.composite
def decimal_literals(draw) -> str:
    """Positive decimal literals as a producer might write them: 1..20 significant digits,
    0..6 decimals (trailing zeros included), magnitudes around the column's limit too."""
    whole = draw(
        st.one_of(
            st.integers(0, 10**4),
            st.integers(10**11, 10**12 + 10),
            st.integers(0, 10**14),
        )
    )
    decimals = draw(st.integers(0, 6))
    fraction = draw(st.integers(0, 10**decimals - 1)) if decimals else 0
    literal = f"{whole}.{fraction:0{decimals}d}" if decimals else str(whole)
    if draw(st.booleans()) and decimals:
        literal += "0" * draw(st.integers(1, 12))  # long but exact: trailing zeros
    if draw(st.integers(0, 9)) == 0:
        literal += "0" * 12 + "1" if "." in literal else ".00000000000000001"
    return literal


@settings(max_examples=400, deadline=None)
@given(decimal_literals())
def test_the_check_accepts_exactly_the_literals_with_at_most_2_decimals_below_10_12(literal):
    value = Decimal(literal)
    decoded = decode_batch(batch([with_amount(literal.encode())]), ORDER_PLACED)
    fits = value > 0 and value < 10**12 and value == value.quantize(Decimal("0.01"))
    if fits:
        assert decoded.dead_letters.empty, decoded.dead_letters["reason"].tolist()
        loaded = decoded.rows.iloc[0]["amount"]
        assert Decimal(repr(float(loaded))) == value, "loaded as written, not rounded"
    else:
        [reason] = decoded.dead_letters["reason"].tolist()
        assert reason.startswith("'payload.amount' "), reason
        if value <= 0:
            assert "must be > 0" in reason
        elif value >= 10**12:
            assert "does not fit numeric(14, 2)" in reason
        else:
            assert "has more than 2 decimals" in reason


@settings(max_examples=300, deadline=None)
@given(st.decimals(min_value=Decimal("1e-6"), max_value=Decimal("1e14"), places=6))
def test_short_literals_round_trip_through_a_double(value):
    """The reasoning the vectorised path rests on: a literal of at most 15 significant
    digits is the shortest repr of its double."""
    digits = len(value.normalize().as_tuple().digits)
    if digits <= 15:
        assert Decimal(repr(float(value))) == value


def test_long_literals_are_found_in_one_scan_and_strings_are_not():
    messages = [
        orjson.dumps({"payload": {"amount": 1.5, "id": "1234567890123456789"}}),
        None,
        b'{"payload": {"amount": 1.0000000000000000001}}',
        b'{"payload": {"amount": [12345678901234567]}}',
    ]
    assert long_literals(messages).tolist() == [2, 3]
    assert long_literals([]).tolist() == []


def test_a_long_but_exact_literal_is_loaded_as_written():
    decoded = decode_batch(batch([with_amount(b"12.340000000000000000")]), ORDER_PLACED)
    assert decoded.dead_letters.empty and decoded.rows.iloc[0]["amount"] == 12.34


def test_integer_amounts_are_checked_against_the_range_too():
    decoded = decode_batch(
        batch([with_amount(b"999999999999"), with_amount(b"1000000000000")]), ORDER_PLACED
    )
    assert decoded.rows["amount"].tolist() == [999999999999.0]
    assert decoded.dead_letters["reason"].tolist() == [
        "'payload.amount' does not fit numeric(14, 2): 1000000000000"
    ]


@given(st.integers(-(10**20), 10**20), st.integers(1, 10**6))
def test_integer_division_rounds_half_to_even_like_decimal(numerator, denominator):
    with localcontext() as ctx:
        ctx.prec = 60
        expected = (Decimal(numerator) / Decimal(denominator)).quantize(
            Decimal(1), rounding="ROUND_HALF_EVEN"
        )
    assert round_half_even_div(numerator, denominator) == int(expected)
