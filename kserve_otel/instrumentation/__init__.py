"""OpenTelemetry instrumentors for model-serving frameworks, one subpackage each, named as contrib names them.

Each is a ``BaseInstrumentor`` registered in the ``opentelemetry_instrumentor`` entry-point group, so
``opentelemetry-instrument`` and kserve-otel's own auto-instrumentation find them.
"""
