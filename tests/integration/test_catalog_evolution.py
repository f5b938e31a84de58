"""Schema evolution at `kappa init`: the catalogue against the existing EDW tables of a real
PostgreSQL. New nullable fields are added (once); a type change or a removed required field
is refused, naming the file, the stream, the field and both types, before anything is
written."""

import uuid
from pathlib import Path

import psycopg
import pytest
from kafka.admin import KafkaAdminClient

from kappa import cli
from kappa.catalog.streams import load_streams
from kappa.edw.connection import connect
from kappa.edw.evolution import table_columns
from kappa.edw.schema import ensure_schema
from kappa.edw.types import Schemas
from kappa.exceptions import ConfigurationError

pytestmark = pytest.mark.integration

SCHEMAS = Schemas()

V1 = """
streams:
  - name: fact_parcel
    topic: TOPIC_PARCEL
    key_field: parcel_id
    event_types: [parcel_sent]
    schema_versions: [1, 2]
    fields:
      parcel_id: text
      weight_g: bigint
      sent_on: date
  - name: fact_scan
    topic: TOPIC_SCAN
    key_field: scan_id
    event_types: [parcel_scanned]
    schema_versions: [1]
    fields:
      scan_id: uuid
      ok: boolean
"""
V2 = V1.replace(
    "      sent_on: date\n",
    "      sent_on: date\n      insured: {type: boolean, nullable: true, since: 2}\n",
)


def write(tmp_path: Path, text: str, name: str = "catalog.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def columns(url: str, table: str) -> dict[str, tuple[str, bool]]:
    with connect(url) as conn:
        found = table_columns(conn, SCHEMAS.edw, table)
    assert found is not None
    return {name: (c.sql_type, c.not_null) for name, c in found.items()}


def test_a_new_nullable_field_is_added_once_and_existing_rows_keep_their_values(
    database_url, tmp_path
):
    with connect(database_url) as conn:
        assert ensure_schema(conn, SCHEMAS, load_streams(write(tmp_path, V1))) == []
        conn.execute(
            "INSERT INTO edw.fact_parcel (event_id, parcel_id, weight_g, sent_on, event_time, "
            "source, schema_version, topic, kafka_partition, kafka_offset, broker_time) VALUES "
            "(gen_random_uuid(), 'p-1', 9000000000, '2026-01-02', now(), 's', 1, 't', 0, 0, now())"
        )
        v2 = load_streams(write(tmp_path, V2))
        assert ensure_schema(conn, SCHEMAS, v2) == ["fact_parcel: add column insured boolean"]
        assert ensure_schema(conn, SCHEMAS, v2) == [], (
            "applied once: the second run changes nothing"
        )
        row = conn.execute(
            "SELECT parcel_id, weight_g, sent_on::text, insured FROM edw.fact_parcel"
        ).fetchall()
    assert row == [("p-1", 9000000000, "2026-01-02", None)]
    found = columns(database_url, "fact_parcel")
    assert found["insured"] == ("boolean", False)
    assert found["weight_g"] == ("bigint", True) and found["sent_on"] == ("date", True)


def test_a_type_change_is_refused_before_anything_is_written(database_url, tmp_path):
    with connect(database_url) as conn:
        ensure_schema(conn, SCHEMAS, load_streams(write(tmp_path, V1)))
    before = {t: columns(database_url, t) for t in ("fact_parcel", "fact_scan")}
    # fact_scan gains a nullable field (allowed) while fact_parcel changes a type (refused):
    # neither is applied.
    changed = V1.replace("weight_g: bigint", "weight_g: integer").replace(
        "      ok: boolean\n", "      ok: boolean\n      note: {type: text, nullable: true}\n"
    )
    path = write(tmp_path, changed, "changed.yaml")
    with connect(database_url) as conn, pytest.raises(ConfigurationError) as caught:
        ensure_schema(conn, SCHEMAS, load_streams(path))
    assert str(caught.value) == (
        f"KAPPA_CATALOG: {path}: stream fact_parcel, field weight_g: the table's type is bigint, "
        "the catalogue's is integer (a type change is not applied)"
    )
    assert {t: columns(database_url, t) for t in before} == before


def test_a_removed_required_field_and_a_new_required_field_are_refused(database_url, tmp_path):
    with connect(database_url) as conn:
        ensure_schema(conn, SCHEMAS, load_streams(write(tmp_path, V1)))
        changed = V1.replace("      sent_on: date\n", "      sent_by: text\n")
        path = write(tmp_path, changed, "changed.yaml")
        with pytest.raises(ConfigurationError) as caught:
            ensure_schema(conn, SCHEMAS, load_streams(path))
    message = str(caught.value)
    assert (
        f"{path}: stream fact_parcel, field sent_by: new field of type text must be nullable"
        in (message)
    )
    assert (
        f"{path}: stream fact_parcel, field sent_on: the table's required column (date) is not "
        in (message)
    )
    assert "sent_by" not in columns(database_url, "fact_parcel")


def test_kappa_init_creates_every_stream_and_refuses_a_type_change_before_creating_topics(
    database_url, broker, tmp_path, monkeypatch, capsys
):
    suffix = uuid.uuid4().hex[:8]
    text = V1.replace("TOPIC_PARCEL", f"parcels-{suffix}").replace("TOPIC_SCAN", f"scans-{suffix}")
    for name, value in {
        "KAFKA_BOOTSTRAP_SERVERS": broker,
        "KAPPA_EDW_URL": database_url,
        "KAPPA_OLTP_URL": database_url,
        "KAPPA_CATALOG": str(write(tmp_path, text)),
    }.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["init"]) == 0, capsys.readouterr().err
    assert set(columns(database_url, "fact_scan")) >= {"scan_id", "ok", "event_id", "kafka_offset"}
    assert "weight_g" in columns(database_url, "fact_parcel")

    refused = text.replace("weight_g: bigint", 'weight_g: "numeric(12,0)"').replace(
        f"scans-{suffix}", f"scans2-{suffix}"
    )
    monkeypatch.setenv("KAPPA_CATALOG", str(write(tmp_path, refused, "refused.yaml")))
    assert cli.main(["init"]) == 2
    err = capsys.readouterr().err
    assert (
        "stream fact_parcel, field weight_g: the table's type is bigint, the catalogue's is " in err
    )
    assert "numeric(12,0)" in err and "Traceback" not in err
    admin = KafkaAdminClient(bootstrap_servers=broker)
    try:
        topics = set(admin.list_topics())
    finally:
        admin.close()
    assert f"parcels-{suffix}" in topics and f"scans-{suffix}" in topics
    assert f"scans2-{suffix}" not in topics, "refused before any topic was created"
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM edw.fact_parcel").fetchone() == (0,)
