"""This code location's resources are kappa's (:mod:`kappa.dagster.resources`), configured by
:func:`kappa.dagster.definitions.resources` from the environment; a deployment that needs
others (another secret store, say) builds them here and passes them to ``Definitions``."""
