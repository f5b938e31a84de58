"""Example deployments built on kappa: catalogues, steps and simulators."""
