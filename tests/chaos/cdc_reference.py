"""An independent account of the captured tables: the OLTP tables as they are now, and the
changes in the change tables, against ``dim_customer`` and ``fact_call_center_call``."""

from __future__ import annotations

import itertools

import psycopg

from tests.chaos.reference import Anomalies


def audit_captures(
    oltp: psycopg.Connection, edw: psycopg.Connection, *, complete: bool
) -> Anomalies:
    found = Anomalies()
    for asset, change_table in (
        ("dim_customer", "cdc.customers_changes"),
        ("fact_call_center_call", "cdc.call_center_calls_changes"),
    ):
        spans = edw.execute(
            "SELECT start_position, end_position, received, loaded, dead_lettered FROM kappa.batch_ledger "
            "WHERE asset = %s ORDER BY start_position",
            (asset,),
        ).fetchall()
        for a, b in itertools.pairwise(spans):
            if a[1] < b[0]:
                found.note(
                    "ledger_gaps", 1, f"{asset}: transactions [{a[1]}, {b[0]}) never applied"
                )
            elif a[1] > b[0]:
                found.note(
                    "ledger_overlaps", 1, f"{asset}: transactions [{b[0]}, {a[1]}) applied twice"
                )
        for start, end, received, loaded, dead in spans:
            row = oltp.execute(
                f"SELECT count(*) FROM {change_table} WHERE xid >= %s::text::xid8 AND xid < %s::text::xid8",
                (str(start), str(end)),
            ).fetchone()
            if row is None or row[0] != received or received != loaded + dead:
                found.note(
                    "ledger_counts",
                    1,
                    f"{asset} [{start}, {end}): {row} changes, ledger {received}",
                )
        if not complete:
            continue
        pending = oltp.execute(
            f"SELECT count(*) FROM {change_table} WHERE xid >= %s::text::xid8",
            (str(spans[-1][1] if spans else 0),),
        ).fetchone()
        found.note("lost", int(pending[0]) if pending else 0, f"{asset}: changes never applied")
    if not complete:
        return found
    source = {
        r[0]: r[1:]
        for r in oltp.execute(
            "SELECT customer_id, name, segment, country::text, credit_limit::text FROM public.customers"
        ).fetchall()
    }
    current = {
        r[0]: r[1:]
        for r in edw.execute(
            "SELECT customer_id, name, segment, rtrim(country), credit_limit::text FROM edw.dim_customer "
            "WHERE is_current"
        ).fetchall()
    }
    found.note(
        "lost", len(set(source) - set(current)), "dim_customer: customers without a current version"
    )
    found.note(
        "unexpected",
        len(set(current) - set(source)),
        "dim_customer: current versions of deleted customers",
    )
    found.note(
        "state",
        sum(1 for k in set(source) & set(current) if source[k] != current[k]),
        "dim_customer: current version differs from the OLTP row",
    )
    versions = [r[0] for r in edw.execute("SELECT customer_sk FROM edw.dim_customer").fetchall()]
    writes = {
        r[0]
        for r in oltp.execute(
            "SELECT change_id FROM cdc.customers_changes WHERE op IN ('I', 'U')"
        ).fetchall()
    }
    found.note("duplicated", len(versions) - len(set(versions)), "dim_customer: a version twice")
    found.note("lost", len(writes - set(versions)), "dim_customer: changes without their version")
    found.note("unexpected", len(set(versions) - writes), "dim_customer: versions of no change")
    calls = {
        r[0]: r[1:]
        for r in oltp.execute(
            "SELECT call_id, customer_id, reason, sentiment, duration_s FROM public.call_center_calls"
        ).fetchall()
    }
    facts = {
        r[0]: r[1:]
        for r in edw.execute(
            "SELECT call_id, customer_id, reason, sentiment, duration_s FROM edw.fact_call_center_call"
        ).fetchall()
    }
    found.note("lost", len(set(calls) - set(facts)), "fact_call_center_call: calls missing")
    found.note(
        "unexpected", len(set(facts) - set(calls)), "fact_call_center_call: calls that are not"
    )
    found.note(
        "state",
        sum(1 for k in set(calls) & set(facts) if calls[k] != facts[k]),
        "calls differ from the OLTP rows",
    )
    return found
