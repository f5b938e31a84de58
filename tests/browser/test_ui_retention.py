"""What the Dagster UI shows for a closed partition once retention deleted its micro-batch runs.

The stack's partitions are daily and its day is still open, so the retention is applied as the
sensor would apply it a day later (``now`` advanced past the partition's end, a 1 h window):
the partition gets its summary from the batch ledger and every micro-batch run of it goes,
with its event log. The partition status cache is then rebuilt from the event log (as after a
change of ``KAPPA_PARTITIONS_START``), so what the partitions view shows comes from what is
left in storage, not from a cache computed while the runs still existed.

This module runs after test_ui.py (the stack is the session's): it deletes runs the other
tests read. The UI assertions are on ``fact_payment``, whose partitions no UI backfill touches.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from playwright.sync_api import Page, expect

from kappa.dagster.instance import open_instance
from kappa.dagster.retention import SUMMARY_MODE, RetentionPolicy, apply_retention
from kappa.dagster.sensors.micro_batch import IN_FLIGHT, RANGES_TAG
from kappa.edw.connection import connect
from kappa.edw.types import Schemas
from kappa.health import ASSET_TAG
from tests.browser.conftest import ARTIFACTS, Stack, screenshot
from tests.browser.test_ui import materialised

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

FACTS = ("fact_order", "fact_payment")
SHOWN = "fact_payment"

PARTITION_STATUS = """
query($key: AssetKeyInput!, $partition: String!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      assetPartitionStatuses {
        ... on TimePartitionStatuses { ranges { status startKey endKey } }
      }
      assetMaterializations(partitions: [$partition], limit: 1) {
        runId
        metadataEntries { label }
      }
    }
  }
}
"""


class Observed:
    """A probe's answer that says what it saw when it is not yet."""

    def __init__(self, ok: bool, seen: str) -> None:
        self.ok, self.seen = ok, seen

    def __bool__(self) -> bool:
        return self.ok

    def __repr__(self) -> str:
        return self.seen


def micro_batch_runs(instance: dg.DagsterInstance, asset: str, partition: str) -> list[str]:
    runs = instance.get_runs(
        filters=dg.RunsFilter(tags={ASSET_TAG: asset, "dagster/partition": partition})
    )
    return [r.run_id for r in runs if RANGES_TAG in r.tags and "dagster/backfill" not in r.tags]


def record_text(page: Page, name: str) -> str:
    """The page's visible text, kept next to its screenshot (what the UI showed)."""
    text = page.locator("body").inner_text()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"{name}.txt").write_text(text)
    return text


def test_closed_partitions_stay_materialised_after_their_runs_are_deleted(
    stack: Stack, page: Page
) -> None:
    stack.wait_until(
        "fact_order and fact_payment materialised",
        lambda: materialised(stack, *FACTS),
        timeout_s=300,
    )
    stack.produce(400, seed=7)
    settings = stack.state.settings
    windows = settings.windows
    partition = windows.at(datetime.now(UTC)).key
    saved = dict(os.environ)  # open_instance sets the stack's DAGSTER_HOME in this process
    try:
        with open_instance(settings) as instance:
            # Every event produced is loaded and no micro-batch of the facts is in flight.
            def settled() -> Observed:
                busy = {
                    f: instance.get_runs_count(
                        dg.RunsFilter(tags={ASSET_TAG: f}, statuses=IN_FLIGHT)
                    )
                    for f in FACTS
                }
                done = {f: len(micro_batch_runs(instance, f, partition)) for f in FACTS}
                return Observed(
                    not any(busy.values()) and all(done.values()),
                    f"in flight {busy}, finished micro-batch runs in {partition} {done}",
                )

            stack.wait_until("the facts' micro-batches done", settled, timeout_s=300, poll_s=3)
            stack.wait_until(
                "no new micro-batch for 3 sensor intervals",
                _quiet(instance, partition),
                timeout_s=120,
                poll_s=2,
            )
            before = {f: micro_batch_runs(instance, f, partition) for f in FACTS}
            later = windows.window(partition).end + timedelta(hours=2)
            policy = RetentionPolicy(keep_hours=1, deletes_per_tick=200, grace_s=600)
            summarised: dict[str, list[str]] = {}
            schemas = Schemas(settings.edw_schema, settings.meta_schema)
            with connect(stack.state.edw_url) as conn:
                while True:
                    report = apply_retention(
                        instance, conn, schemas, FACTS, windows, policy, now=later
                    )
                    for asset, keys in report.summarised.items():
                        summarised.setdefault(asset, []).extend(keys)
                    if not any(report.deleted.values()):
                        break
            assert summarised == {f: [partition] for f in FACTS}, summarised
            for fact in FACTS:
                assert before[fact], f"{fact} had no micro-batch runs in {partition}"
                assert micro_batch_runs(instance, fact, partition) == [], fact
                # The partition status as the UI computes it from storage, not its cache.
                key = dg.AssetKey(fact)
                record = next(iter(instance.get_asset_records([key])))
                instance.update_asset_cached_status_data(
                    key, record.asset_entry.cached_status._replace(partitions_def_id="rebuilt")
                )
    finally:
        os.environ.clear()
        os.environ.update(saved)

    data = stack.graphql(PARTITION_STATUS, {"key": {"path": [SHOWN]}, "partition": partition})
    node = data["assetNodeOrError"]
    ranges = node["assetPartitionStatuses"]["ranges"]
    assert any(
        r["status"] == "MATERIALIZED" and r["startKey"] <= partition <= r["endKey"] for r in ranges
    ), ranges
    (latest,) = node["assetMaterializations"]
    assert latest["runId"] == "", latest  # the summary belongs to no run
    assert "rows_loaded" in {m["label"] for m in latest["metadataEntries"]}

    # The partitions view: the partition is materialised; its latest materialisation is the
    # summary, with its totals.
    page.goto(f"/assets/{SHOWN}?view=partitions")
    expect(page.get_by_text(partition, exact=True).first).to_be_visible(timeout=60_000)
    page.get_by_text(partition, exact=True).first.click()
    expect(page.get_by_text(SUMMARY_MODE).first).to_be_visible(timeout=60_000)
    for label in ("rows_loaded", "micro_batch_runs", "ledger"):
        expect(page.get_by_text(label, exact=True).first).to_be_visible()
    record_text(page, "retention-partitions")
    screenshot(page, "retention-partitions")

    # The events view: the summary is the partition's one materialisation left.
    page.goto(f"/assets/{SHOWN}?view=events&partition={partition}")
    expect(page.get_by_text(SUMMARY_MODE).first).to_be_visible(timeout=60_000)
    record_text(page, "retention-events")
    screenshot(page, "retention-events")

    # The check history: check runs are kept, so their evaluations still show.
    page.goto(f"/assets/{SHOWN}?view=checks")
    expect(page.get_by_text("reconciliation", exact=True).first).to_be_visible(timeout=60_000)
    page.get_by_text("reconciliation", exact=True).first.click()
    page.wait_for_timeout(3000)
    record_text(page, "retention-checks")
    screenshot(page, "retention-checks")

    # The Plots tab charts numeric metadata of the materialisations left.
    page.goto(f"/assets/{SHOWN}?view=plots")
    page.wait_for_timeout(5000)
    record_text(page, "retention-plots")
    screenshot(page, "retention-plots")


def _quiet(instance: dg.DagsterInstance, partition: str):
    seen: dict[str, int] = {}

    def probe() -> bool:
        counts = {f: len(micro_batch_runs(instance, f, partition)) for f in FACTS}
        stamp = seen.get("stamp", 0)
        if counts != {f: seen.get(f) for f in FACTS}:
            seen.update(counts)
            seen["stamp"] = int(time.monotonic())
            return False
        return time.monotonic() - stamp > 6

    return probe
