"""The EDW (PostgreSQL) as a Dagster resource."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import dagster as dg
import psycopg
from pydantic import Field

from kappa import warehouse
from kappa.settings import identifier


class WarehouseResource(dg.ConfigurableResource):
    """Connections to the EDW, and where its tables live.

    Usage::

        with warehouse.connect() as conn:
            head = kappa.warehouse.read_head(conn, warehouse.schemas, "fact_order", "orders", 0)
    """

    url: str = Field(description="PostgreSQL URL of the EDW (KAPPA_EDW_URL); give it as an EnvVar.")
    edw_schema: str = Field(default="edw", description="Schema of the EDW tables.")
    meta_schema: str = Field(default="kappa", description="Schema of the ledger and dead letters.")

    @property
    def schemas(self) -> warehouse.Schemas:
        return warehouse.Schemas(
            edw=identifier("KAPPA_EDW_SCHEMA", self.edw_schema),
            meta=identifier("KAPPA_META_SCHEMA", self.meta_schema),
        )

    @contextmanager
    def connect(self, *, statement_timeout_s: float | None = None) -> Iterator[psycopg.Connection]:
        """A connection to the EDW, closed on exit."""
        with warehouse.connect(self.url, statement_timeout_s=statement_timeout_s) as conn:
            yield conn
