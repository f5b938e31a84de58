"""Benchmarks: measurements of the product's claims, run as commands (not tests)."""
