"""The sources the engine reads: positions, bounds and records.

* :mod:`~kappa.sources.base`: the types every source hands over (no client library);
* :mod:`~kappa.sources.topic`: topic partitions of a Kafka-API event store (kafka-python);
* :mod:`~kappa.sources.pg_capture`: PostgreSQL change tables filled by capture triggers.
"""
