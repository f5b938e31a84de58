import pytest

from kappa.exceptions import ConfigurationError
from kappa.settings import SETTINGS, Settings, postgres_url, redact


def test_defaults_load_and_point_at_the_local_stack():
    settings = Settings.from_env({})
    assert settings.uses_local_broker and settings.uses_embedded_postgres
    assert settings.resolved_bootstrap_servers == "127.0.0.1:19092"
    assert settings.resolved_edw_url == "postgresql://postgres@127.0.0.1:55432/kappa_edw"
    assert (settings.stream("fact_order").topic, settings.stream("fact_payment").topic) == (
        "orders",
        "payments",
    )


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("KAFKA_BOOTSTRAP_SERVERS", "localhost", "is not host:port"),
        ("KAFKA_BOOTSTRAP_SERVERS", "broker:99999", "is not host:port"),
        ("KAPPA_EDW_URL", "not a url", "not a database URL"),
        ("KAPPA_EDW_URL", "mysql://u@h/db", "expected a postgresql:// URL"),
        ("KAPPA_EDW_URL", "postgresql://u@h", "names no database"),
        ("KAPPA_DAGSTER_PG_URL", "sqlite:///x.db", "expected a postgresql:// URL"),
        ("KAPPA_EDW_SCHEMA", "edw; drop table x", "not a valid identifier"),
        ("KAPPA_META_SCHEMA", "Kappa", "not a valid identifier"),
        ("KAPPA_TOPIC_ORDERS", "orders topic", "not a legal topic name"),
        ("KAPPA_TOPIC_PARTITIONS", "four", "expected a whole number"),
        ("KAPPA_TOPIC_PARTITIONS", "0", "outside"),
        ("KAPPA_FRESHNESS_MAX_LAG_S", "0.5", "outside"),
        ("KAPPA_SENSOR_INTERVAL_S", "", "expected a whole number"),
    ],
)
def test_a_bad_value_fails_with_the_setting_named(name, value, fragment):
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({name: value})
    assert caught.value.setting == name
    assert str(caught.value).startswith(f"{name}: ")
    assert fragment in str(caught.value)


def test_conflicting_values_name_the_second_setting():
    with pytest.raises(
        ConfigurationError,
        match="^KAPPA_CATALOG: .*streams fact_order and fact_payment both read topic 'x' "
        r"\(from KAPPA_TOPIC_PAYMENTS\)",
    ):
        Settings.from_env({"KAPPA_TOPIC_ORDERS": "x", "KAPPA_TOPIC_PAYMENTS": "x"})
    with pytest.raises(ConfigurationError, match="^KAPPA_RUN_MAX_RECORDS: "):
        Settings.from_env({"KAPPA_BATCH_MAX_RECORDS": "100", "KAPPA_RUN_MAX_RECORDS": "10"})


def test_urls_are_normalised_and_passwords_redacted():
    url = postgresql = postgres_url("KAPPA_EDW_URL", "postgresql+psycopg://etl:s3cret@db:5433/edw")
    assert postgresql == "postgresql://etl:s3cret@db:5433/edw"
    assert "s3cret" not in redact(url)
    assert "***" in redact(url)


def test_every_setting_is_documented_in_the_readme():
    from pathlib import Path

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    missing = [s.name for s in SETTINGS if f"`{s.name}`" not in readme]
    assert not missing, f"settings missing from the README's configuration table: {missing}"


def test_broker_storage_is_memory_unless_durable_is_asked_for():
    assert Settings.from_env({}).broker_storage == "memory"
    assert Settings.from_env({"KAPPA_BROKER_STORAGE": "Durable"}).broker_storage == "durable"
    settings = Settings.from_env({"KAPPA_HOME": "/tmp/kappa-home"})
    assert settings.broker_data_dir == settings.home / "broker"
    with pytest.raises(ConfigurationError, match="^KAPPA_BROKER_STORAGE: .*'s3'"):
        Settings.from_env({"KAPPA_BROKER_STORAGE": "s3"})


def test_a_runs_memory_bound_is_its_own_setting():
    from kappa.ingest.budget import RUN_MEMORY_RECORDS

    assert Settings.from_env({}).run_memory_records == RUN_MEMORY_RECORDS == 20_000
    # Below the batch bound: a larger batch loads alone, the bound limits what loads beside it.
    bound = Settings.from_env({"KAPPA_BATCH_MAX_RECORDS": "100", "KAPPA_RUN_MEMORY_RECORDS": "40"})
    assert (bound.batch_max_records, bound.run_memory_records) == (100, 40)
    for bad in ("lots", "0"):
        with pytest.raises(ConfigurationError, match="^KAPPA_RUN_MEMORY_RECORDS: "):
            Settings.from_env({"KAPPA_RUN_MEMORY_RECORDS": bad})
