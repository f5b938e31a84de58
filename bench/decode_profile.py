"""CPU per stage of one micro-batch, old path against new, side by side in one process.

``python -m bench.decode_profile`` generates simulator events as ``make bench`` does (valid
events, 5 % late, keyed by customer), cuts one batch per topic of ``--orders`` orders (and the
payments generated with them), and measures each stage's CPU time (``time.process_time``,
best of ``--repeat``) on the same batch:

- ``decode``: :func:`kappa.decode.batch.decode_batch` on the general path only (``old``:
  orjson per message, pandas checks) and with the fast path (``new``); both outcomes are
  compared (rows, dead letters, duplicates) before any figure is printed.
- ``copy_text``: the decoded rows as COPY's text format (:func:`kappa.edw.copy.copy_text`).

``--baseline FILE`` takes ``old`` from another revision's ``kappa/decode/batch.py`` instead
(``git show a7b86c2:kappa/decode/batch.py > /tmp/batch_main.py``), loaded beside this one.

``--invalid-rate`` mixes the simulator's malformed messages in (they all take the general
path); ``--profile`` prints cProfile's top functions of the new decode.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import importlib.util
import pstats
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from pandas.testing import assert_frame_equal

import kappa.decode.batch as batch_module
from bench.demo import ORDER_PLACED, PAYMENT_ATTEMPTED
from examples.shop.simulator import SimulatorConfig, generate
from kappa.catalog.streams import EventContract
from kappa.decode.batch import DecodedBatch, decode_batch
from kappa.edw.copy import copy_text
from kappa.sources.base import RawBatch

RATE = 500.0


def batches(orders: int, seed: int, invalid_rate: float) -> dict[str, RawBatch]:
    """One batch per topic, ``orders`` orders and the payments generated among them."""
    start = datetime.now(UTC) - timedelta(seconds=orders * 2 / RATE) - timedelta(minutes=15)
    config = SimulatorConfig(
        topic_orders="orders",
        topic_payments="payments",
        customers=2000,
        seed=seed,
        duplicate_rate=0.0,
        late_rate=0.05,
        invalid_rate=invalid_rate,
    )
    picked: dict[str, list[Any]] = {"orders": [], "payments": []}
    for message in generate(config, start=start, rate=RATE):
        picked[message.topic].append(message)
        if len(picked["orders"]) >= orders:
            break
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    out = {}
    for topic, messages in picked.items():
        n = len(messages)
        out[topic] = RawBatch(
            topic=topic,
            partition=0,
            start=0,
            end=n,
            offsets=list(range(n)),
            timestamps=[now_ms] * n,
            keys=[m.key for m in messages],
            values=[m.value for m in messages],
        )
    return out


def cpu(fn: Callable[[], Any], repeat: int) -> tuple[float, Any]:
    """The least CPU time of ``repeat`` calls (a collection first, so none inherits garbage)."""
    best, result = float("inf"), None
    for _ in range(repeat):
        gc.collect()
        started = time.process_time()
        result = fn()
        best = min(best, time.process_time() - started)
    return best, result


def decode_general(batch: RawBatch, contract: EventContract) -> DecodedBatch:
    batch_module._FAST = False
    try:
        return decode_batch(batch, contract)
    finally:
        batch_module._FAST = True


def load_baseline(path: str) -> Callable[[RawBatch, EventContract], DecodedBatch]:
    spec = importlib.util.spec_from_file_location("decode_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.decode_batch  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--invalid-rate", type=float, default=0.0)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--baseline", help="a kappa/decode/batch.py of another revision")
    args = parser.parse_args(argv)
    decode_old = load_baseline(args.baseline) if args.baseline else decode_general

    contracts = {"orders": ORDER_PLACED, "payments": PAYMENT_ATTEMPTED}
    print(
        f"{'topic':9} {'stage':10} {'records':>8} {'old s':>8} {'new s':>8} {'old us/rec':>10} "
        f"{'new us/rec':>10} {'ratio':>6}"
    )
    for topic, batch in batches(args.orders, args.seed, args.invalid_rate).items():
        contract = contracts[topic]
        n = len(batch)
        # Interleaved, so a change of the machine's speed meets both paths alike.
        old_s, new_s = float("inf"), float("inf")
        for _ in range(args.repeat):
            t, old = cpu(lambda b=batch, c=contract: decode_old(b, c), 1)
            old_s = min(old_s, t)
            t, new = cpu(lambda b=batch, c=contract: decode_batch(b, c), 1)
            new_s = min(new_s, t)
        assert_frame_equal(new.rows, old.rows)
        assert_frame_equal(new.dead_letters, old.dead_letters)
        assert new.duplicates_in_batch == old.duplicates_in_batch
        rows = new.rows
        text_s, _ = cpu(lambda r=rows: copy_text(r), args.repeat)
        for stage, before, after in (("decode", old_s, new_s), ("copy_text", text_s, text_s)):
            print(
                f"{topic:9} {stage:10} {n:8d} {before:8.3f} {after:8.3f} "
                f"{before / n * 1e6:10.1f} {after / n * 1e6:10.1f} {before / after:6.2f}"
            )
        print(f"{'':9} {len(rows)} rows, {len(new.dead_letters)} dead letters")
        if args.profile:
            profile = cProfile.Profile()
            profile.runcall(decode_batch, batch, contract)
            pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
