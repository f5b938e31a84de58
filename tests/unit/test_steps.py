"""The public step API: a step's config from the catalogue (refusals name the file, the
stream and the key), lookups checked against the captured tables, and the batch-invariance
helper telling an invariant step from one that depends on where batches are cut."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import ClassVar

import pandas as pd
import pytest

from examples.shop.steps import PaymentFraud
from kappa.catalog.captures import load_captures
from kappa.catalog.ingests import build_step
from kappa.catalog.streams import load_streams
from kappa.exceptions import ConfigurationError
from kappa.settings import REPO_ROOT
from kappa.steps import AsOf, Completeness, Lookup, SideTable, StepContext, StepOutput
from kappa.steps.testing import MemoryLookups, batch_differences, run_in_batches

SHOP = REPO_ROOT / "catalog.yaml"


def payment_catalog(tmp_path: Path, config: str) -> Path:
    text = SHOP.read_text()
    start = text.index("    config:\n      velocity_max: 3")
    end = text.index("\n\n", start)
    path = tmp_path / "catalog.yaml"
    path.write_text(text[:start] + config + text[end:])
    return path


def payment_step(path: Path) -> PaymentFraud:
    contract = next(c for c in load_streams(path, {}) if c.name == "fact_payment")
    step = build_step(contract, {c.target: c for c in load_captures(path)})
    assert isinstance(step, PaymentFraud)
    return step


def test_the_shop_catalogue_configures_the_fraud_rules_with_the_former_settings_defaults():
    rules = payment_step(SHOP).rules
    assert rules.velocity_max_payments == 3
    assert rules.velocity_window == timedelta(seconds=60)
    assert rules.amount_z == 3.0
    assert rules.geo_call_window == timedelta(hours=48)


def test_a_step_config_value_given_is_the_value_used(tmp_path: Path):
    path = payment_catalog(tmp_path, "    config: {velocity_max: 7, amount_z: 2.5}")
    rules = payment_step(path).rules
    assert (rules.velocity_max_payments, rules.amount_z) == (7, 2.5)
    assert rules.velocity_window == timedelta(seconds=60)  # not given: the default


@pytest.mark.parametrize(
    ("config", "key", "fragment"),
    [
        ("    config: {velocity_max: 0}", "velocity_max", "whole number in [1, 10000]"),
        ("    config: {velocity_max: '3'}", "velocity_max", "got '3'"),
        ("    config: {amount_z: true}", "amount_z", "a number"),
        ("    config: {velocity_window_s: 1.5}", "velocity_window_s", "whole number"),
        ("    config: {velocity_maximum: 3}", "velocity_maximum", "unknown; known: amount_z"),
    ],
)
def test_a_bad_step_config_names_the_file_the_stream_and_the_key(
    tmp_path: Path, config: str, key: str, fragment: str
):
    path = payment_catalog(tmp_path, config)
    with pytest.raises(ConfigurationError) as caught:
        payment_step(path)
    message = str(caught.value)
    assert str(path) in message and "stream fact_payment" in message, message
    assert f"config key {key}" in message and fragment in message, message


def test_a_step_config_the_step_refuses_fails_when_the_catalogue_loads(tmp_path: Path):
    # Not at the first batch: loading the catalogue (as the settings and the definitions do)
    # already builds the step with its config.
    path = payment_catalog(tmp_path, "    config: {velocity_max: 'three', amount_z: 2.5}")
    with pytest.raises(ConfigurationError) as caught:
        load_streams(path, {})
    message = str(caught.value)
    assert f"{path}: stream fact_payment, config key velocity_max" in message, message
    assert "got 'three'" in message, message


class Threshold:
    """A step configured by its constructor's keyword arguments (no from_catalog)."""

    derived_columns: ClassVar[tuple[tuple[str, str], ...]] = ()
    side_tables: ClassVar[tuple[SideTable, ...]] = ()
    lookups: ClassVar[tuple[Lookup, ...]] = ()

    def __init__(self, limit: int = 3, ratio: float | None = None, label: str = "x") -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit, self.ratio, self.label = limit, ratio, label

    def apply(self, context: StepContext, rows: pd.DataFrame) -> StepOutput:
        return StepOutput(rows)


def threshold_catalog(tmp_path: Path, config: str) -> Path:
    text = SHOP.read_text().replace(
        "step: examples.shop.steps:OrderEnrichment",
        f"step: tests.unit.test_steps:Threshold\n    config: {config}",
    )
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ("{limit: '3'}", "config key limit: expected int, got '3'"),
        ("{limit: true}", "config key limit: expected int, got True"),
        ("{ratio: fast}", "config key ratio: expected float or null, got 'fast'"),
        ("{label: 7}", "config key label: expected str, got 7"),
        ("{limits: 3}", "field config: tests.unit.test_steps:Threshold does not take this config"),
        ("{limit: 0}", "Threshold refuses this config: limit must be at least 1, got 0"),
    ],
)
def test_a_constructor_configured_step_is_checked_at_load_naming_the_file_stream_and_key(
    tmp_path: Path, config: str, fragment: str
):
    path = threshold_catalog(tmp_path, config)
    with pytest.raises(ConfigurationError) as caught:
        load_streams(path, {})
    message = str(caught.value)
    assert f"{path}: stream fact_order" in message and fragment in message, message


def test_a_constructor_configured_step_gets_the_values_given(tmp_path: Path):
    path = threshold_catalog(tmp_path, "{limit: 5, ratio: 2}")
    contract = next(c for c in load_streams(path, {}) if c.name == "fact_order")
    step = build_step(contract)
    assert isinstance(step, Threshold)
    assert (step.limit, step.ratio, step.label) == (5, 2, "x")


def test_a_lookup_of_a_target_nobody_captures_is_refused_naming_the_stream(tmp_path: Path):
    text = SHOP.read_text().replace("target: fact_call_center_call", "target: call_log")
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    with pytest.raises(ConfigurationError) as caught:
        payment_step(path)
    message = str(caught.value)
    assert "stream fact_payment" in message and "fact_call_center_call in mode current" in message


def test_a_side_table_is_a_frozen_value_named_by_its_name():
    table = SideTable("alerts", [("rule", "text"), ("score", "integer")], nullable=["score"])
    assert not isinstance(table, str) and str(table) == table.name == "alerts"
    assert table.columns == (("rule", "text"), ("score", "integer"))
    assert table.nullable == frozenset({"score"})
    same = SideTable("alerts", (("rule", "text"), ("score", "integer")), nullable=("score",))
    assert table == same and hash(table) == hash(same)
    assert table != SideTable("alerts", (("rule", "text"),))
    with pytest.raises(AttributeError):
        table.name = "other"  # type: ignore[misc]


def test_a_side_table_may_not_redeclare_the_engines_columns():
    with pytest.raises(ValueError, match="kafka_offset are the engine's columns"):
        SideTable("alerts", (("kafka_offset", "bigint"),))
    with pytest.raises(ValueError, match="key level is not a column"):
        SideTable("alerts", (("rule", "text"),), key=("level",))


class BadSideTable:
    derived_columns: ClassVar[tuple[tuple[str, str], ...]] = ()
    side_tables: ClassVar[tuple[SideTable, ...]] = (SideTable("Alerts; DROP", (("rule", "text"),)),)
    lookups: ClassVar[tuple[Lookup, ...]] = ()

    def apply(self, context: StepContext, rows: pd.DataFrame) -> StepOutput:
        return StepOutput(rows)


def test_a_side_table_name_that_is_no_plain_identifier_is_refused_naming_the_stream(
    tmp_path: Path,
):
    text = SHOP.read_text().replace(
        "step: examples.shop.steps:OrderEnrichment", "step: tests.unit.test_steps:BadSideTable"
    )
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    contract = next(c for c in load_streams(path, {}) if c.name == "fact_order")
    with pytest.raises(ConfigurationError) as caught:
        build_step(contract)
    message = str(caught.value)
    assert str(path) in message and "stream fact_order" in message, message
    assert "side table Alerts; DROP" in message and "not a valid identifier" in message


# --- the batch-invariance helper --------------------------------------------------------------


class RunningCount:
    """Counts each key's events before each row, in state: invariant under any cut."""

    derived_columns: ClassVar[tuple[tuple[str, str], ...]] = (("seen_before", "integer"),)
    side_tables: ClassVar[tuple[SideTable, ...]] = ()
    lookups: ClassVar[tuple[Lookup, ...]] = ()

    def apply(self, context: StepContext, rows: pd.DataFrame) -> StepOutput:
        counts = {k: v["n"] for k, v in context.get_many("n", rows["site_id"].tolist()).items()}
        before = []
        for key in rows["site_id"]:
            before.append(counts.get(key, 0))
            counts[key] = counts.get(key, 0) + 1
        out = rows.reset_index(drop=True).assign(seen_before=before)
        return StepOutput(out, state={"n": {k: {"n": n} for k, n in counts.items()}})


class BatchCount(RunningCount):
    """Counts only within the batch (forgets state): depends on where batches are cut."""

    def apply(self, context: StepContext, rows: pd.DataFrame) -> StepOutput:
        out = rows.reset_index(drop=True)
        return StepOutput(out.assign(seen_before=out.groupby("site_id").cumcount()))


ROWS = pd.DataFrame(
    {
        "event_id": [f"e-{i}" for i in range(6)],
        "site_id": ["s-1", "s-2", "s-1", "s-1", "s-2", "s-1"],
        "event_time": pd.to_datetime(["2025-01-01T00:00:00Z"] * 6, utc=True),
        "topic": "sites",
        "kafka_partition": 0,
        "kafka_offset": range(6),
    }
)


def test_the_helper_finds_no_difference_for_a_step_that_carries_its_state():
    assert batch_differences(RunningCount(), ROWS, MemoryLookups(), [2, 2, 5], max_keys=1) == []


def test_the_helper_reports_a_step_whose_rows_depend_on_the_cut():
    found = batch_differences(BatchCount(), ROWS, MemoryLookups(), [3])
    assert len(found) == 1 and found[0].startswith("rows:"), found


# --- lookups on any target, completeness per key field --------------------------------------

SITE = AsOf(target="dim_site", key="site_id", columns=("region",), unknown="unknown_site")


class SiteRegion(RunningCount):
    lookups: ClassVar[tuple[Lookup, ...]] = (SITE,)

    def apply(self, context: StepContext, rows: pd.DataFrame) -> StepOutput:
        found = context.as_of("dim_site", rows)
        return StepOutput(rows.reset_index(drop=True).join(found))


def utc(text: str) -> pd.Timestamp:
    return pd.Timestamp(text).tz_convert("UTC")


def test_an_as_of_lookup_works_on_any_scd2_target_keyed_by_any_event_field():
    versions = pd.DataFrame(
        {
            "site_id": ["s-1", "s-1"],
            "site_sk": [10, 11],
            "region": ["north", "south"],
            "valid_from": [utc("2024-12-01T00:00Z"), utc("2025-01-01T00:00:30Z")],
            "valid_to": [utc("2025-01-01T00:00:30Z"), None],
        }
    )
    rows = ROWS.assign(
        event_time=[utc(f"2025-01-01T00:00:{s:02d}Z") for s in (0, 10, 20, 40, 50, 59)]
    )
    lookups = MemoryLookups(
        versions={"dim_site": versions},
        mark=utc("2025-01-01T00:00:45Z"),
        pending={"site_id": {"s-1": utc("2025-01-01T00:00:39Z")}},
    )
    run = run_in_batches(SiteRegion(), rows, lookups)
    assert run.rows[["site_id", "site_sk", "region", "enrichment"]].astype(object).where(
        run.rows[["site_id", "site_sk", "region", "enrichment"]].notna(), None
    ).values.tolist() == [
        ["s-1", 10, "north", "as_of"],
        ["s-2", None, None, "unknown_site"],  # no version of s-2
        ["s-1", 10, "north", "as_of"],
        ["s-1", 11, "south", "provisional"],  # after s-1's waiting change (00:39)
        ["s-2", None, None, "unknown_site"],
        ["s-1", 11, "south", "provisional"],
    ]


def test_completeness_marks_a_row_by_the_earliest_wait_of_any_of_its_key_fields():
    completeness = Completeness(
        utc("2025-01-01T12:00Z"),
        {
            "site_id": {"s-1": utc("2025-01-01T10:00Z")},
            "meter_id": {"m-2": utc("2025-01-01T09:00Z")},
        },
    )
    keys = pd.DataFrame(
        {"site_id": ["s-1", "s-1", "s-2", "s-2"], "meter_id": ["m-1", "m-2", "m-1", "m-2"]}
    )
    assert completeness.marks(keys).tolist() == [
        utc("2025-01-01T10:00Z"),
        utc("2025-01-01T09:00Z"),
        utc("2025-01-01T12:00Z"),
        utc("2025-01-01T09:00Z"),
    ]
