"""Lookups answered from the EDW's capture targets; completeness from the OLTP horizon."""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import pandas as pd
import psycopg
from psycopg import sql

from kappa.catalog.captures import CaptureSpec
from kappa.changes.target import surrogate_key
from kappa.edw.ledger import read_head
from kappa.edw.types import Schemas
from kappa.sources.base import ChangeSource
from kappa.sources.pg_capture import ChangeTable
from kappa.steps.api import AsOf, Lookup, Range
from kappa.steps.completeness import JUST_BEFORE, Completeness


def capture_for(captures: Mapping[str, CaptureSpec], lookup: Lookup) -> CaptureSpec:
    """The capture a lookup reads, checked against its mode."""
    spec = captures.get(lookup.target)
    if spec is None:
        raise KeyError(f"no captured table has target {lookup.target!r}")
    wanted = "scd2" if isinstance(lookup, AsOf) else "current"
    if spec.mode != wanted:
        raise ValueError(
            f"{lookup.target} is captured in mode {spec.mode}, the lookup needs {wanted}"
        )
    if isinstance(lookup, AsOf) and len(spec.keys) != 1:
        raise ValueError(f"{lookup.target}: an as-of lookup needs a one-column business key")
    return spec


class VersionCache:
    """Versions of SCD2 targets in memory for a run, refreshed incrementally.

    Before each lookup the target's ledger end is read (one row); if change capture has
    moved since the last lookup, the keys whose versions were inserted or closed by the
    transactions since are dropped from memory and reloaded on demand. Reading the ledger
    before the versions means memory is never older than the position it records.
    """

    def __init__(self) -> None:
        self._versions: dict[str, dict[str, list[tuple]]] = {}
        self._synced_at: dict[str, int] = {}
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def versions(
        self,
        edw: psycopg.Connection,
        schemas: Schemas,
        spec: CaptureSpec,
        lookup: AsOf,
        keys: list[str],
    ) -> pd.DataFrame:
        business = spec.keys[0]
        names = [business, surrogate_key(spec), *lookup.columns, "valid_from", "valid_to"]
        cached = f"{spec.target}:{','.join(lookup.columns)}"
        table = sql.Identifier(schemas.edw, spec.target)
        head = read_head(edw, schemas, spec.asset, str(spec.change_table), 0)
        position = head.end if head is not None else 0
        with self._lock:
            memory = self._versions.setdefault(cached, {})
            synced = self._synced_at.get(cached)
            if synced is not None and position != synced:
                changed = edw.execute(
                    sql.SQL(
                        "SELECT DISTINCT {key} FROM {table} "
                        "WHERE source_xid >= %s OR closed_by_xid >= %s"
                    ).format(key=sql.Identifier(business), table=table),
                    (synced, synced),
                ).fetchall()
                for (key,) in changed:
                    memory.pop(key, None)
            self._synced_at[cached] = position
            missing = [k for k in keys if k not in memory]
            self.hits += len(keys) - len(missing)
            self.misses += len(missing)
        if missing:
            rows = edw.execute(
                sql.SQL("SELECT {columns} FROM {table} WHERE {key} = ANY(%s)").format(
                    columns=sql.SQL(", ").join(map(sql.Identifier, names)),
                    table=table,
                    key=sql.Identifier(business),
                ),
                (missing,),
            ).fetchall()
            loaded: dict[str, list[tuple]] = {k: [] for k in missing}
            for row in rows:
                loaded[row[0]].append(row)
            with self._lock:
                memory.update(loaded)
        with self._lock:
            found = [row for k in keys for row in memory.get(k, ())]
        frame = pd.DataFrame(found, columns=[lookup.key, *names[1:]])
        for column in ("valid_from", "valid_to"):
            frame[column] = pd.to_datetime(frame[column], utc=True)
        return frame


class WarehouseLookups:
    """A step's lookups from the EDW; completeness from the OLTP horizon.

    The watermark is the time up to which every target the step reads holds every change:
    if nothing committed waits past a capture's ledger, it is now, bounded by the start of
    the oldest transaction still writing; otherwise it is what the capture's last batch
    recorded. Asked for some key values, it is per value: now (so bounded) for a value none
    of whose changes waits, just before the earliest waiting change for one that has some (a
    change's version is never valid before its change time). A committed change not loaded
    yet holds back only the events of its own key value.
    """

    def __init__(
        self,
        edw: psycopg.Connection,
        schemas: Schemas,
        *,
        oltp: psycopg.Connection | None,
        captures: Mapping[str, CaptureSpec],
        lookups: Sequence[Lookup],
        versions: VersionCache | None = None,
        off: frozenset[str] = frozenset(),
        sources: Mapping[str, ChangeSource] | None = None,
    ) -> None:
        self.version_cache = versions or VersionCache()
        #: Targets whose capture is turned off: read as they are, never waited for.
        self.off = off
        self.edw = edw
        self.schemas = schemas
        self.lookups = tuple(lookups)
        self.captures = {lookup.target: capture_for(captures, lookup) for lookup in self.lookups}
        #: The change source of each looked-up target, which completeness is read from:
        #: ``sources`` (any engine), else the change table through ``oltp`` (PostgreSQL).
        self.sources: dict[str, ChangeSource] = dict(sources or {})
        if oltp is not None:
            for target, spec in self.captures.items():
                if spec.engine == "postgresql" and target not in self.sources:
                    self.sources[target] = ChangeTable(oltp, spec)

    def _match(self, lookup: Lookup) -> str:
        """The capture's column holding the event field's values."""
        if isinstance(lookup, AsOf):
            return self.captures[lookup.target].keys[0]
        return lookup.match

    def watermark(self, keys: Mapping[str, Sequence[str]] | None = None) -> Completeness | None:
        live = [lookup for lookup in self.lookups if lookup.target not in self.off]
        if not self.lookups or any(lookup.target not in self.sources for lookup in live):
            return None
        if not live:
            # Every lookup's capture is off: nothing more will come, nothing to wait for.
            return Completeness(pd.Timestamp.now(tz="UTC"), {})
        # Every source's bound before anything else is read of it (see complete_until).
        until = min(
            pd.Timestamp(source.complete_until())
            for source in {id(s): s for s in (self.sources[x.target] for x in live)}.values()
        )
        pending: dict[str, dict[str, pd.Timestamp]] = {}
        asked = {k: list(v) for k, v in (keys or {}).items() if v}
        for lookup in live:
            spec = self.captures[lookup.target]
            source = self.sources[lookup.target]
            head = read_head(self.edw, self.schemas, spec.asset, str(spec.change_table), 0)
            loaded_until = head.end if head is not None else 0
            values = asked.get(lookup.key)
            # Only these values' changes waiting past the ledger hold them back (a range
            # scan from the ledger end; before the capture's first batch that would be the
            # whole change table, on every batch: the common rule applies then).
            since = (
                source.pending_since(loaded_until, self._match(lookup), values)
                if values and head is not None
                else None
            )
            if since is not None:
                field_pending = pending.setdefault(lookup.key, {})
                for value, earliest in since.items():
                    mark = pd.Timestamp(earliest) - JUST_BEFORE
                    field_pending[value] = min(field_pending.get(value, mark), mark)
            elif source.plan_end(loaded_until, max_changes=1) > loaded_until:
                # Changes wait: complete only as far as the capture's last batch recorded.
                if head is None or head.watermark is None:
                    return None
                until = min(until, pd.Timestamp(head.watermark))
        return Completeness(until, pending)

    def surrogate(self, lookup: AsOf) -> str:
        return surrogate_key(self.captures[lookup.target])

    def versions(self, lookup: AsOf, keys: list[str]) -> pd.DataFrame:
        spec = self.captures[lookup.target]
        if not keys:
            return pd.DataFrame(
                columns=[lookup.key, surrogate_key(spec), *lookup.columns, "valid_from", "valid_to"]
            )
        return self.version_cache.versions(self.edw, self.schemas, spec, lookup, keys)

    def range(
        self, lookup: Range, keys: list[str], since: pd.Timestamp, until: pd.Timestamp
    ) -> pd.DataFrame:
        spec = self.captures[lookup.target]
        names = [lookup.match, *lookup.columns, lookup.time]
        rows = self.edw.execute(
            sql.SQL(
                "SELECT {columns} FROM {table} WHERE {match} = ANY(%s) AND {time} BETWEEN %s AND %s"
            ).format(
                columns=sql.SQL(", ").join(map(sql.Identifier, names)),
                table=sql.Identifier(self.schemas.edw, spec.target),
                match=sql.Identifier(lookup.match),
                time=sql.Identifier(lookup.time),
            ),
            (keys, since.to_pydatetime(), until.to_pydatetime()),
        ).fetchall()
        frame = pd.DataFrame(rows, columns=[lookup.key, *lookup.columns, lookup.time])
        frame[lookup.time] = pd.to_datetime(frame[lookup.time], utc=True)
        return frame
