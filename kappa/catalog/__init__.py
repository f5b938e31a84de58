"""The catalogue (``catalog.yaml``): every source a deployment loads, as configuration.

* :mod:`~kappa.catalog.streams`: event streams (topic, key, event types, schema versions,
  payload fields, target table, step), with :mod:`~kappa.catalog.fields` the field types;
* :mod:`~kappa.catalog.captures`: captured OLTP tables (source, keys, columns, target, mode);
* :mod:`~kappa.catalog.ingests`: the streams with their steps built, as the runs load them;
* :mod:`~kappa.catalog.files`: reading the file, and errors that name file, stream and field.
"""
