"""The OLTP database (captured tables and their change tables) as a Dagster resource."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
from pydantic import Field

from kappa.edw import connection


class OltpResource(dg.ConfigurableResource):
    """Read-only access to the change tables.

    Usage::

        with oltp.connect() as conn:
            end = kappa.sources.pg_capture.plan_end(conn, spec, start, max_changes=10_000)
    """

    url: str = Field(description="PostgreSQL URL of the OLTP database (KAPPA_OLTP_URL); an EnvVar.")

    @contextmanager
    def connect(self, *, statement_timeout_s: float | None = None) -> Iterator[psycopg.Connection]:
        """A connection to the OLTP database, closed on exit."""
        with connection.connect(
            self.url, setting="KAPPA_OLTP_URL", statement_timeout_s=statement_timeout_s
        ) as conn:
            yield conn
