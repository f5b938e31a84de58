from pathlib import Path

import pytest

from kappa.catalog.captures import load_captures
from kappa.exceptions import ConfigurationError
from kappa.settings import REPO_ROOT

GOOD = """
tables:
  - name: customers
    source: public.customers
    keys: [customer_id]
    columns: {customer_id: text, credit_limit: "numeric(12,2)", country: "char(2)"}
    change_table: cdc.customers_changes
    target: dim_customer
    mode: scd2
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    return path


def test_the_shipped_configuration_loads():
    specs = load_captures(REPO_ROOT / "catalog.yaml")
    assert [(s.name, s.target, s.mode) for s in specs] == [
        ("customers", "dim_customer", "scd2"),
        ("call_center_calls", "fact_call_center_call", "current"),
    ]


def test_a_valid_entry_becomes_a_spec(tmp_path):
    [spec] = load_captures(write(tmp_path, GOOD))
    assert (
        str(spec.source) == "public.customers" and str(spec.change_table) == "cdc.customers_changes"
    )
    assert spec.keys == ("customer_id",)
    assert [c.name for c in spec.value_columns] == ["credit_limit", "country"]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (("public.customers", "public.customers; drop table x"), "not a valid identifier"),
        (("public.customers", "customers"), "expected schema.table"),
        (("target: dim_customer", 'target: "Dim-Customer"'), "not a valid identifier"),
        (('"numeric(12,2)"', '"numeric(12,2); drop"'), "unsupported type"),
        (("keys: [customer_id]", "keys: [nobody]"), "'nobody' is not one of the columns"),
        (("keys: [customer_id]", "keys: []"), "expected a non-empty list"),
        (("mode: scd2", "mode: scd3"), "expected scd2 or current"),
        (("    mode: scd2\n", ""), "missing mode"),
    ],
)
def test_bad_entries_fail_naming_the_setting_the_file_and_the_entry(tmp_path, change, fragment):
    old, new = change
    path = write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(ConfigurationError) as caught:
        load_captures(path)
    assert str(caught.value).startswith(f"KAPPA_CATALOG: {path}: tables[0]")
    assert fragment in str(caught.value)


def test_a_target_used_twice_is_refused(tmp_path):
    twice = GOOD + GOOD.split("tables:\n")[1].replace("name: customers", "name: other").replace(
        "public.customers", "public.other"
    ).replace("cdc.customers_changes", "cdc.other_changes")
    with pytest.raises(ConfigurationError, match="target used twice: dim_customer"):
        load_captures(write(tmp_path, twice))


def test_a_missing_or_broken_file_names_the_setting(tmp_path):
    with pytest.raises(ConfigurationError, match="^KAPPA_CATALOG: cannot read"):
        load_captures(tmp_path / "absent.yaml")
    with pytest.raises(ConfigurationError, match="^KAPPA_CATALOG: .* is not valid YAML"):
        load_captures(write(tmp_path, "tables: [unclosed"))


def test_a_start_other_than_the_history_is_for_mariadb_tables_only(tmp_path):
    mariadb = GOOD.replace(
        "source: public.customers", "engine: mariadb\n    source: shop.customers"
    )
    mariadb = "\n".join(line for line in mariadb.splitlines() if "change_table" not in line)
    [spec] = load_captures(write(tmp_path, mariadb))
    assert spec.start == "history"
    [spec] = load_captures(write(tmp_path, mariadb + "\n    start: oldest_retained\n"))
    assert spec.start == "oldest_retained"
    with pytest.raises(ConfigurationError, match=r"tables\[0\]\.start: expected one of history"):
        load_captures(write(tmp_path, mariadb + "\n    start: now\n"))
    with pytest.raises(ConfigurationError, match=r"tables\[0\]\.start: only a mariadb table"):
        load_captures(write(tmp_path, GOOD + "\n    start: oldest_retained\n"))
