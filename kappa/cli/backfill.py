"""``kappa backfill``: reprocess time partitions as a Dagster backfill, and ``kappa replay``:
reload an asset from the start of its log or from a broker time."""

from __future__ import annotations

from datetime import UTC, datetime

from kappa.backfill import SUCCEEDED, launch_backfill, wait_for_backfill
from kappa.catalog.ingests import topic_ingests
from kappa.cli.output import say
from kappa.edw.connection import connect
from kappa.edw.replay import reset_for_replay, rewind_topic_asset
from kappa.edw.types import Schemas
from kappa.exceptions import KappaError
from kappa.settings import Settings, redact
from kappa.sources.captured import active_captures
from kappa.sources.topic import EventStore


def backfill(
    settings: Settings,
    asset: str,
    *,
    since: datetime | None,
    until: datetime | None,
    url: str | None,
    wait_s: float | None,
) -> int:
    """Launch a Dagster backfill of ``asset``'s time partitions from ``since`` (default: the
    first) to ``until`` (default: now), on the running webserver, as the UI would."""
    topics = {spec.asset: spec for spec, _ in topic_ingests(settings)}
    captured = {spec.asset for spec in active_captures(settings)}
    if asset not in topics and asset not in captured:
        raise KappaError(
            f"{asset!r} has no time partitions; partitioned assets: "
            f"{', '.join(sorted([*topics, *captured]))}"
        )
    step = topics[asset].step if asset in topics else None
    windows = settings.windows
    first = windows.at(since or windows.start)
    last = windows.at(until or datetime.now(UTC))
    if last.start < first.start:
        raise KappaError(f"--to {last.key} is before --from {first.key}")
    keys = [w.key for w in windows.span(first.key, last.key)]
    selection = [asset, *(t.name for t in (step.side_tables if step is not None else ()))]
    server = url or f"http://127.0.0.1:{settings.ui_port}"
    backfill_id = launch_backfill(
        server, selection, keys, title=f"reprocess {asset} {keys[0]} .. {keys[-1]}"
    )
    say(
        f"{asset}: backfill {backfill_id} of {len(keys)} partitions ({keys[0]} .. {keys[-1]}) "
        f"launched on {server}; the daemon runs them in order: {server}/runs/b/{backfill_id}"
    )
    if wait_s is None:
        return 0
    final = wait_for_backfill(server, backfill_id, timeout_s=wait_s)
    say(f"{asset}: backfill {backfill_id} {final}")
    return 0 if final in SUCCEEDED else 1


def replay(
    settings: Settings, asset: str, *, confirmed: bool, since: datetime | None = None
) -> int:
    """Reload ``asset`` from the beginning of its log, or from ``since`` (topics only)."""
    topics = {spec.asset: spec for spec, _ in topic_ingests(settings)}
    tables = {
        spec.asset: (
            spec.contract.table,
            tuple(t.name for t in spec.step.side_tables) if spec.step else (),
        )
        for spec in topics.values()
    }
    tables.update({spec.asset: (spec.target, ()) for spec in active_captures(settings)})
    if asset not in tables:
        raise KappaError(f"unknown asset {asset!r}; replayable: {', '.join(sorted(tables))}")
    if since is not None and asset not in topics:
        raise KappaError(f"{asset} replays from the beginning of its change table only (no --from)")
    scope = (
        "from the start of its log or change table"
        if since is None
        else f"from {since.isoformat()}"
    )
    if not confirmed:
        say(
            f"This deletes {asset}'s rows, state, alerts, dead letters and ledger batches "
            f"{'(all of them)' if since is None else 'after that point'} in "
            f"{redact(settings.resolved_edw_url)}; its sensor then reloads it {scope}. "
            "Run again with --yes to do it."
        )
        return 1
    schemas = Schemas(settings.edw_schema, settings.meta_schema)
    table, side_tables = tables[asset]
    if since is None:
        with connect(settings.resolved_edw_url) as conn:
            removed = reset_for_replay(conn, schemas, table, asset, side_tables=side_tables)
        say(
            f"{asset}: removed {removed.rows} rows, {removed.dead_letters} dead letters and "
            f"{removed.batches} ledger batches in one transaction; the next sensor tick reloads "
            "it from the start of the log."
        )
        return 0
    spec = topics[asset]
    with EventStore(
        settings.resolved_bootstrap_servers, timeout_s=settings.kafka_timeout_s
    ) as store:
        offsets = store.offsets_for_times(
            spec.topic, store.partitions(spec.topic), int(since.timestamp() * 1000)
        )
    with connect(settings.resolved_edw_url) as conn:
        restarts = rewind_topic_asset(
            conn, schemas, table, asset, spec.topic, offsets, side_tables=side_tables
        )
    moved = ", ".join(f"{spec.topic}[{p}] at {o}" for p, o in sorted(restarts.items())) or "nothing"
    say(
        f"{asset}: rewound {moved} (the batch boundaries at or before {since.isoformat()}) in one "
        "transaction, state as it stood there; the next sensor tick reloads from those offsets."
    )
    return 0
