"""The demo's two streams, as the repository's catalog.yaml declares them."""

from kappa.settings import Settings

DEMO = Settings.from_env({})
ORDER_PLACED = DEMO.stream("fact_order")
PAYMENT_ATTEMPTED = DEMO.stream("fact_payment")
