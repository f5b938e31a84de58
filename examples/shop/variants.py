"""The shop's catalogue with every captured table in PostgreSQL.

``catalog.yaml`` captures the call centre's calls from MariaDB. The tests of the PostgreSQL
capture, the benchmarks and the chaos suite drive the calls through the OLTP database's
writers instead; :func:`postgres_catalog` writes that variant (the same streams, steps and
tables, each MariaDB table moved to ``public.<table>`` with the change table
``cdc.<table>_changes``) for them to name in ``KAPPA_CATALOG``. It lives beside
``catalog.yaml`` (``.catalog.postgres.yaml``, not versioned), so its ``local:`` modules
import and run from the repository root as the shipped catalogue's do.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from kappa.settings import REPO_ROOT


def postgres_catalog(source: Path = REPO_ROOT / "catalog.yaml") -> Path:
    """Write ``source`` with its MariaDB tables moved to PostgreSQL beside it; return the
    file's path. The file is replaced atomically, so concurrent writers agree."""
    document = yaml.safe_load(source.read_text())
    for table in document.get("tables") or []:
        if table.get("engine") == "mariadb":
            name = table["source"].split(".")[-1]
            table.pop("engine")
            table["source"] = f"public.{name}"
            table["change_table"] = f"cdc.{name}_changes"
    path = source.parent / ".catalog.postgres.yaml"
    partial = source.parent / f".catalog.postgres.yaml.{os.getpid()}"
    partial.write_text(yaml.safe_dump(document, sort_keys=False))
    partial.replace(path)
    return path
