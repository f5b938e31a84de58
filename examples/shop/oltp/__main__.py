"""``python -m examples.shop.oltp``: the shop's OLTP writers until SIGINT or SIGTERM.

``kappa up`` runs it as a producer of the catalogue's ``local:`` section, with the engine's
settings in the environment (``KAPPA_OLTP_URL``) and the shop's (``KAPPA_OLTP_RATE``,
``KAPPA_OLTP_WRITERS``, ``KAPPA_SIM_CUSTOMERS``, ``KAPPA_SIM_SEED``).
"""

from __future__ import annotations

import sys
import threading

from examples.shop.calls import calls_in_postgres
from examples.shop.oltp.plans import OltpConfig
from examples.shop.oltp.writers import OltpWriters
from examples.shop.process import run_producer
from examples.shop.settings import ShopSettings
from kappa.settings import Settings


def _write(settings: Settings, shop: ShopSettings, stop: threading.Event) -> None:
    # The calls go to the call centre's own database when they are captured from there.
    config = OltpConfig.from_settings(shop, calls=calls_in_postgres(settings))
    OltpWriters(settings.resolved_oltp_url, config, rate=shop.oltp_rate).run(stop)


if __name__ == "__main__":
    sys.exit(run_producer("examples.shop.oltp", _write))
