"""kappa-etl: continuous, replayable micro-batch ETL from an event store and CDC tables to a
PostgreSQL EDW, orchestrated by Dagster.

The library here holds the logic that does not need Dagster (offset arithmetic, decoding,
the ledger, loading, the local stack); the Dagster code location in ``assets/``,
``resources/``, ``sensors/`` and ``pipelines/`` composes it.
"""

__version__ = "0.1.0"
