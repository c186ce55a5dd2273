"""@instrument_step: kinds, signatures, model names, durations, errors, streaming, spans."""

from __future__ import annotations

import asyncio
import inspect
import time
import traceback
import uuid

import pytest
from opentelemetry import trace
from opentelemetry.trace import StatusCode

from kserve_otel import instrument_step
from kserve_otel.names import ATTR_MODEL_NAME, ERRORS_INSTRUMENT, FIRST_ITEM_INSTRUMENT, step_instrument_name
from kserve_otel.recording.series import REGISTRY


def step_series(step: str, model: str):
    return REGISTRY.histogram(step_instrument_name(step), "", "s", ("model_name",)).series(model)


def error_count(model: str, step: str, error_type: str) -> int:
    family = REGISTRY.get(ERRORS_INSTRUMENT)
    return family.series(model, step, error_type).value if family else 0


def first_item_series(model: str, step: str):
    return REGISTRY.histogram(FIRST_ITEM_INSTRUMENT, "", "s", ("model_name", "step")).series(model, step)


# ----------------------------------------------------------------------------------------- the callable's nature


def test_wrapper_keeps_kind_signature_and_wrapped():
    async def coro(a: int, *, b: str = "x") -> int: ...
    async def agen(a: int):
        yield a
    def gen(a: int):
        yield a
    def func(a: int, b: float = 1.0) -> float: ...

    for original, check in [
        (coro, inspect.iscoroutinefunction),
        (agen, inspect.isasyncgenfunction),
        (gen, inspect.isgeneratorfunction),
        (func, inspect.isfunction),
    ]:
        wrapped = instrument_step("predict")(original)
        assert check(wrapped), original
        assert wrapped.__wrapped__ is original
        assert inspect.signature(wrapped) == inspect.signature(original)
        assert wrapped.__name__ == original.__name__
    assert not inspect.iscoroutinefunction(instrument_step("predict")(func))


def test_bad_step_names_fail_at_decoration_time():
    for bad in ["Predict", "pre-process", "", "1st", "a b", None]:
        with pytest.raises(ValueError, match="lowercase letters, digits and underscores"):
            instrument_step(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="model_name"):
        instrument_step("predict", model_name="")
    with pytest.raises(TypeError, match="can only wrap a callable"):
        instrument_step("predict")(42)


def test_own_step_names_are_accepted(model):
    @instrument_step("tokenize", model_name=model)
    def tokenize(text):
        return text.split()

    assert tokenize("a b") == ["a", "b"]
    assert step_series("tokenize", model).count == 1


def test_decorating_twice_counts_once(model):
    f = instrument_step("predict", model_name=model)(instrument_step("predict", model_name=model)(lambda: 1))
    f()
    assert step_series("predict", model).count == 1


# ----------------------------------------------------------------------------------------- model names


def test_model_name_explicit_then_self_name_then_class_then_function(model):
    class Named:
        def __init__(self):
            self.name = model

        @instrument_step("predict")
        def predict(self, x):
            return x

    class Unnamed:
        @instrument_step("predict")
        def predict(self, x):
            return x

    class Explicit:
        name = "ignored"

        @instrument_step("predict", model_name=model + "-explicit")
        def predict(self, x):
            return x

    @instrument_step("predict")
    def free_function(x):
        return x

    Named().predict(1)
    Unnamed().predict(1)
    Explicit().predict(1)
    free_function(1)
    assert step_series("predict", model).count == 1
    assert step_series("predict", "Unnamed").count >= 1
    assert step_series("predict", model + "-explicit").count == 1
    assert step_series("predict", "free_function").count >= 1


def test_staticmethod_and_classmethod(model):
    class Model:
        @instrument_step("preprocess", model_name=model)
        @staticmethod
        def pre(x):
            return x + 1

        @instrument_step("postprocess", model_name=model)
        @classmethod
        def post(cls, x):
            return (cls.__name__, x)

    assert Model.pre(1) == 2 and Model().pre(1) == 2
    assert Model.post(1) == ("Model", 1)
    assert step_series("preprocess", model).count == 2
    assert step_series("postprocess", model).count == 1


# ----------------------------------------------------------------------------------------- durations


def test_sync_duration_is_recorded(model):
    @instrument_step("predict", model_name=model)
    def slow():
        time.sleep(0.03)
        return "done"

    assert slow() == "done"
    counts, total, low, high, *_ = step_series("predict", model).snapshot()
    assert sum(counts) == 1
    assert 0.03 <= total < 0.5
    # KServe's buckets: 0.03 s falls in (0.025, 0.05]
    assert counts[KSERVE_INDEX[0.05]] == 1


KSERVE_INDEX = {b: i for i, b in enumerate((0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0))}


async def test_async_duration_is_recorded(model):
    @instrument_step("preprocess", model_name=model)
    async def pre(x):
        await asyncio.sleep(0.02)
        return x * 2

    assert await pre(21) == 42
    counts, total, *_ = step_series("preprocess", model).snapshot()
    assert sum(counts) == 1 and 0.02 <= total < 0.5


def test_generator_duration_runs_to_last_item_and_first_item_is_timed(model):
    @instrument_step("predict", model_name=model)
    def stream():
        time.sleep(0.01)
        yield "a"
        time.sleep(0.03)
        yield "b"
        return "result"

    gen = stream()
    assert next(gen) == "a"
    time.sleep(0.02)  # the consumer's time between items counts: the response is still streaming
    assert next(gen) == "b"
    with pytest.raises(StopIteration) as stop:
        next(gen)
    assert stop.value.value == "result"
    _, total, *_ = step_series("predict", model).snapshot()
    assert total >= 0.06
    first_counts, first_total, *_ = first_item_series(model, "predict").snapshot()
    assert sum(first_counts) == 1 and 0.01 <= first_total < 0.03


async def test_async_generator_duration_runs_to_last_item(model):
    @instrument_step("predict", model_name=model)
    async def stream(n):
        for i in range(n):
            await asyncio.sleep(0.01)
            yield i

    assert [i async for i in stream(3)] == [0, 1, 2]
    counts, total, *_ = step_series("predict", model).snapshot()
    assert sum(counts) == 1 and total >= 0.03
    assert sum(first_item_series(model, "predict").snapshot()[0]) == 1


async def test_coroutine_returning_async_generator_is_timed_to_last_chunk(model):
    """KServe's streaming predict: an async handler that returns an async generator."""

    async def chunks():
        for i in range(3):
            await asyncio.sleep(0.01)
            yield i

    @instrument_step("predict", model_name=model)
    async def predict():
        return chunks()

    stream = await predict()
    assert step_series("predict", model).count == 0  # not finished when the iterator is returned
    assert [c async for c in stream] == [0, 1, 2]
    _, total, *_ = step_series("predict", model).snapshot()
    assert step_series("predict", model).count == 1 and total >= 0.03


def test_generator_send_and_throw_are_forwarded(model):
    @instrument_step("predict", model_name=model)
    def echo():
        received = []
        while True:
            try:
                value = yield len(received)
            except KeyError:
                value = "caught"
            if value is None:
                return received
            received.append(value)

    gen = echo()
    assert next(gen) == 0
    assert gen.send("x") == 1
    assert gen.throw(KeyError("k")) == 2
    with pytest.raises(StopIteration) as stop:
        gen.send(None)
    assert stop.value.value == ["x", "caught"]
    assert step_series("predict", model).count == 1


async def test_async_generator_asend_and_athrow_are_forwarded(model):
    @instrument_step("predict", model_name=model)
    async def echo():
        received = []
        while True:
            try:
                value = yield len(received)
            except KeyError:
                value = "caught"
            received.append(value)

    agen = echo()
    assert await agen.asend(None) == 0
    assert await agen.asend("x") == 1
    assert await agen.athrow(KeyError("k")) == 2
    await agen.aclose()
    assert step_series("predict", model).count == 1
    assert error_count(model, "predict", "GeneratorExit") == 0


def test_closed_generator_is_timed_until_close_without_error(model):
    closed = []

    @instrument_step("predict", model_name=model)
    def endless():
        try:
            while True:
                yield 1
        finally:
            closed.append(True)

    gen = endless()
    next(gen)
    time.sleep(0.02)
    gen.close()
    assert closed == [True]
    counts, total, *_ = step_series("predict", model).snapshot()
    assert sum(counts) == 1 and total >= 0.02
    assert error_count(model, "predict", "GeneratorExit") == 0


def test_abandoned_generator_is_recorded_when_collected(model):
    @instrument_step("predict", model_name=model)
    def endless():
        while True:
            yield 1

    gen = endless()
    next(gen)
    del gen  # CPython closes it at once
    assert step_series("predict", model).count == 1


# ----------------------------------------------------------------------------------------- errors


def test_exception_propagates_unchanged_and_is_counted(model, spans):
    class ModelError(Exception):
        pass

    error = ModelError("bad input")

    @instrument_step("predict", model_name=model)
    def predict():
        raise error

    with pytest.raises(ModelError) as info:
        predict()
    assert info.value is error
    frames = [frame.name for frame in traceback.extract_tb(info.value.__traceback__)]
    assert frames[-1] == "predict"  # the traceback still ends where the model raised
    assert step_series("predict", model).count == 1
    assert error_count(model, "predict", "test_exception_propagates_unchanged_and_is_counted.<locals>.ModelError") == 1
    (span,) = [s for s in spans.get_finished_spans() if s.name == f"predict {model}"]
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes["error.type"].endswith("ModelError")
    assert [e.name for e in span.events] == ["exception"]


async def test_async_exception_and_cancellation(model, spans):
    @instrument_step("predict", model_name=model)
    async def fails():
        raise ValueError("no")

    @instrument_step("predict", model_name=model)
    async def hangs():
        await asyncio.sleep(10)

    with pytest.raises(ValueError, match="no"):
        await fails()
    task = asyncio.ensure_future(hangs())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert step_series("predict", model).count == 2
    assert error_count(model, "predict", "ValueError") == 1
    assert error_count(model, "predict", "CancelledError") == 1
    statuses = [s.status.status_code for s in spans.get_finished_spans()]
    assert statuses.count(StatusCode.ERROR) == 2


def test_generator_raising_midway_is_counted(model):
    @instrument_step("predict", model_name=model)
    def stream():
        yield 1
        raise RuntimeError("lost connection")

    gen = stream()
    assert next(gen) == 1
    with pytest.raises(RuntimeError, match="lost connection"):
        next(gen)
    assert step_series("predict", model).count == 1
    assert error_count(model, "predict", "RuntimeError") == 1


# ----------------------------------------------------------------------------------------- spans


async def test_step_spans_are_children_of_the_request_span(model, spans):
    class Model:
        name = model

        @instrument_step("preprocess")
        def preprocess(self, x):
            return x

        @instrument_step("predict")
        async def predict(self, x):
            inner = trace.get_current_span()
            assert inner.is_recording()
            return inner

        @instrument_step("postprocess")
        def postprocess(self, x):
            yield x

    m = Model()
    tracer = spans.provider.get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        m.preprocess(1)
        inner = await m.predict(1)
        list(m.postprocess(1))
    finished = {s.name: s for s in spans.get_finished_spans()}
    request_ctx = request.get_span_context()
    for step in ("preprocess", "predict", "postprocess"):
        span = finished[f"{step} {model}"]
        assert span.parent.span_id == request_ctx.span_id
        assert span.context.trace_id == request_ctx.trace_id
        assert span.attributes["kserve.model.name"] == model
        assert span.attributes["kserve.step"] == step
    assert inner.get_span_context().span_id == finished[f"predict {model}"].context.span_id
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing leaked into the caller's context


def test_generator_span_is_current_only_inside_the_step(model, spans):
    seen_inside = []

    @instrument_step("predict", model_name=model)
    def stream():
        for i in range(2):
            seen_inside.append(trace.get_current_span().get_span_context().span_id)
            yield i

    tracer = spans.provider.get_tracer("test")
    with tracer.start_as_current_span("request") as request:
        for _ in stream():
            assert trace.get_current_span() is request  # the consumer sees its own span between items
    (span,) = [s for s in spans.get_finished_spans() if s.name == f"predict {model}"]
    assert seen_inside == [span.context.span_id] * 2
    assert span.parent.span_id == request.get_span_context().span_id


def test_a_span_ended_in_another_context_is_logged_by_the_api_not_raised(model, spans, caplog):
    """A step's span handle ended where its context token cannot be reset (another contextvars Context, as
    when a generator step is finished by another task): the span still ends, and the API's detach logs."""
    import contextvars

    from kserve_otel.spans import tracing

    with spans.provider.get_tracer("test").start_as_current_span("request"):
        handle = contextvars.copy_context().run(tracing.start_step_span, f"predict {model}", {"model_name": model})
        with caplog.at_level("ERROR", logger="opentelemetry.context"):
            tracing.end_step_span(handle)
    assert "Failed to detach context" in caplog.text
    assert [s.name for s in spans.get_finished_spans()] == [f"predict {model}", "request"]


def test_incoming_traceparent_becomes_the_parent(model, spans):
    from opentelemetry.propagate import extract
    from opentelemetry import context

    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    token = context.attach(extract(carrier))
    try:
        instrument_step("predict", model_name=model)(lambda: None)()
    finally:
        context.detach(token)
    (span,) = spans.get_finished_spans()
    assert format(span.context.trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    assert format(span.parent.span_id, "016x") == "b7ad6b7169203331"


def test_unsampled_parent_skips_span_but_still_records_metrics(model, spans):
    from opentelemetry import context
    from opentelemetry.propagate import extract

    carrier = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"}
    token = context.attach(extract(carrier))
    try:
        instrument_step("predict", model_name=model)(lambda: trace.get_current_span().get_span_context())()
    finally:
        context.detach(token)
    assert spans.get_finished_spans() == ()
    assert step_series("predict", model).count == 1


def test_each_parent_is_decided_by_its_own_flag_in_any_order(model, spans):
    """The decision remembers the last unsampled parent: other parents, sampled or not, are still read."""
    def parent(span_id: int, flags: int) -> trace.Span:
        return trace.NonRecordingSpan(trace.SpanContext(0xA1, span_id, True, trace.TraceFlags(flags)))

    step = instrument_step("predict", model_name=model)(lambda: None)
    unsampled, sampled, other_unsampled = parent(1, 0), parent(2, 1), parent(3, 0)
    for current in (unsampled, unsampled, sampled, unsampled, other_unsampled, sampled):
        with trace.use_span(current):
            step()
    assert [span.parent.span_id for span in spans.get_finished_spans()] == [2, 2]
    assert step_series("predict", model).count == 6


def test_an_invalid_parent_counts_as_none_as_in_the_sdk(model, spans):
    """ParentBased samples by the root sampler when the current span's context is invalid, whatever its flags."""
    invalid_but_flagged = trace.NonRecordingSpan(trace.SpanContext(0, 0, False, trace.TraceFlags(1)))
    for parent in (trace.INVALID_SPAN, invalid_but_flagged):
        with trace.use_span(parent):
            instrument_step("predict", model_name=model)(lambda: None)()
    assert [span.parent for span in spans.get_finished_spans()] == [None, None]


def test_always_off_sampler_and_no_provider_record_metrics_only(model):
    from opentelemetry.sdk.trace import TracerProvider, sampling
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from kserve_otel.spans import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampling.ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.set_tracer_provider(provider)
    try:
        instrument_step("predict", model_name=model)(lambda: None)()
    finally:
        tracing.set_tracer_provider(None)
    instrument_step("predict", model_name=model)(lambda: None)()  # global proxy provider: no SDK at all
    assert exporter.get_finished_spans() == ()
    assert step_series("predict", model).count == 2


def test_ratio_sampler_goes_through_the_sdk(model):
    from opentelemetry.sdk.trace import TracerProvider, sampling
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from kserve_otel.spans import tracing

    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=sampling.TraceIdRatioBased(1.0))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.set_tracer_provider(provider)
    try:
        instrument_step("predict", model_name=model)(lambda: None)()
    finally:
        tracing.set_tracer_provider(None)
    assert len(exporter.get_finished_spans()) == 1


def test_the_api_still_keeps_the_global_tracer_provider_where_tracing_reads_it():
    """kserve_otel.spans.tracing reads ``trace._TRACER_PROVIDER`` (to avoid an environment lookup per step)
    and the current span under ``_SPAN_KEY`` of the runtime context's ContextVar (a lookup instead of four API
    calls): if the OpenTelemetry API moves any of them, this fails."""
    from conftest import run_python

    result = run_python("""
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from kserve_otel.spans import tracing
        assert isinstance(tracing.current_provider(), trace.ProxyTracerProvider)
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        assert trace._TRACER_PROVIDER is provider
        assert tracing.current_provider() is provider
        from opentelemetry import context
        from opentelemetry.trace.propagation import _SPAN_KEY
        span = trace.NonRecordingSpan(trace.SpanContext(1, 2, is_remote=True))
        assert context.get_current().get(_SPAN_KEY) is None
        token = context.attach(trace.set_span_in_context(span))
        assert context.get_current().get(_SPAN_KEY) is span
        assert tracing._current_context() is context.get_current()
        assert tracing._current_context.__self__ is context._RUNTIME_CONTEXT._current_context  # the fast path
        sampled = trace.SpanContext(1, 2, False, trace.TraceFlags(1))  # read by index in the sampling decision
        assert (sampled[3], sampled[5], trace.INVALID_SPAN_CONTEXT[5]) == (1, True, False)
        context.detach(token)
        print("ok")
    """)
    assert result.stdout.strip() == "ok", result.stderr


# ----------------------------------------------------------------------------------------- past the series cap


def _capped_model(step: str):
    """A model class whose ``predict`` records ``step`` under each instance's ``name``."""

    class Model:
        def __init__(self, name: str) -> None:
            self.name = name

        @instrument_step(step)
        def predict(self):
            return self.name

    return Model


def test_past_the_series_cap_nothing_more_is_kept_per_model_name_and_totals_stay_exact():
    """Issue 13 (5): 100k model names past the cap held 105,000 cached entries (+156 MB) for 2,001 series."""
    import tracemalloc

    from kserve_otel.request_path import steps
    from kserve_otel.recording.series import CARDINALITY_LIMIT
    from kserve_otel.spans.tracing import set_tracer_provider

    step = f"cap_{uuid.uuid4().hex[:10]}"  # a family of its own: other tests' step families stay below the cap
    Model = _capped_model(step)
    recorder = inspect.getclosurevars(Model.predict).nonlocals["recorder"]
    set_tracer_provider(trace.NoOpTracerProvider())  # metrics only: no span may hold memory here
    try:
        calls = 0
        for i in range(CARDINALITY_LIMIT + 5):  # fill the family, and a few names past the cap
            Model(f"model-{i}").predict()
            calls += 1
        cached_at_cap = sum(1 for key in steps._infos if key[0] == step)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for i in range(20_000):
            assert Model(f"extra-{i}").predict() == f"extra-{i}"
            calls += 1
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
    finally:
        set_tracer_provider(None)

    assert cached_at_cap == CARDINALITY_LIMIT
    assert sum(1 for key in steps._infos if key[0] == step) == CARDINALITY_LIMIT
    assert len(recorder._models) == CARDINALITY_LIMIT
    retained = sum(stat.size_diff for stat in after.compare_to(before, "filename"))
    assert retained < 256 * 1024, f"{retained} bytes kept for 20,000 names past the cap"  # was about 30 MB
    family = REGISTRY.get(step_instrument_name(step))
    all_series = family.all_series()
    assert len(all_series) == CARDINALITY_LIMIT + 1
    assert sum(series.count for series in all_series) == calls  # every call counted, once
    overflow = [s for s in all_series if s.attributes == {"otel.metric.overflow": True}]
    assert len(overflow) == 1 and overflow[0].count == 20_005


def test_a_model_past_the_cap_keeps_its_name_on_spans_and_is_recorded_once_when_nested(spans):
    """Spans are not metrics: a step span of a model past the cap still names the model. A subclass calling
    ``super().predict()`` (both instrumented) is recorded once there too, as below the cap."""
    from kserve_otel.recording.series import CARDINALITY_LIMIT

    step = f"cap_{uuid.uuid4().hex[:10]}"
    Base = _capped_model(step)

    class Sub(Base):
        @instrument_step(step)
        def predict(self):
            return super().predict()

    for i in range(CARDINALITY_LIMIT):
        Base(f"model-{i}").predict()
    spans.clear()
    assert Sub("over-the-cap").predict() == "over-the-cap"
    assert Sub("over-the-cap").predict() == "over-the-cap"

    finished = spans.get_finished_spans()
    assert [s.name for s in finished] == [f"{step} over-the-cap"] * 2
    assert all(s.attributes[ATTR_MODEL_NAME] == "over-the-cap" for s in finished)
    overflow = [s for s in REGISTRY.get(step_instrument_name(step)).all_series()
                if s.attributes == {"otel.metric.overflow": True}]
    assert overflow[0].count == 2
