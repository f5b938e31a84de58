"""The MariaDB (MySQL-compatible) server whose binlog feeds the catalogue's ``engine: mariadb``
tables, as a Dagster resource."""

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
from pydantic import Field

from kappa.catalog.captures import CaptureSpec
from kappa.sources.mariadb_binlog import BinlogTable
from kappa.sources.mariadb_server import URL_SETTING, ServerAddress


class MariadbResource(dg.ConfigurableResource):
    """Replication access to the server's binlog (a user with REPLICATION SLAVE and
    REPLICATION CLIENT, and SELECT on the captured tables).

    Usage::

        with mariadb.open(spec) as table:
            end = table.plan_end(start, max_changes=10_000)
    """

    url: str = Field(
        description=f"mysql://user:password@host:port/ of the server ({URL_SETTING}); an EnvVar."
    )

    @contextmanager
    def open(self, spec: CaptureSpec) -> Iterator[BinlogTable]:
        """The captured table's binlog source (checks the server's binlog settings), closed
        on exit."""
        table = BinlogTable(ServerAddress.parse(self.url), spec)
        try:
            yield table
        finally:
            table.close()
