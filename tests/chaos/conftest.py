"""Fixtures of the chaos suite, its scale, and the table it prints.

``KAPPA_CHAOS_SCALE=full`` (what ``make chaos`` sets) runs every fault at full scale (at
least 30 SIGKILL trials, restarts of PostgreSQL, the broker and the Dagster daemon);
otherwise a small version with few trials runs inside the default test run. Every test
records rows (fault or input, trials, outcome, anomalies) and the table is printed at the
end of the session and written to ``$KAPPA_CHAOS_REPORT`` (JSON) when set.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

import dagster as dg
import pytest

from tests.chaos.reference import Anomalies
from tests.demo import TEST_CATALOG
from tests.integration.harness import Pipeline

SCALE_ENV = "KAPPA_CHAOS_SCALE"
REPORT_ENV = "KAPPA_CHAOS_REPORT"


def full_scale() -> bool:
    return os.environ.get(SCALE_ENV, "small").strip().lower() == "full"


#: Only at full scale (``make chaos``): the slow faults (restarts, bursts) stay out of ``make test``.
full_only = pytest.mark.skipif(
    os.environ.get("KAPPA_CHAOS_SCALE", "small").strip().lower() != "full",
    reason="full scale only: make chaos",
)


def trials(small: int, full: int) -> int:
    return full if full_scale() else small


@dataclass
class Row:
    fault: str
    trials: int
    outcome: str
    lost: int
    duplicated: int
    other: int
    detail: str = ""


ROWS: list[Row] = []


def record(fault: str, trials: int, outcome: str, anomalies: Anomalies) -> None:
    ROWS.append(
        Row(
            fault=fault,
            trials=trials,
            outcome=outcome,
            lost=anomalies.lost,
            duplicated=anomalies.duplicated,
            other=anomalies.other,
            detail="; ".join(anomalies.details[:5]),
        )
    )


def render(rows: list[Row]) -> str:
    header = ("fault or input", "trials", "outcome", "lost", "duplicated", "other anomalies")
    body = [
        (r.fault, str(r.trials), r.outcome, str(r.lost), str(r.duplicated), str(r.other))
        for r in rows
    ]
    widths = [
        max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)
    ]
    line = "+".join("-" * (w + 2) for w in widths)

    def fmt(cells: tuple[str, ...]) -> str:
        return "|".join(
            f" {c:>{w}} " if i in (1, 3, 4, 5) else f" {c:<{w}} "
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [fmt(header), line, *(fmt(b) for b in body)]
    details = [f"  {r.fault}: {r.detail}" for r in rows if r.detail]
    if details:
        out += ["", "anomaly details:", *details]
    return "\n".join(out)


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # type: ignore[no-untyped-def]
    if not ROWS:
        return
    target = os.environ.get(REPORT_ENV)
    if target:  # python -m tests.chaos prints the table itself
        with open(target, "w", encoding="utf-8") as handle:
            json.dump({"rows": [asdict(r) for r in ROWS]}, handle, indent=2)
        return
    scale = (
        "full scale" if full_scale() else "small version (KAPPA_CHAOS_SCALE=full for make chaos)"
    )
    terminalreporter.section(f"chaos: faults and bad inputs, {scale}")
    terminalreporter.write_line(render(ROWS))


@pytest.fixture
def chaos_env(broker, database_url, topic_factory, monkeypatch) -> dict[str, str]:
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAPPA_EDW_URL": database_url,
        "KAPPA_OLTP_URL": database_url,
        "KAPPA_CATALOG": str(TEST_CATALOG),
        "KAPPA_TOPIC_ORDERS": topic_factory("orders", 4),
        "KAPPA_TOPIC_PAYMENTS": topic_factory("payments", 2),
        "KAPPA_BATCH_MAX_RECORDS": "2000",
        "KAPPA_RUN_MAX_RECORDS": "6000",
        "KAPPA_ENRICH_MAX_WAIT_S": "0",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture
def instance():
    with dg.instance_for_test() as test_instance:
        yield test_instance


@pytest.fixture
def chaos_pipeline(chaos_env, instance) -> Pipeline:
    return Pipeline(env=chaos_env, instance=instance)


@pytest.fixture
def own_postgres(local_state_dir):  # type: ignore[no-untyped-def]
    """A PostgreSQL server of the test's own, so it can be crashed and restarted."""
    import uuid

    from kappa.local.postgres import EmbeddedPostgres
    from kappa.local.processes import free_port

    server = EmbeddedPostgres(local_state_dir / f"pg-{uuid.uuid4().hex[:8]}", free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()
