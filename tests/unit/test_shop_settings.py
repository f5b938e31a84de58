"""The shop demo's settings: outside the engine's, validated at load with messages naming the
variable, documented in the README, and read by the shop's producers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from examples.shop.settings import SHOP_SETTINGS, ShopSettings
from kappa.exceptions import ConfigurationError
from kappa.settings import REPO_ROOT, SETTINGS, Settings


def test_the_defaults_load() -> None:
    shop = ShopSettings.from_env({})
    assert (shop.sim_rate, shop.sim_seed, shop.sim_customers) == (50.0, 42, 500)
    assert (shop.sim_duplicate_rate, shop.sim_late_rate, shop.sim_invalid_rate) == (
        0.02,
        0.05,
        0.005,
    )
    assert (shop.oltp_rate, shop.oltp_writers) == (5.0, 3)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("KAPPA_SIM_RATE", "fast", "expected a number, got 'fast'"),
        ("KAPPA_SIM_RATE", "-1", "-1.0 is outside [0.0, 1000000]"),
        ("KAPPA_SIM_SEED", "1.5", "expected a whole number, got '1.5'"),
        ("KAPPA_SIM_CUSTOMERS", "0", "0 is outside [1, 10000000]"),
        ("KAPPA_SIM_DUPLICATE_RATE", "2", "2.0 is outside [0.0, 1.0]"),
        ("KAPPA_SIM_LATE_RATE", "x", "expected a number"),
        ("KAPPA_SIM_INVALID_RATE", "1.01", "outside [0.0, 1.0]"),
        ("KAPPA_OLTP_RATE", "lots", "expected a number"),
        ("KAPPA_OLTP_WRITERS", "65", "65 is outside [1, 64]"),
    ],
)
def test_a_bad_value_is_refused_naming_the_variable(name, value, fragment) -> None:
    with pytest.raises(ConfigurationError) as caught:
        ShopSettings.from_env({name: value})
    assert str(caught.value).startswith(f"{name}: ")
    assert fragment in str(caught.value)


def test_the_engine_s_settings_name_none_of_the_shop_s() -> None:
    engine = {s.name for s in SETTINGS}
    assert not engine & {s.name for s in SHOP_SETTINGS}
    assert not any(hasattr(Settings, f) for f in ("sim_rate", "oltp_rate", "oltp_writers"))


def test_every_shop_setting_is_documented_in_the_readme() -> None:
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    missing = [s.name for s in SHOP_SETTINGS if f"`{s.name}`" not in readme]
    assert not missing, f"shop settings missing from the README: {missing}"


def _producer(module: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", module],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.parametrize(
    ("module", "env", "idle"),
    [
        ("examples.shop.simulator", {"KAPPA_SIM_RATE": "0"}, "simulator idle"),
        ("examples.shop.oltp", {"KAPPA_OLTP_RATE": "0"}, "oltp simulator idle"),
        ("examples.shop.calls", {"KAPPA_CALLS_RATE": "0"}, "calls simulator idle"),
        # The calls captured from PostgreSQL (the tests' catalogue): nothing for it to write.
        ("examples.shop.calls", {}, "does not capture call_center_calls from MariaDB"),
        (
            "examples.shop.calls",
            {
                "KAPPA_CATALOG": str(REPO_ROOT / "catalog.yaml"),
                "KAPPA_CAPTURES_OFF": "call_center_calls",
            },
            "call_center_calls is off",
        ),
    ],
)
def test_each_producer_runs_until_sigterm(module, env, idle) -> None:
    # Rate 0 idles without connecting, so no broker or database is needed to see the loop.
    process = _producer(module, env)
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    seen = ""
    while idle not in seen and time.monotonic() < deadline and process.poll() is None:
        seen += process.stdout.readline()
    assert idle in seen, seen
    time.sleep(0.3)
    assert process.poll() is None, "the idle producer ended without being asked to"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0


@pytest.mark.parametrize(
    "module", ["examples.shop.simulator", "examples.shop.oltp", "examples.shop.calls"]
)
def test_a_producer_with_a_bad_setting_exits_2_naming_it(module) -> None:
    process = _producer(module, {"KAPPA_SIM_CUSTOMERS": "many"})
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2, output
    assert "KAPPA_SIM_CUSTOMERS: expected a whole number, got 'many'" in output


def test_the_calls_simulator_without_its_server_exits_2_naming_the_setting() -> None:
    env = {"KAPPA_CATALOG": str(REPO_ROOT / "catalog.yaml")}
    process = _producer("examples.shop.calls", env)
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 2, output
    assert "KAPPA_MARIADB_URL: the catalogue captures tables with engine: mariadb" in output
