"""The one request path of every HTTP server this package instruments (KServe's REST app, any ASGI app):
a request span and HTTP server metrics for every request, at a negligible cost (:func:`request_path`).

contrib's ``OpenTelemetryMiddleware`` costs 340-440 µs a request on this project's machine, a third of a whole
KServe request, most of it spent on ``receive``/``send`` child spans and metric attribute handling. This path
does only what step spans need: continue the incoming trace (``traceparent``, or B3 from Istio), open one
SERVER span following OpenTelemetry's HTTP semantic conventions, and make it current so every step span of
the request becomes its child. When the span would not be sampled (or no tracer provider is installed) it
starts no span at all, but still makes the incoming context current so the trace id reaches steps, outgoing
calls and log lines. The bookkeeping of every request (in flight, clock, trace-header scan, status, duration)
is :class:`kserve_otel.recording.speedups.HTTPRecorder`, in C where the extension is built.

The span is named ``"<METHOD> <route template>"`` (``POST /v1/models/{model_name}:predict``), never the raw
path, and the duration histogram is labelled by that template: span names and series stay few. Requests in
flight and durations go to the step series' registry (one increment each), not the SDK's instruments; a
recorded request's duration keeps its span as the bucket's exemplar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import context as context_api
from opentelemetry.trace import Span, Status, StatusCode

from ..recording import exemplars
from ..spans import propagation, tracing
from ..export.exposition import ASGIApp, Receive, Scope, Send
from ..names import ACTIVE_REQUESTS_INSTRUMENT, KSERVE_BUCKETS, REQUEST_DURATION_INSTRUMENT, UNIT_SECONDS
from ..recording.series import REGISTRY as SERIES
from ..recording.series import UpDownCounterSeries
from ..recording.speedups import HTTPRecorder

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

    The interface :class:`kserve_otel.recording.speedups.HTTPRecorder` (C and Python alike) records through,
    and so what any object handed to it as ``metrics`` must offer: the dicts ``active_series`` (method -> a
    series with ``increment()`` and ``decrement()``) and ``duration_series`` (``(method, route template,
    status)`` -> a series with ``observe(seconds)``), read without a lock on every request, and on a miss the
    methods ``active(method)`` and ``duration(method, route, status)``, which return the series and may fill
    the dicts; and for a request given a recording span, ``observe_traced(series, seconds, span)``.
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

    @staticmethod
    def observe_traced(series: Any, seconds: float, span: Span) -> None:
        """Observe a recorded request's duration, with ``span`` as its bucket's exemplar when the filter lets it."""
        exemplars.observe_in_span(series, seconds, span)

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


def request_path(
    app: ASGIApp, metrics: HTTPServerMetrics | None = None, *, on_end: ScopeAttributes | None = None,
    skip: Callable[[Scope], bool] | None = None, endpoint: ASGIApp | None = None, endpoint_path: str | None = None,
    recorded: Callable[[], ASGIApp] | None = None,
) -> ASGIApp:
    """``app`` with every HTTP request recorded: the one request path of KServe's REST app and of any ASGI app.

    Per request: :class:`kserve_otel.recording.speedups.HTTPRecorder` (C when built) counts it in flight,
    starts its clock, scans its headers for trace fields and, as the app's ``send``, notes the status and
    observes the duration (by method, route template and status) when the last body message goes out. When a
    span may be recorded, a SERVER span continues the incoming trace
    (:func:`kserve_otel.spans.tracing.start_server_span`, which decides exactly as the configured sampler), is
    current while the app runs, and is the exemplar of its duration; ``on_end(span, scope)`` adds a
    framework's attributes. Otherwise the incoming context alone is made current, so the trace id still
    reaches steps, outgoing calls and logs.

    Args:
        app: the ASGI application.
        metrics: where the HTTP server series live (a new :class:`HTTPServerMetrics` by default).
        on_end: called with the recording span and the scope when the request is over.
        skip: requests for which it says true go straight to ``app``, unrecorded (probes, excluded URLs).
        endpoint, endpoint_path: the Prometheus endpoint, answered for that exact path (unrecorded).
        recorded: where requests whose span may be recorded go instead of this path's own span (the builder
            of contrib's ``OpenTelemetryMiddleware``, for users of its hooks and header capture).
    """
    start = HTTPRecorder(metrics or HTTPServerMetrics(), KNOWN_METHODS, propagation.header_names,
                         **propagation.header_names_watch()).start
    no_provider, extract = tracing.no_provider, propagation.extract_asgi

    # A plain function with what it needs in its closure: every request passes through it, and on a saturated
    # server each Python-level operation costs several times what a micro-benchmark shows (benchmarks/).
    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if endpoint_path is not None and scope.get("path") == endpoint_path:
            await endpoint(scope, receive, send)  # type: ignore[misc]
            return
        if skip is not None and skip(scope):
            await app(scope, receive, send)
            return
        request = start(scope, send)
        try:
            parent = extract(scope["headers"]) if request.traced else None
            if no_provider():  # nothing can be recorded: two reads, no provider lookup
                await _in_context(app, scope, receive, request, parent)
            elif recorded is not None:
                if tracing.tracer_if_recording(parent) is None:
                    await _in_context(app, scope, receive, request, parent)
                else:
                    await recorded()(scope, receive, request)
            else:
                await _with_server_span(app, scope, receive, request, parent, on_end)
        finally:
            request.finish(scope)

    return asgi


async def _in_context(app: ASGIApp, scope: Scope, receive: Receive, send: Any, parent: Any) -> None:
    if parent is None:
        await app(scope, receive, send)
        return
    token = context_api.attach(parent)
    send.last_send = tracing.sender_outside(token)
    try:
        await app(scope, receive, send)
    finally:
        context_api.detach(token)


async def _with_server_span(app: ASGIApp, scope: Scope, receive: Receive, request: Any, parent: Any,
                            on_end: ScopeAttributes | None) -> None:
    method = request.method
    span, token = tracing.start_server_span(method, lambda: request_attributes(scope, method), parent)
    request.span = span  # the duration's exemplar
    if token is not None:
        request.last_send = tracing.sender_outside(token)
    error: BaseException | None = None
    try:
        await app(scope, receive, request)
    except BaseException as exc:
        error = exc
        raise
    finally:
        if span is not None:
            _finish(span, scope, method, request.status, error, on_end)
        tracing.end_server_span(span, token, error)


def _finish(span: Span, scope: Scope, method: str, status: int, error: BaseException | None,
            on_end: ScopeAttributes | None) -> None:
    route = route_of(scope)
    if route:
        span.update_name(f"{method} {route}")
        span.set_attribute(ATTR_HTTP_ROUTE, route)
    span.set_attribute(ATTR_HTTP_STATUS, status)
    if status >= 500 and error is None:
        span.set_status(Status(StatusCode.ERROR))
        span.set_attribute("error.type", str(status))
    if on_end is not None:
        try:
            on_end(span, scope)
        except Exception as exc:  # noqa: BLE001 - telemetry must never break a request
            span.record_exception(exc)


def request_attributes(scope: Scope, method: str) -> dict[str, Any]:
    """A request span's attributes at its start, as OpenTelemetry's HTTP server semantic conventions (stable)
    name them; ``http.route``, ``http.response.status_code`` and ``error.type`` follow when it ends."""
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": scope.get("path", ""),
        "url.scheme": scope.get("scheme", "http"),
    }
    if method == "_OTHER":
        attributes["http.request.method_original"] = str(scope.get("method", ""))
    query = scope.get("query_string")
    if query:
        attributes["url.query"] = query.decode("latin-1") if isinstance(query, bytes) else str(query)
    server = scope.get("server")
    if server:
        if server[0]:
            attributes["server.address"] = server[0]
        if server[1] is not None:
            attributes["server.port"] = server[1]
    client = scope.get("client")
    if client:
        attributes["client.address"] = client[0]
        if client[1] is not None:
            attributes["client.port"] = client[1]
    version = scope.get("http_version")
    if version:
        attributes["network.protocol.version"] = version
    for key, value in scope.get("headers") or ():
        if key == b"user-agent":
            attributes["user_agent.original"] = value.decode("latin-1")
            break
    return attributes
