"""Span export for Ray Serve's own tracing: ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH`` names a function that
returns span processors, and this one sends Serve's spans (``proxy_http_request``, ``replica_handle_request``)
and the steps' spans, which are their children, to OTLP (``OTEL_EXPORTER_OTLP_ENDPOINT``)::

    RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=kserve_otel.instrumentation.ray_serve.tracing:otlp_span_processors
"""

from __future__ import annotations

from typing import Any


def otlp_span_processors() -> list[Any]:
    """A batch span processor exporting OTLP over HTTP (needs ``kserve-otel[otlp]``)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(OTLPSpanExporter())]
