"""Loading the catalogue's streams: what a valid stream becomes, and how each mistake is
refused naming the file, the stream and the field."""

from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from kappa.catalog.streams import fact_column_specs, load_streams
from kappa.exceptions import ConfigurationError
from kappa.settings import REPO_ROOT, Settings

GOOD = """
streams:
  - name: fact_shipment
    topic: shipments
    key_field: shipment_id
    event_types: [shipment_sent, shipment_resent]
    schema_versions: [1, 2]
    description: Shipments.
    fields:
      shipment_id: uuid
      weight_g: {type: bigint, min: 1}
      price: "numeric(10,3)"
      fragile: boolean
      sent_on: date
      label: {type: text, max_length: 64}
      carrier: {type: enum, values: [dhl, ups]}
      extra: {type: jsonb, nullable: true}
      tracking: {type: text, nullable: true, since: 2}
    max_future_skew: 15m
    max_age: 30d
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path


def test_the_shipped_catalogue_declares_the_demo_streams_with_their_steps():
    streams = {s.name: s for s in load_streams(REPO_ROOT / "catalog.yaml")}
    assert sorted(streams) == ["fact_order", "fact_payment"]
    order = streams["fact_order"]
    assert (order.topic, order.topic_env, order.key_field) == (
        "orders",
        "KAPPA_TOPIC_ORDERS",
        "customer_id",
    )
    assert [(f.name, f.sql_type) for f in order.fields] == [
        ("order_id", "text"),
        ("customer_id", "text"),
        ("amount", "numeric(14,2)"),
        ("currency", "char(3)"),
        ("item_count", "integer"),
        ("channel", "text"),
    ]
    assert order.field("amount").type.exclusive_min == 0
    assert order.field("item_count").type.minimum == 1
    assert streams["fact_payment"].field("status").type.values == ("approved", "declined")
    # The derived columns come from the step class.
    assert ("fraud_score", "numeric(4, 3)") in streams["fact_payment"].derived
    assert ("customer_orders_before", "integer") in order.derived


def test_a_valid_stream_becomes_a_contract_with_its_types_and_limits(tmp_path):
    [stream] = load_streams(write(tmp_path, GOOD))
    assert stream.table == "fact_shipment" and stream.topic == "shipments"
    assert stream.event_types == ("shipment_sent", "shipment_resent")
    assert stream.schema_versions == frozenset({1, 2})
    assert stream.max_future_skew == timedelta(minutes=15)
    assert stream.max_age == timedelta(days=30)
    assert stream.max_message_bytes == 1024 * 1024
    assert stream.derived == () and stream.step is None
    assert stream.field("price").type.precision == 10 and stream.field("price").sql_type == (
        "numeric(10,3)"
    )
    assert stream.field("tracking").since == 2
    columns = {c.name: (c.sql_type, c.not_null) for c in fact_column_specs(stream)}
    assert columns["weight_g"] == ("bigint", True)
    assert columns["extra"] == ("jsonb", False)
    assert columns["carrier"] == ("text", True)
    assert columns["event_id"] == ("uuid", True)


def test_the_topic_defaults_to_the_name_and_topic_env_overrides_it(tmp_path):
    text = GOOD.replace("    topic: shipments\n", "    topic_env: SHIPMENTS_TOPIC\n")
    [stream] = load_streams(write(tmp_path, text))
    assert stream.topic == "fact_shipment"
    [stream] = load_streams(write(tmp_path, text), {"SHIPMENTS_TOPIC": "ship-2"})
    assert stream.topic == "ship-2"
    with pytest.raises(ConfigurationError, match="^SHIPMENTS_TOPIC: .*not a legal topic name"):
        load_streams(write(tmp_path, text), {"SHIPMENTS_TOPIC": "bad topic"})


@pytest.mark.parametrize(
    ("change", "field", "fragment"),
    [
        (("name: fact_shipment", "name: Fact-Shipment"), "name", "not a valid identifier"),
        (("label: {", "bad-label: {"), "bad-label", "not a valid identifier"),
        (('price: "numeric(10,3)"', "price: money"), "price", "unknown type 'money'"),
        (('price: "numeric(10,3)"', "price: numeric"), "price", "unknown type 'numeric'"),
        (('price: "numeric(10,3)"', 'price: "numeric(30,2)"'), "price", "precision must be"),
        (('price: "numeric(10,3)"', 'price: "numeric(2,3)"'), "price", "scale 0..precision"),
        (
            (
                "tracking: {type: text, nullable: true, since: 2}",
                "tracking: {type: text, since: 2}",
            ),
            "tracking",
            "since: 2 needs nullable: true",
        ),
        (
            (
                "tracking: {type: text, nullable: true, since: 2}",
                "tracking: {type: text, nullable: true, since: 3}",
            ),
            "tracking",
            "not one of the schema_versions",
        ),
        (("max_length: 64", "max_length: 64, min: 3"), "label", "do not apply to text"),
        (("values: [dhl, ups]", "values: []"), "carrier", "enum needs 'values'"),
        (("values: [dhl, ups]", "values: [dhl, dhl]"), "carrier", "enum needs 'values'"),
        (
            ("{type: bigint, min: 1}", "{type: bigint, min: 9223372036854775808}"),
            "weight_g",
            "outside the bigint range",
        ),
        (
            ("{type: bigint, min: 1}", "{type: bigint, min: 5, max: 2}"),
            "weight_g",
            "min is above max",
        ),
        (("max_length: 64", 'pattern: "["'), "label", "not a regular expression"),
        (
            ("fragile: boolean", "fragile: {type: boolean, nullable: maybe}"),
            "fragile",
            "nullable must be",
        ),
        (("key_field: shipment_id", "key_field: nobody"), "key_field", "not one of the fields"),
        (("key_field: shipment_id", "key_field: extra"), "key_field", "must be a required field"),
        (("label: {", "topic: {"), "topic", "envelope or source column"),
        (("max_age: 30d", "max_age: 30 days"), "max_age", "positive duration"),
        (("max_age: 30d", "max_age: 0s"), "max_age", "positive duration"),
        (("topic: shipments", 'topic: "ship ments"'), "topic", "not a legal topic name"),
        (
            ("event_types: [shipment_sent, shipment_resent]", "event_types: []"),
            "event_types",
            "non-empty list",
        ),
        (
            ("schema_versions: [1, 2]", "schema_versions: [0, 2]"),
            "schema_versions",
            "whole numbers >= 1",
        ),
        (
            ("description: Shipments.", "step: kappa.nowhere:Step"),
            "step",
            "cannot import kappa.nowhere",
        ),
        (
            ("description: Shipments.", "step: examples.shop.steps:NoSuchStep"),
            "step",
            "has no class NoSuchStep",
        ),
        (("description: Shipments.", "config: {a: 1}"), "config", "config is given but no step"),
        (
            (
                "description: Shipments.",
                "step: examples.shop.steps:OrderEnrichment\n    config: {speed: 3}",
            ),
            "config",
            "does not take this config",
        ),
    ],
)
def test_each_mistake_names_the_file_the_stream_and_the_field(tmp_path, change, field, fragment):
    old, new = change
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigurationError) as caught:
        load_streams(path)
    message = str(caught.value)
    stream = "Fact-Shipment" if field == "name" else "fact_shipment"
    assert message.startswith(f"KAPPA_CATALOG: {path}: stream {stream}, field {field}: "), message
    assert fragment in message, message


def test_a_missing_key_or_an_unknown_key_names_the_stream(tmp_path):
    path = write(tmp_path, GOOD.replace("    key_field: shipment_id\n", ""))
    with pytest.raises(ConfigurationError, match=r"stream fact_shipment: missing key_field$"):
        load_streams(path)
    path = write(tmp_path, GOOD.replace("description:", "descripton:"))
    with pytest.raises(ConfigurationError, match="stream fact_shipment: unknown key.*descripton"):
        load_streams(path)


def test_two_streams_on_one_topic_are_refused_naming_both(tmp_path):
    second = GOOD.split("streams:\n")[1].replace("fact_shipment", "fact_return")
    path = write(tmp_path, GOOD + second)
    with pytest.raises(ConfigurationError) as caught:
        load_streams(path)
    assert str(caught.value) == (
        f"KAPPA_CATALOG: {path}: streams fact_shipment and fact_return both read topic "
        "'shipments': each stream needs its own topic"
    )


def test_a_stream_named_like_a_captured_table_target_is_refused(tmp_path):
    text = GOOD.replace("name: fact_shipment", "name: dim_customer") + (
        "tables:\n  - {name: customers, target: dim_customer}\n"
    )
    with pytest.raises(ConfigurationError, match="stream dim_customer: name is also a table"):
        load_streams(write(tmp_path, text))


def test_a_missing_or_broken_catalogue_names_the_setting(tmp_path):
    with pytest.raises(ConfigurationError, match="^KAPPA_CATALOG: cannot read"):
        load_streams(tmp_path / "absent.yaml")
    with pytest.raises(ConfigurationError, match="^KAPPA_CATALOG: .* is not valid YAML"):
        load_streams(write(tmp_path, "streams: [unclosed"))
    with pytest.raises(ConfigurationError, match="unknown top-level key.*stream"):
        load_streams(write(tmp_path, "stream: []\n"))


def test_the_renamed_setting_is_refused_with_its_new_name(tmp_path):
    with pytest.raises(
        ConfigurationError, match="^KAPPA_CAPTURE_CONFIG: was renamed to KAPPA_CATALOG"
    ):
        Settings.from_env({"KAPPA_CAPTURE_CONFIG": "capture.yaml"})


def test_settings_load_the_catalogue_named_by_kappa_catalog(tmp_path):
    settings = Settings.from_env({"KAPPA_CATALOG": str(write(tmp_path, GOOD))})
    assert [s.name for s in settings.streams] == ["fact_shipment"]
    assert settings.stream("fact_shipment").field("price").type.precision == 10
    with pytest.raises(ConfigurationError, match="declares no stream 'fact_order'"):
        settings.stream("fact_order")
    assert settings.stream("fact_shipment").field("weight_g").type.minimum == 1
    assert (
        Decimal(0) == Settings.from_env({}).stream("fact_order").field("amount").type.exclusive_min
    )


def test_a_step_module_beside_the_catalogue_imports_from_any_working_directory(
    tmp_path, monkeypatch
):
    # The `kappa` console script's sys.path holds neither the working directory nor the
    # catalogue's: the catalogue's own modules must import all the same.
    package = tmp_path / "shipping_steps_beside"
    package.mkdir()
    (package / "__init__.py").write_text(
        "class Stamp:\n    def apply(self, context, rows):\n        return rows\n"
    )
    path = write(tmp_path, GOOD + "    step: shipping_steps_beside:Stamp\n")
    monkeypatch.chdir("/")
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", ".")])
    (contract,) = load_streams(path)
    assert contract.step == "shipping_steps_beside:Stamp"


def test_a_step_may_look_up_a_table_captured_from_mariadb():
    from kappa.catalog.captures import load_captures
    from kappa.catalog.ingests import topic_ingests

    settings = Settings.from_env({"KAPPA_CATALOG": str(REPO_ROOT / "catalog.yaml")})
    engines = {c.target: c.engine for c in load_captures(settings.catalog)}
    assert engines == {"dim_customer": "postgresql", "fact_call_center_call": "mariadb"}
    ingests = {spec.asset: spec for spec, _ in topic_ingests(settings)}
    step = ingests["fact_payment"].step
    assert step is not None
    assert "fact_call_center_call" in {lookup.target for lookup in step.lookups}


def test_captures_turned_off_are_left_out_and_an_unknown_name_is_refused():
    from kappa.sources.captured import OFF_SETTING, active_captures

    names = [c.name for c in active_captures(Settings.from_env({}))]  # the shipped catalogue
    assert names == ["customers", "call_center_calls"]
    off = Settings.from_env({OFF_SETTING: " call_center_calls ,"})
    assert [c.name for c in active_captures(off)] == ["customers"]
    with pytest.raises(ConfigurationError) as caught:
        active_captures(Settings.from_env({OFF_SETTING: "customers,calls"}))
    assert str(caught.value).startswith(OFF_SETTING), caught.value
    assert "calls is not a captured table" in str(caught.value), caught.value
