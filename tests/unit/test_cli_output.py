"""What the `kappa` commands share: finding the repository, parsing times, printing tables."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta, timezone

import pytest

from kappa.cli.output import compact_age, print_table, repo_root, timestamp, utc_time
from kappa.settings import REPO_ROOT


def test_the_repository_is_found_from_any_working_directory(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert repo_root() == REPO_ROOT
    assert (repo_root() / "workspace.yaml").exists()


def test_from_needs_a_zone_and_partition_bounds_default_to_utc() -> None:
    assert timestamp("2026-11-02T08:00:00+01:00") == datetime(
        2026, 11, 2, 8, tzinfo=timezone(timedelta(hours=1))
    )
    with pytest.raises(argparse.ArgumentTypeError, match="has no zone"):
        timestamp("2026-11-02T08:00:00")
    with pytest.raises(argparse.ArgumentTypeError, match="not an ISO-8601 time"):
        timestamp("yesterday")
    assert utc_time("2026-11-02") == datetime(2026, 11, 2, tzinfo=UTC)
    assert utc_time("2026-11-02-07:00") == datetime(2026, 11, 2, 7, tzinfo=UTC)
    with pytest.raises(argparse.ArgumentTypeError, match="nor a partition key"):
        utc_time("2026-13-40")


def test_ages_are_one_word_and_tables_are_padded(capsys) -> None:
    assert [compact_age(s) for s in (None, 42, 420, 3 * 3600, 3 * 86400)] == [
        "-",
        "42s",
        "7min",
        "3h",
        "3d",
    ]
    print_table(("a", "bb"), [("xyz", "1"), ("q", "22")])
    assert capsys.readouterr().out.splitlines() == ["a    bb", "xyz  1", "q    22"]
