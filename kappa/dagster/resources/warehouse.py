"""The EDW (PostgreSQL) as a Dagster resource."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
from pydantic import Field

from kappa.edw import connection, types
from kappa.exceptions import ConfigurationError
from kappa.setting_values import identifier
from kappa.settings import redact


class WarehouseResource(dg.ConfigurableResource):
    """Connections to the EDW, and where its tables live.

    Usage::

        with warehouse.connect() as conn:
            head = kappa.edw.ledger.read_head(conn, warehouse.schemas, asset, topic, partition)
    """

    url: str = Field(description="PostgreSQL URL of the EDW (KAPPA_EDW_URL); give it as an EnvVar.")
    edw_schema: str = Field(default="edw", description="Schema of the EDW tables.")
    meta_schema: str = Field(default="kappa", description="Schema of the ledger and dead letters.")

    @property
    def schemas(self) -> types.Schemas:
        return types.Schemas(
            edw=identifier("KAPPA_EDW_SCHEMA", self.edw_schema),
            meta=identifier("KAPPA_META_SCHEMA", self.meta_schema),
        )

    @contextmanager
    def connect(self, *, statement_timeout_s: float | None = None) -> Iterator[psycopg.Connection]:
        """A connection to the EDW, closed on exit.

        A table or schema missing from the EDW (a database never initialised, or schema
        settings pointing elsewhere) fails naming the settings instead of a bare SQL error.
        """
        with connection.connect(self.url, statement_timeout_s=statement_timeout_s) as conn:
            try:
                yield conn
            except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName) as exc:
                detail = str(exc).strip().splitlines()[0]
                raise ConfigurationError(
                    "KAPPA_EDW_URL",
                    f"{detail} in {redact(self.url)} (KAPPA_EDW_SCHEMA={self.edw_schema}, "
                    f"KAPPA_META_SCHEMA={self.meta_schema}): run `kappa init` against this "
                    "database, or point the settings at an initialised one",
                ) from None
