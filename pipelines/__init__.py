"""Composition: the one Definitions object of the code location."""
