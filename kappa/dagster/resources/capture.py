"""The change source of a captured table, opened through the resource of its engine."""

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from kappa.catalog.captures import CaptureSpec
from kappa.sources.base import ChangeSource
from kappa.sources.pg_capture import ChangeTable

#: The resource key that reaches a captured table, per engine (``engine:`` in the catalogue).
CAPTURE_RESOURCE = {"postgresql": "oltp", "mariadb": "mariadb"}


def capture_resource(spec: CaptureSpec) -> str:
    return CAPTURE_RESOURCE[spec.engine]


@contextmanager
def open_capture(
    resources: Any, spec: CaptureSpec, *, statement_timeout_s: float | None = None
) -> Iterator[ChangeSource]:
    """``spec``'s change source from a run's, check's or sensor's ``resources`` (which hold
    :func:`capture_resource`), closed on exit. ``statement_timeout_s`` bounds each statement
    on PostgreSQL; the binlog reader reads at most up to the server's current end."""
    if spec.engine == "mariadb":
        with resources.mariadb.open(spec) as table:
            yield table
        return
    with resources.oltp.connect(statement_timeout_s=statement_timeout_s) as conn:
        yield ChangeTable(conn, spec)
