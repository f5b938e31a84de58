"""Dagster partitions of the kappa-etl assets, from the configured time windows."""

import dagster as dg

from kappa.partitions import TimeWindows


def arrival_partitions(windows: TimeWindows) -> dg.TimeWindowPartitionsDefinition:
    """Ingestion assets: windows of arrival (broker) time. The open window is included
    (``end_offset=1``): live micro-batches append to it."""
    start = windows.start.strftime(windows.fmt)
    if windows.grain == "hourly":
        return dg.HourlyPartitionsDefinition(start_date=start, end_offset=1, timezone="UTC")
    return dg.DailyPartitionsDefinition(start_date=start, end_offset=1, timezone="UTC")


def event_date_partitions(windows: TimeWindows) -> dg.DailyPartitionsDefinition:
    """Marts: days of event time (UTC), today included."""
    return dg.DailyPartitionsDefinition(
        start_date=windows.start.strftime("%Y-%m-%d"), end_offset=1, timezone="UTC"
    )


def previous_partition_dep(asset: str) -> dg.AssetDep:
    """A time partition depends on the one before it: the state it starts from is the state
    the previous one ended with (backfills run them in order)."""
    return dg.AssetDep(
        asset, partition_mapping=dg.TimeWindowPartitionMapping(start_offset=-1, end_offset=-1)
    )
