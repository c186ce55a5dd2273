"""Delivers the hot path's series (:mod:`kserve_otel.recording.series`) to OpenTelemetry SDK metric readers.

A bridged reader receives, with every collection, the SDK's own metrics plus one extra scope
(``kserve_otel``) holding the step histograms and counters as ordinary ``Histogram`` and ``Sum`` data,
in the temporality the reader prefers; a reader whose exporter asks for exponential histograms
(``OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION=base2_exponential_bucket_histogram``, or a
``preferred_aggregation`` of ``ExponentialBucketHistogramAggregation``) gets the native histogram of each
series that keeps one (:mod:`kserve_otel.recording.speedups`) as an ``ExponentialHistogram``. Readers and
exporters downstream cannot tell them from metrics recorded through the SDK's instruments, which is the point:
the Prometheus reader, the OTLP exporter and the in-memory reader of tests all work unchanged.

How: the SDK hands every reader a collect callback through ``MetricReader._set_collect_callback`` (when it is
registered with ``MeterProvider(metric_readers=...)`` or ``MeterProvider.add_metric_reader``).
:func:`bridge_reader` wraps that callback on the reader instance, so the reader's own ``collect()`` returns
the merged data. That method is the SDK's one seam between providers and readers (stable since SDK 1.10);
it is the only SDK internal this package relies on for metrics, and ``tests/test_metrics_bridge.py`` fails
loudly if it changes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from time import time_ns
from typing import Any

from opentelemetry.sdk.metrics import Counter as CounterInstrument
from opentelemetry.sdk.metrics import Exemplar
from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Buckets,
    ExponentialHistogram,
    ExponentialHistogramDataPoint,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricReader,
    MetricsData,
    NumberDataPoint,
    ResourceMetrics,
    ScopeMetrics,
    Sum,
)
from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.util.instrumentation import InstrumentationScope

from .._version import __version__
from ..names import SCOPE_NAME
from ..recording.series import REGISTRY, CounterFamily, HistogramFamily, SeriesRegistry, UpDownCounterFamily
from .snapshots import Snapshot, add_native, native_entry, snapshot_registry

_SCOPE = InstrumentationScope(SCOPE_NAME, __version__)
_BRIDGE_ATTRIBUTE = "_kserve_otel_bridge"

CollectCallback = Callable[..., "MetricsData | None"]


class _ReaderBridge:
    """Per-reader state: the temporality the reader wants, and for delta readers, what was last exported."""

    def __init__(self, reader: MetricReader, registry: SeriesRegistry, resource: Resource | None) -> None:
        self.histogram_temporality = _preferred_temporality(reader, HistogramInstrument)
        self.counter_temporality = _preferred_temporality(reader, CounterInstrument)
        #: Whether the reader wants histograms as exponential ones (then series with a native histogram are
        #: reported as such; the others keep their explicit buckets).
        self.exponential = _prefers_exponential(reader)
        self.registry = registry
        self.resource = resource
        self._previous: dict[int, tuple[int, Any]] = {}  # id(series) -> (time of last export, what it exported)
        self._lock = threading.Lock()
        #: Other processes of the same server (a :class:`~kserve_otel.export.series_files.SharedSeries`) whose
        #: series this reader reports summed with this process's: set for the Prometheus endpoint of a
        #: multi-worker server. Cumulative readers only (a sum over processes has no per-process delta state).
        self.peers: Any = None
        #: Whether the reader feeds a prometheus_client registry (only such collections are captured by
        #: :func:`capturing_series`: a scrape writes their series itself).
        self.prometheus = _is_prometheus_reader(reader)

    def wrap(self, collect: CollectCallback) -> CollectCallback:
        def collect_with_steps(reader: MetricReader, timeout_millis: float = 10_000, **kwargs: Any) -> MetricsData | None:
            data = collect(reader, timeout_millis=timeout_millis, **kwargs)
            return self.merge(data)

        collect_with_steps.__wrapped__ = collect  # type: ignore[attr-defined]
        return collect_with_steps

    def merge(self, data: MetricsData | None) -> MetricsData | None:
        captured = getattr(_capture, "snapshots", None)
        if captured is not None and self.prometheus and self.cumulative:
            return self._collect_captured(data, captured)
        metrics = self.produce()
        if not metrics:
            return data
        scope_metrics = ScopeMetrics(scope=_SCOPE, metrics=metrics, schema_url="")
        if data is None or not data.resource_metrics:
            resource = self.resource if self.resource is not None else Resource.get_empty()
            return MetricsData(resource_metrics=[ResourceMetrics(resource, [scope_metrics], resource.schema_url)])
        first, *rest = data.resource_metrics
        merged = ResourceMetrics(first.resource, [*first.scope_metrics, scope_metrics], first.schema_url)
        return MetricsData(resource_metrics=[merged, *rest])

    @property
    def cumulative(self) -> bool:
        """Whether this reader takes every series cumulatively (the Prometheus reader does)."""
        return self.histogram_temporality == self.counter_temporality == _CUMULATIVE

    def snapshot(self) -> Snapshot:
        """What a cumulative collection of this reader reports, as a :mod:`kserve_otel.export.snapshots`
        snapshot: the registry's series, or the sum over :attr:`peers` when set."""
        return self.peers.merged_snapshot() if self.peers is not None else snapshot_registry(self.registry)

    def _collect_captured(self, data: MetricsData | None, captured: list[Snapshot]) -> MetricsData | None:
        """A collection under :func:`capturing_series`: the series go to ``captured``, the data stays the SDK's.
        With series and no SDK data, an empty resource stands in, so the reader still reports its
        ``target_info`` as it does when the series are in the data."""
        snapshot = self.snapshot()
        captured.append(snapshot)
        if snapshot and (data is None or not data.resource_metrics):
            resource = self.resource if self.resource is not None else Resource.get_empty()
            return MetricsData(resource_metrics=[ResourceMetrics(resource, [], resource.schema_url)])
        return data

    def produce(self) -> list[Metric]:
        """One OpenTelemetry ``Metric`` per family that has series, in this reader's temporality."""
        now = time_ns()
        if self.peers is not None and self.cumulative:
            return _metrics_from_snapshot(self.peers.merged_snapshot(), now, self.exponential)
        metrics: list[Metric] = []
        with self._lock:  # two collections of one reader at once must not interleave their delta state
            for family in self.registry.families():
                if isinstance(family, HistogramFamily):
                    hist_points = self._histogram_points(family, now)
                    if hist_points:
                        metrics.append(Metric(family.name, family.description, family.unit,
                                              _histogram_data(hist_points, self.histogram_temporality)))
                elif isinstance(family, CounterFamily):
                    monotonic = not isinstance(family, UpDownCounterFamily)
                    temporality = self.counter_temporality if monotonic else _CUMULATIVE
                    sum_points = self._counter_points(family, now, temporality)
                    if sum_points:
                        metrics.append(Metric(family.name, family.description, family.unit, Sum(
                            data_points=sum_points, aggregation_temporality=temporality, is_monotonic=monotonic,
                        )))
        return metrics

    def _histogram_points(self, family: HistogramFamily, now: int) -> list[Any]:
        delta = self.histogram_temporality == AggregationTemporality.DELTA
        exponential = self.exponential and family.native
        points: list[Any] = []
        for series in family.all_series():
            counts, total, low, high, interval_low, interval_high = series.snapshot(reset_interval=delta)
            native = native_entry(series.native()) if exponential else None
            start = series.start_time_ns
            if delta:
                last_time, last = self._previous.get(id(series), (start, None))
                self._previous[id(series)] = (now, (counts, total, native))
                if last is not None:
                    counts = tuple(c - p for c, p in zip(counts, last[0]))
                    total -= last[1]
                    if native is not None and last[2] is not None:
                        native = add_native(native, last[2], sign=-1)
                start, low, high = last_time, interval_low, interval_high
            if not any(counts):  # a series is created just before its first observation
                continue
            found = _exemplars(series.exemplars(), since=start if delta else 0) if family.exemplars else []
            points.append(_histogram_point(series.attributes, start, now, counts, series.bounds, total, low, high,
                                           native, found))
        return points

    def _counter_points(
        self, family: CounterFamily, now: int, temporality: AggregationTemporality
    ) -> list[NumberDataPoint]:
        delta = temporality == AggregationTemporality.DELTA
        points = []
        for series in family.all_series():
            value, start = series.value, series.start_time_ns
            if delta:
                last_time, last = self._previous.get(id(series), (start, 0))
                self._previous[id(series)] = (now, value)
                value, start = value - last, last_time
                if value == 0:
                    continue
            points.append(NumberDataPoint(
                attributes=series.attributes, start_time_unix_nano=start, time_unix_nano=now, value=value,
            ))
        return points


_CUMULATIVE = AggregationTemporality.CUMULATIVE
_capture = threading.local()


@contextmanager
def capturing_series() -> Iterator[list[Snapshot]]:
    """While active, bridged Prometheus readers (cumulative) collected on this thread leave the series out of their
    OpenTelemetry data and append them, as one snapshot per collection, to the list this yields.

    The seam of the scrape path (:func:`kserve_otel.export.exposition.render`): the Prometheus reader still
    turns the SDK's own metrics into prometheus_client families, and :mod:`kserve_otel.export.text_exposition`
    writes the captured series itself. Other threads (a periodic OTLP export) are not affected.
    """
    previous = getattr(_capture, "snapshots", None)
    _capture.snapshots = captured = []
    try:
        yield captured
    finally:
        _capture.snapshots = previous


def _metrics_from_snapshot(families: list[dict[str, Any]], now: int, exponential: bool = False) -> list[Metric]:
    """Cumulative OpenTelemetry metrics from a :mod:`kserve_otel.export.snapshots` snapshot (a sum over
    processes); with ``exponential``, the series that keep a native histogram as exponential histogram
    points."""
    metrics: list[Metric] = []
    for family in families:
        if family["kind"] == "histogram":
            points: list[Any] = []
            for series in family["series"]:
                if not any(series["counts"]):
                    continue
                low = math.inf if series["min"] is None else series["min"]
                high = -math.inf if series["max"] is None else series["max"]
                found = _exemplars(
                    (None if e is None else (e[0], e[1], int(e[2], 16), int(e[3], 16)) for e in series["exemplars"]),
                    since=0) if series.get("exemplars") else []
                points.append(_histogram_point(
                    series["attributes"], series["start"], now, tuple(series["counts"]), tuple(family["bounds"]),
                    series["sum"], low, high, series.get("native") if exponential else None, found))
            data: Any = _histogram_data(points, _CUMULATIVE)
        else:
            points = [NumberDataPoint(
                attributes=series["attributes"], start_time_unix_nano=series["start"], time_unix_nano=now,
                value=series["value"],
            ) for series in family["series"]]
            data = Sum(data_points=points, aggregation_temporality=_CUMULATIVE,
                       is_monotonic=family["kind"] == "counter")
        if points:
            metrics.append(Metric(family["name"], family["description"], family["unit"], data))
    return metrics


def _histogram_data(points: list[Any], temporality: AggregationTemporality) -> Histogram | ExponentialHistogram:
    """A family's points as the SDK's data: exponential when they are (a family's are all of one kind)."""
    exponential = bool(points) and isinstance(points[0], ExponentialHistogramDataPoint)
    return (ExponentialHistogram if exponential else Histogram)(data_points=points, aggregation_temporality=temporality)


def _histogram_point(attributes: Any, start: int, now: int, counts: tuple[int, ...], bounds: tuple[float, ...],
                     total: float, low: float, high: float, native: dict[str, Any] | None,
                     exemplars: list[Exemplar]) -> HistogramDataPoint | ExponentialHistogramDataPoint:
    """One series as an OpenTelemetry point, from the hot path or from a snapshot alike: its native histogram
    (a snapshot's ``"native"`` entry) as an exponential point when one is given, else its explicit buckets."""
    count = sum(counts)
    if native is not None:
        return _exponential_point(attributes, start, now, count, total, low, high, native, exemplars)
    return HistogramDataPoint(
        attributes=attributes, start_time_unix_nano=start, time_unix_nano=now, count=count, sum=total,
        bucket_counts=counts, explicit_bounds=bounds, min=low, max=high, exemplars=exemplars)


def _exponential_point(attributes: Any, start: int, now: int, count: int, total: float, low: float, high: float,
                       native: dict[str, Any], exemplars: list[Exemplar]) -> ExponentialHistogramDataPoint:
    """A series' native histogram (a snapshot's ``"native"`` entry) as an OpenTelemetry exponential point.

    Prometheus's schema is OpenTelemetry's scale; its bucket ``k`` holds (base**(k-1), base**k] where
    OpenTelemetry's index ``i`` holds (base**i, base**(i+1)]: the offset is one less. Durations are never
    negative, so the negative range is empty."""
    return ExponentialHistogramDataPoint(
        attributes=attributes, start_time_unix_nano=start, time_unix_nano=now, count=count, sum=total,
        scale=native["schema"], zero_count=native["zero_count"],
        positive=Buckets(offset=native["offset"] - 1, bucket_counts=list(native["counts"])),
        negative=Buckets(offset=0, bucket_counts=[]), flags=0, min=low, max=high, exemplars=exemplars)


def _exemplars(found: Any, since: int) -> list[Exemplar]:
    """A series' bucket exemplars (``None`` or (value, Unix time, trace id, span id) each) as the SDK's
    ``Exemplar`` objects, those observed at ``since`` (ns) or later: a delta point carries only its interval's."""
    return [Exemplar({}, value, int(when * 1e9), span_id=span, trace_id=trace)
            for value, when, trace, span in (e for e in found if e is not None) if when * 1e9 >= since]


def _is_prometheus_reader(reader: MetricReader) -> bool:
    try:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
    except ImportError:
        return False
    return isinstance(reader, PrometheusMetricReader)


def _prefers_exponential(reader: MetricReader) -> bool:
    # As for temporality: the reader keys its aggregations by the SDK's private instrument classes.
    preferences = getattr(reader, "_instrument_class_aggregation", {})
    return any(isinstance(cls, type) and issubclass(cls, HistogramInstrument)
               and isinstance(aggregation, ExponentialBucketHistogramAggregation)
               for cls, aggregation in preferences.items())


def _preferred_temporality(reader: MetricReader, instrument: type) -> AggregationTemporality:
    # The reader keys its preferences by the SDK's private instrument classes, subclasses of the public ones.
    preferences = getattr(reader, "_instrument_class_temporality", {})
    for cls, temporality in preferences.items():
        if isinstance(cls, type) and issubclass(cls, instrument):
            return temporality  # type: ignore[no-any-return]
    return AggregationTemporality.CUMULATIVE


def bridge_reader(
    reader: MetricReader, resource: Resource | None = None, registry: SeriesRegistry = REGISTRY
) -> MetricReader:
    """Make ``reader`` receive the step metrics with every collection; returns ``reader``.

    Call it before or after the reader is registered with a ``MeterProvider``; calling it twice is harmless.
    ``resource`` is used when the provider itself has no metrics to report (it normally has, and then the
    provider's resource is kept).
    """
    if getattr(reader, _BRIDGE_ATTRIBUTE, None) is not None:
        return reader
    bridge = _ReaderBridge(reader, registry, resource)
    original_setter = reader._set_collect_callback  # the SDK's seam; see the module docstring

    def set_collect_callback(func: CollectCallback | None) -> None:
        original_setter(None if func is None else bridge.wrap(func))

    reader._set_collect_callback = set_collect_callback  # type: ignore[method-assign]
    setattr(reader, _BRIDGE_ATTRIBUTE, bridge)
    current = getattr(reader, "_collect", None)
    if current is not None:  # already registered with a provider
        original_setter(bridge.wrap(current))
    return reader


def bridge_of(reader: MetricReader) -> _ReaderBridge | None:
    """The bridge :func:`bridge_reader` gave ``reader`` (``None`` if it has none)."""
    return getattr(reader, _BRIDGE_ATTRIBUTE, None)


def is_bridged(reader: MetricReader) -> bool:
    """Whether :func:`bridge_reader` was applied to ``reader``."""
    return bridge_of(reader) is not None
