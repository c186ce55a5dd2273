"""``configure()``: one idempotent call that connects the step series to OpenTelemetry and to Prometheus.

What it does, in order:

1. Resolves :class:`~kserve_otel.config.settings.Settings` (argument > ``KSERVE_OTEL_*`` > ``OTEL_*`` > pod
   annotation > default); a bad value raises :class:`~kserve_otel.config.settings.SettingsError` here, at
   start-up.
2. Metrics: creates the readers the settings ask for (a Prometheus reader on a registry of its own, an OTLP or
   console periodic reader), bridges each to the step series, and registers them with the meter provider: the
   one passed in, else the global SDK provider if the application or a framework installed one (readers are
   *added* to it, nothing is replaced), else a new SDK provider that becomes the global one.
3. Traces: with a span exporter configured, adds a batch span processor to the tracer provider passed in,
   else to the global SDK provider (Ray Serve installs its own in replicas), else installs a new global SDK
   provider with the configured sampler. Without an exporter it installs nothing: step spans then go to
   whatever provider the application set, and cost nothing when there is none.
4. Starts the Prometheus endpoint on its own port, unless ``serve_endpoint=False`` or an integration has
   claimed the endpoint (:func:`claim_endpoint`: the KServe instrumentation places it when the model server
   starts, inside the model server's app when the annotated port is the app's own).

Steps that ran before ``configure()`` were counted all the same: their observations appear in the first
export after it. Their spans went to the tracer provider of that moment (none, unless the application set one).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics as metrics_api
from opentelemetry import trace as trace_api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from prometheus_client import CollectorRegistry

from .recording import exemplars
from .spans import tracing
from .export.exposition import ASGIApp, MergedCollector, MetricsMiddleware, MetricsServer
from .export.metrics_bridge import bridge_reader, bridge_of
from .recording.series import REGISTRY as SERIES
from .config.settings import Settings, SettingsError

_logger = logging.getLogger(__name__)


@dataclass
class Telemetry:
    """What :func:`configure` set up. Keep it to inspect, mount or shut down what is running."""

    settings: Settings
    meter_provider: Any
    tracer_provider: Any
    #: The registry the Prometheus endpoint serves (``None`` without the ``prometheus`` exporter).
    prometheus_registry: CollectorRegistry | None = None
    #: The standalone endpoint, if it was started (``None`` when mounted into an app or when the port was busy).
    metrics_server: MetricsServer | None = None
    #: Why the standalone endpoint could not start (``"0.0.0.0:9090: Address already in use"``), else ``None``.
    endpoint_problem: str | None = None
    readers: list[MetricReader] = field(default_factory=list)
    span_processors: list[SpanProcessor] = field(default_factory=list)
    owns_meter_provider: bool = False
    owns_tracer_provider: bool = False
    #: Stops the process and GPU metrics configure() turned on (``None`` when it did not).
    stop_resource_metrics: Callable[[], None] | None = None

    @property
    def metrics_url(self) -> str | None:
        """Where the standalone endpoint answers, if it runs."""
        return self.metrics_server.url if self.metrics_server and self.metrics_server.running else None

    def collector(self, include_global_registry: bool = False) -> Any:
        """What the endpoint serves: this package's registry, and with ``include_global_registry``
        prometheus_client's global one after it, each family name once (see
        :class:`~kserve_otel.export.exposition.MergedCollector`). ``None`` without Prometheus."""
        if self.prometheus_registry is None:
            return None
        if include_global_registry:
            from prometheus_client import REGISTRY

            return MergedCollector(self.prometheus_registry, REGISTRY)
        return self.prometheus_registry

    def start_endpoint(self, include_global_registry: bool = False, fallback: str | None = None) -> bool:
        """Start the standalone endpoint on ``metrics_host:metrics_port`` if it is not running.

        Returns whether it runs. When that address cannot be listened on (a busy port, an invalid host), one
        error line says where, why and which settings gave the address, then what happens instead: the
        metrics are served on ``fallback`` (the caller's words for where it serves them then, such as
        ``"the model server's port 8080"``), or, without one, inference goes on without this endpoint.
        Nothing is raised: telemetry never stops a server.
        """
        if self.metrics_server is not None:
            return True
        collector = self.collector(include_global_registry)
        if collector is None:
            return False
        s = self.settings
        where = f"{s.metrics_host}:{s.metrics_port}"
        # Probing first lets this line name the fallback; MetricsServer.start logs its own line (without it)
        # only if the address is taken between the probe and its bind.
        problem = _listen_problem(s.metrics_host, s.metrics_port)
        if problem is None:
            server = MetricsServer(collector, s.metrics_host, s.metrics_port, s.metrics_path)
            if server.start(source=s.source_of("metrics_port")):
                self.metrics_server = server
                self.endpoint_problem = None
                return True
            self.endpoint_problem = f"{where}: taken while starting"
            if fallback:
                _logger.warning("kserve-otel: serving metrics on %s instead", fallback)
            return False
        self.endpoint_problem = f"{where}: {problem}"
        origins = [f"port from {s.source_of('metrics_port')}"]
        if s.source_of("metrics_host") != "default":
            origins.insert(0, f"host from {s.source_of('metrics_host')}")
        instead = f"serving them on {fallback} instead" if fallback else "inference goes on without this endpoint"
        _logger.error(
            "kserve-otel: cannot serve metrics on %s%s: %s (%s); %s",
            where, s.metrics_path, problem, ", ".join(origins), instead,
        )
        return False

    def merge_peers(self, peers: Any) -> None:
        """Make the Prometheus endpoint show the sum of this process and its ``peers``
        (a :class:`~kserve_otel.export.series_files.SharedSeries`: the processes of one server)."""
        for reader in self.readers:
            bridge = bridge_of(reader)
            if bridge is not None and self.prometheus_registry is not None and _is_prometheus(reader):
                bridge.peers = peers

    def asgi_middleware(self, app: ASGIApp) -> MetricsMiddleware:
        """Wrap ``app`` so that it answers the metrics path itself (the endpoint on the app's own port)."""
        return MetricsMiddleware(app, lambda: self.prometheus_registry, self.settings.metrics_path)

    def force_flush(self, timeout_millis: int = 10_000) -> None:
        """Export pending spans and push metrics now (OTLP and console readers)."""
        for processor in self.span_processors:
            processor.force_flush(timeout_millis)
        for reader in self.readers:
            if isinstance(reader, PeriodicExportingMetricReader):
                reader.force_flush(timeout_millis)

    def summary(self, http_port: int | None = None) -> str:
        """One short line saying where metrics and traces go (``http_port``: the application's port, when
        the application answers the metrics path itself)."""
        s = self.settings
        parts = []
        problem = self.endpoint_problem
        if self.metrics_url:
            parts.append(f"metrics: {self.metrics_url}")
        elif self.prometheus_registry is not None and http_port is not None:
            instead = f", instead of {problem}" if problem else ""
            parts.append(f"metrics: http://127.0.0.1:{http_port}{s.metrics_path} (the application's own port{instead})")
        elif self.prometheus_registry is not None:
            why = f" ({problem})" if problem else ""
            parts.append(f"metrics: {s.metrics_path} not served on a port of its own{why} (mount asgi_middleware)")
        for name in s.metrics_exporters:
            if name != "prometheus":
                parts.append(f"metrics pushed: {name}")
        parts.append(f"traces: {', '.join(s.traces_exporter) or 'not exported by kserve-otel'}")
        return "kserve-otel: " + "; ".join(parts)


def _is_prometheus(reader: MetricReader) -> bool:
    return type(reader).__name__ == "PrometheusMetricReader"


def _listen_problem(host: str, port: int) -> str | None:
    """Why a server could not listen on ``host:port`` now (an unknown host, a busy port), or ``None``.
    Binds as :class:`MetricsServer` does (first address, ``SO_REUSEADDR``) and lets go at once."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


_lock = threading.Lock()
_current: Telemetry | None = None
_endpoint_claims: set[str] = set()


def served_collector() -> Any:
    """What an integration's endpoint serves, looked up at scrape time: the registry of the current
    :func:`configure` plus prometheus_client's global one (``None`` before ``configure()`` or without
    Prometheus)."""
    telemetry = _current
    return telemetry.collector(include_global_registry=True) if telemetry is not None else None


def claim_endpoint(integration: str) -> None:
    """``integration`` will place the endpoint itself: ``configure()`` no longer starts it by default."""
    _endpoint_claims.add(integration)


def release_endpoint(integration: str) -> None:
    """Undo :func:`claim_endpoint`."""
    _endpoint_claims.discard(integration)


def get_telemetry() -> Telemetry | None:
    """The :class:`Telemetry` of the last :func:`configure`, or ``None``."""
    return _current


def configure(
    settings: Settings | None = None,
    *,
    meter_provider: Any = None,
    tracer_provider: Any = None,
    serve_endpoint: bool | None = None,
    resource_attributes: dict[str, Any] | None = None,
    **arguments: Any,
) -> Telemetry:
    """Set up metrics, traces and the Prometheus endpoint; calling it again returns what the first call set up.

    Args:
        settings: resolved settings; by default ``Settings.load(**arguments)``.
        meter_provider: an SDK ``MeterProvider`` to add this package's readers to (default: the global one).
        tracer_provider: a ``TracerProvider`` for step spans (default: the global one).
        serve_endpoint: start the standalone endpoint on ``metrics_port``. By default it starts unless an
            integration placed it (the KServe instrumentation does); pass False when the application mounts
            :meth:`Telemetry.asgi_middleware` on its own port instead.
        resource_attributes: attributes added to the OpenTelemetry resource of what kserve-otel installs
            (an integration's identity of the process, such as a Ray Serve replica's).
        **arguments: explicit settings, such as ``metrics_port=9090``; see :class:`Settings`.

    Raises:
        SettingsError: a setting has a value that is not accepted.
    """
    global _current
    with _lock:
        if _current is not None:
            if settings is not None or arguments or meter_provider is not None or tracer_provider is not None:
                _logger.warning(
                    "kserve-otel: configure() was called before; keeping that configuration "
                    "(call kserve_otel.shutdown() first to change it)"
                )
            return _current
        resolved = settings if settings is not None else Settings.load(**arguments)
        if serve_endpoint is None:
            serve_endpoint = not _endpoint_claims
        telemetry = _build(resolved, meter_provider, tracer_provider, serve_endpoint, resource_attributes or {})
        _current = telemetry
        return telemetry


def shutdown() -> None:
    """Undo :func:`configure`: stop the endpoint, flush and detach readers and span processors.

    Providers that kserve-otel installed globally stay installed (OpenTelemetry allows setting them once per
    process) but lose kserve-otel's readers and exporters; a later :func:`configure` adds new ones.
    """
    global _current
    with _lock:
        telemetry, _current = _current, None
    if telemetry is None:
        return
    if telemetry.metrics_server is not None:
        telemetry.metrics_server.stop()
    if telemetry.stop_resource_metrics is not None:
        telemetry.stop_resource_metrics()
    provider = telemetry.meter_provider
    for reader in telemetry.readers:
        try:
            if isinstance(provider, MeterProvider):
                provider.remove_metric_reader(reader)  # also shuts the reader down
            else:
                reader.shutdown()
        except Exception:  # noqa: BLE001 - a failing exporter must not stop a shutdown
            _logger.exception("kserve-otel: shutting down a metric reader failed")
    for processor in telemetry.span_processors:
        try:
            processor.shutdown()
        except Exception:  # noqa: BLE001
            _logger.exception("kserve-otel: shutting down a span processor failed")
    tracing.set_tracer_provider(None)


# --------------------------------------------------------------------------------------------- building


def _build(
    settings: Settings, meter_provider: Any, tracer_provider: Any, serve_endpoint: bool,
    resource_attributes: dict[str, Any],
) -> Telemetry:
    SERIES.default_bounds = settings.buckets
    exemplars.set_filter(settings.exemplar_filter)
    resource = _resource(settings).merge(Resource(resource_attributes)) if resource_attributes \
        else _resource(settings)
    readers, registry = _metric_readers(settings, resource)
    meter_provider, owns_meters = _attach_readers(readers, meter_provider, resource)
    stop_resources = None
    if readers and isinstance(meter_provider, MeterProvider):  # nothing would export them otherwise
        from .export.resource_metrics import enable_resource_metrics

        stop_resources = enable_resource_metrics(meter_provider)
    tracer_provider, processors, owns_traces = _attach_span_export(
        settings, tracer_provider, resource, meter_provider if readers else None)
    telemetry = Telemetry(
        settings=settings, meter_provider=meter_provider, tracer_provider=tracer_provider,
        prometheus_registry=registry, readers=readers, span_processors=processors,
        owns_meter_provider=owns_meters, owns_tracer_provider=owns_traces, stop_resource_metrics=stop_resources,
    )
    if serve_endpoint:
        telemetry.start_endpoint()
    return telemetry


def _resource(settings: Settings) -> Resource:
    attributes: dict[str, Any] = {"telemetry.distro.name": "kserve-otel"}
    if settings.service_name and settings.source_of("service_name") != "environment variable OTEL_SERVICE_NAME":
        attributes[SERVICE_NAME] = settings.service_name
    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES itself.
    return Resource.create(attributes)


def _metric_readers(settings: Settings, resource: Resource) -> tuple[list[MetricReader], CollectorRegistry | None]:
    readers: list[MetricReader] = []
    registry = None
    for name in settings.metrics_exporters:
        if name == "prometheus":
            from opentelemetry.exporter.prometheus import PrometheusMetricReader

            registry = CollectorRegistry(auto_describe=True)
            readers.append(PrometheusMetricReader(registry=registry, scope_info_enabled=False))
        elif name == "otlp":
            readers.append(PeriodicExportingMetricReader(_otlp("metrics")))
        elif name == "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    for reader in readers:
        bridge_reader(reader, resource)
    return readers, registry


def _otlp(signal: str) -> Any:
    try:
        if signal == "metrics":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            return OTLPMetricExporter()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        from .otlp_export import FastOTLPSpanExporter

        # The SDK's OTLP/HTTP span exporter with the C encoder: same bytes, a tenth of the CPU (issue 14).
        try:
            return FastOTLPSpanExporter()
        except TypeError as error:  # an SDK whose exporter internals moved: its own exporter still works
            _logger.warning("kserve-otel: %s; spans are exported by the SDK's OTLPSpanExporter", error)
            return OTLPSpanExporter()
    except ImportError:
        raise SettingsError(
            f"the otlp {signal} exporter needs the OTLP package: pip install 'kserve-otel[otlp]'"
        ) from None


def _attach_readers(readers: list[MetricReader], provider: Any, resource: Resource) -> tuple[Any, bool]:
    owns = False
    if provider is None:
        provider = metrics_api.get_meter_provider()
        if not isinstance(provider, MeterProvider):
            provider = MeterProvider(resource=resource)
            metrics_api.set_meter_provider(provider)
            owns = metrics_api.get_meter_provider() is provider
    if not isinstance(provider, MeterProvider):
        if readers:
            _logger.warning(
                "kserve-otel: the meter provider %r is not an OpenTelemetry SDK MeterProvider; "
                "step metrics are not exported through it", provider,
            )
        return provider, owns
    for reader in readers:
        provider.add_metric_reader(reader)
    return provider, owns


def _attach_span_export(settings: Settings, provider: Any, resource: Resource,
                        meter_provider: Any = None) -> tuple[Any, list[SpanProcessor], bool]:
    if provider is not None:
        tracing.set_tracer_provider(provider)
    exporters = [_span_exporter(name) for name in settings.traces_exporter]
    if not exporters:
        return provider or trace_api.get_tracer_provider(), [], False
    owns = False
    if provider is None:
        provider = trace_api.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider(resource=resource, sampler=_sampler(settings))
            trace_api.set_tracer_provider(provider)
            owns = trace_api.get_tracer_provider() is provider
    processors: list[SpanProcessor] = []
    if isinstance(provider, TracerProvider):
        for exporter in exporters:
            processor = _batching(exporter)(exporter, meter_provider=meter_provider)
            if isinstance(meter_provider, MeterProvider):
                _count_processed_spans(processor, meter_provider)
            provider.add_span_processor(processor)
            processors.append(processor)
    else:
        _logger.warning(
            "kserve-otel: the tracer provider %r is not an OpenTelemetry SDK TracerProvider; "
            "spans are not exported by kserve-otel", provider,
        )
    return provider, processors, owns


def _batching(exporter: Any) -> type[BatchSpanProcessor]:
    """The batch processor for ``exporter``: spans for the fast OTLP exporter are queued already encoded (see
    :mod:`kserve_otel.otlp_export`), others as the SDK queues them."""
    try:
        from .otlp_export import EncodingBatchSpanProcessor, FastOTLPSpanExporter
    except ImportError:  # no OTLP exporter package: no fast exporter either
        return BatchSpanProcessor
    return EncodingBatchSpanProcessor if isinstance(exporter, FastOTLPSpanExporter) else BatchSpanProcessor


def _count_processed_spans(processor: BatchSpanProcessor, meter_provider: MeterProvider) -> None:
    """Give ``processor`` the SDK's own self-observability metrics (``otel.sdk.processor.span.processed``, with
    ``error.type="queue_full"`` for spans dropped because the export queue was full, and the queue's size and
    capacity), recorded into ``meter_provider``, so they are on the endpoint. The SDK makes them only when
    ``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED=true``; with it, the SDK has done so already. Without it, they are
    made here through the SDK's own constructor, set where the SDK's batch processor keeps them (private names
    of SDK 1.45, checked by tests/test_telemetry.py: an SDK that moved them gets no such metrics, nothing worse).
    """
    try:
        from opentelemetry.sdk._shared_internal._processor_metrics import (
            NoOpProcessorMetrics, create_processor_metrics,
        )
        from opentelemetry.semconv._incubating.attributes.otel_attributes import OtelComponentTypeValues

        batch = processor._batch_processor
        if not isinstance(batch._metrics, NoOpProcessorMetrics):
            return
        metrics = create_processor_metrics(
            "traces", OtelComponentTypeValues.BATCHING_SPAN_PROCESSOR, meter_provider,
            capacity=batch._max_queue_size, enabled=True)
        queue = batch._queue
        metrics.register_queue_size(lambda: len(queue))
        batch._metrics = metrics
    except (ImportError, AttributeError) as error:
        _logger.debug("kserve-otel: no span processor metrics with this SDK: %r", error)


def _span_exporter(name: str) -> Any:
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    return _otlp("traces")


def _sampler(settings: Settings) -> Any:
    from opentelemetry.sdk.trace import sampling

    ratio = 1.0 if settings.traces_sampler_arg is None else settings.traces_sampler_arg
    return {
        "always_on": lambda: sampling.ALWAYS_ON,
        "always_off": lambda: sampling.ALWAYS_OFF,
        "traceidratio": lambda: sampling.TraceIdRatioBased(ratio),
        "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
        "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
        "parentbased_traceidratio": lambda: sampling.ParentBased(sampling.TraceIdRatioBased(ratio)),
    }[settings.traces_sampler]()
