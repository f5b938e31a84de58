"""``kappa check``: can this deployment reach its databases, broker and topics?"""

from __future__ import annotations

from collections.abc import Callable

import pymysql

from kappa.cli.output import loaded_topics, say
from kappa.exceptions import ConfigurationError, KappaError
from kappa.settings import Settings
from kappa.sources.captured import active_captures, check_mariadb_tables, cli_mariadb_url
from kappa.sources.mariadb_server import URL_SETTING
from kappa.sources.topic import EventStore, UnknownTopicError


def check(settings: Settings) -> int:
    """Preflight: can this deployment reach its databases, broker and topics?"""
    from kappa.local.pg_admin import check_postgres

    failures = 0

    def run(title: str, probe: Callable[[], object]) -> None:
        nonlocal failures
        try:
            probe()
        except KappaError as exc:
            failures += 1
            say(f"  ✗ {title}: {exc}")
        else:
            say(f"  ✓ {title}")

    run("KAPPA_EDW_URL", lambda: check_postgres("KAPPA_EDW_URL", settings.resolved_edw_url))
    run("KAPPA_OLTP_URL", lambda: check_postgres("KAPPA_OLTP_URL", settings.resolved_oltp_url))
    run(
        "KAPPA_DAGSTER_PG_URL",
        lambda: check_postgres("KAPPA_DAGSTER_PG_URL", settings.resolved_dagster_pg_url),
    )

    binlogged = [spec for spec in active_captures(settings) if spec.engine == "mariadb"]
    if binlogged:

        def mariadb() -> None:
            try:
                check_mariadb_tables(binlogged, cli_mariadb_url(settings))
            except pymysql.MySQLError as exc:
                raise ConfigurationError(
                    URL_SETTING, f"the server does not answer: {exc}"
                ) from None

        run(f"{URL_SETTING}: binlog settings and captured tables", mariadb)

    def topics() -> None:
        with EventStore(
            settings.resolved_bootstrap_servers, timeout_s=settings.kafka_timeout_s
        ) as store:
            for topic, setting in loaded_topics(settings).items():
                try:
                    store.partitions(topic)
                except UnknownTopicError as exc:
                    raise ConfigurationError(setting, str(exc)) from None

    run("KAFKA_BOOTSTRAP_SERVERS and topics", topics)
    return 1 if failures else 0
