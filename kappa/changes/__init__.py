"""Applying a batch of captured changes to the EDW: SCD type 2 dimensions, current-state tables.

Changes are validated with pandas (unknown operation, malformed row images become dead
letters), staged with COPY, and merged in set-based SQL inside the batch's ledger
transaction. The results do not depend on how the changes were cut into batches:

* SCD2: a version is valid from its change time, clamped so versions of one key never go
  back in time along the (xid, change_id) order (a transaction that commits later may have
  started earlier); it is valid until the next change of its key; a delete closes the
  current version. The surrogate key is the change id, so a replay rebuilds the same keys.
* current: the last change of each key wins; a delete removes the row.
"""
