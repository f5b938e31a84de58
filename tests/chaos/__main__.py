"""``python -m tests.chaos [pytest args]``: the fault and bad-input suite at full scale.

Runs tests/chaos with ``KAPPA_CHAOS_SCALE=full`` (unless set otherwise) and prints the table:
fault or input, trials, outcome, anomalies (lost, duplicated, other). Exits non-zero when a
test failed or any anomaly was found.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

SCALE_ENV = "KAPPA_CHAOS_SCALE"
REPORT_ENV = "KAPPA_CHAOS_REPORT"


def main(argv: list[str]) -> int:
    # Before the suite's conftest is imported: its markers read the scale at import.
    os.environ.setdefault(SCALE_ENV, "full")
    from tests.chaos.conftest import Row, render

    with tempfile.TemporaryDirectory(prefix="kappa-chaos-") as tmp:
        report = Path(tmp) / "report.json"
        os.environ[REPORT_ENV] = str(report)
        code = pytest.main(["tests/chaos", "-q", "-p", "no:cacheprovider", *argv])
        rows = [Row(**r) for r in json.loads(report.read_text())["rows"]] if report.exists() else []
    print(f"\nkappa-etl chaos suite ({os.environ[SCALE_ENV]} scale)\n")
    print(render(rows) if rows else "no results recorded")
    anomalies = sum(r.lost + r.duplicated + r.other for r in rows)
    print(f"\n{len(rows)} faults and inputs, {anomalies} anomalies, pytest exit code {int(code)}")
    return int(code) or (1 if anomalies else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
