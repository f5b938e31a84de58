"""What the Celery broker and result backend of the local default keep of finished runs is
deleted: delivered messages of kombu's SQLAlchemy transport and expired task results of the
database backend, on a real PostgreSQL, while what is still to come stays."""

from __future__ import annotations

import psycopg
import pytest
from celery import Celery, states
from kombu import Connection

from kappa.dagster.celery_storage import clean_celery_storage
from kappa.settings import Settings

pytestmark = pytest.mark.integration


def test_delivered_messages_and_expired_results_are_deleted_and_the_rest_stays(database_url):
    settings = Settings.from_env({"KAPPA_DAGSTER_PG_URL": database_url})
    app = Celery(
        broker=settings.resolved_celery_broker_url, backend=settings.resolved_celery_backend_url
    )
    app.conf.result_expires = 3600
    with Connection(app.conf.broker_url) as conn:
        queue = conn.SimpleQueue("kappa-live")
        for n in range(3):
            queue.put({"run": n})
        delivered = queue.get(timeout=5)  # taken by a worker: kept by kombu, not visible
        delivered.ack()
        queue.close()
    app.backend.store_result("old-task", 1, states.SUCCESS)
    app.backend.store_result("new-task", 2, states.SUCCESS)
    with psycopg.connect(database_url, autocommit=True) as pg:
        pg.execute(
            "UPDATE celery_taskmeta SET date_done = date_done - interval '2 hours' "
            "WHERE task_id = 'old-task'"
        )
        before = pg.execute(
            "SELECT visible, count(*) FROM kombu_message GROUP BY 1 ORDER BY 1"
        ).fetchall()
    assert before == [(False, 1), (True, 2)]

    cleaned = clean_celery_storage(app)

    assert cleaned.delivered_messages == 1 and cleaned.expired_results
    with psycopg.connect(database_url, autocommit=True) as pg:
        after = pg.execute("SELECT visible, count(*) FROM kombu_message GROUP BY 1").fetchall()
        results = pg.execute("SELECT task_id FROM celery_taskmeta ORDER BY 1").fetchall()
    assert after == [(True, 2)]
    assert results == [("new-task",)]
    # The two messages still to come are delivered as before.
    with Connection(app.conf.broker_url) as conn:
        queue = conn.SimpleQueue("kappa-live")
        assert sorted(queue.get(timeout=5).payload["run"] for _ in range(2)) == [1, 2]
        queue.close()


PREPARE = """
import sys
from celery import Celery
from kappa.dagster.celery_storage import prepare_celery_storage
app = Celery(broker=sys.argv[1], backend=sys.argv[2])
prepare_celery_storage(app)
"""


def test_workers_starting_together_on_a_new_database_all_come_up(database_url):
    """Each worker creates the broker's and backend's tables as it starts; on a new database
    several at once collide (the loser used to die: IntegrityError on queue_id_sequence)."""
    import subprocess
    import sys

    settings = Settings.from_env({"KAPPA_DAGSTER_PG_URL": database_url})
    urls = [settings.resolved_celery_broker_url, settings.resolved_celery_backend_url]
    procs = [
        subprocess.Popen([sys.executable, "-c", PREPARE, *urls], stderr=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    outcomes = [(p.wait(120), p.stderr.read() if p.stderr else "") for p in procs]
    assert all(code == 0 for code, _ in outcomes), outcomes
    with psycopg.connect(database_url, autocommit=True) as pg:
        tables = {
            name
            for (name,) in pg.execute(
                "SELECT tablename FROM pg_tables WHERE tablename IN "
                "('kombu_queue', 'kombu_message', 'celery_taskmeta', 'celery_tasksetmeta')"
            ).fetchall()
        }
    assert tables == {"kombu_queue", "kombu_message", "celery_taskmeta", "celery_tasksetmeta"}
