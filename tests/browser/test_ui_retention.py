"""What the Dagster UI shows for a closed partition once retention deleted its micro-batch runs.

The stack's partitions are daily and its day is still open, so the retention is applied as the
sensor would apply it a day later (``now`` advanced past the partition's end, a 1 h window):
the partition gets its summary from the batch ledger and every micro-batch run of it goes,
with its event log. The partition status cache is then invalidated (as after a change of
``KAPPA_PARTITIONS_START``), so what the partitions view shows is computed from what is left in
storage, not from a cache computed while the runs still existed.

What a user sees is asserted on the page: the partition's row in the Partitions tab has the
"materialized" status dot and counts under "Materialized"; its detail says "Materialized",
its latest materialisation is the summary (no run) with the ledger's totals; the Events tab
shows the summary; the check history kept its evaluations.

An earlier version of this test clicked ``get_by_text(partition).first``: on the Partitions
tab that is the status bar's end label (the last partition's key under the bar), not the row
of the list, so the detail pane stayed on "No partition selected" with "Latest
materialization None" and "View all historical events (0)". The partition itself was shown
materialised with its summary all along; the row is now clicked by its own element.

The heal sensors are stopped first: the partition is only pretended closed, and a heal run
re-deriving it later would rightly be its newer latest materialisation.

This module runs after test_ui.py (the stack is the session's): it deletes runs the other
tests read. The UI assertions are on ``fact_payment``, whose partitions no UI backfill touches.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import dagster as dg
import pytest
from playwright.sync_api import Locator, Page, expect

from kappa.dagster.instance import open_instance
from kappa.dagster.retention import (
    SUMMARY_MODE,
    RetentionPolicy,
    apply_retention,
    in_flight_partitions,
)
from kappa.dagster.sensors.micro_batch import IN_FLIGHT, RANGES_TAG
from kappa.edw.connection import connect
from kappa.edw.types import Schemas
from kappa.health import ASSET_TAG, recent_failures
from tests.browser.conftest import ARTIFACTS, Stack, screenshot, wait_for
from tests.browser.test_ui import check_status, materialised, stop_sensor

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

FACTS = ("fact_order", "fact_payment")
SHOWN = "fact_payment"
#: Long waits: on a loaded 2-core machine a page's queries take many seconds.
UI_TIMEOUT_MS = 90_000

PARTITION_STATUS = """
query($key: AssetKeyInput!, $partition: String!) {
  assetNodeOrError(assetKey: $key) {
    ... on AssetNode {
      partitionKeysByDimension { partitionKeys }
      assetPartitionStatuses {
        ... on TimePartitionStatuses { ranges { status startKey endKey } }
      }
      assetMaterializations(partitions: [$partition]) {
        runId
        timestamp
        metadataEntries { label ... on TextMetadataEntry { text } }
      }
    }
  }
}
"""

CHECK_HISTORY = """
query($key: AssetKeyInput!, $check: String!) {
  assetCheckExecutions(assetKey: $key, checkName: $check, limit: 1000) { id }
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


def check_executions(stack: Stack, asset: str, check: str) -> int:
    data = stack.graphql(CHECK_HISTORY, {"key": {"path": [asset]}, "check": check})
    return len(data["assetCheckExecutions"])


def partition_row(page: Page, partition: str) -> Locator:
    """The partition's row in the Partitions tab's list: its key (a truncating label titled
    with the whole key) and its status dot. Not ``get_by_text(partition)``: the status bar
    above the list labels its ends with partition keys too."""
    label = page.locator(f"[class*=MiddleTruncate_container][title='{partition}']")
    return label.locator("xpath=ancestor::div[contains(@class, 'Box_flexRow')][1]")


def dot_colour(row: Locator) -> str:
    """The background of the row's status dot (Dagster's colour variable)."""
    return row.evaluate(
        "row => { const dot = row.lastElementChild; return dot ? dot.style.background : ''; }"
    )


def legend_count(page: Page, status: str) -> int:
    """The count the Partitions tab's legend gives for ``status`` ("Materialized (3)")."""
    text = page.get_by_text(re.compile(rf"^{status} \(\d+\)$")).first.inner_text()
    return int(re.search(r"\((\d+)\)", text).group(1))  # type: ignore[union-attr]


def invalidate_status_cache(instance: dg.DagsterInstance, asset: str) -> None:
    """Make the UI compute the asset's partition status again from the event log (as after a
    change of the partitions definition); an asset with no cache yet computes it anyway."""
    key = dg.AssetKey(asset)
    record = next(iter(instance.get_asset_records([key])))
    cached = record.asset_entry.cached_status
    if cached is not None:
        instance.update_asset_cached_status_data(key, cached._replace(partitions_def_id="stale"))


def _quiet(instance: dg.DagsterInstance, partition: str) -> Callable[[], bool]:
    seen: dict[str, float] = {}

    def probe() -> bool:
        counts = {f: len(micro_batch_runs(instance, f, partition)) for f in FACTS}
        if any(seen.get(f) != n for f, n in counts.items()):
            seen.update(counts)
            seen["stamp"] = time.monotonic()
            return False
        return time.monotonic() - seen["stamp"] > 6

    return probe


def test_closed_partitions_stay_materialised_after_their_runs_are_deleted(
    stack: Stack, page: Page
) -> None:
    stack.wait_until(
        "fact_order and fact_payment materialised",
        lambda: materialised(stack, *FACTS),
        timeout_s=300,
    )
    stack.wait_until(
        f"a freshness evaluation of {SHOWN}",
        lambda: check_status(stack, SHOWN, "freshness"),
        timeout_s=180,
    )
    # The partition is only pretended closed: the heal sensors would still re-derive it as
    # change capture catches up (a heal run's materialisation, newer than the summary, is the
    # partition's latest, rightly). Stopped, so the summary is what the pages show.
    for fact in FACTS:
        stop_sensor(stack, f"{fact}_heal_sensor")
    stack.produce(400, seed=7)
    settings = stack.state.settings
    windows = settings.windows
    partition = windows.at(datetime.now(UTC)).key
    saved = dict(os.environ)  # open_instance sets the stack's DAGSTER_HOME in this process
    try:
        with open_instance(settings) as instance:
            # Every event produced is loaded, and nothing keeps the partition open for the
            # retention: no run of the facts in flight, and no shard whose latest run failed
            # (a run failed on a loaded machine is retried; its partition is closed only once
            # the retry succeeded).
            def settled() -> Observed:
                in_flight = {
                    f: instance.get_runs_count(
                        dg.RunsFilter(tags={ASSET_TAG: f}, statuses=IN_FLIGHT)
                    )
                    for f in FACTS
                }
                busy = {f: sorted(in_flight_partitions(instance, f)) for f in FACTS}
                failed = {
                    f: {
                        s: x.first_line
                        for s, x in recent_failures(instance, f, threshold=1).items()
                    }
                    for f in FACTS
                }
                done = {f: len(micro_batch_runs(instance, f, partition)) for f in FACTS}
                return Observed(
                    not any(in_flight.values()) and not any(busy.values()) and all(done.values()),
                    f"runs in flight {in_flight}, partitions kept open {busy} (shards whose "
                    f"latest run failed: {failed}), finished micro-batch runs in {partition} "
                    f"{done}",
                )

            stack.wait_until("the facts' micro-batches done", settled, timeout_s=300, poll_s=3)
            stack.wait_until(
                "no new micro-batch for 3 sensor intervals",
                _quiet(instance, partition),
                timeout_s=180,
                poll_s=2,
            )
            before = {f: micro_batch_runs(instance, f, partition) for f in FACTS}
            checks_before = check_executions(stack, SHOWN, "freshness")
            later = windows.window(partition).end + timedelta(hours=2)
            policy = RetentionPolicy(keep_hours=1, deletes_per_tick=200, grace_s=600)
            summarised: dict[str, list[str]] = {}
            schemas = Schemas(settings.edw_schema, settings.meta_schema)
            wanted = {f: [partition] for f in FACTS}

            def kept_open() -> str:
                return repr(
                    (
                        {f: sorted(in_flight_partitions(instance, f)) for f in FACTS},
                        {f: recent_failures(instance, f, threshold=1) for f in FACTS},
                        [
                            (r.run_id, r.status, r.job_name, r.tags)
                            for r in instance.get_runs(limit=8)
                        ],
                    )
                )

            # Ticks as the retention sensor makes them: a partition some run still keeps open
            # is summarised on a later tick, once it closed.
            deadline = time.monotonic() + 180
            with connect(stack.state.edw_url) as conn:
                while True:
                    report = apply_retention(
                        instance, conn, schemas, FACTS, windows, policy, now=later
                    )
                    for asset, keys in report.summarised.items():
                        summarised.setdefault(asset, []).extend(keys)
                    if any(report.deleted.values()):
                        continue
                    if summarised == wanted:
                        break
                    assert time.monotonic() < deadline, (summarised, kept_open())
                    time.sleep(2)
            for fact in FACTS:
                assert before[fact], f"{fact} had no micro-batch runs in {partition}"
                assert micro_batch_runs(instance, fact, partition) == [], fact
                invalidate_status_cache(instance, fact)
    finally:
        os.environ.clear()
        os.environ.update(saved)

    data = stack.graphql(PARTITION_STATUS, {"key": {"path": [SHOWN]}, "partition": partition})
    node = data["assetNodeOrError"]
    ranges = node["assetPartitionStatuses"]["ranges"]
    assert any(
        r["status"] == "MATERIALIZED" and r["startKey"] <= partition <= r["endKey"] for r in ranges
    ), ranges
    history = node["assetMaterializations"]  # newest first
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "retention-history.json").write_text(json.dumps(history, indent=1))
    latest = history[0]
    assert latest["runId"] == "", latest  # the summary belongs to no run: deleting runs keeps it
    assert "rows_loaded" in {m["label"] for m in latest["metadataEntries"]}

    # The Partitions tab: the partition's row has the materialised status, the legend counts it.
    page.goto(f"/assets/{SHOWN}?view=partitions")
    row = partition_row(page, partition)
    expect(row).to_be_visible(timeout=UI_TIMEOUT_MS)
    wait_for(
        f"{partition}'s status dot in the list",
        lambda: "accent-green" in dot_colour(row) or None,
        timeout_s=UI_TIMEOUT_MS / 1000,
    )
    expect(page.get_by_text(re.compile(r"^Materialized \(\d+\)$")).first).to_be_visible()
    assert legend_count(page, "Materialized") >= 1
    assert legend_count(page, "Failed") == 0

    # Its detail: "Materialized", the latest materialisation the summary with its totals, no run.
    row.click()
    expect(page).to_have_url(re.compile(rf"partition={re.escape(partition)}"))
    expect(page.get_by_text("Materialized", exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(page.get_by_text("No partition selected")).to_have_count(0)
    expect(page.get_by_text(SUMMARY_MODE, exact=True).first).to_be_visible(timeout=UI_TIMEOUT_MS)
    for label in ("rows_loaded", "micro_batch_runs", "ledger"):
        expect(page.get_by_text(label, exact=True).first).to_be_visible()
    events = page.get_by_role("button", name=re.compile(r"View all historical events \(\d+\)"))
    expect(events).to_be_visible()
    assert events.inner_text().strip() != "View all historical events (0)"
    text = record_text(page, "retention-partitions")
    assert "Latest materialization\nNone" not in text, text
    screenshot(page, "retention-partitions")

    # The Events tab: the summary, reported without a run, with its description.
    page.goto(f"/assets/{SHOWN}?view=events&partition={partition}")
    expect(page.get_by_text(f"Partition {partition} closed").first).to_be_visible(
        timeout=UI_TIMEOUT_MS
    )
    expect(page.get_by_text(SUMMARY_MODE, exact=True).first).to_be_visible()
    record_text(page, "retention-events")
    screenshot(page, "retention-events")

    # The check history: the freshness evaluations are reported by its sensor (no run) and
    # the check runs are never pruned, so every evaluation from before the retention is kept.
    assert check_executions(stack, SHOWN, "freshness") >= checks_before > 0
    page.goto(f"/assets/{SHOWN}?view=checks&checkDetail=freshness")
    page.get_by_text("Execution history", exact=True).click()
    expect(page.get_by_text("Evaluation result").first).to_be_visible(timeout=UI_TIMEOUT_MS)
    expect(page.get_by_text("shard(s) loaded up to their source").first).to_be_visible(
        timeout=UI_TIMEOUT_MS
    )
    record_text(page, "retention-checks")
    screenshot(page, "retention-checks")
