"""The direct writer of the scrape path (kserve_otel.export.text_exposition) against the path it replaces.

"The current path" is prometheus_client's own encoder over the registry of a bridged OpenTelemetry
``PrometheusMetricReader`` (series -> OpenTelemetry data -> the reader's metric families -> encoder), which is
what ``generate_latest(registry)`` still runs outside :func:`kserve_otel.export.exposition.render`. Every test
builds real series registries, readers and meter providers of its own (no global state, no live process
metrics), renders both ways and compares the parsed families, and the bytes.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import ROOT
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.openmetrics import exposition as openmetrics_exposition
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from kserve_otel.export import exposition, text_exposition
from kserve_otel.export.exposition import MergedCollector, MetricsServer, render
from kserve_otel.export.metrics_bridge import bridge_of, bridge_reader
from kserve_otel.names import KSERVE_BUCKETS
from kserve_otel.recording.series import CARDINALITY_LIMIT, SeriesRegistry
from kserve_otel.export.series_files import SharedSeries, create_directory
from kserve_otel.export.snapshots import snapshot_registry

PROMTOOL = shutil.which("promtool")
OPENMETRICS = "application/openmetrics-text; version=1.0.0"

ODD_VALUES = ["plain", 'with "quotes"', "back\\slash", "new\nline", "ünïcødé ✓ 😀", "", "\\n literal", 'all\\"\n']


class Stack:
    """A series registry bridged to its own Prometheus reader, meter provider and prometheus_client registry."""

    def __init__(self, with_sdk_metric: bool = False) -> None:
        self.series = SeriesRegistry()
        self.series.default_bounds = KSERVE_BUCKETS
        self.registry = CollectorRegistry(auto_describe=True)
        self.reader = PrometheusMetricReader(registry=self.registry, scope_info_enabled=False)
        resource = Resource.create({"service.name": "text-exposition-test", "odd": 'a"b\\c'})
        bridge_reader(self.reader, resource, registry=self.series)
        self.provider = MeterProvider(metric_readers=[self.reader], resource=resource)
        if with_sdk_metric:  # the SDK has data of its own: the series then join the SDK's resource
            self.provider.get_meter("app").create_counter("app_requests", "1", "Requests").add(3, {"route": "/x"})

    def current(self, openmetrics: bool = False) -> str:
        """The current path's body."""
        encode = openmetrics_exposition.generate_latest if openmetrics else generate_latest
        return encode(self.registry).decode()

    def rendered(self, openmetrics: bool = False, collector: Any = None, gzip: bool = False) -> str:
        headers, body = render(collector or self.registry, OPENMETRICS if openmetrics else None,
                               "gzip" if gzip else None)
        if gzip:
            import gzip as gz

            assert ("Content-Encoding", "gzip") in headers
            body = gz.decompress(body)
        return body.decode()


@pytest.fixture
def stack() -> Iterator[Stack]:
    s = Stack()
    yield s
    s.provider.shutdown()


def fill(series: SeriesRegistry, nan: bool = True) -> None:
    """Histograms, counters and up-down counters with odd label values, empty series, +Inf and NaN (unless
    ``nan=False``: prometheus_client's OpenMetrics parser refuses a NaN ``_sum``, whichever path wrote it)."""
    predict = series.histogram("request_predict", "Duration of the predict step", "s", ["model_name"])
    for i, value in enumerate(ODD_VALUES):
        for _ in range(i + 1):
            predict.series(value).observe(0.001 * 10 ** (i % 5))
    predict.series("infinite").observe(math.inf)
    if nan:
        predict.series("not-a-number").observe(math.nan)
    predict.series("never-observed")  # created, no observation: left out, as the reader leaves it out
    series.histogram("request_explain", "never observed at all", "s", ["model_name"]).series("x")
    tokens = series.histogram("tokens.per.request", 'Help with \\ backslash, "quotes"\nand a newline', "{token}",
                              ["model.name", "step"], bounds=[1e-05, 0.5, 1, 1e21])
    tokens.series("a", "predict").observe(2e21)
    tokens.series("b", "explain").observe(0.25)
    errors = series.counter("request_step_errors_total", "Steps that raised", "", ["model_name", "step", "error_type"])
    errors.series("a", "predict", "ValueError").add(3)
    errors.series('q"uote', "predict", "KeyError")  # zero: counters show every series
    series.counter("request_bytes", "Bytes", "By", ["model_name"]).series("a").add(1_500_000_000)
    series.counter("plain_events", "Events without labels", "1", []).series().add(7)
    in_flight = series.up_down_counter("http.server.active_requests", "In flight", "{request}", ["http.method"])
    in_flight.series("GET").add(2)
    in_flight.series("POST").add(-1)
    in_flight.series("PUT")


def fill_overflow(series: SeriesRegistry) -> None:
    """One family past the cardinality limit: its extra label sets share the overflow series."""
    family = series.histogram("request_preprocess", "Duration of the preprocess step", "s", ["model_name"])
    for i in range(CARDINALITY_LIMIT + 5):
        family.series(f"m{i:05d}").observe(0.02)
    counter = series.counter("overflowing_total", "c", "", ["model_name"])
    for i in range(CARDINALITY_LIMIT + 1):
        counter.series(f"m{i:05d}").add(1)


def normalized(families: Any) -> list[tuple[Any, ...]]:
    """Parsed families as comparable tuples (NaN as a string: NaN != NaN)."""
    return [
        (f.name, f.type, f.documentation, f.unit,
         [(s.name, tuple(sorted(s.labels.items())), repr(s.value), s.timestamp) for s in f.samples])
        for f in families
    ]


def assert_same(stack: Stack, openmetrics: bool = False, parsed: bool = True) -> str:
    current, rendered = stack.current(openmetrics), stack.rendered(openmetrics)
    if parsed:
        parse = parse_openmetrics if openmetrics else parse_text
        assert normalized(parse(rendered)) == normalized(parse(current))
    assert rendered == current  # same lines in the same order, too
    return rendered


def promtool_check(text: str) -> None:
    assert PROMTOOL, "promtool is installed by the project's set-up (Debian package prometheus)"
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------- same output


def test_text_format_matches_the_current_path_and_promtool_accepts_it(stack):
    fill(stack.series)
    text = assert_same(stack)
    families = {f.name: f for f in parse_text(text)}
    predict = families["request_predict_seconds"]
    assert predict.type == "histogram"
    values = {s.labels["model_name"] for s in predict.samples}
    assert values == {*ODD_VALUES, "infinite", "not-a-number"}  # the never-observed series is left out
    les = [s.labels["le"] for s in predict.samples if s.name.endswith("_bucket") and s.labels["model_name"] == "plain"]
    assert les == ["0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0", "2.5", "5.0",
                   "7.5", "10.0", "+Inf"]
    assert "request_explain_seconds" not in families
    assert families["tokens_per_request"].type == "histogram"
    assert families["request_step_errors"].type == "counter"
    assert families["request_bytes"].type == "counter"  # request_bytes_total with the unit already in the name
    assert families["http_server_active_requests"].type == "gauge"
    assert 'le="1e+21"' in text and 'le="1e-05"' in text and "NaN" in text and "+Inf" in text
    assert "target_info" in families
    promtool_check(text)


def test_openmetrics_matches_the_current_path(stack):
    fill(stack.series, nan=False)
    text = assert_same(stack, openmetrics=True)
    assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    assert "# UNIT request_predict_seconds seconds\n" in text
    stack.series.histogram("request_predict", "", "s", ["model_name"]).series("not-a-number").observe(math.nan)
    assert_same(stack, openmetrics=True, parsed=False)  # the same bytes, NaN sum included


def test_empty_help_text_matches(stack):
    stack.series.counter("undocumented", "", "", ["k"]).series("v").add(1)
    stack.series.histogram("undocumented_seconds", "", "s", []).series().observe(1)
    assert "# HELP undocumented_total \n" in assert_same(stack)
    assert "# HELP undocumented \n" in assert_same(stack, openmetrics=True)


def test_the_overflow_series_matches(stack):
    fill(stack.series, nan=False)
    fill_overflow(stack.series)
    text = assert_same(stack)
    assert_same(stack, openmetrics=True)
    family = {f.name: f for f in parse_text(text)}["request_preprocess_seconds"]
    counts = [s for s in family.samples if s.name == "request_preprocess_seconds_count"]
    assert len(counts) == CARDINALITY_LIMIT + 1
    [overflow] = [s for s in counts if s.labels["otel_metric_overflow"] == "true"]
    assert overflow.labels["model_name"] == "" and overflow.value == 5
    assert all(s.labels["otel_metric_overflow"] == "" for s in counts if s is not overflow)
    promtool_check(text)


def test_with_sdk_metrics_of_its_own_and_without_any_series():
    for with_sdk in (False, True):
        s = Stack(with_sdk_metric=with_sdk)
        try:
            assert_same(s)  # no series: target_info only with SDK data, as before
            assert ("target_info" in s.rendered()) is with_sdk
            fill(s.series, nan=False)
            text = assert_same(s)
            assert_same(s, openmetrics=True)
            assert text.startswith("# HELP target_info")
            assert ("app_requests_total" in text) is with_sdk
        finally:
            s.provider.shutdown()


def test_only_empty_histograms_show_nothing(stack):
    stack.series.histogram("request_predict", "d", "s", ["model_name"]).series("idle")
    assert_same(stack)
    assert "request_predict" not in stack.rendered()


def test_a_shut_down_reader_shows_no_series(stack):
    fill(stack.series)
    stack.provider.shutdown()  # unregisters the reader's collector
    assert stack.rendered() == stack.current() == ""


def test_gzip_and_name_escapings_the_writer_does_not_write(stack):
    fill(stack.series)
    assert stack.rendered(gzip=True) == stack.current()
    for accept in ("text/plain; version=1.0.0; escaping=dots", f"{OPENMETRICS}; escaping=values",
                   f"{OPENMETRICS}; escaping=allow-utf-8", "text/plain; version=1.0.0; escaping=allow-utf-8"):
        encoder, _ = choose_encoder(accept)
        assert render(stack.registry, accept, None)[1] == encoder(stack.registry), accept


def test_merged_with_another_registry_one_family_per_name(stack, monkeypatch):
    monkeypatch.setattr(exposition, "GLOBAL_REGISTRY_WINS", set())  # whatever KServe tests left in this process
    fill(stack.series, nan=False)
    other = CollectorRegistry()
    kserve = Histogram("request_predict_seconds", "KServe's own", ["model_name"], registry=other)
    kserve.labels(model_name="global").observe(0.1)
    Counter("process_things", "other collector's counter", registry=other).inc()
    merged = MergedCollector(stack.registry, other)
    for openmetrics in (False, True):
        encode = openmetrics_exposition.generate_latest if openmetrics else generate_latest
        assert stack.rendered(openmetrics, merged) == encode(merged).decode()
    text = stack.rendered(collector=merged)
    assert 'model_name="global"' not in text and "process_things_total" in text  # ours win, the rest is served
    monkeypatch.setattr(exposition, "GLOBAL_REGISTRY_WINS", {"request_predict_seconds"})
    for openmetrics in (False, True):
        encode = openmetrics_exposition.generate_latest if openmetrics else generate_latest
        assert stack.rendered(openmetrics, merged) == encode(merged).decode()
    text = stack.rendered(collector=merged)
    assert 'model_name="global"' in text and 'model_name="plain"' not in text
    assert text.count("# TYPE request_predict_seconds ") == 1
    promtool_check(text)


def test_writer_alone_from_a_snapshot(stack):
    """write() takes a snapshot: the same families as the render, and `seen` keeps the first of each name."""
    fill(stack.series)
    written = text_exposition.write(snapshot_registry(stack.series))
    assert written and written in stack.rendered()
    seen = {"request_predict_seconds"}
    partial = text_exposition.write(snapshot_registry(stack.series), seen=seen)
    assert "request_predict_seconds" not in partial and "request_step_errors_total" in partial
    assert {"request_step_errors", "http_server_active_requests", "tokens_per_request"} <= seen


# ----------------------------------------------------------------------------------------- the sum of processes

WORKER = """
import sys
from kserve_otel.recording.series import REGISTRY
from kserve_otel.export.series_files import SharedSeries
predict = REGISTRY.histogram("request_predict", "Duration of the predict step", "s", ["model_name"])
for name in ("shared", 'worker "only"'):
    predict.series(name).observe(0.3)
REGISTRY.counter("request_step_errors", "Steps that raised", "", ["model_name"]).series("shared").add(2)
REGISTRY.up_down_counter("in_flight", "In flight", "", ["m"]).series("GET").add(1)
SharedSeries(sys.argv[1]).start()
print("ready", flush=True)
sys.stdin.read()
"""


def test_the_sum_over_processes_matches(stack, tmp_path):
    directory = create_directory(str(tmp_path))
    child = subprocess.Popen([sys.executable, "-c", WORKER, directory], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             cwd=ROOT, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        stack.series.histogram("request_predict", "Duration of the predict step", "s", ["model_name"]) \
            .series("shared").observe(2.0)
        stack.series.counter("request_step_errors", "Steps that raised", "", ["model_name"]).series("shared").add(1)
        shared = SharedSeries(directory, registry=stack.series)
        shared.start()
        bridge = bridge_of(stack.reader)
        assert bridge is not None
        bridge.peers = shared
        text = assert_same(stack)
        assert_same(stack, openmetrics=True)
        families = {f.name: f for f in parse_text(text)}
        count = [s for s in families["request_predict_seconds"].samples
                 if s.name == "request_predict_seconds_count" and s.labels["model_name"] == "shared"]
        assert count[0].value == 2
        assert [s.value for s in families["request_step_errors"].samples] == [3]
        shared.stop()
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait(timeout=30)
        if child.stdout:
            child.stdout.close()


# ----------------------------------------------------------------------------------------- over HTTP


def test_a_scrape_of_2000_series_over_http_returns_every_series(stack, monkeypatch):
    monkeypatch.setattr(exposition, "GLOBAL_REGISTRY_WINS", set())  # whatever KServe tests left in this process
    models = 500
    for step in ("preprocess", "predict", "postprocess", "explain"):
        family = stack.series.histogram(f"request_{step}", f"Duration of the {step} step", "s", ["model_name"])
        for i in range(models):
            family.series(f"model-{i:03d}").observe(0.01 * (i % 7))
    other = CollectorRegistry()
    Counter("other_things", "another registry's counter", registry=other).inc()
    server = MetricsServer(MergedCollector(stack.registry, other), "127.0.0.1", 0)
    assert server.start()
    try:
        for headers in ({}, {"Accept-Encoding": "gzip"}, {"Accept": OPENMETRICS}):
            request = urllib.request.Request(server.url, headers=headers)
            with urllib.request.urlopen(request, timeout=30) as response:
                body = response.read()
                if response.headers.get("Content-Encoding") == "gzip":
                    import gzip

                    body = gzip.decompress(body)
            text = body.decode()
            parse = parse_openmetrics if "Accept" in headers else parse_text
            families = {f.name: f for f in parse(text)}
            for step in ("preprocess", "predict", "postprocess", "explain"):
                name = f"request_{step}_seconds"
                counts = {s.labels["model_name"] for s in families[name].samples if s.name == f"{name}_count"}
                assert counts == {f"model-{i:03d}" for i in range(models)}, (headers, step)
                buckets = [s for s in families[name].samples if s.name == f"{name}_bucket"]
                assert len(buckets) == models * (len(KSERVE_BUCKETS) + 1)
            assert "other_things" in families and ("target" if "Accept" in headers else "target_info") in families
            if not headers:
                promtool_check(text)
    finally:
        server.stop()


def test_no_leftover_capture_outside_render(stack):
    """Outside render, collecting the registry still carries the series in the OpenTelemetry data."""
    fill(stack.series)
    stack.rendered()
    assert "request_predict_seconds_bucket" in generate_latest(stack.registry).decode()
