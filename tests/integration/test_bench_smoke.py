"""The benchmarks run at a tiny scale and write every figure (no timing is asserted); their
contenders compute the same rows as the pipeline."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.suite import KEYS

pytestmark = pytest.mark.integration

ROOT = Path(__file__).parents[2]


def test_bench_tiny_scale_writes_every_key(tmp_path: Path) -> None:
    output = tmp_path / "latest.json"
    argv = [sys.executable, "-m", "bench.suite", "--scale", "tiny", "--output", str(output)]
    if importlib.util.find_spec("quixstreams") is None:
        argv.append("--no-peer")  # the peer needs the bench extra
    if os.environ.get("KAPPA_TEST_PG_URL"):
        argv += ["--pg-url", os.environ["KAPPA_TEST_PG_URL"]]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(output.read_text(encoding="utf-8"))
    assert set(KEYS) <= set(figures)
    for key in (
        "pipeline_eps",
        "rbar_eps",
        "consume_only_eps",
        "copy_only_eps",
        "backfill_to_live_ratio",
    ):
        assert figures[key] is not None and figures[key] > 0, key
    assert "reprocessed in one transaction" in figures["details"]["notes"]["backfill_to_live_ratio"]
    # Row by row and the pipeline compute the same rows for the events both processed.
    agreement = figures["details"]["rbar"]["agreement"]
    assert agreement["orders_compared"] > 0
    assert agreement["orders_differing"] == 0
    assert agreement["payments_compared"] > 0
    assert agreement["payments_differing"] == 0, agreement.get("payments_sample")
    peer = figures["details"].get("peer")
    if peer is not None:
        assert peer["agreement"]["orders_compared"] > 0
        assert peer["agreement"]["orders_differing"] == 0
    assert "| pipeline_eps |" in result.stdout


def test_bench_cache_small_scale_agrees_with_per_message(tmp_path: Path) -> None:
    """``make bench-cache`` at a small scale: both paths run, agree, and write the figures."""
    output = tmp_path / "cache_vs_queries.json"
    argv = [
        sys.executable,
        "-m",
        "bench.cache_vs_queries",
        "--events",
        "1500",
        "--customers",
        "100",
        "--baseline-events",
        "200",
        "--batch-size",
        "500",
        "--repeat",
        "1",
        "--output",
        str(output),
    ]
    if os.environ.get("KAPPA_TEST_PG_URL"):
        argv += ["--pg-url", os.environ["KAPPA_TEST_PG_URL"]]
    result = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    figures = json.loads(output.read_text(encoding="utf-8"))
    assert figures["agree"] is True
    assert figures["events"] == 1500
    assert figures["baseline_events"] > 0
    assert figures["cache_eps"] > 0 and figures["per_message_eps"] > 0
    assert figures["ratio"] > 0
