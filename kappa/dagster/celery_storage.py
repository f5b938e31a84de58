"""What the Celery broker and result backend keep of finished runs, deleted as runs go on.

Every run launched on Celery leaves a row in each of the local default's two tables:

* kombu's SQLAlchemy transport (``sqla+postgresql://``) keeps a delivered message in
  ``kombu_message`` for good (``visible`` false; kombu itself never reads it again: a message
  a worker did not acknowledge is put back as a new one);
* Celery's database result backend (``db+postgresql://``) keeps a task's state in
  ``celery_taskmeta``; its ``result_expires`` applies only when something calls the
  backend's cleanup (Celery's beat would, and the stack runs none).

At the default cadence that is tens of thousands of rows a day. :func:`clean_celery_storage`
deletes the delivered messages and the expired results; the run launcher calls it at most
every :data:`CLEAN_EVERY_S` as it launches runs. Redis (and AMQP) expire or drop their own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy
from celery import Celery
from celery.backends.database import DatabaseBackend

#: Seconds between two cleanups by the launcher.
CLEAN_EVERY_S = 600.0
#: kombu's default name of its messages table (``message_tablename`` transport option).
_MESSAGES = "kombu_message"


@dataclass(frozen=True)
class Cleaned:
    """What one cleanup deleted (None: that side keeps nothing of its own to delete)."""

    delivered_messages: int | None
    expired_results: bool


def clean_celery_storage(app: Celery) -> Cleaned:
    """Delete the delivered messages of an SQLAlchemy broker and the expired results of a
    database result backend of ``app``; other brokers and backends are left alone."""
    delivered = None
    broker = str(app.conf.broker_url or "")
    if broker.startswith("sqla+"):
        table = str(app.conf.broker_transport_options.get("message_tablename", _MESSAGES))
        engine = sqlalchemy.create_engine(
            broker.removeprefix("sqla+"), poolclass=sqlalchemy.NullPool
        )
        try:
            with engine.begin() as conn:
                if sqlalchemy.inspect(conn).has_table(table):
                    messages = sqlalchemy.table(table, sqlalchemy.column("visible"))
                    result = conn.execute(
                        sqlalchemy.delete(messages).where(messages.c.visible.is_(False))
                    )
                    delivered = result.rowcount
                else:
                    delivered = 0
        finally:
            engine.dispose()
    backend = app.backend
    expired = isinstance(backend, DatabaseBackend)
    if expired:
        backend.cleanup()
    return Cleaned(delivered_messages=delivered, expired_results=expired)


def prepare_celery_storage(app: Celery, *, attempts: int = 5) -> None:
    """Create the tables of an SQLAlchemy broker and of a database result backend of ``app``
    before a worker consumes (both create them on first use, idempotently).

    Two workers starting at once on a new database (``kappa up --reset`` starts the live and
    the backfill worker together; workers on several machines) would both create them, and
    the one that loses the race dies at startup (``IntegrityError`` on kombu's
    ``queue_id_sequence``). A collision is retried: the other worker has created the table
    by then."""
    for attempt in range(attempts):
        try:
            if str(app.conf.broker_url or "").startswith("sqla+"):
                with app.connection_for_write() as conn:
                    conn.default_channel.session  # noqa: B018 (kombu creates its tables here)
            backend = app.backend
            if isinstance(backend, DatabaseBackend):
                backend.ResultSession().close()
            return
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
