"""The demo's catalogue as the tests run it, and its two streams.

``TEST_CATALOG`` is the repository's catalog.yaml with the call centre's calls captured from
PostgreSQL instead of MariaDB (:func:`examples.shop.variants.postgres_catalog`): the tests of
the PostgreSQL capture, the steps and the chaos suite write the calls through the OLTP
database's writers. The test session names it in ``KAPPA_CATALOG`` (tests/conftest.py);
the MariaDB capture of the shipped catalogue has tests of its own.
"""

from examples.shop.variants import postgres_catalog
from kappa.settings import Settings

TEST_CATALOG = postgres_catalog()
DEMO = Settings.from_env({"KAPPA_CATALOG": str(TEST_CATALOG)})
ORDER_PLACED = DEMO.stream("fact_order")
PAYMENT_ATTEMPTED = DEMO.stream("fact_payment")
