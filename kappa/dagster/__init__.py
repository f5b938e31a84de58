"""kappa's Dagster integration: assets, checks, sensors and resources built from a catalogue.

A code location's ``definitions.py`` calls :func:`kappa.dagster.definitions.build_definitions`
and merges its own assets into the result; it never copies these modules.
"""
