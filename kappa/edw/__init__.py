"""The EDW in PostgreSQL: its tables, the batch ledger, the exactly-once commit, reprocessing.

* :mod:`~kappa.edw.types`: value types without a database client (schemas, ledger records);
* :mod:`~kappa.edw.connection`, :mod:`~kappa.edw.schema`, :mod:`~kappa.edw.evolution`: the
  connection, the tables from the catalogue and how they may evolve;
* :mod:`~kappa.edw.ledger`, :mod:`~kappa.edw.copy`, :mod:`~kappa.edw.commit`,
  :mod:`~kappa.edw.poison`: the ledger, COPY, the batch commit and the isolation of records
  the database refuses;
* :mod:`~kappa.edw.checkpoints`, :mod:`~kappa.edw.window`, :mod:`~kappa.edw.replay`: state
  checkpoints per partition, replacing a partition, replaying an asset.
"""
