"""The Dagster UI as the control room, checked in a real browser against a running stack."""

from __future__ import annotations

import re

import psycopg
import pytest
from playwright.sync_api import Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError
from psycopg import sql

from tests.browser.conftest import Stack, screenshot, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

LOCATION = "kappa_etl"
ASSET_QUERY = """
{
  assetNodes {
    assetKey { path }
    isPartitioned
    partitionDefinition { description }
    partitionKeysByDimension { partitionKeys }
    assetMaterializations(limit: 1) { runId }
  }
}
"""
SKIP_REASONS = {
    "no new offsets": re.compile(r"no new offsets in orders"),
    "batch in flight": re.compile(r"batch in flight for orders\[\d+\]"),
}


def asset_nodes(stack: Stack) -> list[dict]:
    return stack.graphql(ASSET_QUERY)["assetNodes"]


def materialised(stack: Stack, *assets: str) -> bool:
    done = {
        "/".join(n["assetKey"]["path"]) for n in asset_nodes(stack) if n["assetMaterializations"]
    }
    return set(assets) <= done


SENSOR_ID = """
query($s: SensorSelector!) { sensorOrError(sensorSelector: $s) { ... on Sensor { id } } }
"""
STOP_SENSOR = """
mutation($id: String!) {
  stopSensor(id: $id) {
    __typename
    ... on StopSensorMutationResult { instigationState { status } }
    ... on PythonError { message }
  }
}
"""


def _sensor(name: str) -> dict[str, str]:
    """The GraphQL selector of one of the code location's sensors."""
    return {
        "repositoryLocationName": LOCATION,
        "repositoryName": "__repository__",
        "sensorName": name,
    }


def stop_sensor(stack: Stack, name: str) -> None:
    """Stop one of the stack's sensors through the UI's GraphQL API (as its toggle does)."""
    sensor = stack.graphql(SENSOR_ID, {"s": _sensor(name)})["sensorOrError"]
    assert "id" in sensor, sensor
    result = stack.graphql(STOP_SENSOR, {"id": sensor["id"]})["stopSensor"]
    assert result.get("instigationState", {}).get("status") == "STOPPED", result


START_SENSOR = """
mutation($s: SensorSelector!) {
  startSensor(sensorSelector: $s) {
    __typename
    ... on Sensor { sensorState { status } }
    ... on PythonError { message }
  }
}
"""


def start_sensor(stack: Stack, name: str) -> None:
    """Start one of the stack's sensors through the UI's GraphQL API (as its toggle does)."""
    result = stack.graphql(START_SENSOR, {"s": _sensor(name)})["startSensor"]
    assert result.get("sensorState", {}).get("status") == "RUNNING", result


def check_status(
    stack: Stack, asset: str, check: str, *, latest_materialisation: bool = False
) -> str | None:
    """The status of the check's latest execution, whichever materialisation it followed (a
    live asset is materialised every few seconds, so one attached to the latest
    materialisation is soon None again), or, with ``latest_materialisation``, of the one
    attached to the asset's latest materialisation (what the UI shows)."""
    if latest_materialisation:
        data = stack.graphql(
            """
            query($key: AssetKeyInput!) {
              assetNodeOrError(assetKey: $key) {
                ... on AssetNode {
                  assetChecksOrError {
                    ... on AssetChecks {
                      checks { name executionForLatestMaterialization { status } }
                    }
                  }
                }
              }
            }
            """,
            {"key": {"path": asset.split("/")}},
        )
        for found in data["assetNodeOrError"]["assetChecksOrError"].get("checks", []):
            if found["name"] == check and found["executionForLatestMaterialization"]:
                return found["executionForLatestMaterialization"]["status"]
        return None
    data = stack.graphql(
        """
        query($key: AssetKeyInput!, $check: String!) {
          assetCheckExecutions(assetKey: $key, checkName: $check, limit: 1) { status }
        }
        """,
        {"key": {"path": asset.split("/")}, "check": check},
    )
    executions = data["assetCheckExecutions"]
    return executions[0]["status"] if executions else None


def test_asset_graph_renders_every_asset(stack: Stack, page: Page) -> None:
    stack.wait_until(
        "fact_order, fact_payment and dim_customer materialised",
        lambda: materialised(stack, "fact_order", "fact_payment", "dim_customer"),
        timeout_s=180,
    )
    expected = {n["assetKey"]["path"][-1] for n in asset_nodes(stack)}
    assert {"fact_order", "fact_payment", "orders", "payments", "dim_customer"} <= expected

    page.goto("/asset-groups")
    expect(page.get_by_text("Global asset lineage")).to_be_visible()
    expect(page.locator("[class*=AssetGraphExplorer_svgContainer]")).to_be_visible()
    names = page.locator("[class*=AssetNode_assetName]")

    def every_node_shown() -> bool:
        if not names.count():
            # The graph opens with its groups folded: "Expand all groups" (Alt+E). Clicking
            # the title first gives the page the focus the shortcut needs.
            page.get_by_text("Global asset lineage").click()
            page.keyboard.press("Alt+e")
            page.wait_for_timeout(1000)
        return expected <= {t.strip() for t in names.all_inner_texts()}

    wait_for("every asset's node in the graph", every_node_shown, timeout_s=60, poll_s=2)
    for name in sorted(expected):
        expect(names.filter(has_text=re.compile(rf"^{re.escape(name)}$")).first).to_be_visible()
    # Each fact node reports its checks (reconciliation, replay equivalence, freshness, state continuity).
    expect(page.get_by_text(re.compile(r"\d+ / \d+ Passed")).first).to_be_visible()
    page.wait_for_timeout(1000)  # let the last edges settle before the picture
    screenshot(page, "asset-graph", docs="asset-graph.png")


def test_sensor_page_shows_ticks_and_why_they_skipped(stack: Stack, page: Page) -> None:
    """The sensor page: a tick that requested the burst's run, a tick skipped while that run
    was in flight, and one skipped with nothing new, each saying why.

    A warm worker may load a burst within one sensor interval, and then no tick ever sees the
    run in flight. So the test holds the run: a SHARE lock on ``fact_order`` (reads go on,
    the run's insert waits) until the page shows a "batch in flight" tick, then lets go."""
    stack.wait_until(
        "fact_order materialised",
        lambda: materialised(stack, "fact_order"),
        timeout_s=180,
    )
    seen: dict[str, str] = {}

    def open_skipped_ticks(kinds: tuple[str, ...]) -> bool:
        page.reload()
        buttons = page.locator("td button", has_text="0 runs requested")
        expect(buttons.first).to_be_visible()
        for index in range(min(buttons.count(), 25)):
            buttons.nth(index).click()
            dialog = page.get_by_role("dialog")
            text = dialog.inner_text()
            for kind, pattern in SKIP_REASONS.items():
                if kind not in seen and pattern.search(text):
                    seen[kind] = text
                    screenshot(page, f"sensor-skip-{kind.replace(' ', '-')}")
            dialog.get_by_role("button", name="Close").click()
            if all(kind in seen for kind in kinds):
                return True
        return False

    schema = stack.state.settings.edw_schema
    with psycopg.connect(stack.state.edw_url, connect_timeout=10) as hold:
        hold.execute(
            sql.SQL("LOCK TABLE {} IN SHARE MODE").format(sql.Identifier(schema, "fact_order"))
        )
        stack.produce(800, seed=2)  # a fresh burst: a run, ticks waiting for it, then quiet
        page.goto(f"/locations/{LOCATION}/sensors/fact_order_sensor")
        expect(page.get_by_text("fact_order_sensor").first).to_be_visible()
        expect(page.get_by_text('"generation"').first).to_be_visible()  # the readable cursor
        expect(page.get_by_text("1 run requested").first).to_be_visible(timeout=90_000)
        wait_for(
            "a tick skipped while the run is in flight",
            lambda: open_skipped_ticks(("batch in flight",)),
            120,
            5,
        )
        hold.rollback()  # the run goes on
    wait_for(
        "a skipped tick of each kind in the tick history",
        lambda: open_skipped_ticks(tuple(SKIP_REASONS)),
        120,
        5,
    )
    for text in seen.values():
        assert "Skip reason:" in text, text
    screenshot(page, "sensor-fact-order")


def test_asset_checks_show_on_the_assets(stack: Stack, page: Page) -> None:
    for asset in ("fact_order", "dim_customer"):
        stack.wait_until(
            f"a freshness evaluation of {asset}",
            lambda a=asset: check_status(stack, a, "freshness"),
            timeout_s=120,
        )
    # The UI shows a check's status for the asset's latest materialisation, and a live
    # micro-batch materialises fact_order every few seconds, between freshness evaluations.
    # Its sensor is stopped until an evaluation follows the last materialisation.
    stop_sensor(stack, "fact_order_sensor")
    try:
        stack.wait_until(
            "a freshness evaluation of fact_order's latest materialisation",
            lambda: check_status(stack, "fact_order", "freshness", latest_materialisation=True),
            timeout_s=120,
        )
        page.goto("/assets/fact_order?view=checks")
        for check in ("freshness", "reconciliation", "replay_equivalence"):
            expect(page.get_by_text(check, exact=True).first).to_be_visible()
        page.get_by_text("freshness", exact=True).first.click()
        expect(page.get_by_text("KAPPA_FRESHNESS_MAX_LAG_S").first).to_be_visible()
        expect(page.get_by_text(re.compile(r"^(Passed|Failed)$")).first).to_be_visible()
        screenshot(page, "checks-fact-order")
    finally:
        start_sensor(stack, "fact_order_sensor")

    page.goto("/assets/dim_customer?view=checks")
    expect(page.get_by_text("freshness", exact=True).first).to_be_visible()
    expect(page.get_by_text("reconciliation", exact=True).first).to_be_visible()


def test_materialisations_show_the_recent_batches(stack: Stack, page: Page) -> None:
    stack.wait_until(
        "dim_customer materialised",
        lambda: materialised(stack, "dim_customer"),
        timeout_s=180,
    )
    page.goto("/assets/dim_customer?view=events")
    for key in ("recent_batches", "lag_trend", "rows_per_second", "lag_after_batch"):
        expect(page.get_by_text(key, exact=True).first).to_be_visible(timeout=60_000)
    screenshot(page, "events-dim-customer")


def test_a_partition_backfill_launched_from_the_ui_completes(stack: Stack, page: Page) -> None:
    nodes = asset_nodes(stack)
    partitioned = [n for n in nodes if n["isPartitioned"]]
    # The facts are partitioned by arrival time: a code location without that is a
    # regression, a failure here (never a skip).
    facts = {"fact_order", "fact_payment"}
    assert facts <= {"/".join(n["assetKey"]["path"]) for n in partitioned}, (
        "the facts are not partitioned: "
        + ", ".join(
            sorted("/".join(n["assetKey"]["path"]) for n in nodes if not n["isPartitioned"])
        )
    )
    stack.wait_until(
        "fact_order materialised by the live micro-batches",
        lambda: materialised(stack, "fact_order"),
        timeout_s=180,
    )
    preferred = [n for n in partitioned if n["assetKey"]["path"] == ["fact_order"]]
    node = (preferred or partitioned)[0]
    key = "/".join(node["assetKey"]["path"])
    keys = [k for dim in node["partitionKeysByDimension"] for k in dim["partitionKeys"]]
    assert keys, f"{key} is partitioned but has no partition keys"
    before = {b["id"] for b in backfills(stack)}

    page.goto(f"/assets/{key}")
    # The split button's label is "Materialize…"; on a partitioned asset it opens the
    # launch dialog with its partition selection.
    dialog = page.get_by_role("dialog").filter(has_text="Launch runs to materialize")

    def launch_dialog_open() -> bool:
        # A click can land before the page is ready for it: click again until the launch
        # dialog shows.
        page.locator("button", has_text=re.compile(r"^Materialize")).first.click()
        # Upstream assets never materialised (a stack just started) make the UI ask first.
        sure = page.get_by_role("dialog").filter(has_text="Are you sure?")
        try:
            sure.wait_for(state="visible", timeout=3_000)
            sure.get_by_role("button", name="Confirm").click()
        except PlaywrightTimeoutError:
            pass
        try:
            dialog.wait_for(state="visible", timeout=5_000)
        except PlaywrightTimeoutError:
            screenshot(page, "launch-dialog-not-open")
            page.keyboard.press("Escape")
            return False
        return True

    wait_for("the launch dialog of the Materialize button", launch_dialog_open, 90, 1)
    # Two partitions when there are two (a range, one run: backfill policy single_run).
    chosen = keys[-2:]
    selection = dialog.get_by_placeholder(re.compile("partition", re.I)).first
    selection.click()
    selection.fill(f"[{chosen[0]}...{chosen[-1]}]" if len(chosen) > 1 else chosen[0])
    selection.press("Enter")
    # The whole text: "2 partition" is also inside "32 partitions" (the asset's count on the
    # 32nd day since the first partition).
    expect(dialog.get_by_text(re.compile(rf"^{len(chosen)} partitions?$"))).to_be_visible()
    screenshot(page, "backfill-dialog")
    dialog.locator("button", has_text=re.compile(r"^Launch")).click()

    def launched() -> dict | None:
        new = [b for b in backfills(stack) if b["id"] not in before]
        return new[0] if new else None

    backfill = wait_for("the backfill launched from the UI", launched, 60)
    done = wait_for(
        f"backfill {backfill['id']} to finish",
        lambda: next(
            (
                b
                for b in backfills(stack)
                if b["id"] == backfill["id"] and b["status"] not in ("REQUESTED", "CANCELING")
            ),
            None,
        ),
        timeout_s=600,
        poll_s=5,
    )
    assert done["status"] in ("COMPLETED", "COMPLETED_SUCCESS"), done
    page.goto("/overview/backfills")
    expect(page.get_by_text(backfill["id"]).first).to_be_visible()
    screenshot(page, "backfill-completed")


def backfills(stack: Stack) -> list[dict]:
    data = stack.graphql(
        """
        {
          partitionBackfillsOrError(limit: 20) {
            ... on PartitionBackfills { results { id status } }
          }
        }
        """
    )
    return data["partitionBackfillsOrError"].get("results", [])
