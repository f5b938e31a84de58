"""What the shop's producer processes share: settings, signals, and errors as exit codes."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable

from examples.shop.settings import ShopSettings
from kappa.exceptions import KappaError
from kappa.settings import Settings


def stop_on_signal() -> threading.Event:
    """Logging for a producer process, and an event set by SIGINT or SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def run_producer(
    name: str, work: Callable[[Settings, ShopSettings, threading.Event], object]
) -> int:
    """Run ``work`` until it returns (after SIGINT or SIGTERM): exit 0, or 2 with the message
    of a configuration or runtime error (which names the setting), as ``kappa`` does."""
    stop = stop_on_signal()
    try:
        work(Settings.from_env(), ShopSettings.from_env(), stop)
    except KappaError as exc:
        print(f"\n{name}: {exc}", file=sys.stderr)
        return 2
    return 0
