"""Fact rows go straight into the fact table with COPY; an event the table holds already
sends the batch through the staging table, where the duplicate is settled (real PostgreSQL)."""

import uuid

import pandas as pd
import psycopg
import pytest
from psycopg import sql

from kappa.edw.commit import load_rows

pytestmark = pytest.mark.integration


def _table(conn: psycopg.Connection) -> sql.Identifier:
    name = f"fact_load_{uuid.uuid4().hex[:8]}"
    conn.execute(
        sql.SQL(
            "CREATE TABLE {} (event_id uuid PRIMARY KEY, note text NOT NULL, "
            "amount numeric(12, 2), kafka_offset bigint NOT NULL)"
        ).format(sql.Identifier(name))
    )
    return sql.Identifier(name)


def _rows(ids: list[uuid.UUID], offsets: list[int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "event_id": pd.Series([str(i) for i in ids], dtype="string"),
            "note": pd.Series([f"n\t{o}\\" if o % 2 else "" for o in offsets], dtype="string"),
            "amount": [19.99] * len(offsets),
            "kafka_offset": offsets,
        }
    )


def test_new_rows_are_copied_exactly_and_a_held_event_is_settled_not_refused(database_url: str):
    ids = [uuid.uuid4() for _ in range(6)]
    with psycopg.connect(database_url, autocommit=True) as conn:
        fact = _table(conn)
        try:
            with conn.transaction():
                assert load_rows(conn, fact, "stage_fact_load", _rows(ids[:3], [2, 0, 1])) == 3
            with conn.transaction():
                # ids[2] is in the table already: the batch loads the others, nothing fails.
                assert load_rows(conn, fact, "stage_fact_load", _rows(ids[2:], [3, 4, 5, 6])) == 3
            got = conn.execute(
                sql.SQL(
                    "SELECT event_id, note, amount::text, kafka_offset FROM {} ORDER BY kafka_offset"
                ).format(fact)
            ).fetchall()
        finally:
            conn.execute(sql.SQL("DROP TABLE {}").format(fact))
    assert got == [
        (ids[1], "", "19.99", 0),
        (ids[2], "n\t1\\", "19.99", 1),
        (ids[0], "", "19.99", 2),
        (ids[3], "", "19.99", 4),
        (ids[4], "n\t5\\", "19.99", 5),
        (ids[5], "", "19.99", 6),
    ]
