"""Execute one micro-batch run in this process, so a test can SIGKILL it mid-batch.

Usage: python -m tests.integration.run_batch '<run config as JSON>' '<tags as JSON>' [partition]
(the deployment comes from the environment, as in a Dagster run worker).
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
    result = job.execute_in_process(
        run_config=run_config,
        instance=dg.DagsterInstance.ephemeral(),
        tags=tags,
        partition_key=sys.argv[3] if len(sys.argv) > 3 else None,
    )
    sys.exit(0 if result.success else 1)
