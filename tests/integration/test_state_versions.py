"""The durable state tier keeps versions by position: the state at any batch boundary can
be restored, and rewinding forgets exactly what came after."""

import pytest

from kappa.edw.connection import connect
from kappa.state.postgres import PostgresStateBackend
from tests.integration.harness import Pipeline

pytestmark = pytest.mark.integration


def state_at(
    pipeline: Pipeline, backend: PostgresStateBackend, store: str, shard: int, as_of: int | None
) -> dict:
    with connect(pipeline.edw_url) as conn:
        return backend.load(conn, store, shard, backend.keys(conn, store, shard), as_of=as_of)


def test_the_state_as_of_every_batch_boundary_can_be_restored(pipeline_env, instance, monkeypatch):
    monkeypatch.setenv("KAPPA_BATCH_MAX_RECORDS", "25")
    pipeline = Pipeline(env={**pipeline_env, "KAPPA_BATCH_MAX_RECORDS": "25"}, instance=instance)
    backend = PostgresStateBackend(pipeline.schemas)
    store = "fact_order/order_stats"
    pipeline.simulate(500, invalid_rate=0.0, duplicate_rate=0.0)
    seen: dict[int, dict] = {}
    for _ in range(100):
        result = pipeline.tick("fact_order")
        if not result.run_requests:
            break
        [request] = result.run_requests
        pipeline.execute(request)
        for shard, end in pipeline.query(
            "SELECT shard, end_position FROM kappa.ledger_head WHERE asset = 'fact_order'"
        ):
            seen.setdefault(shard, {})[end] = state_at(pipeline, backend, store, shard, None)
    shard, snapshots = max(seen.items(), key=lambda item: len(item[1]))
    assert len(snapshots) >= 3, "several batches per partition"
    for end, snapshot in snapshots.items():
        assert state_at(pipeline, backend, store, shard, end) == snapshot, (
            f"state as of offset {end}"
        )

    first, *_, last = sorted(snapshots)
    with connect(pipeline.edw_url) as conn, conn.transaction():
        assert backend.rewind(conn, store, shard, first) > 0
    assert state_at(pipeline, backend, store, shard, None) == snapshots[first]
    assert state_at(pipeline, backend, store, shard, last) == snapshots[first], (
        "nothing after the rewind point"
    )
