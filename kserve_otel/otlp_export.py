"""The SDK's OTLP/HTTP span exporter with the fast encoder: :class:`FastOTLPSpanExporter`.

Why: the SDK exporter's ``export()`` spends most of its CPU time in ``encode_spans(spans)`` (protobuf message
objects, about 17 µs a span), in the ``BatchSpanProcessor``'s thread but under the GIL the server's event loop
needs. This subclass is the SDK's ``OTLPSpanExporter`` in every respect (configuration and environment
variables, HTTP client with its retries, compression and timeouts, ``shutdown``, the self-observability metrics
of ``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``, the ``max_request_size`` check) except that the request body
comes from :func:`kserve_otel.otlp_encoding.encode_spans`: the same bytes, at a fraction of the cost.

``export()`` is the SDK's own (1.45), step for step, with the encoder swapped. It needs four of the SDK
exporter's private attributes, read in one place (:func:`_sdk_parts`), and checked when an exporter is made:
if a future SDK renames them, construction fails with a message saying so instead of an export failing later.
``tests/test_otlp_encoding.py`` also checks that the SDK's ``export()`` still uses exactly these.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

from opentelemetry.exporter.otlp.proto.http import trace_exporter as _sdk_trace_exporter
from opentelemetry.exporter.otlp.proto.http._common import RequestPayloadTooLargeError, _is_request_too_large
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExportResult
from opentelemetry.semconv.attributes.http_attributes import HTTP_RESPONSE_STATUS_CODE

from .otlp_encoding import encode_spans

__all__ = ["FastOTLPSpanExporter"]

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

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        parts = _sdk_parts(self)
        if parts.shutdown:
            _logger.warning("Exporter already shutdown, ignoring batch")
            return SpanExportResult.FAILURE

        with parts.metrics.export_operation(len(spans)) as result:
            try:
                serialized_data = encode_spans(spans)
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
