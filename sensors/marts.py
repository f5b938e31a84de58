"""The sensor that keeps event-date marts right when events arrive late.

Every fact materialisation lists the event dates of the events it loaded (metadata
``event_dates``). The sensor reads the materialisations since its cursor (an event-log
storage id) and requests one run per touched date of the mart, so a late event re-builds
the partition of the day it happened on, not of the day it arrived.
"""

import json

import dagster as dg

from kappa.partitions import TimeWindows

#: Materialisations read per tick (the rest wait for the next tick).
_PAGE = 500


def build_mart_sensor(
    mart: str, facts: list[str], *, windows: TimeWindows, interval_s: int
) -> dg.SensorDefinition:
    @dg.sensor(
        name="mart_sensor",
        description=(
            f"Re-materialises the partitions of `{mart}` for every event date that a run of "
            f"{', '.join(f'`{f}`' for f in facts)} touched (late events included)."
        ),
        asset_selection=[dg.AssetKey(mart)],
        minimum_interval_seconds=interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    def mart_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        cursor: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
        touched: set[str] = set()
        for fact in facts:
            records = context.instance.fetch_materializations(
                dg.AssetRecordsFilter(
                    asset_key=dg.AssetKey(fact), after_storage_id=cursor.get(fact)
                ),
                limit=_PAGE,
                ascending=True,
            ).records
            for record in records:
                materialization = record.asset_materialization
                dates = materialization.metadata.get("event_dates") if materialization else None
                if dates is not None:
                    touched.update(dates.value)  # type: ignore[arg-type]
                cursor[fact] = record.storage_id
        first_day = windows.start.date().isoformat()
        valid = sorted(d for d in touched if d >= first_day)
        skipped = sorted(touched - set(valid))
        if skipped:
            context.log.warning(
                f"event dates before the first partition ({first_day}) have no mart partition: "
                + ", ".join(skipped)
            )
        if not valid:
            return dg.SensorResult(
                skip_reason="no fact run touched an event date since the last tick",
                cursor=json.dumps(cursor),
            )
        stamp = ".".join(str(cursor[f]) for f in facts if f in cursor)
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(
                    run_key=f"{mart}/{day}/{stamp}",
                    partition_key=day,
                    asset_selection=[dg.AssetKey(mart)],
                )
                for day in valid
            ],
            cursor=json.dumps(cursor),
        )

    return mart_sensor
