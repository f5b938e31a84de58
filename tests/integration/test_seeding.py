"""`kappa up` seeds the shop's customers on its first start only: a restart changes no source data.

Against a real PostgreSQL (a fresh database) and the broker, through the function `kappa up`
calls at every start (`prepare`, with the catalogue's local hooks as with `--no-simulator`)
and the `kappa init --local [--seed]` command; the hooks are the shop's (catalog.yaml `local:`).
"""

from __future__ import annotations

import pytest

from examples.shop.settings import ShopSettings
from kappa import cli
from kappa.edw.connection import connect
from kappa.settings import Settings

pytestmark = pytest.mark.integration

OLTP_TABLES = (
    "public.customers",
    "public.call_center_calls",
    "cdc.customers_changes",
    "cdc.call_center_calls_changes",
)


def oltp_snapshot(url: str) -> dict[str, tuple[int, str]]:
    """Row count and a checksum of every OLTP table (source tables and change tables)."""
    with connect(url) as conn:
        return {
            table: tuple(  # type: ignore[misc]
                conn.execute(
                    f"SELECT count(*), md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) "
                    f"FROM {table} t"
                ).fetchone()
                or ()
            )
            for table in OLTP_TABLES
        }


def test_the_first_start_seeds_and_a_restart_leaves_the_oltp_tables_unchanged(pipeline_env):
    settings = Settings.from_env(pipeline_env)
    url = pipeline_env["KAPPA_OLTP_URL"]
    expected = ShopSettings.from_env(pipeline_env).sim_customers * 9 // 10
    assert expected > 0

    # First start: the demo tables are created empty and seeded.
    cli.prepare(settings, create_topics=True, local=True)
    first = oltp_snapshot(url)
    assert first["public.customers"][0] == expected
    assert first["cdc.customers_changes"][0] == expected, "the seed is captured"

    # Between sessions the OLTP writers deleted and changed customers.
    with connect(url) as conn:
        conn.execute(
            "DELETE FROM public.customers WHERE customer_id IN "
            "(SELECT customer_id FROM public.customers ORDER BY customer_id LIMIT 5)"
        )
        conn.execute(
            "UPDATE public.customers SET segment = 'vip' WHERE customer_id = "
            "(SELECT max(customer_id) FROM public.customers)"
        )
    before = oltp_snapshot(url)
    assert before["public.customers"][0] == expected - 5

    # A restart (`kappa up --no-simulator` again), twice: nothing written to the OLTP tables.
    cli.prepare(settings, create_topics=True, local=True)
    assert oltp_snapshot(url) == before
    cli.prepare(settings, create_topics=True, local=True)
    assert oltp_snapshot(url) == before
    assert cli.main(["init", "--local"]) == 0
    assert oltp_snapshot(url) == before

    # Asked for: `--seed` tops the customers up again.
    assert cli.main(["init", "--local", "--seed"]) == 0
    topped = oltp_snapshot(url)
    assert topped["public.customers"][0] == expected
    assert topped["cdc.customers_changes"][0] == before["cdc.customers_changes"][0] + 5
    assert cli.main(["init", "--local", "--seed"]) == 0
    assert oltp_snapshot(url) == topped, "topped up already: nothing more to add"
