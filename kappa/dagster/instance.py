"""The deployment's Dagster instance, opened from the library (``kappa status``, retention).

The instance is the deployment's: ``DAGSTER_HOME`` when set, else the one ``kappa up``
writes to ``$KAPPA_HOME/dagster`` (its storage at ``KAPPA_DAGSTER_PG_URL`` or the embedded
PostgreSQL).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from kappa.exceptions import KappaError
from kappa.settings import Settings

if TYPE_CHECKING:
    import dagster as dg


class InstanceUnavailable(KappaError):
    """No Dagster instance to read check results from."""


@contextmanager
def open_instance(settings: Settings) -> Iterator[dg.DagsterInstance]:
    """The deployment's Dagster instance (see the module docstring)."""
    import dagster as dg

    from kappa.local.dagster_instance import dagster_environment

    if os.environ.get("DAGSTER_HOME"):
        home = Path(os.environ["DAGSTER_HOME"])
    else:
        home = settings.home / "dagster"
        if not (home / "dagster.yaml").exists():
            raise InstanceUnavailable(
                f"no Dagster instance: DAGSTER_HOME is not set and {home / 'dagster.yaml'} "
                "does not exist (`kappa up` writes it)"
            )
        os.environ.update(dagster_environment(settings, home))
    try:
        instance = dg.DagsterInstance.from_config(str(home))
    except Exception as exc:
        raise InstanceUnavailable(
            f"the Dagster instance in {home} did not open: {type(exc).__name__}: {exc}"
        ) from None
    with instance:
        yield instance
