"""A request span and HTTP server metrics for every HTTP request of an ASGI app, at a negligible cost.

contrib's ``OpenTelemetryMiddleware`` costs 340-440 µs a request on this project's machine, a third of a whole
KServe request, most of it spent on ``receive``/``send`` child spans and metric attribute handling. This
middleware does only what step spans need: continue the incoming trace (``traceparent``, or B3 from Istio),
open one SERVER span following OpenTelemetry's HTTP semantic conventions, and make it current so every step
span of the request becomes its child. When the span would not be sampled (or no tracer provider is
installed) it starts no span at all, but still makes the incoming context current so the trace id reaches
steps, outgoing calls and log lines.

The span is named ``"<METHOD> <route template>"`` (``POST /v1/models/{model_name}:predict``), never the raw
path, and the duration histogram is labelled by that template: span names and series stay few. Requests in
flight and durations go to the step series' registry (one increment each), not the SDK's instruments.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import Any

from opentelemetry.trace import Span, Status, StatusCode

from . import exemplars, propagation, tracing
from .exposition import ASGIApp, Message, Receive, Scope, Send
from .names import ACTIVE_REQUESTS_INSTRUMENT, KSERVE_BUCKETS, REQUEST_DURATION_INSTRUMENT, UNIT_SECONDS
from .series import REGISTRY as SERIES
from .series import UpDownCounterSeries

#: OpenTelemetry's HTTP server metrics (Prometheus: ``http_server_active_requests``,
#: ``http_server_request_duration_seconds``) and their attributes (labels ``http_request_method``...).
ACTIVE_REQUESTS = ACTIVE_REQUESTS_INSTRUMENT
REQUEST_DURATION = REQUEST_DURATION_INSTRUMENT
ATTR_HTTP_METHOD = "http.request.method"
ATTR_HTTP_ROUTE = "http.route"
ATTR_HTTP_STATUS = "http.response.status_code"
#: The semantic conventions' advised boundaries, which are KServe's step buckets too.
HTTP_DURATION_BUCKETS = KSERVE_BUCKETS
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})

#: Called with the recording span and the finished request's scope, to add attributes of a framework's own.
ScopeAttributes = Callable[[Span, Scope], None]


class HTTPServerMetrics:
    """Requests in flight and request durations, by method (and route template and status for durations).

    The interface :class:`kserve_otel.speedups.HTTPRecorder` (C and Python alike) records through, and so what any
    object handed to it as ``metrics`` must offer: the dicts ``active_series`` (method -> a series with
    ``increment()`` and ``decrement()``) and ``duration_series`` (``(method, route template, status)`` -> a
    series with ``observe(seconds)``), read without a lock on every request, and on a miss the methods
    ``active(method)`` and ``duration(method, route, status)``, which return the series and may fill the dicts.
    ``tests/test_speedups.py`` runs both recorders against this class."""

    def __init__(self) -> None:
        self._active = SERIES.up_down_counter(
            ACTIVE_REQUESTS, "Number of HTTP server requests in flight", "{request}", (ATTR_HTTP_METHOD,)
        )
        self._duration = SERIES.histogram(
            REQUEST_DURATION, "Duration of HTTP server requests", UNIT_SECONDS,
            (ATTR_HTTP_METHOD, ATTR_HTTP_ROUTE, ATTR_HTTP_STATUS), bounds=HTTP_DURATION_BUCKETS, exemplars=True,
            native=True,
        )

        #: The series of each label set, kept at hand (two family lookups a request are measurable here); a
        #: middleware may read these first and call :meth:`active` / :meth:`duration` on a miss.
        self.active_series: dict[str, UpDownCounterSeries] = {}
        self.duration_series: dict[tuple[str, str, int], Any] = {}

    def active(self, method: str) -> UpDownCounterSeries:
        """The in-flight series of ``method`` (see :func:`method_of`): ``increment()`` when a request
        starts, ``decrement()`` when it ends."""
        active = self.active_series.get(method)
        if active is None:
            active = self.active_series[method] = self._active.series(method)
        return active

    def duration(self, method: str, route: str, status: int) -> Any:
        """The duration series of requests of ``method`` to ``route`` answered with ``status``."""
        key = (method, route, status)
        duration = self.duration_series.get(key)
        if duration is None:
            duration = self.duration_series[key] = self._duration.series(method, route, str(status))
        return duration


def method_of(scope: Scope) -> str:
    """The request's method, or ``_OTHER`` for a method HTTP does not define (bounded label values)."""
    method = scope.get("method", "GET")
    return method if method in KNOWN_METHODS else "_OTHER"


def route_of(scope: Scope) -> str:
    """The route template the framework matched (Starlette and FastAPI set ``scope["route"]``), else ``""``."""
    return getattr(scope.get("route"), "path", None) or ""


class RequestSpanMiddleware:
    """ASGI middleware opening a SERVER span per HTTP request, and counting requests in flight and their
    durations (``http.server.active_requests``, ``http.server.request.duration`` in seconds, as OpenTelemetry's
    HTTP semantic conventions name them). Other scope types pass through untouched."""

    def __init__(self, app: ASGIApp, on_end: ScopeAttributes | None = None, excluded_paths: frozenset[str] = frozenset()) -> None:
        self.app = app
        self.on_end = on_end
        self.excluded_paths = excluded_paths
        self.metrics = HTTPServerMetrics()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.excluded_paths:
            await self.app(scope, receive, send)
            return
        method = method_of(scope)
        active = self.metrics.active(method)
        active.increment()
        started = perf_counter()
        parent = propagation.extract_asgi(scope.get("headers", ()))
        span, token = tracing.start_server_span(method, lambda: _request_attributes(scope, method), parent)
        status = 500  # what the client gets if the app fails before answering
        recorded = False

        def record() -> None:
            nonlocal recorded
            recorded = True
            active.decrement()
            series = self.metrics.duration(method, route_of(scope), status)
            if span is not None:  # the request's span: its bucket's exemplar, when sampled
                exemplars.observe_in_span(series, perf_counter() - started, span)
            else:
                series.observe(perf_counter() - started)

        async def send_recording_status(message: Message) -> None:  # a closure: cheaper than an object here
            nonlocal status
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
            elif kind == "http.response.body" and not recorded and not message.get("more_body", False):
                record()  # counted before the client can see it answered: a kill right after loses nothing
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_recording_status)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if not recorded:
                record()
            route = route_of(scope)
            if span is not None:
                self._finish(span, scope, method, route, status, error)
            tracing.end_server_span(span, token, error)

    def _finish(self, span: Span, scope: Scope, method: str, route: str, status: int, error: BaseException | None) -> None:
        if route:
            span.update_name(f"{method} {route}")
            span.set_attribute(ATTR_HTTP_ROUTE, route)
        span.set_attribute(ATTR_HTTP_STATUS, status)
        if status >= 500 and error is None:
            span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("error.type", str(status))
        if self.on_end is not None:
            try:
                self.on_end(span, scope)
            except Exception as exc:  # noqa: BLE001 - telemetry must never break a request
                span.record_exception(exc)


def _request_attributes(scope: Scope, method: str) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": scope.get("path", ""),
        "url.scheme": scope.get("scheme", "http"),
    }
    server = scope.get("server")
    if server and server[1] is not None:
        attributes["server.port"] = server[1]
    return attributes
