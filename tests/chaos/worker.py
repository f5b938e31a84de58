"""One micro-batch run in its own process, as a Dagster run worker would execute it.

Usage: python -m tests.chaos.worker '<run config JSON>' '<tags JSON>' [partition key]

Prints ``ready`` once the code location is loaded (just before the run starts), so a test
can SIGKILL it at a random point of the run itself rather than of the imports.
"""

import json
import sys

import dagster as dg

from kappa.settings import Settings
from pipelines.definitions import build_definitions

if __name__ == "__main__":
    run_config, tags = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    defs = build_definitions(Settings.from_env())
    job = defs.resolve_implicit_global_asset_job_def().get_subset(
        asset_selection=set(defs.resolve_assets_def(tags["kappa/asset"]).keys),
        asset_check_selection=set(),
    )
    with dg.DagsterInstance.ephemeral() as instance:
        print("ready", flush=True)
        result = job.execute_in_process(
            run_config=run_config,
            instance=instance,
            tags=tags,
            partition_key=sys.argv[3] if len(sys.argv) > 3 else None,
        )
    sys.exit(0 if result.success else 1)
