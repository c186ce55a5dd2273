"""The fast OTLP span encoder writes the SDK encoder's bytes, and its exporter sends them like the SDK's.

Each case encodes the same spans with the SDK (``encode_spans(spans).SerializeToString()``), with the C
extension and with its pure-Python twin, and compares the bytes; the exporter cases send real spans to a real
OTLP/HTTP receiver on loopback that decodes them.
"""

from __future__ import annotations

import inspect
import logging

import pytest
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from kserve_otel.export import otlp_encoding
from kserve_otel.otlp_export import SDK_ATTRIBUTES, FastOTLPSpanExporter
from otlp_receiver import OTLPReceiver

ENCODERS = {"c": otlp_encoding.encode_spans, "python": otlp_encoding.py_encode_spans}


def test_the_extension_is_built_here() -> None:
    """CI builds the C extension: the byte comparisons below then cover both implementations."""
    assert otlp_encoding.IMPLEMENTATION == "c"


def _context(trace_id: int, span_id: int, *, remote: bool = False, state: TraceState | None = None) -> SpanContext:
    return SpanContext(trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(TraceFlags.SAMPLED),
                       trace_state=state)


def _traced_spans() -> list[ReadableSpan]:
    """Spans as a real tracer makes them: kinds, every attribute type, events, an exception, links, statuses."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "iris", "k8s.pod.uid": "a", "n": 3}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("kserve_otel", "1.2", schema_url="https://opentelemetry.io/schemas/1.26.0",
                                 attributes={"scope.attr": True})
    other = provider.get_tracer("user.code")
    attributes = {"s": "é ☃", "f": -1.5, "b": False, "t": True, "i": -3, "big": 2**63 - 1, "zero": 0,
                  "strings": ["a", ""], "ints": [1, -1], "floats": (0.5,), "bools": [True, False], "empty": [],
                  "bytes": b"\x00\xff"}
    with tracer.start_as_current_span("POST /v1/models/iris:predict", kind=SpanKind.SERVER,
                                      attributes=attributes) as root:
        root.add_event("queued", {"depth": 2}, timestamp=1_700_000_000_000_000_001)
        root.add_event("no attributes")
        for step in ("preprocess", "predict", "postprocess"):
            with tracer.start_as_current_span(step, attributes={"model_name": "iris"}):
                pass
        with other.start_as_current_span("client", kind=SpanKind.CLIENT,
                                         links=[Link(root.get_span_context(), {"why": "retry"}),
                                                Link(_context(7, 8, remote=True))]) as client:
            client.set_status(Status(StatusCode.ERROR, "upstream said 503"))
        with other.start_as_current_span("ok", kind=SpanKind.PRODUCER) as ok:
            ok.set_status(Status(StatusCode.OK))
        try:
            with other.start_as_current_span("raises", kind=SpanKind.CONSUMER):
                raise ValueError("the model's own error")
        except ValueError:
            pass
    return list(exporter.get_finished_spans())


def _hand_made_spans() -> list[ReadableSpan]:
    """What a tracer rarely makes: remote parents, trace state, no scope, several resources, zero times."""
    first, second = Resource({"service.name": "a"}, schema_url="https://x"), Resource({"service.name": "b"})
    scope = InstrumentationScope("s", None, None, None)
    state = TraceState([("vendor", "v1"), ("other", "x-y")])
    return [
        ReadableSpan("remote child", _context(2**128 - 1, 2**64 - 1, state=state),
                     parent=_context(1, 2, remote=True), resource=first, instrumentation_scope=scope,
                     start_time=1, end_time=2**64 - 1, kind=SpanKind.SERVER),
        ReadableSpan("no scope", _context(5, 6), parent=_context(5, 1), resource=second, start_time=0, end_time=0),
        ReadableSpan("", _context(9, 10), resource=first, instrumentation_scope=scope, start_time=3, end_time=4,
                     events=[Event("e", {"x": [1.0, 2.0]}, timestamp=5)], status=Status(StatusCode.UNSET, None)),
        # equal to `first` but another object: the SDK groups it with `first`, and so must the encoder
        ReadableSpan("equal resource", _context(11, 12), resource=Resource({"service.name": "a"},
                                                                           schema_url="https://x"),
                     instrumentation_scope=InstrumentationScope("s", None, None, None), start_time=1, end_time=1),
    ]


class _OwnSpan(ReadableSpan):
    """A span class of a user's own: the encoder reads it through its properties only."""

    @property
    def name(self) -> str:
        return f"own {self._name}"


class _OwnContext(SpanContext):
    pass


def _own_class_spans() -> list[ReadableSpan]:
    """Spans that are not the SDK's exact classes, next to ones that are, in one batch."""
    own = [_OwnSpan(span.name, _OwnContext(span.context.trace_id, span.context.span_id, span.context.is_remote,
                                           span.context.trace_flags, span.context.trace_state),
                    parent=span.parent, resource=span.resource, attributes=span.attributes, events=span.events,
                    links=span.links, kind=span.kind, status=span.status, start_time=span.start_time,
                    end_time=span.end_time, instrumentation_scope=span.instrumentation_scope)
           for span in _traced_spans()]
    return own + _hand_made_spans()


@pytest.mark.parametrize("implementation", ENCODERS)
@pytest.mark.parametrize("make", [_traced_spans, _hand_made_spans, _own_class_spans, lambda: []],
                         ids=["traced", "hand-made", "own-classes", "none"])
def test_same_bytes_as_the_sdk_encoder(implementation: str, make) -> None:
    spans = make()
    expected = sdk_encode_spans(spans).SerializeToString()
    assert ENCODERS[implementation](spans) == expected
    many = spans * 40  # lengths past one byte's varint, and groups met again after other groups
    assert ENCODERS[implementation](many) == sdk_encode_spans(many).SerializeToString()


@pytest.mark.parametrize("batch", ["c", "python"])
@pytest.mark.parametrize("make", [_traced_spans, _hand_made_spans, _own_class_spans, lambda: []],
                         ids=["traced", "hand-made", "own-classes", "none"])
def test_a_batch_of_spans_encoded_one_by_one_is_the_sdk_encoders_request(batch: str, make) -> None:
    """What the encoding processor queues (each span's bytes with its resource and scope) makes, batched, the
    request the SDK's encoder makes of the spans: same groups in the same order, same bytes."""
    encode_batch = {"c": otlp_encoding.encode_batch, "python": otlp_encoding.py_encode_batch}[batch]
    spans = make() * 40  # groups met again after other groups, lengths past one byte's varint
    items = [otlp_encoding.EncodedSpan(span.resource, span.instrumentation_scope or None,
                                       otlp_encoding.encode_span(span)) for span in spans]
    assert encode_batch(items) == sdk_encode_spans(spans).SerializeToString()
    with pytest.raises((TypeError, ValueError)):  # the exporter fails such a batch, as one it cannot encode
        encode_batch([("not", "an encoded span")])


@pytest.mark.parametrize("implementation", ENCODERS)
def test_dropped_counts_and_limits_are_written(implementation: str) -> None:
    from opentelemetry.sdk.trace import SpanLimits

    exporter = InMemorySpanExporter()
    provider = TracerProvider(span_limits=SpanLimits(max_span_attributes=1, max_events=1, max_links=1,
                                                     max_event_attributes=1, max_link_attributes=1))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with provider.get_tracer("t").start_as_current_span(
            "limited", attributes={"a": 1, "b": 2},
            links=[Link(_context(1, 2), {"x": 1, "y": 2}), Link(_context(3, 4))]) as span:
        span.add_event("one", {"x": 1, "y": 2})
        span.add_event("two")
    spans = exporter.get_finished_spans()
    encoded = ENCODERS[implementation](spans)
    assert encoded == sdk_encode_spans(spans).SerializeToString()
    decoded = ExportTraceServiceRequest.FromString(encoded).resource_spans[0].scope_spans[0].spans[0]
    assert (decoded.dropped_attributes_count, decoded.dropped_events_count, decoded.dropped_links_count) == (1, 1, 1)


@pytest.mark.parametrize("implementation", ENCODERS)
@pytest.mark.parametrize("bad", [object(), 2**63, -(2**63) - 1, "lone \udc80 surrogate", [1, object()],
                                 {"nested": object()}])
def test_an_attribute_that_cannot_be_encoded_is_logged_and_left_out(implementation: str, bad, caplog) -> None:
    """As the SDK's encoder does: the span keeps its other attributes; the batch is not lost."""
    span = ReadableSpan("s", _context(1, 2), resource=Resource({}), start_time=1, end_time=2,
                        attributes={"before": 1, "bad": bad, "after": "x"})
    with caplog.at_level(logging.ERROR):
        encoded = ENCODERS[implementation]([span])
    assert encoded == sdk_encode_spans([span]).SerializeToString()
    decoded = ExportTraceServiceRequest.FromString(encoded).resource_spans[0].scope_spans[0].spans[0]
    assert [pair.key for pair in decoded.attributes] == ["before", "after"]
    assert "bad" in caplog.text


@pytest.mark.parametrize("implementation", ENCODERS)
@pytest.mark.parametrize("broken", [
    {"context": SpanContext(2**128, 1, False)}, {"start_time": -1}, {"name": 7},
])
def test_a_span_that_does_not_fit_the_wire_raises_as_the_sdk_does(implementation: str, broken) -> None:
    fields = {"name": "s", "context": _context(1, 2), "resource": Resource({}), "start_time": 1, "end_time": 2}
    fields.update(broken)
    span = ReadableSpan(**fields)
    with pytest.raises(Exception):
        sdk_encode_spans([span]).SerializeToString()
    with pytest.raises((TypeError, ValueError, OverflowError)):
        ENCODERS[implementation]([span])


def test_the_sdk_export_still_uses_the_parts_the_fast_exporter_reads() -> None:
    """FastOTLPSpanExporter.export is the SDK's with the encoder swapped; a new SDK that moves these breaks here."""
    source = inspect.getsource(OTLPSpanExporter.export)
    for name in SDK_ATTRIBUTES:
        assert f"self.{name}" in source, name
    assert "encode_spans(spans)" in source


def test_the_fast_exporter_delivers_what_the_sdk_exporter_delivers() -> None:
    spans = _traced_spans() + _hand_made_spans()
    with OTLPReceiver() as receiver:
        for exporter_type in (OTLPSpanExporter, FastOTLPSpanExporter):
            exporter = exporter_type(endpoint=f"{receiver.endpoint}/v1/traces")
            assert exporter.export(spans) is SpanExportResult.SUCCESS
            exporter.shutdown()
            assert exporter.export(spans) is SpanExportResult.FAILURE  # after shutdown, as the SDK's
    sdk_request, fast_request = receiver.traces
    assert fast_request == sdk_request
    assert len(receiver.spans()) == 2 * len(spans)


def test_the_fast_exporter_fails_a_batch_it_cannot_send_without_raising() -> None:
    """A dead receiver or an unencodable batch is a failed export, never an exception in the processor."""
    with OTLPReceiver() as receiver:
        endpoint = f"{receiver.endpoint}/v1/traces"
    exporter = FastOTLPSpanExporter(endpoint=endpoint, timeout=1)
    assert exporter.export(_hand_made_spans()) is SpanExportResult.FAILURE
    unencodable = ReadableSpan("s", SpanContext(2**128, 1, False), resource=Resource({}), start_time=1, end_time=2)
    assert exporter.export([unencodable]) is SpanExportResult.FAILURE
    exporter.shutdown()


def test_the_tracer_of_a_traced_server_exports_with_the_fast_exporter() -> None:
    from kserve_otel import telemetry

    assert type(telemetry._span_exporter("otlp")) is FastOTLPSpanExporter


def test_an_sdk_whose_exporter_internals_moved_gets_its_own_exporter(monkeypatch, caplog) -> None:
    """A future SDK without the private attributes: a warning naming them, and the SDK's exporter, not a crash."""
    from kserve_otel import telemetry

    def without_client(self, *args, **kwargs) -> None:
        OTLPSpanExporter.__init__(self, *args, **kwargs)
        del self._client  # then the real check, on an exporter that lacks _client
        from kserve_otel.otlp_export import _sdk_parts

        _sdk_parts(self)

    monkeypatch.setattr(FastOTLPSpanExporter, "__init__", without_client)
    with caplog.at_level(logging.WARNING):
        exporter = telemetry._span_exporter("otlp")
    assert type(exporter) is OTLPSpanExporter
    assert "_client" in caplog.text and "OTLPSpanExporter" in caplog.text


def test_a_span_from_a_real_tracer_reaches_the_receiver_whole() -> None:
    """Through a BatchSpanProcessor, as the server runs it: every span arrives, with its parent and attributes."""
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    with OTLPReceiver() as receiver:
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(FastOTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces")))
        tracer = provider.get_tracer("t")
        for _ in range(300):
            with tracer.start_as_current_span("request", kind=trace.SpanKind.SERVER):
                with tracer.start_as_current_span("predict", attributes={"model_name": "iris"}):
                    pass
        provider.shutdown()
        spans = receiver.spans()
    assert len(spans) == 600
    by_id = {span.span_id: span for span in spans}
    children = [span for span in spans if span.name == "predict"]
    assert all(by_id[span.parent_span_id].name == "request" for span in children)
    assert all(span.attributes[0].value.string_value == "iris" for span in children)


# ------------------------------------------------------------------------- the processor that queues bytes


def _provider_with(processor, exporter: InMemorySpanExporter | None = None) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "iris"}))
    provider.add_span_processor(processor)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider


def test_the_encoding_processor_delivers_the_sdk_encoders_bytes() -> None:
    """Spans encoded one by one as they end, batched, sent: the receiver gets what the SDK would have sent."""
    from kserve_otel.otlp_export import EncodingBatchSpanProcessor

    memory = InMemorySpanExporter()
    with OTLPReceiver() as receiver:
        exporter = FastOTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces")
        provider = _provider_with(EncodingBatchSpanProcessor(exporter, max_export_batch_size=2_048), memory)
        for tracer in (provider.get_tracer("a", "1"), provider.get_tracer("b"), provider.get_tracer("a", "1")):
            with tracer.start_as_current_span("request", kind=SpanKind.SERVER, attributes={"k": [1, 2]}) as span:
                span.add_event("e", {"x": "y"})
                with tracer.start_as_current_span("predict", links=[Link(_context(3, 4, remote=True))]):
                    pass
        provider.shutdown()
        (request,) = receiver.traces
    assert request.SerializeToString() == sdk_encode_spans(memory.get_finished_spans()).SerializeToString()


def test_a_queued_span_is_one_small_object_for_the_garbage_collector() -> None:
    """What the processor is for: spans waiting for their batch add next to nothing to what the collector
    tracks (the SDK's processor queues each span's twenty or so objects)."""
    import gc

    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from kserve_otel.otlp_export import EncodingBatchSpanProcessor

    def tracked_per_span(processor_type) -> float:
        exporter = FastOTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")  # never reached: no export runs
        processor = processor_type(exporter, max_queue_size=5_000, max_export_batch_size=5_000,
                                   schedule_delay_millis=600_000)
        tracer = _provider_with(processor).get_tracer("t")
        for _ in range(10):  # warm: the tracer's and the processor's own objects exist
            tracer.start_span("s", attributes={"model_name": "iris"}).end()
        gc.collect()
        before = len(gc.get_objects())
        for _ in range(2_000):
            tracer.start_span("s", attributes={"model_name": "iris"}).end()
        gc.collect()
        grown = (len(gc.get_objects()) - before) / 2_000
        processor._batch_processor._queue.clear()
        processor.shutdown()
        return grown

    ours, sdk = tracked_per_span(EncodingBatchSpanProcessor), tracked_per_span(BatchSpanProcessor)
    assert ours <= 1.05 and sdk >= 5, (ours, sdk)


def test_a_span_that_cannot_be_encoded_is_dropped_alone_and_counted(caplog, monkeypatch) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from kserve_otel import telemetry
    from kserve_otel.otlp_export import EncodingBatchSpanProcessor

    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")  # the exporter's own metrics
    reader = InMemoryMetricReader()
    meters = MeterProvider(metric_readers=[reader])
    with OTLPReceiver() as receiver:
        processor = EncodingBatchSpanProcessor(FastOTLPSpanExporter(endpoint=f"{receiver.endpoint}/v1/traces",
                                                                    meter_provider=meters))
        telemetry._count_processed_spans(processor, meters)
        provider = _provider_with(processor)
        with caplog.at_level(logging.ERROR):
            processor.on_end(ReadableSpan("broken", SpanContext(2**128, 1, False, TraceFlags(TraceFlags.SAMPLED)),
                                          resource=Resource({}), start_time=1, end_time=2))
        with provider.get_tracer("t").start_as_current_span("fine"):
            pass
        provider.shutdown()
        assert [span.name for span in receiver.spans()] == ["fine"]
    assert "broken" in caplog.text
    counted = {(metric.name, point.attributes.get("error.type")): point.value
               for resource in reader.get_metrics_data().resource_metrics for scope in resource.scope_metrics
               for metric in scope.metrics if metric.name.endswith((".span.processed", ".span.exported"))
               for point in metric.data.data_points}
    # as the SDK's exporter counts a batch it cannot encode (a 129-bit trace id: OverflowError in C, ValueError
    # in Python); nothing says the queue was full
    failed = {error: value for (name, error), value in counted.items() if name == "otel.sdk.exporter.span.exported"}
    assert failed in ({None: 1, "OverflowError": 1}, {None: 1, "ValueError": 1}), counted
    assert ("otel.sdk.processor.span.processed", "queue_full") not in counted, counted


def test_a_traced_server_queues_encoded_spans(monkeypatch) -> None:
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from kserve_otel import telemetry
    from kserve_otel.otlp_export import EncodingBatchSpanProcessor

    assert telemetry._batching(telemetry._span_exporter("otlp")) is EncodingBatchSpanProcessor
    assert telemetry._batching(InMemorySpanExporter()) is BatchSpanProcessor


@pytest.mark.parametrize("arguments, environment, expected", [
    ({}, {}, (2048, 8192)),  # kserve-otel's defaults: a quarter of the SDK's exports (see otlp_export)
    ({}, {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "100", "OTEL_BSP_MAX_QUEUE_SIZE": "300"}, (100, 300)),
    ({}, {"OTEL_BSP_MAX_QUEUE_SIZE": "1000"}, (1000, 1000)),  # a batch never larger than the queue
    ({}, {"OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "64"}, (64, 8192)),
    ({"max_export_batch_size": 10, "max_queue_size": 20}, {"OTEL_BSP_MAX_QUEUE_SIZE": "1000"}, (10, 20)),
])
def test_the_encoding_processor_batches_as_asked_else_by_its_defaults(arguments, environment, expected,
                                                                        monkeypatch) -> None:
    """Arguments first, then OTEL_BSP_MAX_EXPORT_BATCH_SIZE / OTEL_BSP_MAX_QUEUE_SIZE, then kserve-otel's own
    defaults: what the SDK's batch processor then holds."""
    from kserve_otel.otlp_export import EncodingBatchSpanProcessor

    for name in ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "OTEL_BSP_MAX_QUEUE_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    processor = EncodingBatchSpanProcessor(FastOTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces"),
                                           **arguments)
    try:
        batching = processor._batch_processor
        assert (batching._max_export_batch_size, batching._max_queue_size) == expected
    finally:
        processor.shutdown()
