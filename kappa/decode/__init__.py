"""Decoding raw records against a stream's contract: :mod:`~kappa.decode.batch` (the envelope,
deduplication, dead letters) and :mod:`~kappa.decode.columns` (each field type's checks)."""
