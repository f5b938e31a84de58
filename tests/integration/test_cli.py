"""The kappa command against real services: clear errors naming the setting, no tracebacks."""

import re

import pytest

from kappa import cli
from kappa.local.processes import free_port

pytestmark = pytest.mark.integration


def test_check_reports_each_setting(pipeline_env, monkeypatch, capsys):
    monkeypatch.setenv("KAPPA_DAGSTER_PG_URL", pipeline_env["KAPPA_EDW_URL"])
    assert cli.main(["check"]) == 0
    out = capsys.readouterr().out
    assert "✓ KAPPA_EDW_URL" in out and "✓ KAFKA_BOOTSTRAP_SERVERS and topics" in out

    monkeypatch.setenv("KAPPA_TOPIC_PAYMENTS", "missing_topic")
    monkeypatch.setenv("KAPPA_DAGSTER_PG_URL", f"postgresql://u:pw1234@127.0.0.1:{free_port()}/x")
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out
    assert "✗ KAPPA_DAGSTER_PG_URL: KAPPA_DAGSTER_PG_URL: " in out
    assert "KAPPA_TOPIC_PAYMENTS: topic 'missing_topic' does not exist" in out
    assert "pw1234" not in out


@pytest.mark.parametrize(
    ("name", "value", "starts"),
    [
        ("KAFKA_BOOTSTRAP_SERVERS", "no-port-here", "kappa: KAFKA_BOOTSTRAP_SERVERS: "),
        ("KAPPA_EDW_URL", "mysql://x@y/z", "kappa: KAPPA_EDW_URL: "),
        ("KAPPA_EDW_SCHEMA", "drop table;", "kappa: KAPPA_EDW_SCHEMA: "),
    ],
)
def test_bad_configuration_fails_before_starting_anything(
    monkeypatch, capsys, tmp_path, name, value, starts
):
    monkeypatch.setenv("KAPPA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(name, value)
    assert cli.main(["up"]) == 2
    err = capsys.readouterr().err
    assert err.strip().startswith(starts)
    assert "Traceback" not in err
    assert not (tmp_path / "home").exists()


def test_an_unreachable_broker_given_to_init_names_the_setting(pipeline_env, monkeypatch, capsys):
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("KAPPA_KAFKA_TIMEOUT_S", "1")
    assert cli.main(["init"]) == 2
    err = capsys.readouterr().err
    assert "kappa: KAFKA_BOOTSTRAP_SERVERS: no broker answered" in err


def _status_lines(out: str) -> list[str]:
    """The lag table of `kappa status`: from its header to the first blank line."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("asset "))
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def test_status_shows_lag_per_shard_and_the_ledger(pipeline, capsys, monkeypatch, tmp_path):
    from tests.integration.harness import Pipeline

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.setenv("KAPPA_HOME", str(tmp_path / "no-stack-here"))
    assert isinstance(pipeline, Pipeline)
    messages = pipeline.simulate(300, invalid_rate=0.05)
    pipeline.drain("fact_order")
    assert cli.main(["status"]) == 0
    text = capsys.readouterr().out
    out = _status_lines(text)
    assert out[0].split() == [
        "asset", "shard", "log", "end", "loaded", "to", "lag", "oldest", "batches", "loaded",
        "dead", "dedup", "last", "batch",
    ]  # fmt: skip
    topic = pipeline.env["KAPPA_TOPIC_ORDERS"]
    orders = [line.split() for line in out if line.startswith("fact_order ")]
    assert len(orders) == 4, "one line per partition of the orders topic"
    for cells in orders:
        assert cells[1].startswith(f"{topic}[")
        assert cells[2] == cells[3] and cells[4] == "0", "drained: loaded to the log end, no lag"
        assert cells[5] == "-", "nothing pending, so no oldest pending record"
    loaded = sum(int(cells[7]) for cells in orders)
    assert loaded == len({m.event_id for m in messages if m.topic == topic and m.kind == "valid"})
    payments = [line.split() for line in out if line.startswith("fact_payment ")]
    assert payments and all(int(cells[4]) > 0 for cells in payments if cells[2] != "0"), (
        "not loaded yet: lagging"
    )
    assert all(cells[5].endswith("s") for cells in payments if cells[2] != "0"), (
        "the age of the oldest pending payment"
    )
    assert any(line.startswith("dim_customer ") for line in out)
    # The last batches, newest first, and why no check results were read.
    listed = re.search(r"\nlast (\d+) batches\n", text)
    assert listed is not None, text
    count = int(listed.group(1))
    assert count == 4, "one batch per orders partition (at most 5 listed)"
    batches = text[listed.end() :].splitlines()
    assert batches[0].split()[:3] == ["asset", "shard", "positions"]
    assert all(line.startswith("fact_order ") for line in batches[1 : 1 + count])
    assert "checks: not read (no Dagster instance: DAGSTER_HOME is not set" in text


def test_status_lists_failing_checks_from_the_dagster_instance(
    pipeline, capsys, monkeypatch, tmp_path
):
    import dagster as dg

    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    pipeline.simulate(50)
    with dg.DagsterInstance.get() as instance:
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey("fact_order"),
                check_name="freshness",
                passed=False,
                severity=dg.AssetCheckSeverity.WARN,
                description="orders[2]: oldest of 40 pending is 900 s old (bound 300 s)",
            )
        )
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey("fact_payment"), check_name="freshness", passed=True
            )
        )
    assert cli.main(["status", "--batches", "0"]) == 1
    text = capsys.readouterr().out
    assert "batches\n" not in text, "--batches 0 lists no batches"
    defined = len(list(pipeline.defs.resolve_asset_graph().asset_check_keys))
    assert (
        f"checks: {defined} defined, 1 passed, 1 failing, 0 running, {defined - 2} never evaluated"
        in text
    )
    failing = text.split("checks: ")[1].splitlines()[1:]
    assert failing[0].split()[:6] == ["asset", "check", "state", "severity", "when", "why"]
    cells = failing[1].split()
    assert cells[:4] == ["fact_order", "freshness", "failed", "warn"]
    assert failing[1].endswith("orders[2]: oldest of 40 pending is 900 s old (bound 300 s)")

    with dg.DagsterInstance.get() as instance:
        instance.report_runless_asset_event(
            dg.AssetCheckEvaluation(
                asset_key=dg.AssetKey("fact_order"), check_name="freshness", passed=True
            )
        )
    assert cli.main(["status", "--batches", "0"]) == 0
    assert "2 passed, 0 failing" in capsys.readouterr().out


def test_reconcile_adds_up_and_names_a_ledger_gap(pipeline, capsys):
    for seed in (1, 2):  # two rounds: every partition gets several batches
        pipeline.simulate(300, seed=seed, duplicate_rate=0.05, invalid_rate=0.05)
        pipeline.drain("fact_order")
        pipeline.drain("fact_payment")
    assert cli.main(["reconcile"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[-1] for line in out.splitlines()[1:]] == ["ok"] * (4 + 2 + 2), (
        out
    )  # partitions, change tables

    job = pipeline.defs.resolve_job_def("edw_checks")
    result = job.execute_in_process(instance=pipeline.instance)
    evaluations = {
        (e.asset_key.to_user_string(), e.check_name): e
        for e in result.get_asset_check_evaluations()
    }
    assert all(e.passed for e in evaluations.values()), [
        e.description for e in evaluations.values() if not e.passed
    ]
    assert ("dim_customer", "reconciliation") in evaluations

    # Lose a batch from the ledger: a gap, and fewer received than the log holds.
    [(shard, start)] = pipeline.query(
        "SELECT shard, start_position FROM kappa.batch_ledger WHERE asset = 'fact_order' AND start_position > 0 LIMIT 1"
    )
    pipeline.query(
        "DELETE FROM kappa.batch_ledger WHERE asset = 'fact_order' AND shard = %s AND start_position = %s",
        (shard, start),
    )
    assert cli.main(["reconcile"]) == 1
    out = capsys.readouterr().out
    topic = pipeline.env["KAPPA_TOPIC_ORDERS"]
    assert f"{topic}[{shard}]" in out and (
        "but the next batch starts at" in out or "but its head says" in out
    )
    result = job.execute_in_process(instance=pipeline.instance, raise_on_error=False)
    [check] = [
        e
        for e in result.get_asset_check_evaluations()
        if e.asset_key.to_user_string() == "fact_order" and e.check_name == "reconciliation"
    ]
    assert not check.passed and f"{topic}[{shard}]: ledger" in check.description
