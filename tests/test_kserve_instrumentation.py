"""KServeInstrumentor in process: which classes it wraps, KServe's own histograms, uninstrument, entry point."""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Iterator

import kserve
import kserve.model as kserve_model
import pytest
from opentelemetry import trace
from prometheus_client import REGISTRY

from kserve_otel.instrumentation.kserve import KServeInstrumentor
from kserve_otel.instrumentation.kserve.latency_log import LatencyLogFilter
from kserve_otel.names import step_instrument_name
from kserve_otel.recording.series import REGISTRY as SERIES


def count(step: str, model: str) -> int:
    family = SERIES.get(step_instrument_name(step))
    return family.series(model).count if family else 0


class DefinedBefore(kserve.Model):
    def preprocess(self, payload, headers=None):
        return payload

    async def predict(self, payload, headers=None):
        return {"predictions": payload["instances"]}


@pytest.fixture
def instrumented() -> Iterator[KServeInstrumentor]:
    instrumentor = KServeInstrumentor()
    instrumentor.instrument()
    yield instrumentor
    instrumentor.uninstrument()


async def test_existing_and_later_subclasses_are_timed_through_kserves_own_call(instrumented, model):
    class DefinedAfter(DefinedBefore):
        def postprocess(self, result, headers=None, response_headers=None):
            return result

    for cls in (DefinedBefore, DefinedAfter):
        instance = cls(f"{model}-{cls.__name__}")
        response, _ = await instance({"instances": [1, 2]})
        assert response == {"predictions": [1, 2]}
        for step in ("preprocess", "predict", "postprocess"):
            assert count(step, instance.name) == 1, (cls, step)
    # the wrappers kept each handler's nature, which KServe relies on to decide whether to await
    import inspect

    assert inspect.iscoroutinefunction(DefinedBefore.predict)
    assert not inspect.iscoroutinefunction(DefinedBefore.preprocess)


async def test_kserve_histograms_are_replaced_not_duplicated(instrumented, model):
    native = instrumented.models._timers["PREDICT_HIST_TIME"]  # type: ignore[union-attr]
    assert native not in REGISTRY._collector_to_names  # noqa: SLF001 - the registry's own bookkeeping
    await DefinedBefore(model)({"instances": [1]})
    assert native.labels(model_name=model)._sum.get() == 0  # KServe's histogram did not time the call
    assert count("predict", model) == 1


async def test_super_call_of_an_instrumented_handler_is_recorded_once(instrumented, model):
    class Child(DefinedBefore):
        async def predict(self, payload, headers=None):
            return await super().predict(payload, headers)

    await Child(model)({"instances": [1]})
    assert count("predict", model) == 1


async def test_author_decorated_handlers_are_not_wrapped_twice(instrumented, model):
    from kserve_otel import instrument_step

    class Decorated(kserve.Model):
        @instrument_step("predict")
        def predict(self, payload, headers=None):
            return payload

    await Decorated(model)({"instances": []})
    assert count("predict", model) == 1


async def test_uninstrument_restores_kserve_exactly(model):
    originals = {step: DefinedBefore.__dict__.get(step) for step in ("preprocess", "predict")}
    model_handlers = {step: kserve_model.Model.__dict__[step] for step in ("preprocess", "predict", "postprocess")}
    histograms = {name: getattr(kserve_model, name) for name in ("PRE_HIST_TIME", "PREDICT_HIST_TIME")}

    instrumentor = KServeInstrumentor()
    instrumentor.instrument()
    assert DefinedBefore.__dict__["predict"] is not originals["predict"]
    instrumentor.uninstrument()

    assert {step: DefinedBefore.__dict__.get(step) for step in originals} == originals
    assert {step: kserve_model.Model.__dict__[step] for step in model_handlers} == model_handlers
    assert "__init_subclass__" not in kserve_model.Model.__dict__
    assert {name: getattr(kserve_model, name) for name in histograms} == histograms
    assert histograms["PREDICT_HIST_TIME"] in REGISTRY._collector_to_names  # noqa: SLF001
    before = histograms["PREDICT_HIST_TIME"].labels(model_name=model)._sum.get()
    await DefinedBefore(model)({"instances": [1]})
    assert histograms["PREDICT_HIST_TIME"].labels(model_name=model)._sum.get() > before
    assert count("predict", model) == 0


def test_registered_as_an_opentelemetry_instrumentor():
    entry_points = importlib.metadata.entry_points(group="opentelemetry_instrumentor")
    kserve_entry = [ep for ep in entry_points if ep.name == "kserve"]
    assert kserve_entry and kserve_entry[0].load() is KServeInstrumentor
    assert list(KServeInstrumentor().instrumentation_dependencies()) == ["kserve >= 0.21, < 0.22"]


@pytest.mark.parametrize(("mode", "expected"), [
    ("trace_id", "requestId: r1, predict_ms: 1.0, trace_id: 0000000000000000000000000000abcd"),
    ("kserve", "requestId: r1, predict_ms: 1.0"),
    ("off", None),
])
def test_latency_log_modes(mode, expected):
    record = logging.LogRecord("kserve.trace", logging.INFO, __file__, 1, "requestId: r1, predict_ms: 1.0", None, None)
    context = trace.SpanContext(0xABCD, 0x1, is_remote=True, trace_flags=trace.TraceFlags(1))
    with trace.use_span(trace.NonRecordingSpan(context)):
        kept = LatencyLogFilter(mode).filter(record)
    assert (record.getMessage() if kept else None) == expected
    other = logging.LogRecord("kserve.trace", logging.INFO, __file__, 1, "kserve.io.v1: 0.1", None, None)
    assert LatencyLogFilter("off").filter(other)
