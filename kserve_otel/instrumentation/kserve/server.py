"""The KServe model server's side: set-up at start, request spans, the metrics endpoint, worker processes.

* ``ModelServer.start``: configures telemetry (unless the application did) and decides where the Prometheus
  endpoint goes. When the annotated port is the model server's own HTTP port (KServe's default, 8080), the
  REST app answers the metrics path itself; otherwise the endpoint runs on the annotated port, served by the
  parent process. If that port cannot be used (busy, or an invalid host), the REST app answers the metrics
  path instead, as KServe itself would, and the one error line says so: the step metrics, which replaced
  KServe's own, are never served nowhere.
* ``RESTServer.create_application``: adds a request span per REST request (v1, v2 and the rest) and, on the
  model server's port, the metrics path. That path serves this package's registry plus prometheus_client's
  global one (process metrics, a model's own metrics) without KServe's step histograms, which
  :mod:`.models` replaced: every series exactly once.
* ``InferenceServicer.ModelInfer``: a request span per gRPC inference.
* ``uninstrument()`` in a running server: Starlette builds an app's middleware once, and grpc binds its
  handlers at start, so what was added stays in place but asks :data:`SWITCH` on every request and, switched
  off, passes the request on untouched. The metrics path then reaches KServe's own handler, which serves
  KServe's restored histograms; ``instrument()`` switches everything on again.
* ``workers > 1``: KServe spawns worker processes that unpickle the data plane. A small object pickled with it
  instruments each worker as it arrives there, with the parent's settings, and every process (the parent
  serves gRPC) keeps its series in a shared file (:class:`~kserve_otel.export.series_files.SharedSeries`):
  whichever process a scrape reaches answers with the sum over all of them, dead or alive, so the scraped
  counts equal the requests served and never go back when a worker dies or stalls (kserve#2979).
"""

from __future__ import annotations

import atexit
import functools
import logging
import shutil
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry.instrumentation.utils import unwrap
from opentelemetry.trace import Span
from wrapt import wrap_function_wrapper

from ...spans import propagation, tracing
from ...export.exposition import ASGIApp, MetricsMiddleware, Receive, Scope, Send
from ...names import ATTR_MODEL_NAME
from ...request_path.request_spans import request_path
from ...config.settings import Settings, SettingsError
from ...telemetry import Telemetry, configure, get_telemetry, served_collector
from ..fastapi_telemetry import quiet_fastapi_telemetry

_logger = logging.getLogger(__name__)

#: Span attribute naming the inference protocol of a request: ``v1``, ``v2``, ``grpc-v2``, ``openai``.
ATTR_PROTOCOL = "kserve.protocol"
#: Requests that get no span: liveness and readiness probes would otherwise fill traces.
PROBE_PATHS = frozenset({"/", "/v2/health/live", "/v2/health/ready"})
GRPC_SERVICE = "inference.GRPCInferenceService"
_CHILD_ATTRIBUTE = "_kserve_otel_worker_setup"


class Switch:
    """Whether the KServe instrumentation is on in this process: the layers it put into a running server (REST
    middleware, the gRPC handler) ask it on every request, since they cannot be taken out again.

    FastAPI's own telemetry stays off on KServe's app after ``uninstrument()``: switched back on, it would
    record into the meter provider kserve-otel installed, under the names of kserve-otel's HTTP metrics."""

    def __init__(self) -> None:
        self.on = False


#: The process's one switch.
SWITCH = Switch()


class ServerHooks:
    """The model-server patches of one instrumentation, and the state they share."""

    def __init__(
        self, settings: Settings | None, configure_arguments: dict[str, Any], print_summary: bool | str = False
    ) -> None:
        self.settings = settings
        self.configure_arguments = configure_arguments
        self.print_summary = print_summary
        #: Whether the REST app answers the metrics path (the annotated port is the model server's port).
        self.mount_endpoint = True
        self._model_infer: Any = None

    # ----------------------------------------------------------------------------------------- patching

    def patch(self) -> None:
        from kserve.protocol.grpc.servicer import InferenceServicer

        wrap_function_wrapper("kserve.model_server", "ModelServer.start", self._wrap_start)
        wrap_function_wrapper(
            "kserve.protocol.rest.server", "RESTServer.create_application", self._wrap_create_application
        )
        # grpc.aio awaits a handler only if it is a coroutine function: replace it with one, not a proxy.
        self._model_infer = InferenceServicer.__dict__["ModelInfer"]
        InferenceServicer.ModelInfer = _traced_model_infer(self._model_infer)  # type: ignore[method-assign]
        SWITCH.on = True

    def unpatch(self) -> None:
        import kserve.model_server
        import kserve.protocol.rest.server
        from kserve.protocol.grpc.servicer import InferenceServicer

        SWITCH.on = False
        unwrap(kserve.model_server.ModelServer, "start")
        unwrap(kserve.protocol.rest.server.RESTServer, "create_application")
        if self._model_infer is not None:
            InferenceServicer.ModelInfer = self._model_infer  # type: ignore[method-assign]
            self._model_infer = None

    # ----------------------------------------------------------------------------------------- start

    def _wrap_start(self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        try:
            self.prepare(instance)
        except SettingsError:
            raise  # a bad setting stops the server at start-up, with a message saying which and why
        except Exception:  # noqa: BLE001 - telemetry must never stop a model server
            _logger.exception("kserve-otel: setting up telemetry failed; the model server runs without it")
        return wrapped(*args, **kwargs)

    def telemetry(self) -> Telemetry:
        """The process's telemetry, configured now (with the endpoint left to :meth:`prepare`) if need be."""
        return get_telemetry() or configure(self.settings, serve_endpoint=False, **self.configure_arguments)

    def prepare(self, server: Any) -> None:
        """Configure telemetry for ``server`` and place the endpoint; runs in the parent before it serves."""
        telemetry = self.telemetry()
        settings = telemetry.settings
        prometheus = "prometheus" in settings.metrics_exporters
        # Unset, the port is "the model server's own" (KServe's annotations default to it): follow --http_port.
        own_port = settings.source_of("metrics_port") == "default" or settings.metrics_port == server.http_port
        self.mount_endpoint = prometheus and own_port
        if prometheus and not self.mount_endpoint and telemetry.metrics_server is None:
            # Before the worker set-up below is made: workers build their apps with the endpoint or without.
            fallback = f"the model server's port {server.http_port}"
            self.mount_endpoint = not telemetry.start_endpoint(include_global_registry=True, fallback=fallback)
        if server.workers > 1:
            from ...export.series_files import SharedSeries, create_directory

            directory = create_directory()
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
            shared = SharedSeries(directory)
            shared.start()
            telemetry.merge_peers(shared)
            setattr(server.dataplane, _CHILD_ATTRIBUTE, WorkerSetup(settings, directory, self.mount_endpoint))
        summary = telemetry.summary(http_port=server.http_port if self.mount_endpoint else None)
        _logger.info("%s", summary)
        if self.print_summary:
            header = f"{self.print_summary}\n" if isinstance(self.print_summary, str) else ""
            print(f"{header}{summary}", file=sys.stderr, flush=True)

    # ----------------------------------------------------------------------------------------- REST app

    def _wrap_create_application(
        self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        result = wrapped(*args, **kwargs)
        try:
            import kserve.model_server

            self.add_middleware(kserve.model_server.app)
        except Exception:  # noqa: BLE001 - telemetry must never stop a model server
            _logger.exception("kserve-otel: instrumenting the REST application failed; it serves without it")
        return result

    def add_middleware(self, app: Any) -> None:
        """Request spans on every REST request, and the metrics path when this app's port is the endpoint's."""
        # FastAPI's own telemetry would duplicate the request span and cost 9-12 % of the iris server's
        # throughput here (measured), against 0-4 % for kserve-otel's request span and steps.
        quiet_fastapi_telemetry(app)
        telemetry = self.telemetry()
        path = telemetry.settings.metrics_path
        mount_endpoint = self.mount_endpoint

        unrecorded = PROBE_PATHS | {path}

        def instrumented(inner: ASGIApp) -> ASGIApp:
            return request_path(
                inner, on_end=_rest_attributes, skip=lambda scope: scope.get("path") in unrecorded,
                endpoint=MetricsMiddleware(inner, registry=served_collector, path=path) if mount_endpoint else None,
                endpoint_path=path if mount_endpoint else None)

        app.add_middleware(WhileInstrumented, instrumented=instrumented)


class WhileInstrumented:
    """The one ASGI layer kserve-otel adds to KServe's app: requests go through ``instrumented(app)`` while
    :data:`SWITCH` is on, straight to ``app`` otherwise. Returning the chosen app's coroutine (rather than
    awaiting it in a coroutine of its own) keeps the layer at one attribute test a request."""

    def __init__(self, app: ASGIApp, instrumented: Callable[[ASGIApp], ASGIApp]) -> None:
        self.app = app
        self.instrumented = instrumented(app)

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        return (self.instrumented if SWITCH.on else self.app)(scope, receive, send)


def _rest_attributes(span: Span, scope: Scope) -> None:
    model = scope.get("path_params", {}).get("model_name")
    if model:
        span.set_attribute(ATTR_MODEL_NAME, model)
    route = getattr(scope.get("route"), "path", "") or ""
    protocol = route.split("/", 2)[1] if route.count("/") >= 2 else ""
    if protocol in ("v1", "v2", "openai"):
        span.set_attribute(ATTR_PROTOCOL, protocol)


def _traced_model_infer(model_infer: Any) -> Any:
    @functools.wraps(model_infer)
    async def ModelInfer(self: Any, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's method name
        if not SWITCH.on:  # uninstrumented since the server bound this handler
            return await model_infer(self, request, context)
        carrier = {m.key: m.value for m in context.invocation_metadata() or ()}
        span, token = tracing.start_server_span(
            f"{GRPC_SERVICE}/ModelInfer", lambda: _grpc_attributes(request), propagation.extract(carrier)
        )
        try:
            response = await model_infer(self, request, context)
        except BaseException as exc:
            tracing.end_server_span(span, token, exc)
            raise
        if span is not None:
            span.set_attribute("rpc.grpc.status_code", 0)
        tracing.end_server_span(span, token)
        return response

    return ModelInfer


def _grpc_attributes(request: Any) -> dict[str, Any]:
    return {
        "rpc.system": "grpc",
        "rpc.service": GRPC_SERVICE,
        "rpc.method": "ModelInfer",
        ATTR_MODEL_NAME: getattr(request, "model_name", ""),
        ATTR_PROTOCOL: "grpc-v2",
    }


# --------------------------------------------------------------------------------------------- workers


class WorkerSetup:
    """Travels with the pickled data plane into each KServe worker process and instruments it there."""

    def __init__(self, settings: Settings, directory: str, mount_endpoint: bool) -> None:
        self.settings = settings
        self.directory = directory
        self.mount_endpoint = mount_endpoint

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return _set_up_worker, (self.settings, self.directory, self.mount_endpoint)


def _set_up_worker(settings: Settings, directory: str, mount_endpoint: bool) -> WorkerSetup:
    """Runs in a worker process while it unpickles the data plane, before it builds its REST app."""
    try:
        from ...export.series_files import DirectoryRefused, SharedSeries
        from . import KServeInstrumentor

        instrumentor = KServeInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(settings=settings)
        hooks = instrumentor.hooks
        if hooks is not None:
            hooks.mount_endpoint = mount_endpoint
        telemetry = get_telemetry() or configure(settings, serve_endpoint=False)
        shared = SharedSeries(directory)
        try:
            shared.start()
        except DirectoryRefused as refused:
            _logger.error("kserve-otel: %s; this worker's metrics are served by this worker alone", refused)
        else:
            telemetry.merge_peers(shared)
    except Exception:  # noqa: BLE001 - a worker must serve even if its telemetry cannot be set up
        _logger.exception("kserve-otel: instrumenting a KServe worker process failed; it serves without it")
    return WorkerSetup(settings, directory, mount_endpoint)
