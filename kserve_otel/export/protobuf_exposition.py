"""The Prometheus protobuf exposition (``io.prometheus.client.MetricFamily``, length-delimited), the one format
that carries native histograms: a Prometheus started with ``--enable-feature=native-histograms`` asks for it.

Why written here: neither prometheus_client nor OpenTelemetry's Prometheus exporter writes it, and the wire
format is small (varints, length-delimited fields; ``metrics.proto`` of prometheus/client_model). Each family is
one ``MetricFamily`` message preceded by its length. A step histogram's message holds both of its forms: the
classic buckets (cumulative, with their exemplars; the ``+Inf`` bucket implied by the count) and the native
histogram (schema, zero threshold and count, one positive span per run of buckets, deltas of the counts).
Families of other collectors (prometheus_client's process metrics, ``target_info``) are written from their
samples. ``tests/test_protobuf_exposition.py`` decodes the bytes with Prometheus's own ``metrics.proto``
compiled by protobuf, and a real Prometheus reads them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.metrics_core import Metric

from .snapshots import Snapshot
from .text_exposition import families_to_write, label_rows

__all__ = ["CONTENT_TYPE", "accepts", "write_families", "write_snapshot"]

CONTENT_TYPE = "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"
_COUNTER, _GAUGE, _SUMMARY, _UNTYPED, _HISTOGRAM = 0, 1, 2, 3, 4
_DOUBLE = struct.Struct("<d")


def accepts(accept: str | None) -> bool:
    """Whether a scraper's ``Accept`` header asks for the delimited ``MetricFamily`` protobuf."""
    for part in (accept or "").split(","):
        fields = [f.strip() for f in part.split(";")]
        if fields[0] == "application/vnd.google.protobuf" and "proto=io.prometheus.client.MetricFamily" in fields \
                and "encoding=delimited" in fields:
            return True
    return False


# ------------------------------------------------------------------------------------------------ wire format


_SMALL = [bytes((i,)) for i in range(128)]


def _varint(value: int) -> bytes:
    if 0 <= value < 128:  # most are: field keys, lengths of labels, bucket counts of a quiet series
        return _SMALL[value]
    out = bytearray()
    value &= (1 << 64) - 1
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _zigzag(value: int) -> int:
    return (value << 1) ^ (value >> 63)


def _key(field: int, wire: int) -> bytes:
    return _KEYS.get((field, wire)) or _varint(field << 3 | wire)


_KEYS = {(field, wire): _varint(field << 3 | wire) for field in range(1, 16) for wire in (0, 1, 2)}


def _string(field: int, text: str) -> bytes:
    data = text.encode("utf-8")
    return _key(field, 2) + _varint(len(data)) + data


def _message(field: int, body: bytes) -> bytes:
    return _key(field, 2) + _varint(len(body)) + body


def _double(field: int, value: float) -> bytes:
    return _key(field, 1) + _DOUBLE.pack(value)


def _uint(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(value)


def _sint(field: int, value: int) -> bytes:
    return _key(field, 0) + _varint(_zigzag(value))


def _labels(labels: dict[str, str]) -> bytes:
    return b"".join(_message(1, _string(1, name) + _string(2, value)) for name, value in labels.items())


def _family(name: str, help_text: str, kind: int, metrics: list[bytes]) -> bytes:
    body = _string(1, name) + (_string(2, help_text) if help_text else b"") + _uint(3, kind)
    body += b"".join(_message(4, metric) for metric in metrics)
    return _varint(len(body)) + body


# ------------------------------------------------------------------------------------------- this package's


def _label_values(series: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Each series' labels as the text writer writes them (sanitized names, every label of the family on every
    series, ``""`` where one lacks it), unescaped."""
    rows, keys = label_rows(series, escaped=False)
    return [{k: row.get(k, "") for k in keys} for row in rows]


def _exemplar(exemplar: list[Any]) -> bytes:
    value, when, trace_id, span_id = exemplar
    seconds = math.floor(when)
    stamp = _uint(1, seconds) + _uint(2, int((when - seconds) * 1e9))
    return _labels({"trace_id": trace_id, "span_id": span_id}) + _double(2, value) + _message(3, stamp)


def _native(native: dict[str, Any]) -> bytes:
    """The native fields of a ``Histogram`` message: schema, zero threshold and count, spans and deltas."""
    out = _sint(5, native["schema"]) + _double(6, native["zero_threshold"]) + _uint(7, native["zero_count"])
    counts, offset = list(native["counts"]), native["offset"]
    spans: list[tuple[int, int]] = []  # (gap from the previous span's end, or the first key; length)
    deltas: list[int] = []
    previous_end, previous_count, index = None, 0, 0
    while index < len(counts):
        if counts[index] == 0:
            index += 1
            continue
        start = index
        while index < len(counts) and counts[index] != 0:
            deltas.append(counts[index] - previous_count)
            previous_count = counts[index]
            index += 1
        key = offset + start
        spans.append((key if previous_end is None else key - previous_end, index - start))
        previous_end = offset + index
    for gap, length in spans:
        out += _message(12, _sint(1, gap) + _uint(2, length))
    if deltas:
        packed = b"".join(_varint(_zigzag(d)) for d in deltas)
        out += _key(13, 2) + _varint(len(packed)) + packed
    return out


def write_snapshot(snapshot: Snapshot, seen: set[str] | None = None) -> bytes:
    """The families of ``snapshot`` as delimited ``MetricFamily`` messages; ``seen`` as in
    :func:`kserve_otel.export.text_exposition.write` (families already written are left out, written names
    added)."""
    out = []
    for family, name, series in families_to_write(snapshot, seen):
        kind = family["kind"]
        bounds = [_double(2, float(bound)) for bound in family.get("bounds", ())]  # the same for every series
        metrics = []
        for s, labels in zip(series, _label_values(series)):
            if kind == "histogram":
                count = sum(s["counts"])
                body = _uint(1, count) + _double(2, s["sum"])
                cumulative = 0
                exemplars = s.get("exemplars") or [None] * len(s["counts"])
                for bound, bucket, exemplar in zip(bounds, s["counts"], exemplars):
                    cumulative += bucket
                    one = _uint(1, cumulative) + bound
                    if exemplar is not None:
                        one += _message(3, _exemplar(exemplar))
                    body += _message(3, one)
                if s.get("native") is not None:
                    body += _native(s["native"])
                body += _message(15, _uint(1, s["start"] // 1_000_000_000) + _uint(2, s["start"] % 1_000_000_000))
                metrics.append(_labels(labels) + _message(7, body))
            elif kind == "counter":
                metrics.append(_labels(labels) + _message(3, _double(1, float(s["value"]))))
            else:
                metrics.append(_labels(labels) + _message(2, _double(1, float(s["value"]))))
        full = name + "_total" if kind == "counter" else name
        out.append(_family(full, family["description"], {"histogram": _HISTOGRAM, "counter": _COUNTER}.get(
            kind, _GAUGE), metrics))
    return b"".join(out)


# ---------------------------------------------------------------------------------------- other collectors


def write_families(families: Iterable[Metric]) -> bytes:
    """prometheus_client metric families as delimited ``MetricFamily`` messages, from their samples."""
    out = []
    for family in families:
        kind = family.type
        if kind == "counter":
            metrics = [_labels(s.labels) + _message(3, _double(1, s.value)) for s in family.samples
                       if s.name.endswith("_total")]
            out.append(_family(family.name + "_total", family.documentation, _COUNTER, metrics))
        elif kind == "histogram":
            out.append(_family(family.name, family.documentation, _HISTOGRAM, _classic(family)))
        elif kind == "summary":
            out.append(_family(family.name, family.documentation, _SUMMARY, _summary(family)))
        else:  # gauge, info, stateset, unknown...: each sample as a gauge of its own name
            by_name: dict[str, list[bytes]] = {}
            for s in family.samples:
                by_name.setdefault(s.name, []).append(_labels(s.labels) + _message(2, _double(1, s.value)))
            out.extend(_family(name, family.documentation, _GAUGE if kind != "unknown" else _UNTYPED, metrics)
                       for name, metrics in by_name.items())
    return b"".join(out)


def _grouped(family: Metric, drop: str) -> dict[tuple[tuple[str, str], ...], dict[str, Any]]:
    groups: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for s in family.samples:
        labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != drop))
        group = groups.setdefault(labels, {"parts": []})
        group["parts"].append((s.name[len(family.name):], s.labels.get(drop), s.value))
    return groups


def _classic(family: Metric) -> list[bytes]:
    return _grouped_points(family, "le", 7, lambda le, value: _message(3, _uint(1, int(value)) + _double(2, float(le)))
                           if le != "+Inf" else b"")


def _summary(family: Metric) -> list[bytes]:
    return _grouped_points(family, "quantile", 4, lambda q, value: _message(3, _double(1, float(q)) + _double(2, value)))


def _grouped_points(family: Metric, drop: str, field: int, point: Callable[[str, float], bytes]) -> list[bytes]:
    """A histogram's (``drop`` = ``le``, ``Metric`` field 7) or summary's (``quantile``, field 4) samples as one
    message per label set: count, sum, then a point per bucket or quantile sample."""
    metrics = []
    for labels, group in _grouped(family, drop).items():
        body, count, total = b"", 0.0, 0.0
        for suffix, key, value in group["parts"]:
            if suffix == "_count":
                count = value
            elif suffix == "_sum":
                total = value
            elif key is not None and suffix in ("", "_bucket"):
                body += point(key, value)
        metrics.append(_labels(dict(labels)) + _message(field, _uint(1, int(count)) + _double(2, total) + body))
    return metrics
