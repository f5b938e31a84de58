"""The demo's catalogue as the benchmarks run it, and its two streams.

``BENCH_CATALOG``: catalog.yaml with the call centre's calls in PostgreSQL
(:func:`examples.shop.variants.postgres_catalog`), where ``bench.common.populate_edw`` puts
them; the benchmarks measure the event path, not the MariaDB capture (``bench.capture``).
"""

from examples.shop.variants import postgres_catalog
from kappa.settings import Settings

BENCH_CATALOG = postgres_catalog()
DEMO = Settings.from_env({"KAPPA_CATALOG": str(BENCH_CATALOG)})
ORDER_PLACED = DEMO.stream("fact_order")
PAYMENT_ATTEMPTED = DEMO.stream("fact_payment")
