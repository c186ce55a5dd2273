"""Series as plain data: the cumulative state of a registry, or of another process's series file, and their sum.

Why it exists: a scrape of one process of a multi-process server answers for all of them
(:mod:`kserve_otel.export.series_files`). Each process's series become a *snapshot* (a list of families,
JSON-able dicts) and the snapshots are added up here; :mod:`kserve_otel.export.metrics_bridge` turns the sum
into OpenTelemetry metric data. A family is ``{"name", "kind", "description", "unit", "label_names",
"series"}`` (histograms add ``"bounds"``, and ``"exemplars": true`` when its series keep exemplars); a
histogram series is ``{"attributes", "start", "counts", "sum", "min", "max"}`` (min and max ``None`` when
nothing was observed), with ``"exemplars"`` when it has any: per bucket ``None`` or ``[value, unix time, trace
id, span id]`` (the ids as 32 and 16 lower-case hex digits), and with ``"native"`` when its family keeps
native histograms (``"native": true`` on the family): ``{"schema", "zero_threshold", "zero_count", "offset",
"counts"}``, the bucket counts from key ``offset``; a counter's is ``{"attributes", "start", "value"}``.
Summing keeps the latest exemplar of each bucket, and adds native histograms at the lower of their schemas.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable
from typing import Any

from ..recording.series import CounterFamily, HistogramFamily, SeriesRegistry
from ..recording.speedups import native_reduce

logger = logging.getLogger(__name__)

Snapshot = list[dict[str, Any]]

_WARN_INTERVAL = 300.0  # seconds between two warnings about the same thing
_last_warned: dict[str, float] = {}


def warn_now_and_then(key: str, message: str, *args: object) -> None:
    """Log a warning, or a debug line if the same ``key`` warned less than five minutes ago."""
    now = time.monotonic()
    repeated = now - _last_warned.get(key, -math.inf) < _WARN_INTERVAL
    if not repeated:
        _last_warned[key] = now
    logger.log(logging.DEBUG if repeated else logging.WARNING, message, *args)


def family_entry(family: Any) -> dict[str, Any]:
    """A family's description in a snapshot, without its series."""
    entry: dict[str, Any] = {
        "name": family.name, "kind": family.kind, "description": family.description, "unit": family.unit,
        "label_names": list(family.label_names), "series": [],
    }
    if isinstance(family, HistogramFamily):
        entry["bounds"] = list(family.bounds)
        if family.exemplars:
            entry["exemplars"] = True
        if family.native:
            entry["native"] = True
    return entry


def native_entry(native: tuple[int, float, int, int, Iterable[int]] | None) -> dict[str, Any] | None:
    """A series' native histogram as a snapshot holds it (from ``Histogram.native()``)."""
    if native is None:
        return None
    schema, threshold, zero, offset, counts = native
    return {"schema": schema, "zero_threshold": threshold, "zero_count": zero, "offset": offset,
            "counts": list(counts)}


def add_native(ours: dict[str, Any] | None, theirs: dict[str, Any], sign: int = 1) -> dict[str, Any]:
    """The sum of two native histograms (with ``sign=-1``, ``ours`` minus ``theirs``: what was counted since
    ``theirs``, an earlier state of the same series), at the lower of their schemas."""
    if ours is None:
        return {**theirs, "counts": list(theirs["counts"])}
    schema = min(ours["schema"], theirs["schema"])
    total: dict[int, int] = {}
    for native, factor in ((ours, 1), (theirs, sign)):
        offset, counts = native_reduce(native["offset"], native["counts"], native["schema"] - schema)
        for index, count in enumerate(counts):
            total[offset + index] = total.get(offset + index, 0) + factor * count
    used = [key for key, count in total.items() if count]
    offset = min(used, default=0)
    counts = [total.get(key, 0) for key in range(offset, max(used, default=-1) + 1)]
    return {"schema": schema, "zero_threshold": max(ours["zero_threshold"], theirs["zero_threshold"]),
            "zero_count": ours["zero_count"] + sign * theirs["zero_count"], "offset": offset, "counts": counts}


def exemplar_entries(exemplars: Iterable[tuple[float, float, int, int] | None]) -> list[list[Any] | None] | None:
    """A series' exemplars as a snapshot holds them, or ``None`` when it has none."""
    entries = [None if e is None else [e[0], e[1], format(e[2], "032x"), format(e[3], "016x")] for e in exemplars]
    return entries if any(e is not None for e in entries) else None


def histogram_entry(attributes: dict[str, Any], start: int, counts: Iterable[int], total: float, low: float,
                    high: float) -> dict[str, Any]:
    """A histogram series in a snapshot."""
    return {"attributes": attributes, "start": start, "counts": list(counts), "sum": total,
            "min": low if math.isfinite(low) else None, "max": high if math.isfinite(high) else None}


def snapshot_registry(registry: SeriesRegistry) -> Snapshot:
    """The cumulative state of ``registry``: one family per family that has series; histogram series that
    observed nothing are left out."""
    snapshot = []
    for family in registry.families():
        entry = family_entry(family)
        if isinstance(family, HistogramFamily):
            for series in family.all_series():
                counts, total, low, high, _, _ = series.snapshot()  # never resets: delta readers own that
                if sum(counts):
                    item = histogram_entry(dict(series.attributes), series.start_time_ns, counts, total, low, high)
                    exemplars = exemplar_entries(series.exemplars()) if family.exemplars else None
                    if exemplars is not None:
                        item["exemplars"] = exemplars
                    if family.native:
                        item["native"] = native_entry(series.native())
                    entry["series"].append(item)
        elif isinstance(family, CounterFamily):
            entry["series"] = [
                {"attributes": dict(s.attributes), "start": s.start_time_ns, "value": s.value}
                for s in family.all_series()
            ]
        if entry["series"]:
            snapshot.append(entry)
    return snapshot


def merge_snapshots(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Add snapshots up: families by name, series by attributes, both in the order first seen."""
    families: dict[str, tuple[dict[str, Any], dict[str, dict[str, Any]]]] = {}
    for snapshot in snapshots:
        for family in snapshot:
            if family["name"] not in families:
                families[family["name"]] = ({**family, "series": []}, {})
            merged, by_attributes = families[family["name"]]
            if family["kind"] != merged["kind"] or family.get("bounds") != merged.get("bounds"):
                warn_now_and_then(f"merge {family['name']}", "cannot merge metric %s: its kind or bounds differ "
                                  "between processes; skipping one process's series", family["name"])
                continue
            for series in family["series"]:
                key = json.dumps(series["attributes"], sort_keys=True)
                into = by_attributes.get(key)
                if into is None:
                    by_attributes[key] = into = {**series, "attributes": dict(series["attributes"])}
                    if "counts" in series:
                        into["counts"] = list(series["counts"])
                    merged["series"].append(into)
                    continue
                into["start"] = min(into["start"], series["start"])
                if "value" in series:
                    into["value"] += series["value"]
                    continue
                into["counts"] = [a + b for a, b in zip(into["counts"], series["counts"], strict=True)]
                if "exemplars" in series:
                    into["exemplars"] = _latest(into.get("exemplars"), series["exemplars"])
                if "native" in series:
                    into["native"] = add_native(into.get("native"), series["native"])
                into["sum"] += series["sum"]
                into["min"] = min((v for v in (into["min"], series["min"]) if v is not None), default=None)
                into["max"] = max((v for v in (into["max"], series["max"]) if v is not None), default=None)
    return [merged for merged, _ in families.values()]


def _latest(ours: list[Any] | None, theirs: list[Any]) -> list[Any]:
    """Per bucket, the exemplar observed last."""
    if ours is None:
        return list(theirs)
    return [b if a is None or (b is not None and b[1] > a[1]) else a for a, b in zip(ours, theirs, strict=True)]


def without_gauges(snapshot: Snapshot) -> Snapshot:
    """``snapshot`` less its up-down counters (requests in flight): what a process that ended leaves counted."""
    return [family for family in snapshot if family["kind"] != "updowncounter"]
