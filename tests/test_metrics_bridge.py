"""The bridge: step series reach any SDK reader as real OpenTelemetry Histogram and Sum data."""

from __future__ import annotations

from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    InMemoryMetricReader,
    MetricReader,
    Sum,
)
from opentelemetry.sdk.resources import Resource

from kserve_otel import instrument_step
from kserve_otel.export.metrics_bridge import bridge_reader, is_bridged
from kserve_otel.names import KSERVE_BUCKETS


def metrics_by_name(reader: InMemoryMetricReader) -> dict:
    data = reader.get_metrics_data()
    out = {}
    for rm in data.resource_metrics if data is not None else ():
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                out[metric.name] = (sm.scope.name, metric, rm.resource)
    return out


def points_for(metric, model):
    return [p for p in metric.data.data_points if p.attributes.get("model_name") == model]


def test_sdk_still_hands_readers_their_collect_callback_through_the_seam():
    """If the SDK ever renames this seam, the bridge would silently export nothing: fail here instead."""
    assert hasattr(MetricReader, "_set_collect_callback")
    reader = InMemoryMetricReader()
    MeterProvider(metric_readers=[reader])
    assert callable(getattr(reader, "_collect", None))


def test_bridged_reader_receives_step_histograms_with_kserve_buckets(model):
    reader = bridge_reader(InMemoryMetricReader())
    provider = MeterProvider(metric_readers=[reader], resource=Resource.create({"service.name": "svc"}))
    provider.get_meter("app").create_counter("app_requests").add(3)

    @instrument_step("predict", model_name=model)
    def predict():
        return 1

    for _ in range(5):
        predict()
    metrics = metrics_by_name(reader)
    assert metrics["app_requests"][0] == "app"  # the SDK's own metrics are kept
    scope, metric, resource = metrics["request_predict"]
    assert scope == "kserve_otel"
    assert resource.attributes["service.name"] == "svc"  # the provider's resource
    assert metric.unit == "s"
    assert isinstance(metric.data, Histogram)
    assert metric.data.aggregation_temporality is AggregationTemporality.CUMULATIVE
    (point,) = points_for(metric, model)
    assert point.count == 5 and sum(point.bucket_counts) == 5
    assert tuple(point.explicit_bounds) == KSERVE_BUCKETS
    assert 0 <= point.min <= point.max <= point.sum
    # cumulative: a second collection shows the running total
    predict()
    (point,) = points_for(metrics_by_name(reader)["request_predict"][1], model)
    assert point.count == 6


def test_reader_bridged_after_registration_and_provider_without_metrics(model):
    reader = InMemoryMetricReader()
    MeterProvider(metric_readers=[reader])  # the provider has no instruments of its own
    bridge_reader(reader, Resource.create({"service.name": "late"}))
    bridge_reader(reader)  # twice is harmless
    assert is_bridged(reader)
    instrument_step("predict", model_name=model)(lambda: None)()
    scope, metric, resource = metrics_by_name(reader)["request_predict"]
    assert points_for(metric, model)[0].count == 1
    assert resource.attributes["service.name"] == "late"


def test_delta_reader_gets_intervals(model):
    reader = bridge_reader(InMemoryMetricReader(
        preferred_temporality={HistogramInstrument: AggregationTemporality.DELTA}
    ))
    MeterProvider(metric_readers=[reader])
    fast = instrument_step("predict", model_name=model)(lambda: None)

    for _ in range(3):
        fast()
    (point,) = points_for(metrics_by_name(reader)["request_predict"][1], model)
    assert point.count == 3
    first_end = point.time_unix_nano

    fast()
    metric = metrics_by_name(reader)["request_predict"][1]
    assert metric.data.aggregation_temporality is AggregationTemporality.DELTA
    (point,) = points_for(metric, model)
    assert point.count == 1 and sum(point.bucket_counts) == 1
    assert point.start_time_unix_nano == first_end
    assert point.min <= point.max

    metrics = metrics_by_name(reader)
    assert "request_predict" not in metrics or not points_for(metrics["request_predict"][1], model)


def test_errors_are_a_monotonic_sum(model):
    reader = bridge_reader(InMemoryMetricReader())
    MeterProvider(metric_readers=[reader])

    @instrument_step("explain", model_name=model)
    def explain():
        raise KeyError("feature")

    for _ in range(2):
        try:
            explain()
        except KeyError:
            pass
    metric = metrics_by_name(reader)["request_step_errors"][1]
    assert isinstance(metric.data, Sum) and metric.data.is_monotonic
    (point,) = points_for(metric, model)
    assert point.value == 2
    assert dict(point.attributes) == {"model_name": model, "step": "explain", "error_type": "KeyError"}


def test_observations_before_the_reader_exists_are_exported(model):
    instrument_step("predict", model_name=model)(lambda: None)()
    reader = bridge_reader(InMemoryMetricReader())
    MeterProvider(metric_readers=[reader])
    (point,) = points_for(metrics_by_name(reader)["request_predict"][1], model)
    assert point.count == 1
