"""This package's series, written straight from a snapshot as Prometheus text 0.0.4 or OpenMetrics 1.0.

Why it exists: a scrape used to take every series through three conversions: OpenTelemetry data points (the
bridge), the OpenTelemetry Prometheus reader's prometheus_client metric families, and prometheus_client's
encoder, one formatted sample at a time. cProfile of a 2,000-series render (500 models x 4 steps, 34,000
samples, 2.4 MB) put 78% of the time in the encoder (``sample_line``: label escaping and validation per
sample), 21% in the reader's conversion (``HistogramMetricFamily.add_metric``, ``_convert_buckets``); the render
cost 0.80 x what prometheus_client's ``generate_latest`` costs for the same series (``benchmarks/scrape.py``,
median of 31 samples). Writing from a :mod:`kserve_otel.export.snapshots` snapshot formats each series' labels
once and each bucket line with one f-string: 0.07 x in the same run (25 ms for 2,000 series).

What it writes is exactly what that chain writes for the same series: the reader's metric names
(``sanitize_full_name``, the unit suffix from ``map_unit``, ``_total`` for counters), its labels (attribute keys
sanitized, values that are not strings JSON-encoded, every label of the family on every sample, ``""`` where a
series lacks it: the overflow series ``otel.metric.overflow`` shows as ``otel_metric_overflow="true"``), its
``le`` values (``str(bound)``), up-down counters as gauges, and prometheus_client's HELP/TYPE/UNIT lines,
escaping, label order and number formatting. ``tests/test_text_exposition.py`` compares both outputs.
The reader's own families (``target_info``, the SDK's metrics) still go through prometheus_client.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from itertools import accumulate
from typing import Any

# The reader's own name mapping (a private module of the exporter), so that the names cannot drift apart;
# tests/test_text_exposition.py compares the outputs with every installed version.
from opentelemetry.exporter.prometheus._mapping import map_unit, sanitize_attribute, sanitize_full_name
from prometheus_client import exposition as _text
from prometheus_client.openmetrics import exposition as _openmetrics
from prometheus_client.utils import floatToGoString

from .snapshots import Snapshot

UNDERSCORES = _openmetrics.UNDERSCORES
ALLOWUTF8 = _openmetrics.ALLOWUTF8

#: Name escapings under which prometheus_client writes this package's (sanitized, legacy-valid) names unchanged.
_PLAIN_ESCAPINGS = (UNDERSCORES, ALLOWUTF8)


def direct_format(encoder: Callable[..., bytes]) -> tuple[bool, str] | None:
    """``(openmetrics, escaping)`` when ``encoder`` (as ``prometheus_client.exposition.choose_encoder`` returns
    it) writes a format this module writes too, else ``None`` (then prometheus_client writes everything)."""
    func, keywords = encoder, {}
    if isinstance(encoder, partial):
        func, keywords = encoder.func, dict(encoder.keywords)
        if encoder.args:
            return None
    escaping = keywords.pop("escaping", UNDERSCORES)
    keywords.pop("version", None)  # OpenMetrics 2.0 differs from 1.0 only in native histograms: none here
    if keywords or escaping not in _PLAIN_ESCAPINGS:
        return None
    if func is _text.generate_latest:
        return False, escaping
    if func is _openmetrics.generate_latest:
        return True, escaping
    return None


def family_name(family: dict[str, Any]) -> str:
    """The prometheus_client family name the OpenTelemetry Prometheus reader gives a snapshot family (what
    :class:`~kserve_otel.export.exposition.MergedCollector` compares): counters without ``_total``, with the
    unit."""
    name = sanitize_full_name(family["name"])
    unit = map_unit(family["unit"] or "")
    if family["kind"] == "counter" and name.endswith("_total"):
        name = name[:-6]
    if unit and not name.endswith("_" + unit):
        name += "_" + unit
    return name


def families_to_write(snapshot: Snapshot, seen: set[str] | None) -> Iterator[tuple[dict[str, Any], str, list[Any]]]:
    """The families of ``snapshot`` that an exposition writes, each with its name and the series to write:
    histograms without observations are left out, families left empty skipped, and with ``seen`` the names
    already written elsewhere skipped (first one wins) and the written ones added. Both encodings use it."""
    for family in snapshot:
        if family["kind"] == "histogram":
            series = [s for s in family["series"] if sum(s["counts"])]
        else:
            series = family["series"]
        if not series:
            continue
        name = family_name(family)
        if seen is not None:
            if name in seen:
                continue
            seen.add(name)
        yield family, name, series


def write(snapshot: Snapshot, openmetrics: bool = False, escaping: str = UNDERSCORES,
          seen: set[str] | None = None) -> str:
    """The families of ``snapshot`` in the Prometheus text format 0.0.4 (or OpenMetrics 1.0, without the
    closing ``# EOF``). With ``seen``, families whose name is in it are left out and the names written are
    added to it (first one wins, as in :class:`~kserve_otel.export.exposition.MergedCollector`)."""
    out: list[str] = []
    counts = _Formatted()
    for family, name, series in families_to_write(snapshot, seen):
        kind = family["kind"]
        _header(out, family, name, kind, openmetrics)
        sample = name.replace(":", "_") if openmetrics and escaping == UNDERSCORES else name
        rows, keys = label_rows(series)
        if kind == "histogram":
            _histogram(out, sample, family["bounds"], series, rows, keys, counts, openmetrics)
        else:
            _numbers(out, sample + "_total" if kind == "counter" else sample, series, rows, keys)
    return "".join(out)


# --------------------------------------------------------------------------------------------- pieces

_PROMETHEUS_TYPES = {"histogram": "histogram", "counter": "counter", "updowncounter": "gauge"}


def _header(out: list[str], family: dict[str, Any], name: str, kind: str, openmetrics: bool) -> None:
    doc = family["description"] or ""
    kind = _PROMETHEUS_TYPES[kind]
    if openmetrics:
        doc = doc.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")
        out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")
        unit = map_unit(family["unit"] or "")
        if unit:
            out.append(f"# UNIT {name} {unit}\n")
        return
    if kind == "counter":
        name += "_total"  # prometheus_client's munging of OpenMetrics counters into the text format
    doc = doc.replace("\\", r"\\").replace("\n", r"\n")
    out.append(f"# HELP {name} {doc}\n# TYPE {name} {kind}\n")


_sanitized: dict[str, str] = {}


def _label_name(key: str) -> str:
    name = _sanitized.get(key)
    if name is None:
        name = sanitize_attribute(key)
        if len(_sanitized) < 10_000:
            _sanitized[key] = name
    return name


def _label_text(value: object) -> str:
    """The reader's ``_check_value``: a string as it is, anything else as JSON."""
    if type(value) is not str:
        value = str(value) if isinstance(value, str) else json.dumps(value, default=str)
    return value  # type: ignore[return-value]


def _label_value(value: object) -> str:
    """The reader's ``_check_value``, then prometheus_client's label value escaping."""
    value = _label_text(value)
    if "\\" in value or "\n" in value or '"' in value:  # type: ignore[operator]
        value = value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")  # type: ignore[union-attr]
    return value  # type: ignore[return-value]


def label_rows(series: Iterable[dict[str, Any]], escaped: bool = True) -> tuple[list[dict[str, str]], list[str]]:
    """Each series' labels (sanitized names, values escaped for the text formats unless ``escaped`` is false)
    and the family's label names, sorted: the union over its series, as the reader builds it."""
    rows = []
    keys: set[str] = set()
    for s in series:
        labels = {_label_name(k): v for k, v in s["attributes"].items()}
        keys.update(labels)
        rows.append(labels)
    value = _label_value if escaped else _label_text
    for labels in rows:
        for k, v in labels.items():
            labels[k] = value(v)
    return rows, sorted(keys)


def _joined(labels: dict[str, str], keys: list[str]) -> str:
    get = labels.get
    return ",".join([f'{k}="{get(k, "")}"' for k in keys])


def _histogram(out: list[str], name: str, bounds: list[float], series: list[dict[str, Any]],
               rows: list[dict[str, str]], keys: list[str], counts: _Formatted, openmetrics: bool = False) -> None:
    with_le = sorted({*keys, "le"})
    at = with_le.index("le")
    before, after = with_le[:at], with_le[at + 1:]
    les = [f'le="{b}"' for b in bounds] + ['le="+Inf"']
    # Don't include sum and count if there are negative buckets (prometheus_client's HistogramMetricFamily).
    totals = not bounds or float(bounds[0]) >= 0
    bucket, count, total = f"{name}_bucket{{", f"{name}_count", f"{name}_sum"
    for s, labels in zip(series, rows):
        head = bucket + "".join([f'{k}="{labels.get(k, "")}",' for k in before])
        tail = "".join([f',{k}="{labels.get(k, "")}"' for k in after]) + "} "
        cumulative = list(accumulate(s["counts"]))
        exemplars = s.get("exemplars") if openmetrics else None
        if exemplars is None:
            out.extend([f"{head}{le}{tail}{counts[c]}\n" for le, c in zip(les, cumulative)])
        else:  # OpenMetrics only: ``... 8.0 # {trace_id="...",span_id="..."} 0.054 1520879607.789``
            out.extend([f"{head}{le}{tail}{counts[c]}{_exemplar(e)}\n" for le, c, e in zip(les, cumulative, exemplars)])
        if totals:
            plain = "{" + _joined(labels, keys) + "}" if keys else ""
            last = cumulative[min(len(les), len(cumulative)) - 1]  # the last bucket zip reaches
            out.append(f"{count}{plain} {counts[last]}\n{total}{plain} {floatToGoString(s['sum'])}\n")


def _exemplar(exemplar: list[Any] | None) -> str:
    """A bucket line's OpenMetrics exemplar: its trace and span ids, value and timestamp (``""`` for none)."""
    if exemplar is None:
        return ""
    value, when, trace_id, span_id = exemplar
    return f' # {{trace_id="{trace_id}",span_id="{span_id}"}} {floatToGoString(value)} {when:.3f}'


def _numbers(out: list[str], name: str, series: list[dict[str, Any]], rows: list[dict[str, str]],
             keys: list[str]) -> None:
    for s, labels in zip(series, rows):
        plain = "{" + _joined(labels, keys) + "}" if keys else ""
        out.append(f"{name}{plain} {floatToGoString(s['value'])}\n")


class _Formatted(dict):  # type: ignore[type-arg]
    """Bucket counts as prometheus_client writes them (``floatToGoString``), each distinct one formatted once."""

    def __missing__(self, value: int) -> str:
        text = self[value] = floatToGoString(value)
        return text
