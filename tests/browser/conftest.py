"""A running local stack and a real browser (Debian's Chromium driven by Playwright).

The stack is `kappa up --reset` on free ports with its own KAPPA_HOME, started as in
tests/integration/test_local_stack_e2e.py, with the event simulator idle
(KAPPA_SIM_RATE=0): the tests produce bursts of simulated events themselves, so the
sensors show both kinds of tick (runs requested, and skipped with a reason). The OLTP
simulator runs as usual.

`make test-browser` installs what these tests need (Debian's chromium, the `browser` extra);
without it they are skipped with the reason. Playwright never downloads a browser here: it
launches /usr/bin/chromium.

Screenshots go to tests/artifacts/browser/ (ignored by git); with KAPPA_UPDATE_DOCS=1
(`make screenshots`) the asset graph is also copied to docs/asset-graph.png for the README.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = Path(os.environ.get("KAPPA_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
REPO_ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts" / "browser"
DOCS = REPO_ROOT / "docs"
VIEWPORT = {"width": 1920, "height": 1200}

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the environment
    pytest.skip(
        "playwright is not installed: `make test-browser` installs it (extra `browser`)",
        allow_module_level=True,
    )
if not CHROMIUM.exists():  # pragma: no cover - depends on the environment
    pytest.skip(
        f"{CHROMIUM} is missing: `make test-browser` installs Debian's chromium",
        allow_module_level=True,
    )

from tests.integration.test_local_stack_e2e import (  # noqa: E402
    LocalState,
    Ports,
    StackProcess,
    kill_leftovers,
)

pytestmark = [pytest.mark.integration, pytest.mark.e2e]
# The UI of a busy 2-core machine: pages and their queries take seconds, not milliseconds.
expect.set_options(timeout=30_000)


@dataclass
class BrowserStackState(LocalState):
    """The e2e stack's state with the event simulator idle (the tests produce events)."""

    @property
    def env(self) -> dict[str, str]:
        return {**super().env, "KAPPA_SIM_RATE": "0"}


@dataclass
class Stack:
    """The running stack, seen from outside."""

    state: BrowserStackState
    process: StackProcess

    @property
    def ui(self) -> str:
        return self.state.ui

    def graphql(self, query: str, variables: dict[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(
            f"{self.ui}/graphql",
            data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
        assert not body.get("errors"), body["errors"]
        return body["data"]

    def produce(self, count: int, *, seed: int) -> int:
        """``count`` simulated events to the stack's topics, now."""
        from kafka import KafkaProducer

        from examples.shop import simulator
        from examples.shop.settings import ShopSettings

        settings = self.state.settings
        config = replace(
            simulator.SimulatorConfig.from_settings(settings, ShopSettings.from_env(settings.env)),
            seed=seed,
        )
        messages = list(
            islice(simulator.generate(config, start=datetime.now(UTC), rate=1000.0), count)
        )
        producer = KafkaProducer(bootstrap_servers=settings.resolved_bootstrap_servers, acks="all")
        try:
            simulator.produce(messages, producer)
        finally:
            producer.close()
        return len(messages)

    def wait_until(self, what: str, probe: Any, timeout_s: float, poll_s: float = 2.0) -> Any:
        return self.process.wait_until(what, probe, timeout_s, poll_s)


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    base = Path(tempfile.mkdtemp(prefix="kappa-browser-"))
    state = BrowserStackState(home=base / "home", ports=Ports.pick())
    try:
        with StackProcess(state, reset=True) as process:
            process.wait_for_output("kappa-etl is running", timeout_s=240)
            running = Stack(state, process)
            running.produce(1500, seed=1)
            yield running
            code = process.interrupt(timeout_s=60)
            assert code == 0, process.diagnostics()
    finally:
        kill_leftovers(state)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Browser, stack: Stack) -> Iterator[Page]:
    """A fresh browser context on the stack's UI. The stack's instance disables Dagster's
    "Join the Dagster community" dialog (``nux``): a test fails if it ever shows (after
    dismissing it, so the failure is the dialog and not a click it swallowed)."""
    context = browser.new_context(viewport=VIEWPORT, base_url=stack.ui)
    context.set_default_timeout(30_000)
    page = context.new_page()
    greeted: list[str] = []

    def dismiss() -> None:
        greeted.append(page.url)
        page.get_by_role("button", name="Skip").click()

    page.add_locator_handler(page.get_by_text("Join the Dagster community"), dismiss)
    try:
        yield page
    finally:
        context.close()
    assert not greeted, f"Dagster's community sign-up dialog showed on {greeted[0]}"


def screenshot(page: Page, name: str, *, docs: str | None = None) -> Path:
    """Save a screenshot as a test artifact (and, under KAPPA_UPDATE_DOCS=1, into docs/)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    if docs and os.environ.get("KAPPA_UPDATE_DOCS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copyfile(path, DOCS / docs)
    return path


def wait_for(what: str, probe: Any, timeout_s: float, poll_s: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(poll_s)
    raise AssertionError(f"{what}: not within {timeout_s:.0f} s (last: {last!r})")
