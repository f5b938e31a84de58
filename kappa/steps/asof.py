"""The as-of join: for each event, the version of an SCD2 dimension valid at its time."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

#: Enrichment statuses besides the lookup's own ``unknown`` one.
AS_OF = "as_of"
PROVISIONAL = "provisional"
#: The column of an as-of lookup's result that says how the row was enriched.
STATUS = "enrichment"


def enrich_as_of(
    events: pd.DataFrame,
    versions: pd.DataFrame,
    watermark: pd.Timestamp | pd.Series | None,
    *,
    key: str,
    surrogate: str,
    columns: Sequence[str] = (),
    unknown: str = "unknown",
) -> pd.DataFrame:
    """The dimension version valid at each event's time, row-aligned with ``events``.

    ``events`` has ``key`` and ``event_time``; ``versions`` has ``key``, ``surrogate``,
    ``columns``, ``valid_from``, ``valid_to``. ``watermark``: the time change capture is
    complete up to, for every row or per row (a row-aligned series). The result has
    ``surrogate``, ``columns`` and ``enrichment``: ``as_of`` (the version valid then),
    ``provisional`` (the event is later than what change capture has loaded: the newest
    known version, which may change) or ``unknown`` (no version valid then).
    """
    values = [surrogate, *columns]
    left = pd.DataFrame(
        {
            "row": np.arange(len(events)),
            "key": _key(events[key]),
            "event_time": _utc(events["event_time"]),
        }
    ).sort_values(["event_time", "row"], kind="stable")
    right = pd.DataFrame(
        {
            "key": _key(versions[key]),
            "valid_from": _utc(versions["valid_from"]),
            "valid_to": _utc(versions["valid_to"]),
            **{c: versions[c].to_numpy() for c in values},
        }
    ).sort_values(["valid_from", surrogate], kind="stable")
    if right.empty:
        joined = left.assign(
            **{c: pd.NA for c in values},
            valid_to=pd.Series(pd.NaT, index=left.index, dtype="datetime64[ns, UTC]"),
        )
    else:
        joined = pd.merge_asof(
            left,
            right[["key", "valid_from", "valid_to", *values]],
            left_on="event_time",
            right_on="valid_from",
            by="key",
            direction="backward",
        )
    closed = joined["valid_to"].notna() & (joined["event_time"] >= joined["valid_to"])
    joined.loc[closed, values] = pd.NA
    joined = joined.sort_values("row").reset_index(drop=True)
    found = joined[surrogate].notna().to_numpy()
    if watermark is None:
        late = np.ones(len(joined), dtype=bool)
    elif isinstance(watermark, pd.Series):
        # As datetime64 (UTC): without a dtype, zone-aware times become an object array of
        # Timestamps, which was most of this function's time.
        late = (
            joined["event_time"].to_numpy("datetime64[ns]")
            > _utc(watermark).to_numpy("datetime64[ns]")
        ) | watermark.isna().to_numpy()
    else:
        late = (joined["event_time"] > watermark).to_numpy()
    status = np.where(~found, unknown, np.where(late, PROVISIONAL, AS_OF))
    out = {surrogate: joined[surrogate].astype("Int64")}
    for column in columns:
        series = joined[column]
        # Text stays text whatever was missing; other types keep pandas' nullable dtype.
        out[column] = series.astype("string") if series.dtype == object else series.convert_dtypes()
    out[STATUS] = pd.Series(status).astype("string")
    return pd.DataFrame(out)


def _key(values: pd.Series) -> np.ndarray:
    """Join keys as plain Python strings, whatever string dtype pandas chose."""
    return np.asarray(values.to_numpy(dtype=object), dtype=object)


def _utc(times: pd.Series) -> pd.Series:
    """One time representation for joins: nanoseconds, UTC, index dropped."""
    return pd.to_datetime(times, utc=True).astype("datetime64[ns, UTC]").reset_index(drop=True)


def join_key(values: pd.Series) -> np.ndarray:
    """Join keys as plain Python strings (for steps' own as-of joins)."""
    return _key(values)


def utc_times(times: pd.Series) -> pd.Series:
    """Times as the as-of join compares them (for steps' own as-of joins)."""
    return _utc(times)
