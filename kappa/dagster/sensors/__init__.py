"""Sensors built from a catalogue: offsets of topics, transactions of change tables, heals."""
