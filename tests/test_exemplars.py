"""Exemplars on the step histograms: a step made in a sampled span leaves its duration, trace id and span id as
its bucket's exemplar, served in the OpenMetrics exposition (never in the plain text one), filtered by
``OTEL_METRICS_EXEMPLAR_FILTER``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from conftest import scrape
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from kserve_otel.recording import exemplars
from kserve_otel import instrument_step

OPENMETRICS = {"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}


@pytest.fixture
def exemplar_filter() -> Iterator[None]:
    yield
    exemplars.set_filter("trace_based")


def step_exemplars(text: str, model: str) -> list:
    return [(sample.labels["le"], sample.exemplar) for family in text_string_to_metric_families(text)
            if family.name == "request_predict_seconds" for sample in family.samples
            if sample.name.endswith("_bucket") and sample.labels.get("model_name") == model and sample.exemplar]


def test_a_sampled_step_is_its_buckets_exemplar_with_its_own_span(telemetry, spans, model):
    step = instrument_step("predict", model_name=model)(lambda: None)
    step()  # no parent, sampled by the default sampler: its own root span
    [span] = [s for s in spans.get_finished_spans() if s.attributes.get("kserve.model.name") == model]

    found = step_exemplars(scrape(telemetry.metrics_url, OPENMETRICS), model)

    assert len(found) == 1
    le, exemplar = found[0]
    assert le == "0.005"
    assert exemplar.labels == {"trace_id": f"{span.context.trace_id:032x}", "span_id": f"{span.context.span_id:016x}"}
    assert 0 < exemplar.value < 0.005 and exemplar.timestamp is not None
    assert "trace_id" not in scrape(telemetry.metrics_url), "the plain text format has no exemplars"


def test_an_unsampled_step_leaves_none_unless_the_filter_is_always_on(telemetry, model, exemplar_filter):
    step = instrument_step("predict", model_name=model)(lambda: None)
    unsampled = NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=True, trace_flags=TraceFlags(0)))
    with trace.use_span(unsampled):
        step()
    assert step_exemplars(scrape(telemetry.metrics_url, OPENMETRICS), model) == []

    exemplars.set_filter("always_on")
    with trace.use_span(unsampled):
        step()
    [(_, exemplar)] = step_exemplars(scrape(telemetry.metrics_url, OPENMETRICS), model)
    assert exemplar.labels == {"trace_id": f"{0xABC:032x}", "span_id": f"{0xDEF:016x}"}


def test_always_off_keeps_no_exemplar(telemetry, model, exemplar_filter):
    exemplars.set_filter("always_off")
    instrument_step("predict", model_name=model)(lambda: None)()
    assert step_exemplars(scrape(telemetry.metrics_url, OPENMETRICS), model) == []


def test_a_bad_filter_names_the_accepted_ones():
    with pytest.raises(ValueError, match="trace_based, always_on, always_off"):
        exemplars.set_filter("sometimes")


def test_otlp_push_carries_the_exemplars_of_the_spans_it_exports():
    from conftest import run_python
    from otlp_receiver import OTLPReceiver

    with OTLPReceiver() as receiver:
        result = run_python(
            """
            import kserve_otel
            from kserve_otel import instrument_step
            t = kserve_otel.configure()
            step = instrument_step("predict", model_name="iris")(lambda: None)
            for _ in range(3):
                step()
            t.force_flush()
            kserve_otel.shutdown()
            """,
            env={"KSERVE_OTEL_ANNOTATIONS_FILE": "/nonexistent", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                 "KSERVE_OTEL_METRICS_EXPORTER": "otlp", "OTEL_TRACES_EXPORTER": "otlp",
                 "OTEL_METRIC_EXPORT_INTERVAL": "60000"},
        )
        assert result.returncode == 0, result.stderr
        [point, *_] = [p for p in receiver.histogram_points("request_predict") if p.count == 3]
        spans = {(s.trace_id, s.span_id) for s in receiver.spans() if s.name == "predict iris"}
    assert len(spans) == 3
    [exemplar] = point.exemplars  # three observations in one bucket: the latest is its exemplar
    assert (exemplar.trace_id, exemplar.span_id) in spans
    assert 0 < exemplar.as_double < 0.005 and exemplar.time_unix_nano > 0
