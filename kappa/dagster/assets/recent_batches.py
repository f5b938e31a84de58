"""Lag and throughput over the recent batches of an asset, as materialisation metadata.

One materialisation tells about one batch; whether the pipeline keeps up shows over many.
:func:`recent_batches_metadata` adds to a batch's metadata a table of the last batches
(this one first), read back from the asset's previous materialisations in the Dagster
instance, and a one-line lag trend. The figures come from the keys every micro-batch asset
already records (``rows_received``, ``rows_loaded``, ``lag_after_batch``,
``batch_seconds``), so the helper needs nothing new in the ledger.

Call it last, with the metadata the batch is about to record::

    metadata = {...}
    metadata.update(recent_batches_metadata(context.instance, asset_key, metadata))
    yield dg.MaterializeResult(asset_key=asset_key, metadata=metadata)
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import dagster as dg

#: Batches in the lag and throughput bars, this one included.
RECENT_BATCHES = 20
#: Rows of the table, this one first. Every materialisation carries its table, so each row
#: is stored once per later batch: ten rows are half the bytes of twenty, and the bars (and
#: the Plots tab, over every batch) still show the longer trend.
TABLE_ROWS = 10
#: The ``mode`` of a closed partition's summary (kappa.dagster.retention): not a batch.
SUMMARY_MODE = "partition summary"
_BARS = "▁▂▃▄▅▆▇█"


@dataclass(frozen=True)
class BatchFigures:
    """What one materialisation says about its batch."""

    at: float  # unix seconds
    run_id: str
    received: int
    loaded: int
    lag_after: int
    seconds: float

    @property
    def rows_per_s(self) -> float:
        return round(self.received / self.seconds, 1) if self.seconds > 0 else 0.0


def _number(value: Any) -> float:
    """A metadata value (raw or a Dagster MetadataValue) as a number; 0 when absent."""
    raw = getattr(value, "value", value)
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return 0.0
    return float(raw)


def figures(metadata: Mapping[str, Any], *, at: float, run_id: str) -> BatchFigures:
    return BatchFigures(
        at=at,
        run_id=run_id,
        received=int(_number(metadata.get("rows_received"))),
        loaded=int(_number(metadata.get("rows_loaded"))),
        lag_after=int(_number(metadata.get("lag_after_batch"))),
        seconds=_number(metadata.get("batch_seconds")),
    )


def sparkline(values: list[int]) -> str:
    """Bars scaled from 0 to the largest value, oldest first."""
    top = max(values, default=0)
    if top <= 0:
        return _BARS[0] * len(values)
    return "".join(_BARS[min(len(_BARS) - 1, v * (len(_BARS) - 1) // top)] for v in values)


def previous_batches(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, *, limit: int
) -> list[BatchFigures]:
    """The asset's last ``limit`` batches (materialisations other than partition summaries),
    newest first."""
    if limit <= 0:
        return []
    result = instance.fetch_materializations(asset_key, limit=limit, ascending=False)
    batches = []
    for record in result.records:
        materialization = record.asset_materialization
        if materialization is None:
            continue
        mode = materialization.metadata.get("mode")
        if getattr(mode, "value", mode) == SUMMARY_MODE:
            continue
        batches.append(
            figures(materialization.metadata, at=record.timestamp, run_id=record.run_id or "")
        )
    return batches


def recent_batches_metadata(
    instance: dg.DagsterInstance,
    asset_key: dg.AssetKey | str,
    current: Mapping[str, Any],
    *,
    run_id: str = "",
    limit: int = RECENT_BATCHES,
    now: float | None = None,
) -> dict[str, dg.MetadataValue]:
    """``recent_batches`` (a table, newest first), ``lag_trend`` (markdown) and
    ``rows_per_second`` (plotted by the UI over materialisations) for a batch whose own
    metadata is ``current``."""
    key = dg.AssetKey.from_coercible(asset_key)
    this = figures(current, at=time.time() if now is None else now, run_id=run_id)
    batches = [this, *previous_batches(instance, key, limit=limit - 1)]
    table = dg.MetadataValue.table(
        records=[
            dg.TableRecord(
                {
                    "committed": datetime.fromtimestamp(b.at, UTC).strftime("%Y-%m-%d %H:%M:%S"),
                    "run": b.run_id[:8],
                    "received": b.received,
                    "loaded": b.loaded,
                    "lag_after": b.lag_after,
                    "seconds": round(b.seconds, 3),
                    "rows_per_s": b.rows_per_s,
                }
            )
            for b in batches[:TABLE_ROWS]
        ],
        schema=dg.TableSchema(
            columns=[
                dg.TableColumn("committed", "string", description="UTC"),
                dg.TableColumn("run", "string"),
                dg.TableColumn("received", "int"),
                dg.TableColumn("loaded", "int"),
                dg.TableColumn("lag_after", "int", description="records or changes left after it"),
                dg.TableColumn("seconds", "float"),
                dg.TableColumn("rows_per_s", "float", description="received / seconds"),
            ]
        ),
    )
    oldest_first = list(reversed(batches))
    lags = [b.lag_after for b in oldest_first]
    rates = [int(b.rows_per_s) for b in oldest_first]
    trend = (
        f"lag after each of the last {len(batches)} batches (oldest first): "
        f"`{sparkline(lags)}` max {max(lags)}, now {this.lag_after}\n\n"
        f"rows per second: `{sparkline(rates)}` max {max(rates)}, now {this.rows_per_s:g}"
    )
    return {
        "recent_batches": table,
        "lag_trend": dg.MetadataValue.md(trend),
        "rows_per_second": dg.MetadataValue.float(this.rows_per_s),
    }
