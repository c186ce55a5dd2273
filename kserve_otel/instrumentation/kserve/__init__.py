"""OpenTelemetry instrumentation of KServe model servers: every step of every model, with no change to the models.

Usage
-----

.. code-block:: python

    from kserve_otel.instrumentation.kserve import KServeInstrumentor

    KServeInstrumentor().instrument()          # before or after the models are defined
    kserve.ModelServer().start([IrisModel("iris")])

or, with no code at all, ``KSERVE_OTEL_ENABLED=true python model.py`` (the entry point ``kserve`` in the
``opentelemetry_instrumentor`` group is found by ``opentelemetry-instrument`` too).

What a stock KServe model server then has:

* ``request_preprocess_seconds``, ``request_predict_seconds``, ``request_postprocess_seconds``,
  ``request_explain_seconds`` with label ``model_name`` and KServe's buckets, exactly once on ``/metrics``:
  KServe's own prometheus_client histograms are replaced, not duplicated, so KServe's dashboards and alerts
  keep working. A streaming predict is timed to its last chunk; a step that raises is counted in
  ``request_step_errors_total{model_name, step, error_type}``.
* the endpoint on the annotated port and path (``prometheus.kserve.io/port``, ``prometheus.kserve.io/path``):
  inside the model server's REST app when that port is the model server's own (8080 by default), on a port of
  its own otherwise; when that port cannot be used (busy, an invalid host), inside the REST app after all,
  said in the one error line. With ``workers > 1`` every scrape shows the sum over all worker processes.
* a SERVER span per REST (v1, v2) and gRPC inference request, continuing an incoming ``traceparent`` (or
  Istio's B3 headers), with a child span per step; calls from a transformer to its predictor carry the trace
  context, so both form one trace.
* KServe's per-request latency log line with the trace id added (setting ``latency_log``).

Configuration
-------------

``instrument(**settings)`` takes any :class:`kserve_otel.Settings` field (``metrics_port=9090``) or
``settings=Settings(...)``, and ``print_summary=True`` (or a header line) to print where metrics and traces
go when the server starts; the rest comes from ``KSERVE_OTEL_*``/``OTEL_*`` variables and pod annotations.
Telemetry is configured when ``ModelServer.start`` runs, unless the application called
``kserve_otel.configure()`` before. ``tracer_provider`` and ``meter_provider`` are honoured as in every
OpenTelemetry instrumentor. ``uninstrument()`` restores KServe exactly, its own histograms included, in a
running server too: its ``/metrics`` is KServe's own again and kserve-otel lets every request through
untouched until ``instrument()`` is called again.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from ... import telemetry as telemetry_module
from ...config.settings import Settings
from . import clients, latency_log
from .models import ModelPatcher
from .package import _instruments
from .server import ServerHooks

__all__ = ["KServeInstrumentor"]


class KServeInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instruments ``kserve.Model`` subclasses (present and future), the model server and its clients."""

    models: ModelPatcher | None = None
    hooks: ServerHooks | None = None
    _log_filter: latency_log.LatencyLogFilter | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        settings: Settings | None = kwargs.pop("settings", None)
        print_summary: bool | str = kwargs.pop("print_summary", False)
        configure_arguments = {
            key: kwargs[key] for key in ("tracer_provider", "meter_provider") if kwargs.get(key) is not None
        }
        explicit = {key: value for key, value in kwargs.items() if key in Settings.field_names()}
        if settings is None:
            settings = Settings.load(**explicit) if explicit else None
        resolved = settings or Settings.load()
        self.models = ModelPatcher()
        self.models.patch()
        self.hooks = ServerHooks(settings, configure_arguments, print_summary)
        self.hooks.patch()
        clients.patch_clients()
        self._log_filter = latency_log.install(resolved.latency_log)
        telemetry_module.claim_endpoint("kserve")

    def _uninstrument(self, **kwargs: Any) -> None:
        telemetry_module.release_endpoint("kserve")
        latency_log.uninstall(self._log_filter)
        self._log_filter = None
        clients.unpatch_clients()
        if self.hooks is not None:
            self.hooks.unpatch()
            self.hooks = None
        if self.models is not None:
            self.models.unpatch()
            self.models = None


def instrument_on_import(module: object = None) -> None:
    """Auto-instrumentation's hook (``KSERVE_OTEL_ENABLED``): instrument KServe as it is imported. The start-up
    summary is printed by the main process only, not by each worker."""
    import multiprocessing

    instrumentor = KServeInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        # No code of the user's to raise into: a bad variable is one line and turns off only what it configures.
        settings = Settings.load_forgiving()
        instrumentor.instrument(settings=settings, print_summary=multiprocessing.parent_process() is None)
