"""``kappa reconcile``: source = received = loaded + dead-lettered + deduplicated, per shard."""

from __future__ import annotations

from kappa.catalog.ingests import topic_ingests
from kappa.cli.output import print_table
from kappa.edw.connection import connect
from kappa.edw.types import Schemas
from kappa.settings import Settings
from kappa.sources.captured import active_captures, open_change_source
from kappa.sources.topic import EventStore


def reconcile(settings: Settings) -> int:
    """Per shard: source against ledger against counts; exit 1 if anything does not add up."""
    from kappa.reconcile import reconcile_source, reconcile_topic

    schemas = Schemas(settings.edw_schema, settings.meta_schema)
    with (
        EventStore(
            settings.resolved_bootstrap_servers, timeout_s=settings.kafka_timeout_s
        ) as store,
        connect(settings.resolved_edw_url) as edw,
    ):
        accounts = [
            a
            for spec, _ in topic_ingests(settings)
            for a in reconcile_topic(store, edw, schemas, spec)
        ]
        for capture in active_captures(settings):
            with open_change_source(capture, settings) as changes:
                accounts += reconcile_source(changes, edw, schemas, capture.asset)
    header = (
        "asset",
        "shard",
        "ledger",
        "lag",
        "in source",
        "received",
        "loaded",
        "dead",
        "dedup",
        "result",
    )
    rows = [
        (
            a.asset,
            a.shard,
            f"[{a.ledger_start},{a.ledger_end})",
            str(a.lag),
            str(a.source_count),
            str(a.received),
            str(a.loaded),
            str(a.dead_lettered),
            str(a.deduplicated),
            "ok" if not a.problems else "; ".join(a.problems),
        )
        for a in accounts
    ]
    print_table(header, rows)
    return 1 if any(a.problems for a in accounts) else 0
