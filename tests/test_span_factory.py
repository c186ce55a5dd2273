"""Step spans made from a template (kserve_otel.spans.span_factory) are the spans the SDK's own
Tracer.start_span makes."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, Tracer, TracerProvider, _Span, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.trace import SpanContext, TraceFlags, TraceState

from kserve_otel import instrument_step
from kserve_otel.spans import tracing
from kserve_otel.spans.span_factory import SpanFactory, SpanIds, span_factory, start_sampled_span, supports

ATTRIBUTES = {"model_name": "iris", "kserve.step": "predict", "long": "abcdefgh"}


class StartRecorder(SpanProcessor):
    """What processors see when a span starts."""

    def __init__(self) -> None:
        self.started: list[tuple[Any, Any]] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.started.append((span, parent_context))


class CountingIds(IdGenerator):
    def __init__(self) -> None:
        self.next = 0x1000

    def generate_span_id(self) -> int:
        self.next += 1
        return self.next

    def generate_trace_id(self) -> int:
        self.next += 1
        return self.next << 64

    def is_trace_id_random(self) -> bool:
        return False


def provider_with(exporter: InMemorySpanExporter, **options: Any) -> tuple[TracerProvider, StartRecorder]:
    provider = TracerProvider(resource=Resource.create({"service.name": "factory-test"}), **options)
    starts = StartRecorder()
    provider.add_span_processor(starts)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, starts


def comparable(span: ReadableSpan) -> dict[str, Any]:
    """Everything an exporter reads from a span, except what differs between any two spans (ids, times)."""
    context = span.context
    return {
        "name": span.name, "kind": span.kind, "attributes": dict(span.attributes), "parent": span.parent,
        "trace_flags": context.trace_flags, "trace_state": context.trace_state, "remote": context.is_remote,
        "valid": context.is_valid, "resource": span.resource, "scope": span.instrumentation_scope,
        "status": (span.status.status_code, span.status.description), "events": [e.name for e in span.events],
        "links": list(span.links), "dropped": (span.dropped_attributes, span.dropped_events, span.dropped_links),
        "timed": span.start_time is not None and span.end_time is not None and span.start_time <= span.end_time,
    }


def both_ways(provider: TracerProvider, parent: context_api.Context, exporter: InMemorySpanExporter) -> tuple[Any, Any]:
    """The same span, made by the SDK and by a factory, under ``parent``, with the same work done inside."""
    tracer = provider.get_tracer("kserve-otel-test", "1")
    factory = span_factory(tracer, "predict iris", ATTRIBUTES)
    assert isinstance(factory, SpanFactory)
    made = []
    token = context_api.attach(parent)  # step spans start under the current context, passing none explicitly
    try:
        for start in (lambda: tracer.start_span("predict iris", attributes=ATTRIBUTES),
                      lambda: factory.start(context_api.get_current())):
            span = start()
            span.set_attribute("extra", 1)
            span.add_event("halfway", {"n": 2})
            span.end()
            made.append(span)
    finally:
        context_api.detach(token)
    sdk_made, factory_made = exporter.get_finished_spans()[-2:]
    # The factory's span is an SDK span (a subclass of _Span holding the shared fields as class attributes), and
    # every field of the SDK's span reads the same on it.
    assert type(made[0]) is _Span and isinstance(made[1], _Span)
    for field in made[0].__dict__:
        assert hasattr(made[1], field), field
    return sdk_made, factory_made


def test_root_span_matches_the_sdk():
    exporter = InMemorySpanExporter()
    provider, _ = provider_with(exporter)
    sdk_made, factory_made = both_ways(provider, context_api.Context(), exporter)
    assert comparable(factory_made) == comparable(sdk_made)
    assert factory_made.parent is None and factory_made.context.trace_id != sdk_made.context.trace_id
    assert factory_made.context.trace_flags == TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)


@pytest.mark.parametrize("remote", [True, False])
def test_child_span_matches_the_sdk_and_keeps_the_trace(remote):
    exporter = InMemorySpanExporter()
    provider, _ = provider_with(exporter)
    # a parent with flags the SDK does not pass on (0x80), and a trace state it does
    parent_context = SpanContext(0xABC, 0xDEF, is_remote=remote, trace_flags=TraceFlags(0x81),
                                 trace_state=TraceState([("vendor", "v1")]))
    parent = trace.set_span_in_context(trace.NonRecordingSpan(parent_context))
    sdk_made, factory_made = both_ways(provider, parent, exporter)
    assert comparable(factory_made) == comparable(sdk_made)
    assert factory_made.context.trace_id == 0xABC and factory_made.parent == parent_context
    assert factory_made.context.trace_state == TraceState([("vendor", "v1")])
    assert factory_made.context.trace_flags == TraceFlags.SAMPLED


def test_span_limits_and_a_custom_id_generator_apply_as_in_the_sdk():
    exporter = InMemorySpanExporter()
    limits = SpanLimits(max_span_attributes=2, max_span_attribute_length=3, max_events=0)
    provider, _ = provider_with(exporter, span_limits=limits, id_generator=CountingIds())
    sdk_made, factory_made = both_ways(provider, context_api.Context(), exporter)
    assert comparable(factory_made) == comparable(sdk_made)
    assert factory_made.dropped_attributes == 2 and factory_made.dropped_events == 1
    assert factory_made.attributes["long"] == "abc"
    assert factory_made.context.span_id == sdk_made.context.span_id + 2  # one generator, called in turn
    assert factory_made.context.trace_flags == TraceFlags.SAMPLED  # ids not random: no RANDOM_TRACE_ID flag


def test_processors_see_the_start_as_from_the_sdk():
    exporter = InMemorySpanExporter()
    provider, starts = provider_with(exporter)
    both_ways(provider, context_api.Context(), exporter)
    (sdk_span, sdk_parent), (factory_span, factory_parent) = starts.started
    assert factory_parent is sdk_parent is None  # what the SDK passes on for a span started without one
    assert factory_span.start_time is not None and factory_span.is_recording() is False  # ended since


def test_errors_are_recorded_on_factory_spans():
    exporter = InMemorySpanExporter()
    provider, _ = provider_with(exporter)
    tracing.set_tracer_provider(provider)
    try:
        step = instrument_step("predict", model_name="factory-error")(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            step()
    finally:
        tracing.set_tracer_provider(None)
    (span,) = exporter.get_finished_spans()
    assert span.status.status_code is trace.StatusCode.ERROR
    assert [event.name for event in span.events] == ["exception"]
    assert span.attributes["error.type"] == "ZeroDivisionError"


@pytest.mark.parametrize("sampler", [sampling.DEFAULT_ON, sampling.ALWAYS_ON])
def test_steps_use_a_factory_when_sampling_is_certain(sampler):
    exporter = InMemorySpanExporter()
    provider, _ = provider_with(exporter, sampler=sampler)
    tracing.set_tracer_provider(provider)
    try:
        step = instrument_step("predict", model_name="factory-steps")(lambda: trace.get_current_span())
        outer = provider.get_tracer("test").start_span("request")
        with trace.use_span(outer, end_on_exit=True):
            inner = step()
        factories = tracing._state.factories
    finally:
        tracing.set_tracer_provider(None)
    assert [type(factory) for factory in factories.values()] == [SpanFactory]
    step_span, request_span = exporter.get_finished_spans()
    assert inner.get_span_context() == step_span.context  # the step's span was current inside the step
    assert step_span.parent == request_span.context and step_span.name == "predict factory-steps"


@pytest.mark.parametrize("parent", ["root", "local", "remote"])
def test_a_step_span_started_in_c_is_the_span_the_python_path_makes(parent, monkeypatch):
    """With kserve-otel's encoding processor alone on the tracer, a sampled step's span is started and made
    current in one C call (kserve_otel.spans._spans): the same span, field for field, as the Python path makes
    (that path forced by taking the C function away), the same context made current, the same bytes exported."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
    from otlp_receiver import OTLPReceiver

    from kserve_otel.otlp_export import EncodingBatchSpanProcessor, FastOTLPSpanExporter

    assert tracing._start_current is not None, "the C extension kserve_otel.spans._spans is built and used here"
    parents = {
        "root": context_api.Context(),
        "local": trace.set_span_in_context(trace.NonRecordingSpan(SpanContext(
            0xABC, 0xDEF, False, TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID),
            TraceState([("k", "v")])))),
        "remote": trace.set_span_in_context(trace.NonRecordingSpan(SpanContext(0xABC, 0xDEF, True,
                                                                               TraceFlags(TraceFlags.SAMPLED)))),
    }
    with OTLPReceiver() as receiver:
        processor = EncodingBatchSpanProcessor(FastOTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
        provider = TracerProvider(resource=Resource.create({"service.name": "c-start"}))
        provider.add_span_processor(processor)
        tracing.set_tracer_provider(provider)
        spans, currents = [], []
        try:
            python_start = SpanFactory.start
            for path in ("c", "python"):
                if path == "c":  # the Python path must not run
                    monkeypatch.setattr(SpanFactory, "start", lambda *args: pytest.fail("the Python path ran"))
                else:
                    monkeypatch.setattr(SpanFactory, "start", python_start)
                    monkeypatch.setattr(tracing, "_start_current", None)
                handle, current = _step_in(parents[parent])
                currents.append(current)
                spans.append(handle[0])
        finally:
            tracing.set_tracer_provider(None)
        provider.shutdown()
        (request,) = receiver.traces
    c_span, python_span = spans
    assert type(c_span) is type(python_span) and type(c_span).__base__.__name__ == "TemplateSpan"
    assert set(c_span.__dict__) == set(python_span.__dict__) == {"_context", "_parent", "_start_time", "_end_time"}
    same = {key: value for key, value in comparable(python_span).items() if key not in ("span_id", "trace_id")}
    assert {key: value for key, value in comparable(c_span).items() if key not in ("span_id", "trace_id")} == same
    assert type(c_span.context) is SpanContext and c_span.context.is_valid and c_span.context.span_id
    if parent == "root":
        assert c_span.context.trace_id != python_span.context.trace_id and c_span.parent is None
    else:
        assert c_span.context.trace_id == 0xABC and c_span.parent == parents[parent][_span_key()].get_span_context()
    assert [type(current) for current in currents] == [context_api.Context] * 2
    assert currents[0].keys() == currents[1].keys() and currents[0][_span_key()] is c_span
    assert request.SerializeToString() == sdk_encode_spans(spans).SerializeToString()


@pytest.mark.parametrize("parent", ["root", "sampled", "remote unsampled random", "remote sampled"])
def test_a_dropped_spans_non_recording_span_is_made_in_c_as_in_python(monkeypatch, parent):
    """Where the sampler drops a span (a ratio sampler's root, or ALWAYS_OFF under a sampled parent), the SDK's
    non-recording span of that trace is made current: in one C call (kserve_otel.spans._spans.dropped_current)
    as in Python, field for field, with the flags and trace state the SDK gives it."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

    assert tracing._dropped_current is not None, "the C extension kserve_otel.spans._spans is built and used here"
    state = TraceState([("k", "v")])
    parents = {
        "root": None,
        "sampled": SpanContext(0xABC, 0xDEF, False, TraceFlags(TraceFlags.SAMPLED), state),
        "remote unsampled random": SpanContext(0xABC, 0xDEF, True, TraceFlags(TraceFlags.RANDOM_TRACE_ID), state),
        "remote sampled": SpanContext(0xABC, 0xDEF, True, TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)),
    }
    # Roots are dropped at ratio 0, children of sampled and of remote unsampled parents by ALWAYS_OFF; children
    # of unsampled local spans are sampled, so a dropped span's children are not all dropped: its
    # non-recording span must be made.
    sampler = ParentBased(TraceIdRatioBased(0.0), local_parent_sampled=ALWAYS_OFF, remote_parent_sampled=ALWAYS_OFF,
                          local_parent_not_sampled=ALWAYS_ON, remote_parent_not_sampled=ALWAYS_OFF)
    provider = TracerProvider(sampler=sampler)
    tracing.set_tracer_provider(provider)
    handles, currents = [], []
    try:
        for path in ("c", "python"):
            if path == "python":
                monkeypatch.setattr(tracing, "_dropped_current", None)
            context = context_api.Context() if parents[parent] is None else trace.set_span_in_context(
                trace.NonRecordingSpan(parents[parent]))
            handle, current = _step_in(context)
            currents.append(current)
            handles.append(handle)
    finally:
        tracing.set_tracer_provider(None)
    (c_span, _), (python_span, _) = handles
    assert type(c_span) is type(python_span) is trace.NonRecordingSpan
    assert set(c_span.__dict__) == set(python_span.__dict__) == {"_context"}
    c, py = c_span.get_span_context(), python_span.get_span_context()
    assert type(c) is type(py) is SpanContext and c.is_valid and py.is_valid and c.span_id != py.span_id
    assert (c.is_remote, c.trace_flags, c.trace_state) == (py.is_remote, py.trace_flags, py.trace_state)
    assert not c.trace_flags.sampled and c.is_remote is False
    if parent == "root":
        assert c.trace_state == trace.DEFAULT_TRACE_STATE and c.trace_id != py.trace_id
    else:
        assert c.trace_id == py.trace_id == 0xABC and c.trace_state is parents[parent].trace_state
        assert c.trace_flags & TraceFlags.RANDOM_TRACE_ID == parents[parent].trace_flags & TraceFlags.RANDOM_TRACE_ID
    assert [type(current) for current in currents] == [context_api.Context] * 2
    assert currents[0][_span_key()] is c_span and currents[1][_span_key()] is python_span


def _step_in(context: Any) -> tuple[Any, Any]:
    """Start and end a step span with ``context`` current: its handle and the context current inside it."""
    token = context_api.attach(context)
    try:
        handle = tracing.start_step_span("predict iris", ATTRIBUTES)
        assert handle is not None
        current = context_api.get_current()
        tracing.end_step_span(handle)
    finally:
        context_api.detach(token)
    return handle, current


def _span_key() -> str:
    from opentelemetry.trace.propagation import _SPAN_KEY

    return _SPAN_KEY


def test_tracers_the_factory_does_not_know_take_the_sdk_path():
    class OwnTracer(Tracer):
        pass

    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    own = OwnTracer(tracer.sampler, tracer.resource, tracer.span_processor, tracer.id_generator,
                    tracer.instrumentation_info, tracer._span_limits, tracer._instrumentation_scope)
    assert span_factory(own, "predict iris", ATTRIBUTES) is None
    assert span_factory(trace.NoOpTracer(), "predict iris", ATTRIBUTES) is None
    assert isinstance(span_factory(tracer, "predict iris", ATTRIBUTES), SpanFactory)


def test_a_disabled_tracer_makes_no_span_through_the_factory_either():
    """The SDK's tracer configuration (here: every tracer disabled) is asked on every span, as by start_span."""
    from opentelemetry.sdk.trace import _disable_tracer_configurator

    exporter = InMemorySpanExporter()
    provider, starts = provider_with(exporter, _tracer_configurator=_disable_tracer_configurator)
    factory = span_factory(provider.get_tracer("kserve-otel-test"), "predict iris", ATTRIBUTES)
    assert isinstance(factory, SpanFactory)
    span = factory.start(context_api.Context())
    span.end()
    assert not span.is_recording() and starts.started == [] and exporter.get_finished_spans() == ()


def test_the_sdks_own_span_metrics_count_factory_spans_alike(monkeypatch):
    """``otel.sdk.span.started`` / ``otel.sdk.span.live``: the SDK's self-observability sees both paths alike."""
    from opentelemetry.sdk.metrics import MeterProvider

    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    exporter = InMemorySpanExporter()
    provider, _ = provider_with(exporter, meter_provider=MeterProvider(metric_readers=[reader]))
    both_ways(provider, context_api.Context(), exporter)
    points = {
        metric.name: [(dict(point.attributes), point.value) for point in metric.data.data_points]
        for resource_metrics in reader.get_metrics_data().resource_metrics
        for scope_metrics in resource_metrics.scope_metrics for metric in scope_metrics.metrics
    }
    assert [value for _, value in points["otel.sdk.span.started"]] == [2]  # one series: same attributes
    assert all(value == 0 for _, value in points["otel.sdk.span.live"])  # both ended


@pytest.mark.parametrize("remote", [None, True, False])
def test_a_request_span_for_a_decided_trace_id_is_the_span_the_sdk_makes(remote):
    """start_sampled_span: what Tracer.start_span makes (any kind, per-request attributes) once its sampler said
    "sample", with the trace id the decision was made for, and the start processors see."""
    exporter = InMemorySpanExporter()
    provider, starts = provider_with(exporter)
    tracer = provider.get_tracer("kserve-otel-test", "1")
    attributes = {"url.path": "/v1/models/iris:predict", "server.port": 8080}
    if remote is None:
        parent, parent_span = None, None
    else:
        parent_span = SpanContext(0xABC, 0xDEF, is_remote=remote, trace_flags=TraceFlags(0x03),
                                  trace_state=TraceState([("vendor", "v1")]))
        parent = trace.set_span_in_context(trace.NonRecordingSpan(parent_span))
    sdk_made = tracer.start_span("POST /v1/models/{model_name}:predict", context=parent,
                                 kind=trace.SpanKind.SERVER, attributes=attributes)
    ours = start_sampled_span(tracer, SpanIds(tracer), "POST /v1/models/{model_name}:predict", parent, parent_span,
                              0x1234 << 64 | 0x5678, trace.SpanKind.SERVER, attributes)
    for span in (sdk_made, ours):
        span.set_attribute("http.response.status_code", 200)
        span.end()
    sdk_made, factory_made = exporter.get_finished_spans()
    assert comparable(factory_made) == comparable(sdk_made)
    assert factory_made.context.trace_id == (0x1234 << 64 | 0x5678 if remote is None else 0xABC)
    assert [parent_context for _, parent_context in starts.started] == [parent, parent]


def test_a_factory_span_carries_the_trace_id_it_was_decided_for():
    exporter = InMemorySpanExporter()
    provider, _ = provider_with(exporter)
    tracer = provider.get_tracer("kserve-otel-test", "1")
    factory = span_factory(tracer, "predict iris", ATTRIBUTES)
    assert isinstance(factory, SpanFactory)
    factory.start(context_api.Context(), None, 0xFEED).end()
    (span,) = exporter.get_finished_spans()
    assert span.context.trace_id == 0xFEED and span.parent is None


def test_span_ids_are_drawn_as_the_sdks_id_generator_draws_them():
    import random

    tracer = TracerProvider().get_tracer("kserve-otel-test")
    assert type(tracer.id_generator) is RandomIdGenerator and supports(tracer)
    state = random.getstate()
    try:
        random.seed(14)
        ids = SpanIds(tracer)
        ours = [ids.trace_id(), ids.span_id(), ids.trace_id()]
        random.seed(14)
        generator = RandomIdGenerator()
        assert ours == [generator.generate_trace_id(), generator.generate_span_id(), generator.generate_trace_id()]
    finally:
        random.setstate(state)
    assert ids.root_flags == (TraceFlags(TraceFlags.RANDOM_TRACE_ID),
                              TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID))
    counting = TracerProvider(id_generator=CountingIds()).get_tracer("kserve-otel-test")
    ids = SpanIds(counting)
    assert (ids.trace_id(), ids.span_id()) == (0x1001 << 64, 0x1002)
    assert ids.root_flags == (TraceFlags(TraceFlags.DEFAULT), TraceFlags(TraceFlags.SAMPLED))


@pytest.mark.parametrize(("attributes", "limits"), [
    ({"url.path": "/v1/models/iris:predict", "server.port": 8080, "ok": True, "ratio": 0.5}, {}),
    ({"http.request.header.accept": ["a", "b"], "server.port": 8080}, {}),  # a sequence: cleaned by the SDK
    ({"url.path": "/v1/models/iris:predict"}, {"max_span_attribute_length": 4}),  # truncated by the SDK
    ({f"a{i}": i for i in range(5)}, {"max_span_attributes": 3}),  # some dropped by the SDK
], ids=["plain", "sequence", "value-length-limit", "count-limit"])
def test_request_spans_are_the_sdks_with_any_attributes_and_limits(attributes, limits):
    """Plain attributes skip the SDK's cleaning (the request-span template); anything the cleaning would change
    takes the SDK's path: either way the span is the SDK's."""
    from opentelemetry.sdk.trace import SpanLimits

    exporter = InMemorySpanExporter()
    provider, _ = provider_with(exporter, span_limits=SpanLimits(**limits))
    tracer = provider.get_tracer("kserve-otel-test", "1")
    sdk_made = tracer.start_span("GET /", kind=trace.SpanKind.SERVER, attributes=attributes)
    ours = start_sampled_span(tracer, SpanIds(tracer), "GET /", None, None, 0x77, trace.SpanKind.SERVER, attributes)
    for span in (sdk_made, ours):
        span.set_attribute("http.response.status_code", 200)
        span.end()
    sdk_made, factory_made = exporter.get_finished_spans()
    assert comparable(factory_made) == comparable(sdk_made)
    assert type(factory_made.attributes) is type(sdk_made.attributes)


# ------------------------------------------------------------- template spans: shared fields, the fast end


def _used(span: Any, n: int) -> Any:
    """A span given what a user's code may do to it inside a step."""
    if n % 2:
        span.set_attribute("n", n)
        span.set_attributes({"odd": True, "list": [1, 2]})
    if n % 3 == 0:
        span.add_event("event", {"n": n})
    if n % 4 == 0:
        span.add_link(SpanContext(0x1234, 0x5678, is_remote=True), {"why": "batch"})
    if n % 5 == 0:
        span.update_name(f"renamed {n}")
        span.record_exception(ValueError("bad input"))
        span.set_status(trace.Status(trace.StatusCode.ERROR, "bad input"))
    span.end()
    return span


def test_template_spans_share_nothing_a_span_changes():
    exporter = InMemorySpanExporter()
    provider, _ = provider_with(exporter)
    factory = span_factory(provider.get_tracer("t"), "predict iris", ATTRIBUTES)
    spans = [_used(factory.start(context_api.Context()), n) for n in range(6)]
    exported = exporter.get_finished_spans()
    assert [dict(span.attributes) for span in exported] == [
        {**ATTRIBUTES, **({"n": n, "odd": True, "list": (1, 2)} if n % 2 else {})} for n in range(6)]
    assert [[event.name for event in span.events] for span in exported] == [
        ["event", "exception"], [], [], ["event"], [], ["exception"]]
    assert [len(span.links) for span in exported] == [1, 0, 0, 0, 1, 0]
    assert [span.name for span in exported] == ["renamed 0", *["predict iris"] * 4, "renamed 5"]
    # a new span still starts from the template alone
    fresh = factory.start(context_api.Context())
    assert dict(fresh._attributes) == ATTRIBUTES and tuple(fresh._events) == () and fresh.name == "predict iris"
    fresh.set_attribute("after", 1)
    with pytest.raises(TypeError):  # what the SDK does to a change of an ended span's attributes
        spans[0]._attributes["late"] = 1
    assert "after" not in factory.start(context_api.Context()).attributes


@pytest.mark.parametrize("implementation", ["c", "python"])
def test_template_spans_encode_as_the_sdk_encoder_reads_them(implementation):
    """The OTLP encoder reads a template span's fields (some of them class attributes) as the SDK's encoder
    reads its properties."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans

    from kserve_otel.export import otlp_encoding

    encode = {"c": otlp_encoding.encode_spans, "python": otlp_encoding.py_encode_spans}[implementation]
    limits = SpanLimits(max_span_attributes=4, max_events=1, max_links=0)
    for options in ({}, {"span_limits": limits}):
        exporter = InMemorySpanExporter()
        provider, _ = provider_with(exporter, **options)
        tracer = provider.get_tracer("kserve-otel-test", "1")
        factory = span_factory(tracer, "predict iris", ATTRIBUTES)
        parent = trace.set_span_in_context(trace.NonRecordingSpan(SpanContext(0xABC, 0xDEF, is_remote=True)))
        live = [_used(factory.start(parent if n % 2 else context_api.Context()), n) for n in range(10)]
        ids = SpanIds(tracer)
        live += [_used(start_sampled_span(tracer, ids, "request", None, None, ids.trace_id(), trace.SpanKind.SERVER,
                                          {"url.path": "/v1/models/iris:predict", "server.port": 8080}), n)
                 for n in range(5)]
        expected = sdk_encode_spans(live).SerializeToString()
        assert encode(live) == expected
        assert encode(exporter.get_finished_spans()) == expected  # their ReadableSpan copies alike


def test_the_only_processor_gets_the_ended_span_and_the_receiver_the_sdks_bytes():
    """A tracer whose one processor is kserve-otel's encoding processor: starts skip the processors' no-op
    on_start, ends pass the span itself, and what reaches a real OTLP/HTTP receiver is what the SDK's encoder
    makes of the same spans."""
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
    from otlp_receiver import OTLPReceiver

    from kserve_otel.otlp_export import EncodingBatchSpanProcessor, FastOTLPSpanExporter

    with OTLPReceiver() as receiver:
        processor = EncodingBatchSpanProcessor(FastOTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
        provider = TracerProvider(resource=Resource.create({"service.name": "fast"}))
        provider.add_span_processor(processor)
        tracer = provider.get_tracer("kserve-otel-test", "1")
        factory = span_factory(tracer, "predict iris", ATTRIBUTES)
        assert factory._span_class._fast == (processor,)
        ended = []
        original, original_end = processor.on_end, processor.end_span
        processor.on_end = lambda span: (ended.append(span), original(span))[1]
        processor.end_span = lambda span, at: (ended.append(span), original_end(span, at))[1]
        live = [_used(factory.start(context_api.Context()), n) for n in range(12)]
        assert ended == live  # the spans themselves, no ReadableSpan copies, ended by the processor
        # a processor added while a span runs sees its end as from the SDK, and the fast path steps aside
        running = factory.start(context_api.Context())
        memory = InMemorySpanExporter()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        running.end()
        assert [span.context for span in memory.get_finished_spans()] == [running.context]
        assert type(ended[-1]) is ReadableSpan
        provider.shutdown()
        (request,) = receiver.traces
    assert request.SerializeToString() == sdk_encode_spans([*live, running]).SerializeToString()


@pytest.mark.parametrize("implementation", ["c", "python"])
def test_the_processors_end_of_a_span_is_the_sdks_end(implementation, caplog):
    """The encoding processor's end_span (C, and its Python twin) ends a template span as Span.end does: the end
    time given or now, the end metrics called once, a second end warned about and ignored; a span it cannot
    encode is logged and dropped, never raised; the receiver gets the SDK encoder's bytes of the others."""
    from functools import partial

    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
    from otlp_receiver import OTLPReceiver

    from kserve_otel.export import otlp_encoding
    from kserve_otel.otlp_export import EncodingBatchSpanProcessor, FastOTLPSpanExporter, py_end_span

    with OTLPReceiver() as receiver:
        processor = EncodingBatchSpanProcessor(FastOTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces"))
        assert processor.end_span.func is (otlp_encoding.c_end_span or py_end_span)
        if implementation == "python":
            processor.end_span = partial(py_end_span, *processor.end_span.args)
        elif otlp_encoding.c_end_span is None:
            pytest.fail("the C extension is not built")
        provider = TracerProvider(resource=Resource.create({"service.name": "fast"}))
        provider.add_span_processor(processor)
        factory = span_factory(provider.get_tracer("kserve-otel-test", "1"), "predict iris", ATTRIBUTES)
        first, timed, broken = (factory.start(context_api.Context()) for _ in range(3))
        metrics: list[str] = []
        first._record_end_metrics = lambda: metrics.append("ended")
        first.set_attribute("rows", 2)
        first.end()
        first.end()
        assert metrics == ["ended"] and caplog.text.count("Calling end() on an ended span.") == 1
        assert first.start_time <= first.end_time and not first.is_recording()
        timed.end(end_time=timed.start_time + 5)
        assert timed.end_time == timed.start_time + 5
        broken._start_time = "not a time"
        broken.end()  # nothing raised
        assert "Failed to encode span 'predict iris', dropping it" in caplog.text
        with pytest.raises(TypeError):  # ended: its attributes are immutable, as the SDK leaves them
            first._attributes["late"] = 1
        provider.shutdown()
        (request,) = receiver.traces
    assert request.SerializeToString() == sdk_encode_spans([first, timed]).SerializeToString()


def test_a_user_processors_on_start_keeps_the_sdk_path():
    from kserve_otel.otlp_export import EncodingBatchSpanProcessor, FastOTLPSpanExporter

    class Watching(EncodingBatchSpanProcessor):
        def on_start(self, span: Any, parent_context: Any = None) -> None:
            self.seen = span

    processor = Watching(FastOTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces"))
    provider = TracerProvider()
    provider.add_span_processor(processor)
    factory = span_factory(provider.get_tracer("t"), "predict iris", ATTRIBUTES)
    assert factory._span_class._fast is None
    span = factory.start(context_api.Context())
    assert processor.seen is span
    span.end()
    provider.shutdown()


@pytest.mark.parametrize("limits", [None, SpanLimits(max_span_attributes=4), SpanLimits(max_span_attribute_length=3)],
                         ids=["default", "four attributes", "three characters"])
def test_set_attribute_keeps_what_the_sdk_keeps_in_its_order(limits, caplog):
    """The template span's own set_attribute (plain values) against the SDK's: same items, same order (a key
    set again moves to the end), same drops, same warning for an ended span."""
    exporter = InMemorySpanExporter()
    provider, _ = provider_with(exporter, **({"span_limits": limits} if limits else {}))
    tracer = provider.get_tracer("t")
    factory = span_factory(tracer, "predict iris", {"model_name": "iris"})
    ids = SpanIds(tracer)
    made = {
        "sdk": tracer.start_span("predict iris", attributes={"model_name": "iris"}),
        "step": factory.start(context_api.Context()),
        "request": start_sampled_span(tracer, ids, "predict iris", None, None, ids.trace_id(),
                                      trace.SpanKind.INTERNAL, {"model_name": "iris"}),
    }
    for span in made.values():
        for key, value in (("a", 1), ("b", "a long value"), ("model_name", "other"), ("a", 2.5), ("c", True),
                           ("d", [1, 2]), ("", 3), ("e", -4)):
            span.set_attribute(key, value)
        span.end()
        with caplog.at_level("WARNING", logger="opentelemetry.sdk.trace"):
            span.set_attribute("late", 1)
    assert caplog.text.count("Setting attribute on ended span.") == 3
    by_name = dict(zip(made, exporter.get_finished_spans()))
    expected = list(by_name["sdk"].attributes.items())
    for name in ("step", "request"):
        assert list(by_name[name].attributes.items()) == expected, name
        assert by_name[name].dropped_attributes == by_name["sdk"].dropped_attributes
