"""Native histograms: every step and HTTP duration histogram keeps an exponential histogram beside KServe's
buckets, served in the protobuf exposition a Prometheus with ``--enable-feature=native-histograms`` asks for,
and read by it: a step that busy-waits 0.3 ms has a p99 near 0.3 ms, where KServe's buckets (5 ms first) say
4.95 ms. A scraper that does not ask for protobuf gets the text formats as before."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, PrometheusProcess, free_port, wait_until

from kserve_otel.export import protobuf_exposition
from kserve_otel.recording import speedups
from kserve_otel.export.exposition import render
from kserve_otel.recording.series import SeriesRegistry
from kserve_otel.export.snapshots import merge_snapshots, snapshot_registry

PROMETHEUS_ACCEPT = ("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;"
                     "q=0.7,text/plain;version=0.0.4;q=0.3,*/*;q=0.1")  # what Prometheus 2.42 sends with the flag


@pytest.fixture(scope="module")
def pb(tmp_path_factory):
    """prometheus/client_model's messages, compiled from tests/prometheus_metrics.proto by protobuf's protoc."""
    import grpc_tools
    from grpc_tools import protoc

    out = tmp_path_factory.mktemp("proto")
    include = Path(grpc_tools.__file__).parent / "_proto"
    tests = Path(__file__).parent
    assert protoc.main(["protoc", f"-I{tests}", f"-I{include}", f"--python_out={out}",
                        str(tests / "prometheus_metrics.proto")]) == 0
    spec = importlib.util.spec_from_file_location("prometheus_metrics_pb2", out / "prometheus_metrics_pb2.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def decode(pb, body: bytes) -> dict:
    """The delimited MetricFamily messages of ``body``, by name."""
    from google.protobuf.internal.decoder import _DecodeVarint

    families, at = {}, 0
    while at < len(body):
        size, at = _DecodeVarint(body, at)
        family = pb.MetricFamily.FromString(body[at: at + size])
        families[family.name] = family
        at += size
    return families


def native_buckets(histogram) -> dict[int, int]:
    """Key -> count of a decoded native histogram (spans and deltas undone)."""
    buckets, key, count = {}, None, 0
    deltas = iter(histogram.positive_delta)
    for span in histogram.positive_span:
        key = span.offset if key is None else key + span.offset
        for _ in range(span.length):
            count += next(deltas)
            buckets[key] = count
            key += 1
    return buckets


def test_both_implementations_bucket_values_as_prometheus_does():
    # bucket k of schema s holds (2^((k-1)/2^s), 2^(k/2^s)]: the upper bounds themselves belong to it
    for schema in (3, 2, 1, 0, -1, -2):
        for key in range(-40, 40):
            upper = 2.0 ** (key / 2 ** schema)
            assert speedups.native_key(upper, schema) == key, (schema, key)
            assert speedups.native_key(upper * (1 + 1e-9), schema) == key + 1, (schema, key)
    for implementation in (speedups.PyHistogram, speedups.Histogram):
        histogram = implementation([0.005], native=True)
        for value in (0.0, 0.0003, 0.0003, 1.0, math.nan):
            histogram.observe(value)
        schema, threshold, zero, offset, counts = histogram.native()
        assert (schema, threshold, zero) == (3, 2.0 ** -128, 1)
        assert {offset + i: c for i, c in enumerate(counts) if c} == {
            speedups.native_key(0.0003, 3): 2, 0: 1}
        assert histogram.count == 5, "the classic buckets count every value"


def test_the_schema_is_lowered_so_that_at_most_160_buckets_are_kept():
    for implementation in (speedups.PyHistogram, speedups.Histogram):
        histogram = implementation([1.0], native=True)
        values = [10 ** (k / 100) for k in range(-700, 300)]  # 1e-7 .. 1e3 seconds
        for value in values:
            histogram.observe(value)
        schema, _, _, offset, counts = histogram.native()
        assert schema == 2 and len(counts) <= 160 and sum(counts) == len(values)
        for value in (1e-7, 1.0, 999.0):  # each value is in the bucket its key names at the final schema
            assert 0 <= speedups.native_key(value, schema) - offset < len(counts)


def test_the_protobuf_exposition_holds_both_forms_and_other_collectors(pb):
    registry = SeriesRegistry()
    family = registry.histogram("request_predict", "Duration of the predict step", "s", ("model_name",),
                                bounds=(0.005, 0.01), exemplars=True, native=True)
    for value in (0.0003, 0.0003, 0.002, 0.007, 1.0):
        family.series("iris").observe(value)
    family.series("iris").observe_exemplar(0.0004, 0xABC, 0xDEF)
    registry.counter("request_step_errors", "Errors", "", ("model_name",)).series("iris").add(2)
    snapshot = snapshot_registry(registry)

    families = decode(pb, protobuf_exposition.write_snapshot(snapshot))

    histogram = families["request_predict_seconds"]
    assert histogram.type == pb.HISTOGRAM and histogram.help == "Duration of the predict step"
    (metric,) = histogram.metric
    assert {label.name: label.value for label in metric.label} == {"model_name": "iris"}
    h = metric.histogram
    assert (h.sample_count, h.schema, h.zero_count) == (6, 3, 0) and h.sample_sum == pytest.approx(1.01)
    assert [(b.upper_bound, b.cumulative_count) for b in h.bucket] == [(0.005, 4), (0.01, 5)]
    (exemplar,) = [b.exemplar for b in h.bucket if b.HasField("exemplar")]
    assert {label.name: label.value for label in exemplar.label} == {"trace_id": f"{0xABC:032x}",
                                                                     "span_id": f"{0xDEF:016x}"}
    expected: dict[int, int] = {}
    for value in (0.0003, 0.0003, 0.002, 0.007, 1.0, 0.0004):
        key = speedups.native_key(value, 3)
        expected[key] = expected.get(key, 0) + 1
    assert native_buckets(h) == expected
    assert families["request_step_errors_total"].type == pb.COUNTER
    assert families["request_step_errors_total"].metric[0].counter.value == 2

    other = SeriesRegistry()
    other.histogram("request_predict", "Duration of the predict step", "s", ("model_name",),
                    bounds=(0.005, 0.01), native=True).series("iris").observe(30.0)  # a wider range: lower schema?
    summed = merge_snapshots([snapshot, snapshot_registry(other)])
    (metric,) = decode(pb, protobuf_exposition.write_snapshot(summed))["request_predict_seconds"].metric
    assert metric.histogram.sample_count == 7 and sum(native_buckets(metric.histogram).values()) == 7


def test_render_serves_protobuf_only_to_a_scraper_that_asks_for_it(pb):
    from prometheus_client import CollectorRegistry, Gauge

    from kserve_otel.export.exposition import MergedCollector

    gauges = CollectorRegistry()
    Gauge("process_open_fds", "Open file descriptors", registry=gauges).set(7)
    headers, body = render(gauges, PROMETHEUS_ACCEPT, None)
    assert dict(headers)["Content-Type"] == protobuf_exposition.CONTENT_TYPE
    assert decode(pb, body)["process_open_fds"].metric[0].gauge.value == 7
    headers, body = render(MergedCollector(gauges), "text/plain;version=0.0.4", None)
    assert dict(headers)["Content-Type"].startswith("text/plain") and b"process_open_fds 7.0" in body


# ------------------------------------------------------------------------------------ a real Prometheus

SERVER = """
import sys, time
import kserve_otel
from kserve_otel import instrument_step
kserve_otel.configure(metrics_host="127.0.0.1", metrics_port=int(sys.argv[1]), annotations_file="/nonexistent")

@instrument_step("predict", model_name="busy")
def predict():
    begin = time.perf_counter()
    until = begin + 0.0003
    while time.perf_counter() < until:
        pass
    return time.perf_counter() - begin

# Each call's duration twice, with the wall time: timed inside the step's function (never more than the step
# recorded) and around the decorated call (never less), so that the test brackets the true p99 of the same
# minute however loaded the machine: a preemption just outside the step's own clock lands in the second only.
log = open(sys.argv[2], "a", buffering=1)  # line by line: the test reads up to the last scrape
print("ready", flush=True)
while True:
    start = time.perf_counter()
    inner = predict()
    log.write(f"{time.time()} {inner} {time.perf_counter() - start}\\n")
    time.sleep(0.002)
"""


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory) -> Iterator[tuple[int, Path]]:
    port = free_port()
    durations = tmp_path_factory.mktemp("busy") / "durations"
    child = subprocess.Popen([sys.executable, "-c", SERVER, str(port), str(durations)], cwd=ROOT,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        yield port, durations
    finally:
        child.kill()
        child.wait(timeout=30)
        if child.stdout:
            child.stdout.close()


def _true_p99(durations: Path, since: float, until: float) -> tuple[float, float]:
    """The p99 of the calls logged between two instants, timed inside the step and around it."""
    rows = [(float(inner), float(outer)) for t, inner, outer in (line.split() for line in
            durations.read_text().splitlines() if line.count(" ") == 2) if since <= float(t) <= until]
    assert len(rows) > 1000, len(rows)
    at = int(len(rows) * 0.99)
    return sorted(r[0] for r in rows)[at], sorted(r[1] for r in rows)[at]


@pytest.mark.e2e
@pytest.mark.parametrize("features", [("native-histograms",), ()], ids=["native", "classic"])
def test_prometheus_reads_a_sub_millisecond_p99(busy_server, tmp_path, features):
    port, durations = busy_server
    with PrometheusProcess.scraping(port, tmp_path, features=features) as prometheus:
        def p99(at: float | None = None) -> float | None:
            query = ("histogram_quantile(0.99, sum(rate(request_predict_seconds[1m])))" if features else
                     "histogram_quantile(0.99, sum by (le) (rate(request_predict_seconds_bucket[1m])))")
            result = prometheus.api("query", query=query, **({"time": at} if at else {}))["data"]["result"]
            return float(result[0]["value"][1]) if result else None

        wait_until(lambda: p99() is not None and not math.isnan(p99() or math.nan), "a p99 in Prometheus", 60)
        time.sleep(5)
        at = time.time()
        measured = p99(at)
        # The scrapes that rate() used at that instant: the observations between the first and the last are
        # the ones Prometheus's p99 is of (a few seconds after start, not a whole minute).
        scrapes = [float(t) for t, _ in prometheus.api("query", query="up[1m]", time=at)["data"]["result"][0]["values"]]
        assert measured is not None
    if features:  # within 20 % of the true p99 of those scrapes (0.3 ms on an idle machine, more when loaded)
        inner, outer = _true_p99(durations, scrapes[0], scrapes[-1])
        assert inner * 0.8 <= measured <= outer * 1.2, (measured, inner, outer)
    else:  # without the flag, the text format's classic buckets: KServe's first bucket is 5 ms
        assert 0.003 < measured <= 0.005, measured
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        assert response.headers["Content-Type"].startswith("text/plain")


# ------------------------------------------------------------------------- OTLP push: exponential histograms


def _exponential_reader(registry: SeriesRegistry, temporality=None):
    from opentelemetry.sdk.metrics import Histogram as HistogramInstrument
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.metrics.view import ExponentialBucketHistogramAggregation

    from kserve_otel.export.metrics_bridge import bridge_reader

    reader = bridge_reader(InMemoryMetricReader(
        preferred_aggregation={HistogramInstrument: ExponentialBucketHistogramAggregation()},
        preferred_temporality={HistogramInstrument: temporality} if temporality else None), registry=registry)
    MeterProvider(metric_readers=[reader])
    return reader


def _points(reader, name: str):
    data = reader.get_metrics_data()
    return [(m, p) for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics if m.name == name
            for p in m.data.data_points]


def _otel_index(value: float, scale: int) -> int:
    """OpenTelemetry's exponential bucket of ``value``: index i holds (base**i, base**(i+1)], base = 2**2**-scale."""
    index = math.floor(math.log2(value) * 2 ** scale)
    while 2 ** ((index + 1) / 2 ** scale) < value:
        index += 1
    while 2 ** (index / 2 ** scale) >= value:
        index -= 1
    return index


def test_a_reader_that_asks_for_exponential_histograms_gets_the_native_ones():
    from opentelemetry.sdk.metrics.export import ExponentialHistogram, Histogram

    registry = SeriesRegistry()
    native = registry.histogram("request_predict", "Duration of the predict step", "s", ("model_name",),
                                native=True)
    classic = registry.histogram("request_batch_size", "Requests per batch", "", ("model_name",))
    values = [0.00031, 0.0003, 0.0012, 0.0049, 0.25, 0.0]
    for value in values:
        native.series("iris").observe(value)
    classic.series("iris").observe(3)
    [(metric, point)] = _points(_exponential_reader(registry), "request_predict")
    assert isinstance(metric.data, ExponentialHistogram)
    assert point.scale == speedups.NATIVE_SCHEMA and point.count == len(values) and point.zero_count == 1
    assert point.sum == pytest.approx(sum(values)) and point.min == 0.0 and point.max == 0.25
    assert point.negative.bucket_counts == [] or not any(point.negative.bucket_counts)
    expected: dict[int, int] = {}
    for value in values[:-1]:
        index = _otel_index(value, point.scale)
        expected[index] = expected.get(index, 0) + 1
    got = {point.positive.offset + i: c for i, c in enumerate(point.positive.bucket_counts) if c}
    assert got == expected
    [(metric, _)] = _points(_exponential_reader(registry), "request_batch_size")
    assert isinstance(metric.data, Histogram)  # no native histogram: its explicit buckets stay


def test_a_delta_reader_gets_each_interval_of_the_native_histogram():
    from opentelemetry.sdk.metrics.export import AggregationTemporality

    registry = SeriesRegistry()
    series = registry.histogram("request_predict", "Duration of the predict step", "s", ("model_name",),
                                native=True).series("iris")
    reader = _exponential_reader(registry, AggregationTemporality.DELTA)
    for value in (0.001, 0.001, 0.002):
        series.observe(value)
    [(_, first)] = _points(reader, "request_predict")
    assert first.count == 3 and sum(first.positive.bucket_counts) == 3
    series.observe(10000.0)  # far away: the series lowers its schema to hold both ends
    [(_, second)] = _points(reader, "request_predict")
    assert second.count == 1 and sum(second.positive.bucket_counts) == 1
    assert second.scale < first.scale and second.start_time_unix_nano == first.time_unix_nano
    [index] = [second.positive.offset + i for i, c in enumerate(second.positive.bucket_counts) if c]
    assert index == _otel_index(10000.0, second.scale)


def test_otlp_push_sends_exponential_histograms_when_the_exporter_asks_for_them():
    from conftest import run_python
    from otlp_receiver import OTLPReceiver

    with OTLPReceiver() as receiver:
        result = run_python(
            """
            import time
            import kserve_otel
            from kserve_otel import instrument_step
            t = kserve_otel.configure()
            @instrument_step("predict", model_name="iris")
            def predict():
                until = time.perf_counter() + 0.0003
                while time.perf_counter() < until:
                    pass
            for _ in range(50):
                predict()
            t.force_flush()
            kserve_otel.shutdown()
            """,
            env={"KSERVE_OTEL_ANNOTATIONS_FILE": "/nonexistent", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                 "KSERVE_OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "60000",
                 "OTEL_EXPORTER_OTLP_METRICS_DEFAULT_HISTOGRAM_AGGREGATION": "base2_exponential_bucket_histogram"},
        )
        assert result.returncode == 0, result.stderr
        points = [p for request in receiver.metrics for rm in request.resource_metrics for sm in rm.scope_metrics
                  for m in sm.metrics if m.name == "request_predict" for p in m.exponential_histogram.data_points]
    [point] = [p for p in points if p.count == 50]
    assert point.scale == speedups.NATIVE_SCHEMA and sum(point.positive.bucket_counts) == 50
    low = 2 ** ((point.positive.offset) / 2 ** point.scale)  # the lower bound of the first bucket
    assert 0.0002 < low <= 0.0003 < point.sum / 50 < 0.01
