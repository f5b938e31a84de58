"""The shop's OLTP database: source tables and a simulator of concurrent writers.

* :mod:`~examples.shop.oltp.plans`: the configuration and the pure transaction planning;
* :mod:`~examples.shop.oltp.tables`: the DDL, the seeding, and the catalogue's ``local:`` hooks
  (:func:`prepare`, :func:`seed`);
* :mod:`~examples.shop.oltp.writers`: the concurrent writers (``python -m examples.shop.oltp``
  runs them until SIGINT or SIGTERM);
* :mod:`~examples.shop.oltp.stats`: what they wrote, per table.
"""

from examples.shop.oltp.plans import (
    CALLS_TABLE,
    CUSTOMERS_TABLE,
    OPERATION_MIX,
    CustomerRow,
    DeleteCustomer,
    InsertCall,
    InsertCustomer,
    OltpConfig,
    OpKind,
    TransactionPlan,
    UpdateCustomer,
    WriterState,
    customer_id,
    customer_row,
    plan_transaction,
    writer_rng,
)
from examples.shop.oltp.stats import OltpStats
from examples.shop.oltp.tables import (
    ensure_source_tables,
    prepare,
    seed,
    seed_customers,
    seed_demo_customers,
)
from examples.shop.oltp.writers import APPLICATION_NAME, OltpWriters, run_transactions

__all__ = [
    "APPLICATION_NAME",
    "CALLS_TABLE",
    "CUSTOMERS_TABLE",
    "OPERATION_MIX",
    "CustomerRow",
    "DeleteCustomer",
    "InsertCall",
    "InsertCustomer",
    "OltpConfig",
    "OltpStats",
    "OltpWriters",
    "OpKind",
    "TransactionPlan",
    "UpdateCustomer",
    "WriterState",
    "customer_id",
    "customer_row",
    "ensure_source_tables",
    "plan_transaction",
    "prepare",
    "run_transactions",
    "seed",
    "seed_customers",
    "seed_demo_customers",
    "writer_rng",
]
