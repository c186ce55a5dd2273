"""FastAPI's own OpenTelemetry telemetry, switched off on the apps kserve-otel instruments.

Why it exists: FastAPI 0.16x turns its own request spans and HTTP metrics on when a global provider exists;
on an app kserve-otel instruments they would duplicate the request span and cost the KServe iris server 9-12 %
of its throughput (measured). Both the KServe and the ASGI instrumentation switch them off, and this module
needs nothing beyond the standard library, so the ``kserve`` extra alone does not pull in what the ``asgi``
extra installs (``opentelemetry-instrumentation-asgi``, ``opentelemetry-util-http``).
"""

from __future__ import annotations

from typing import Any

__all__ = ["FASTAPI_TELEMETRY_OFF", "quiet_fastapi_telemetry"]

#: FastAPI's own OpenTelemetry switches that kserve-otel turns off on the apps it instruments.
FASTAPI_TELEMETRY_OFF = {"tracing": False, "metrics": False, "operation_spans": False}


def quiet_fastapi_telemetry(app: Any) -> None:
    """Switch off FastAPI's own request spans and HTTP metrics on ``app`` (FastAPI 0.16x reads the dict that
    ``FastAPI(telemetry=...)`` fills on every request); nothing happens for other apps."""
    config = getattr(app, "_telemetry", None)
    if isinstance(config, dict):
        config.update(FASTAPI_TELEMETRY_OFF)
