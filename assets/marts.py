"""Marts: EDW facts summarised per event date, partitioned by event date.

A partition of a mart is rebuilt whole (delete and insert in one transaction) from the facts,
so it is right whatever order the events arrived in: ``mart_sensor`` re-materialises every
event date that a fact run touched, late events included.
"""

import dagster as dg
from psycopg import sql

from kappa.dagster.assets.partitions import event_date_partitions
from kappa.dagster.resources.warehouse import WarehouseResource
from kappa.partitions import TimeWindows

CUSTOMER_DAILY = "mart_customer_daily"

_DDL = """
CREATE TABLE IF NOT EXISTS {table} (
  activity_date date NOT NULL,
  customer_id text NOT NULL,
  orders integer NOT NULL,
  order_amount numeric(18, 2) NOT NULL,
  payments integer NOT NULL,
  payment_amount numeric(18, 2) NOT NULL,
  fraud_alerts integer NOT NULL,
  PRIMARY KEY (activity_date, customer_id)
)
"""

_REBUILD = """
INSERT INTO {table} (activity_date, customer_id, orders, order_amount, payments,
                     payment_amount, fraud_alerts)
SELECT %(day)s::date, customer_id, sum(orders), sum(order_amount), sum(payments),
       sum(payment_amount), sum(alerts)
FROM (
  SELECT customer_id, count(*) AS orders, sum(amount) AS order_amount, 0 AS payments,
         0 AS payment_amount, 0 AS alerts
  FROM {orders} WHERE event_time >= %(day)s::date AND event_time < %(day)s::date + 1
  GROUP BY customer_id
  UNION ALL
  SELECT customer_id, 0, 0, count(*), sum(amount), 0
  FROM {payments} WHERE event_time >= %(day)s::date AND event_time < %(day)s::date + 1
  GROUP BY customer_id
  UNION ALL
  SELECT customer_id, 0, 0, 0, 0, count(DISTINCT event_id)
  FROM {alerts} WHERE event_time >= %(day)s::date AND event_time < %(day)s::date + 1
  GROUP BY customer_id
) AS activity
GROUP BY customer_id
"""


def build_customer_daily(windows: TimeWindows, facts: list[str]) -> dg.AssetsDefinition:
    """Per customer and event date: orders, payments (counts and amounts), fraud alerts."""

    @dg.asset(
        name=CUSTOMER_DAILY,
        deps=[dg.AssetDep(fact, partition_mapping=dg.AllPartitionMapping()) for fact in facts],
        partitions_def=event_date_partitions(windows),
        group_name="marts",
        kinds={"postgres"},
        owners=["team:data-platform"],
        description=(
            "Customer activity per event date (UTC): orders and payments with their amounts, "
            "and fraud alerts. A partition is rebuilt whole from the facts; `mart_sensor` "
            "re-materialises every event date a fact run touched, so late events are counted."
        ),
    )
    def mart_customer_daily(
        context: dg.AssetExecutionContext, warehouse: WarehouseResource
    ) -> dg.MaterializeResult:
        edw = warehouse.schemas.edw
        table = sql.Identifier(edw, CUSTOMER_DAILY)
        day = context.partition_key
        with warehouse.connect() as conn, conn.transaction():
            # One rebuild at a time (and no race on CREATE TABLE between the first two).
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('kappa-etl:mart_customer_daily'))")
            conn.execute(sql.SQL(_DDL).format(table=table))
            removed = conn.execute(
                sql.SQL("DELETE FROM {} WHERE activity_date = %s").format(table), (day,)
            ).rowcount
            rows = conn.execute(
                sql.SQL(_REBUILD).format(
                    table=table,
                    orders=sql.Identifier(edw, "fact_order"),
                    payments=sql.Identifier(edw, "fact_payment"),
                    alerts=sql.Identifier(edw, "fraud_alert"),
                ),
                {"day": day},
            ).rowcount
            totals = conn.execute(
                sql.SQL(
                    "SELECT coalesce(sum(orders), 0), coalesce(sum(payments), 0), "
                    "coalesce(sum(fraud_alerts), 0) FROM {} WHERE activity_date = %s"
                ).format(table),
                (day,),
            ).fetchone()
        assert totals is not None
        return dg.MaterializeResult(
            metadata={
                "customers": rows,
                "rows_replaced": removed,
                "orders": int(totals[0]),
                "payments": int(totals[1]),
                "fraud_alerts": int(totals[2]),
            }
        )

    return mart_customer_daily
