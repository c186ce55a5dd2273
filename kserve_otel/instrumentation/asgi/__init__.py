"""OpenTelemetry for any ASGI app (FastAPI, Starlette, a bare ASGI callable): request spans, HTTP server
metrics in seconds and the Prometheus endpoint.

Usage
-----

.. code-block:: python

    from kserve_otel.instrumentation.asgi import instrument_app

    app = instrument_app(FastAPI())     # then serve it as usual: uvicorn, kserve-otel-run ...

What every HTTP request then gets:

* a SERVER span, continuing an incoming ``traceparent``, named and labelled by its route template
  (``GET /items/{item_id}``); ``@instrument_step`` functions called by the handler are its children;
* ``http_server_request_duration_seconds{http_request_method, http_route, http_response_status_code}`` and
  ``http_server_active_requests{http_request_method}``; ``http_route`` is the template, never the raw path,
  so ``/items/{item_id}`` is one series however many items there are (``""`` for apps without a router);
* the Prometheus endpoint: answered by the app itself on its own port when the annotated port is the app's
  (or none is set), with the exact path and no redirect; on a port of its own otherwise.

How it is built, and why
------------------------

Every request takes the package's one request path,
:func:`kserve_otel.request_path.request_spans.request_path` (KServe's REST app takes it too): the per-request
bookkeeping (requests in flight, the clock, the scan for trace headers, the status seen by ``send``, the
duration's series) is :class:`kserve_otel.recording.speedups.HTTPRecorder`, in C when the optional extension
is built, and a request whose span may be recorded gets the package's SERVER span, with OpenTelemetry's stable
HTTP semantic conventions, the exact sampler decision and the duration's exemplar. Requests whose span would
not be recorded (no tracer provider, ``always_off``, or a parent-based sampler with an unsampled parent) only
make the incoming context current. HTTP metrics are this package's own for every request (one series increment
each, instead of the SDK's record path, which costs 9-15 µs).

opentelemetry-instrumentation-asgi's ``OpenTelemetryMiddleware`` makes the recorded spans instead when its
features are asked for: its hooks (``server_request_hook``, ``client_request_hook``, ``client_response_hook``)
or header capture (``http_capture_headers_server_request`` ..., or its ``OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_*``
variables), passed through as given, without its per-``receive``/``send`` child spans, with a no-op meter
provider. Used on every request that middleware costs 340-440 µs here, and on recorded requests it is measured
slower than the package's span (``benchmarks/``: starlette-traced against starlette-contrib), so it is not the
default. FastAPI's own telemetry (FastAPI 0.16x turns it on as soon as a global provider exists) is switched
off on the wrapped app, since it would duplicate both the span and ``http_server_request_duration_seconds``.
The endpoint, when it is on the app's port, is answered by the same path (one ASGI layer, not two).
``benchmarks/`` measures the result against the bare app.

Configuration
-------------

``instrument_app(app, http_port=None, settings=None, **hooks_and_capture)``: settings as everywhere
(``KSERVE_OTEL_*``/``OTEL_*`` variables, pod annotations); ``OTEL_PYTHON_ASGI_EXCLUDED_URLS`` (or
``excluded_urls=``) excludes URLs from spans and metrics alike.
"""

from __future__ import annotations

import os
from typing import Any

from opentelemetry import trace
from opentelemetry.metrics import NoOpMeterProvider
from opentelemetry.util.http import ExcludeList, get_excluded_urls, parse_excluded_urls

from ...spans import tracing
from ...export.exposition import ASGIApp, Message, MetricsMiddleware, Receive, Scope, Send
from ...request_path.request_spans import (
    ATTR_HTTP_ROUTE, HTTPServerMetrics, method_of, request_path, route_of,
)
from ...config.settings import Settings
from ...telemetry import configure, get_telemetry, served_collector
from ..fastapi_telemetry import quiet_fastapi_telemetry

__all__ = ["TelemetryMiddleware", "instrument_app", "quiet_fastapi_telemetry"]

#: contrib's header-capture variables: set, they make recorded requests go through contrib's middleware.
CONTRIB_HEADER_CAPTURE = (
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_REQUEST",
    "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_SERVER_RESPONSE",
)

class _NameByRoute:
    """Inside contrib's span: when the response starts (the app has routed the request by then; contrib ends
    the span with the last body message), name the span by the route template."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        span = trace.get_current_span()

        async def send_naming_span(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = route_of(scope)
                if route and span.is_recording():
                    span.update_name(f"{method_of(scope)} {route}")
                    span.set_attribute(ATTR_HTTP_ROUTE, route)
            await send(message)

        await self.app(scope, receive, send_naming_span)


class TelemetryMiddleware:
    """ASGI middleware: a span per HTTP request (contrib's, when it will be recorded) and HTTP server metrics;
    with ``metrics_registry``, also the Prometheus endpoint at ``metrics_path`` (scrapes are not counted).

    Keyword arguments other than these and ``excluded_urls`` go to contrib's ``OpenTelemetryMiddleware`` as
    they are.
    """

    def __init__(
        self, app: ASGIApp, *, excluded_urls: ExcludeList | str | None = None,
        metrics_registry: Any = None, metrics_path: str = "/metrics", **contrib_options: Any,
    ) -> None:
        quiet_fastapi_telemetry(app)
        self.app = app
        if isinstance(excluded_urls, str):
            excluded_urls = parse_excluded_urls(excluded_urls)
        self.excluded_urls = excluded_urls if excluded_urls is not None else get_excluded_urls("ASGI")
        self._exclusions = bool(getattr(self.excluded_urls, "_excluded_urls", None))
        self.contrib_options = contrib_options
        self.metrics = HTTPServerMetrics()
        #: Whether recorded requests get contrib's span (with its hooks and header capture) rather than this
        #: package's: only when they are asked for, by an option or contrib's header-capture variables. Measured
        #: on the trivial Starlette app with every request traced: the package's span path is cheaper (see
        #: benchmarks/results.md, starlette-traced against starlette-contrib).
        self.uses_contrib = bool(contrib_options) or any(os.environ.get(name) for name in CONTRIB_HEADER_CAPTURE)
        self._contrib: tuple[Any, Any] = (None, None)  # (tracer provider, middleware built for it)
        # The endpoint is checked here rather than by a MetricsMiddleware around this one: one ASGI layer
        # less on every request (measured: about 3 % of a trivial app's throughput).
        self._endpoint = MetricsMiddleware(app, metrics_registry, metrics_path) if metrics_registry is not None else None
        self._metrics_path = metrics_path if metrics_registry is not None else None
        #: The middleware as a plain ASGI function (what :func:`instrument_app` returns): the same behaviour
        #: as calling this object, without the cost of calling an instance on every request.
        self.asgi: ASGIApp = self._build_asgi()

    def _contrib_middleware(self) -> Any:
        provider = tracing.current_provider()
        built_for, middleware = self._contrib
        if built_for is not provider:
            from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

            middleware = OpenTelemetryMiddleware(
                _NameByRoute(self.app), excluded_urls=self.excluded_urls, tracer_provider=provider,
                meter_provider=NoOpMeterProvider(), exclude_spans=["receive", "send"], **self.contrib_options,
            )
            self._contrib = (provider, middleware)
        return middleware

    def _excluded(self, scope: Scope) -> bool:
        from opentelemetry.instrumentation.asgi import get_host_port_url_tuple

        return self.excluded_urls.url_disabled(get_host_port_url_tuple(scope)[2])

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.asgi(scope, receive, send)

    def _build_asgi(self) -> ASGIApp:
        # The one request path (kserve_otel.request_path.request_spans.request_path), KServe's REST app's too;
        # contrib's middleware makes the recorded spans only for users of its hooks or header capture.
        asgi = request_path(
            self.app, self.metrics, skip=self._excluded if self._exclusions else None, endpoint=self._endpoint,
            endpoint_path=self._metrics_path, recorded=self._contrib_middleware if self.uses_contrib else None)
        asgi.middleware = self  # type: ignore[attr-defined]
        return asgi


def instrument_app(
    app: ASGIApp, *, http_port: int | None = None, settings: Settings | None = None, **options: Any
) -> ASGIApp:
    """``app`` with request spans, HTTP server metrics and (on its own port) the Prometheus endpoint: an ASGI
    function whose ``middleware`` attribute is the :class:`TelemetryMiddleware` behind it.

    Args:
        app: any ASGI application.
        http_port: the port ``app`` is served on, if known: the endpoint is mounted in the app when the
            configured ``metrics_port`` is this port, or when no metrics port is configured at all.
        settings: resolved settings; by default configured from the environment and pod annotations (or
            the application's earlier ``kserve_otel.configure()``).
        **options: ``excluded_urls`` and contrib's hook and header-capture options (see the module doc).
    """
    telemetry = get_telemetry() or configure(settings, serve_endpoint=False)
    s = telemetry.settings
    if "prometheus" in s.metrics_exporters:
        if s.source_of("metrics_port") == "default" or s.metrics_port == http_port:
            return TelemetryMiddleware(app, metrics_registry=served_collector, metrics_path=s.metrics_path, **options).asgi
        telemetry.start_endpoint(include_global_registry=True)
    return TelemetryMiddleware(app, **options).asgi
