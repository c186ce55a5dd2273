"""The SDK's OTLP/HTTP span exporter with the fast encoder (:class:`FastOTLPSpanExporter`), and the SDK's batch
processor queuing spans already encoded for it (:class:`EncodingBatchSpanProcessor`).

Why: the SDK exporter's ``export()`` spends most of its CPU time in ``encode_spans(spans)`` (protobuf message
objects, about 17 µs a span), in the ``BatchSpanProcessor``'s thread but under the GIL the server's event loop
needs. This subclass is the SDK's ``OTLPSpanExporter`` in every respect (configuration and environment
variables, HTTP client with its retries, compression and timeouts, ``shutdown``, the self-observability metrics
of ``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``, the ``max_request_size`` check) except that the request body
comes from :func:`kserve_otel.export.otlp_encoding.encode_spans`: the same bytes, at a fraction of the cost.

``export()`` is the SDK's own (1.45), step for step, with the encoder swapped. It needs four of the SDK
exporter's private attributes, read in one place (:func:`_sdk_parts`), and checked when an exporter is made:
if a future SDK renames them, construction fails with a message saying so instead of an export failing later.
``tests/test_otlp_encoding.py`` also checks that the SDK's ``export()`` still uses exactly these.

Why the processor: a queued ``ReadableSpan`` is some twenty objects that the garbage collector tracks, and
they wait up to the schedule delay for their batch: long enough to be promoted to the oldest generation,
whose growth then triggers full collections of the whole server's heap. On a KServe server tracing every
request that was about seven full collections in ten seconds, 85 ms each on average, against four without
tracing, and the cause of its 90 ms p99. The processor encodes each span when it ends and queues one
:class:`~kserve_otel.export.otlp_encoding.EncodedSpan`; the span itself is freed at once. Everything else is
the SDK's ``BatchSpanProcessor``: the queue and its limit (spans dropped when it is full are counted as ever),
the schedule, batch size (larger by default: :data:`DEFAULT_MAX_EXPORT_BATCH_SIZE`), ``force_flush``,
``shutdown`` and its self-observability metrics. Where the tracer's only processor is this one, it also ends
the step and request spans of kserve_otel.spans.span_factory itself (:attr:`EncodingBatchSpanProcessor.end_span`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from functools import partial
from time import time_ns
from typing import Any, NamedTuple

from opentelemetry.exporter.otlp.proto.http import trace_exporter as _sdk_trace_exporter
from opentelemetry.exporter.otlp.proto.http._common import RequestPayloadTooLargeError, _is_request_too_large
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.environment_variables import OTEL_BSP_MAX_EXPORT_BATCH_SIZE, OTEL_BSP_MAX_QUEUE_SIZE
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE
from opentelemetry.trace import SpanContext

from .export.otlp_encoding import EncodedSpan, c_end_span, encode_batch, encode_span, encode_spans
from .spans.span_factory import TemplateSpan

__all__ = ["EncodingBatchSpanProcessor", "FastOTLPSpanExporter"]

_new_tuple = tuple.__new__

# The SDK exporter's logger: the same messages reach the same handlers as with the SDK's exporter.
_logger = logging.getLogger(_sdk_trace_exporter.__name__)

#: The private attributes of the SDK's ``OTLPSpanExporter`` that ``export()`` uses.
SDK_ATTRIBUTES = ("_shutdown", "_metrics", "_max_request_size", "_client")


class _SDKParts(NamedTuple):
    shutdown: bool
    metrics: Any  # .export_operation(n) -> context manager yielding a result with .error and .error_attrs
    max_request_size: int
    client: Any  # .export(bytes) -> result with .success, .status_code, .error


def _sdk_parts(exporter: OTLPSpanExporter) -> _SDKParts:
    """The one place that reads the SDK exporter's private attributes."""
    try:
        return _SDKParts(exporter._shutdown, exporter._metrics, exporter._max_request_size, exporter._client)
    except AttributeError as error:
        raise TypeError(
            f"FastOTLPSpanExporter needs the SDK OTLPSpanExporter's private attributes {SDK_ATTRIBUTES}, which "
            f"this opentelemetry-exporter-otlp-proto-http no longer has ({error}); use the SDK's OTLPSpanExporter"
        ) from error


class FastOTLPSpanExporter(OTLPSpanExporter):
    """``OTLPSpanExporter`` (OTLP/HTTP protobuf) whose request bodies come from the fast encoder; same arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _sdk_parts(self)  # fail now, not at the first export, if the SDK's internals moved

    def export(self, spans: Sequence[ReadableSpan] | Sequence[EncodedSpan]) -> SpanExportResult:
        """Export SDK spans, or spans already encoded (a batch of :class:`EncodingBatchSpanProcessor`)."""
        parts = _sdk_parts(self)
        if parts.shutdown:
            _logger.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE

        with parts.metrics.export_operation(len(spans)) as result:
            try:
                serialized_data = (encode_batch(spans) if spans and isinstance(spans[0], EncodedSpan)
                                   else encode_spans(spans))
            except Exception as error:  # noqa: BLE001 - as the SDK: a batch that cannot be encoded fails, quietly
                _logger.error("Failed to encode span batch: %s", error)
                result.error = error
                return SpanExportResult.FAILURE

            if _is_request_too_large(serialized_data, parts.max_request_size):
                _logger.warning(
                    "Dropping span batch: serialized size %d bytes exceeds max_request_size %d bytes.",
                    len(serialized_data), parts.max_request_size,
                )
                result.error = RequestPayloadTooLargeError(
                    f"Serialized span request size {len(serialized_data)} bytes exceeds max_request_size "
                    f"{parts.max_request_size} bytes."
                )
                return SpanExportResult.FAILURE

            export_result = parts.client.export(serialized_data)
            if not export_result.success:
                result.error = export_result.error
                result.error_attrs = (
                    {HTTP_RESPONSE_STATUS_CODE: export_result.status_code}
                    if export_result.status_code is not None
                    else None
                )
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


#: The batch and queue sizes of :class:`EncodingBatchSpanProcessor` where neither an argument nor
#: ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` / ``OTEL_BSP_MAX_QUEUE_SIZE`` says otherwise (the SDK's: 512 and 2048).
#: Why larger: an OTLP/HTTP export costs about a millisecond of CPU whatever its size (the SDK's HTTP client),
#: in the export thread but under the GIL; on a KServe server tracing every request (about 4,000 spans a
#: second here) 512-span batches took 2.3-2.6 % of a core in that thread and 2,048-span ones 0.7-0.8 %, and
#: the server served 1,052-1,081 requests a second against 1,005-1,026 (wrk, concurrency 8, runs taken in
#: turn). A batch of 2,048 spans of kserve-otel is about 250 kB, well inside what collectors accept.
DEFAULT_MAX_EXPORT_BATCH_SIZE = 2048
DEFAULT_MAX_QUEUE_SIZE = 4 * DEFAULT_MAX_EXPORT_BATCH_SIZE


def _sdk_default_queue_size() -> int | None:
    """The queue size the SDK reads from ``OTEL_BSP_MAX_QUEUE_SIZE`` (``None`` if this SDK cannot say)."""
    default = getattr(BatchSpanProcessor, "_default_max_queue_size", None)
    try:
        return int(default()) if callable(default) else None
    except (TypeError, ValueError):
        return None


class EncodingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's ``BatchSpanProcessor`` (same arguments) for a :class:`FastOTLPSpanExporter`: each sampled span
    is encoded when it ends and queued as one small :class:`~kserve_otel.export.otlp_encoding.EncodedSpan`.
    Batches of :data:`DEFAULT_MAX_EXPORT_BATCH_SIZE` spans and a queue of :data:`DEFAULT_MAX_QUEUE_SIZE` unless
    the arguments or ``OTEL_BSP_MAX_EXPORT_BATCH_SIZE`` / ``OTEL_BSP_MAX_QUEUE_SIZE`` say otherwise."""

    #: ``on_end`` encodes the span there and then and keeps nothing of it: a tracer whose only processor this is
    #: may pass it the ended span itself in place of a ``ReadableSpan`` copy, or have it end the span
    #: (:attr:`end_span`; see kserve_otel.spans.span_factory).
    encodes_at_end = True

    def __init__(self, span_exporter: FastOTLPSpanExporter, max_queue_size: int | None = None,
                 schedule_delay_millis: float | None = None, max_export_batch_size: int | None = None,
                 export_timeout_millis: float | None = None, **kwargs: Any) -> None:
        if not isinstance(span_exporter, FastOTLPSpanExporter):
            raise TypeError(f"EncodingBatchSpanProcessor exports with a FastOTLPSpanExporter, not {span_exporter!r}")
        if max_queue_size is None and OTEL_BSP_MAX_QUEUE_SIZE not in os.environ:
            max_queue_size = DEFAULT_MAX_QUEUE_SIZE
        if max_export_batch_size is None and OTEL_BSP_MAX_EXPORT_BATCH_SIZE not in os.environ:
            queue = max_queue_size if max_queue_size is not None else _sdk_default_queue_size()
            max_export_batch_size = min(DEFAULT_MAX_EXPORT_BATCH_SIZE, queue) if queue else None
        super().__init__(span_exporter, max_queue_size, schedule_delay_millis, max_export_batch_size,
                         export_timeout_millis, **kwargs)
        #: ``end_span(span, end_time) -> bool``: end a sampled span of the SDK's layout that no other processor
        #: sees (the tracer's only processor is this one), as ``Span.end(end_time)`` would, then encode and queue
        #: it as :meth:`on_end` does; false when it had ended already (nothing done, the caller warns).
        #: :func:`py_end_span`, in C where the extension is built: every step span's end.
        self.end_span: Callable[[Any, int | None], bool] = partial(
            c_end_span or py_end_span, EncodedSpan, self._batch_processor.emit, self._encoding_failed)

    def on_end(self, span: ReadableSpan) -> None:
        # Step and request spans: their fields, past three property calls (a class test, not isinstance: the
        # SDK's span classes are ABCs, whose isinstance is two calls more).
        if type(span).__base__ is TemplateSpan:
            context, resource, scope = span._context, span._resource, span._instrumentation_scope
        else:
            context, resource, scope = span.context, span.resource, span.instrumentation_scope
        # A SpanContext is a tuple (trace_id, span_id, is_remote, trace_flags, ...): flags without two calls.
        if not (context[3] & 1 if type(context) is SpanContext else context and context.trace_flags.sampled):
            return
        try:
            # tuple.__new__: the NamedTuple's own __new__ is a Python function, called for every span
            item = _new_tuple(EncodedSpan, (resource, scope or None, encode_span(span)))
        except Exception as error:  # noqa: BLE001 - a span that cannot be encoded is dropped, never raised
            self._encoding_failed(span, error)
            return
        self._batch_processor.emit(item)

    def _encoding_failed(self, span: ReadableSpan, error: Exception) -> None:
        # The SDK's exporter would fail its whole batch; this loses the one span, and counts it as the SDK
        # counts a batch it cannot encode: an export of it that failed with this error.
        _logger.error("Failed to encode span %r, dropping it: %s", span.name, error)
        with _sdk_parts(self.span_exporter).metrics.export_operation(1) as result:
            result.error = error


def py_end_span(encoded: type[EncodedSpan], emit: Callable[[EncodedSpan], None],
                failed: Callable[[Any, Exception], None], span: Any, end_time: int | None) -> bool:
    """End ``span`` (a sampled span of the SDK's own layout: a template span of kserve_otel.spans.span_factory)
    whose tracer's only processor is an :class:`EncodingBatchSpanProcessor`, then queue it encoded.

    The SDK's ``Span.end`` for such a span is: under its lock, set the end time and make the attributes
    immutable (or warn that it had ended: here ``False`` is returned, for the caller to warn), call its end
    metrics, hand it to the processors (``on_ending``, a no-op, and ``on_end``). These are the same steps with
    ``on_end``'s own inlined (the span is sampled by construction): ``encode`` and ``emit`` it, and a span that
    cannot be encoded goes to ``failed(span, error)`` (logged and counted), never raised. The C extension's
    ``end_span`` does the same; this is its pure-Python twin."""
    with span._lock:
        if span._end_time is not None:
            return False
        span._end_time = end_time if end_time is not None else time_ns()
        span._attributes._immutable = True
    if span._record_end_metrics:
        span._record_end_metrics()
    try:
        item = _new_tuple(encoded, (span._resource, span._instrumentation_scope or None, encode_span(span)))
    except Exception as error:  # noqa: BLE001 - a span that cannot be encoded is dropped, never raised
        failed(span, error)
        return True
    emit(item)
    return True
