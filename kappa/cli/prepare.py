"""``kappa init``: schemas, tables, capture triggers and topics, idempotently (``kappa up``
calls it at every start)."""

from __future__ import annotations

from kappa.catalog.captures import load_captures
from kappa.changes.target import ensure_target
from kappa.cli.output import loaded_topics, say, step
from kappa.edw.connection import connect
from kappa.edw.evolution import plan_evolution
from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.settings import Settings
from kappa.sources.captured import active_captures, check_mariadb_tables, mariadb_url
from kappa.sources.pg_capture import install_capture


def prepare(settings: Settings, *, create_topics: bool, local: bool, seed: bool = False) -> None:
    """Schemas, tables, capture triggers and topics: idempotent, safe to run on every start.

    ``local`` runs the catalogue's ``local.prepare`` against the OLTP database before the
    capture triggers are installed (a project's source tables), and ``local.seed`` after
    them, so what it writes is captured; ``seed`` is passed to it as ``top_up`` (``--seed``).
    Against a real OLTP database the captured tables exist already and only the change
    tables and triggers are added.
    """
    from kappa.local.catalog import load_local
    from kappa.local.topics import ensure_topics

    # Every table's EDW target exists, also of a table turned off (KAPPA_CAPTURES_OFF): a
    # step reading it sees what was loaded before.
    targets = load_captures(settings.catalog)
    captures = active_captures(settings)
    triggered = [spec for spec in captures if spec.engine == "postgresql"]
    binlogged = [spec for spec in captures if spec.engine == "mariadb"]
    section = load_local(settings.catalog) if local else None
    prepare_hook = section.hook("prepare") if section is not None else None
    seed_hook = section.hook("seed") if section is not None else None
    schemas = Schemas(settings.edw_schema, settings.meta_schema)

    # A catalogue the existing fact tables cannot follow is refused before anything (a topic
    # included) is created; ensure_schema checks again inside its transaction.
    with (
        step(f"catalogue {settings.catalog.name} against the EDW"),
        connect(settings.resolved_edw_url) as conn,
    ):
        plan_evolution(conn, schemas, settings.streams)
    if create_topics:
        with step(f"topics {', '.join(loaded_topics(settings))}"):
            ensure_topics(
                settings.resolved_bootstrap_servers,
                {topic: settings.topic_partitions for topic in loaded_topics(settings)},
                timeout_s=settings.kafka_timeout_s,
            )
    with (
        step(f"EDW schemas {settings.edw_schema}, {settings.meta_schema}"),
        connect(settings.resolved_edw_url) as conn,
    ):
        changes = ensure_schema(conn, schemas, settings.streams)
        for spec in targets:
            ensure_target(conn, schemas, spec)
    for change in changes:
        say(f"  schema evolution: {change}")
    messages: list[str] = []
    if prepare_hook is not None and section is not None:
        with (
            step(f"local.prepare {section.prepare}"),
            connect(settings.resolved_oltp_url, setting="KAPPA_OLTP_URL") as conn,
        ):
            messages = prepare_hook(settings, conn)
        for message in messages:
            say(f"    {message}")
    if triggered:
        names = ", ".join(str(spec.source) for spec in triggered)
        with (
            step(f"change capture on {names}"),
            connect(settings.resolved_oltp_url, setting="KAPPA_OLTP_URL") as conn,
        ):
            for spec in triggered:
                install_capture(conn, spec)
    if binlogged:
        names = ", ".join(str(spec.source) for spec in binlogged)
        with step(f"MariaDB binlog capture of {names}"):
            check_mariadb_tables(binlogged, mariadb_url(settings.env))
    if seed_hook is not None and section is not None:
        with (
            step(f"local.seed {section.seed}" + (" (--seed)" if seed else "")),
            connect(settings.resolved_oltp_url, setting="KAPPA_OLTP_URL") as conn,
        ):
            messages = seed_hook(settings, conn, top_up=seed)
        for message in messages:
            say(f"    {message}")
