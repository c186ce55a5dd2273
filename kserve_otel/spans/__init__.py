"""Spans, the second stage: step and request spans as cheap as the OpenTelemetry API allows, sampled exactly
as the SDK samples.

``tracing`` decides, per step or request, whether a span is made and makes it; ``span_factory`` builds the
SDK's own span objects from a template; ``propagation`` reads and writes trace context in request headers.
"""
