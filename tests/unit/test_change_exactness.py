"""Captured values a target column would round, truncate or refuse become dead letters
with their reason, instead of being changed silently or failing the whole COPY."""

from datetime import UTC, datetime

import orjson
import pandas as pd
import pytest

from kappa.catalog.captures import load_captures
from kappa.changes.validate import validate_changes
from tests.demo import TEST_CATALOG

SPECS = {spec.name: spec for spec in load_captures(TEST_CATALOG)}
AT = datetime(2026, 11, 26, 6, 0, tzinfo=UTC)


def customer(**overrides: object) -> dict:
    return {
        "customer_id": "c-1",
        "name": "Ada",
        "segment": "retail",
        "country": "DE",
        "credit_limit": 100.5,
        **overrides,
    }


def changes(*afters: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "change_id": range(1, len(afters) + 1),
            "xid": [7] * len(afters),
            "op": ["I"] * len(afters),
            "change_time": [AT] * len(afters),
            "before": [None] * len(afters),
            "after": list(afters),
        }
    )


def image(**overrides: object) -> str:
    return orjson.dumps(customer(**overrides)).decode()


def literal(credit_limit: str) -> str:
    return image(credit_limit="LIMIT").replace('"LIMIT"', credit_limit)


@pytest.mark.parametrize(
    ("after", "reason"),
    [
        (literal("100.005"), "'credit_limit' has more than 2 decimals: 100.005"),
        (literal("10000000000.00"), "'credit_limit' does not fit numeric(12, 2): 10000000000.0"),
        # 19 significant digits: the double is 1.0; the exact re-parse sees the decimals.
        (
            literal("1.000000000000000001"),
            "'credit_limit' has more than 2 decimals: 1.000000000000000001",
        ),
        (image(country="DEU"), "'country' is longer than char(2): 'DEU'"),
    ],
)
def test_a_value_the_column_cannot_hold_exactly_is_a_dead_letter(after, reason):
    validated = validate_changes(SPECS["customers"], changes(after, image(customer_id="c-2")))
    assert validated.rows["customer_id"].tolist() == ["c-2"]
    assert validated.dead_letters["reason"].tolist() == [reason]
    assert validated.dead_letters["position"].tolist() == [1]


def test_values_that_fit_are_kept_as_written():
    validated = validate_changes(
        SPECS["customers"],
        changes(literal("9999999999.99"), literal("12.340000000000000000"), image(country="FR ")),
    )
    assert validated.dead_letters.empty
    assert validated.rows["credit_limit"].tolist() == [9999999999.99, 12.34, 100.5]
    assert validated.rows["country"].tolist() == ["DE", "DE", "FR"]


def test_an_integer_outside_the_column_range_is_a_dead_letter():
    call = {
        "call_id": "k-1",
        "customer_id": "c-1",
        "reason": "fraud",
        "sentiment": "bad",
        "duration_s": 3_000_000_000,
        "called_at": AT.isoformat(),
    }
    validated = validate_changes(
        SPECS["call_center_calls"],
        changes(orjson.dumps(call).decode(), orjson.dumps({**call, "duration_s": 60}).decode()),
    )
    assert validated.rows["duration_s"].tolist() == [60]
    assert validated.dead_letters["reason"].tolist() == [
        "'duration_s' is outside the integer range: 3000000000"
    ]
