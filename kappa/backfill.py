"""Launch and follow Dagster backfills through the webserver's GraphQL API, as the UI does.

For scripts and runbooks: ``kappa backfill <asset> --from 2026-11-20`` asks the running
Dagster webserver for the same partition backfill a user would launch from the asset's
Partitions tab; the daemon runs it.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any

from kappa.exceptions import KappaError

_LAUNCH = """
mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
    ... on Error { message }
  }
}
"""

_STATUS = """
query Status($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { id status }
    ... on PythonError { message }
    ... on Error { message }
  }
}
"""

#: Statuses after which a backfill does nothing more.
DONE = {"COMPLETED", "COMPLETED_SUCCESS", "COMPLETED_FAILED", "FAILED", "CANCELED"}
SUCCEEDED = {"COMPLETED", "COMPLETED_SUCCESS"}


class BackfillError(KappaError):
    """The webserver refused or failed a backfill."""


def graphql(url: str, query: str, variables: dict[str, Any], *, timeout_s: float = 30) -> Any:
    request = urllib.request.Request(
        f"{url.rstrip('/')}/graphql",
        data=json.dumps({"query": query, "variables": variables}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            body = json.load(response)
    except (urllib.error.URLError, OSError) as exc:
        raise BackfillError(
            f"the Dagster webserver at {url} does not answer ({exc}); start it with `kappa up`"
        ) from None
    if body.get("errors"):
        raise BackfillError(f"GraphQL error: {body['errors'][0].get('message')}")
    return body["data"]


def launch_backfill(
    url: str, assets: Sequence[str], partitions: Sequence[str], *, title: str
) -> str:
    """Launch a backfill of ``partitions`` of ``assets``; returns its id."""
    data = graphql(
        url,
        _LAUNCH,
        {
            "params": {
                "assetSelection": [{"path": asset.split("/")} for asset in assets],
                "partitionNames": list(partitions),
                "title": title,
                "tags": [{"key": "kappa/launched_by", "value": "kappa backfill"}],
            }
        },
    )["launchPartitionBackfill"]
    if data["__typename"] != "LaunchBackfillSuccess":
        raise BackfillError(f"backfill refused: {data.get('message', data['__typename'])}")
    return str(data["backfillId"])


def backfill_status(url: str, backfill_id: str) -> str:
    data = graphql(url, _STATUS, {"id": backfill_id})["partitionBackfillOrError"]
    if data["__typename"] != "PartitionBackfill":
        raise BackfillError(f"backfill {backfill_id}: {data.get('message', data['__typename'])}")
    return str(data["status"])


def wait_for_backfill(url: str, backfill_id: str, *, timeout_s: float, poll_s: float = 2.0) -> str:
    """Poll until the backfill is done; its final status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = backfill_status(url, backfill_id)
        if status in DONE:
            return status
        if time.monotonic() >= deadline:
            raise BackfillError(f"backfill {backfill_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)
