"""OpenTelemetry instrumentation of Ray Serve: step histograms and spans from every replica of every deployment.

Usage
-----

.. code-block:: python

    from kserve_otel.instrumentation.ray_serve import RayServeInstrumentor

    RayServeInstrumentor().instrument()        # in the driver, before serve.run
    serve.run(app)

or ``kserve-otel-run module:app``, or with no code at all ``KSERVE_OTEL_ENABLED=true`` in the cluster's
environment (a KubeRay ``RayService``); entry point ``ray_serve`` in the ``opentelemetry_instrumentor`` group.

What is instrumented, in the replicas themselves (see :mod:`.replica` for why and how):

* methods decorated with ``@instrument_step``; ``kserve.Model`` deployments (``kserve.ray.RayModel``), whose
  handlers the KServe instrumentation wraps; in classes with neither, the methods the ``ray_steps`` setting
  maps to steps (``__call__=predict`` by default); ``@serve.batch`` methods also record per-batch execution
  time, batch size and each request's wait in the queue (:mod:`.batching`);
* metrics, by the ``ray_metrics`` setting: ``ray`` (default) forwards every observation into Ray's own
  metrics, exported by each node's Ray metrics endpoint as ``ray_request_<step>_seconds{model_name,
  deployment, replica, application}``, ``ray_request_step_errors_total{...}``,
  ``ray_request_batch_execution_seconds`` ...; no port per replica, nothing to add as the cluster grows.
  ``otlp`` pushes them to ``OTEL_EXPORTER_OTLP_ENDPOINT`` under their OpenTelemetry names
  (``request_predict`` in seconds ...), each replica a resource of its own (``service.instance.id``,
  ``ray.serve.deployment``, ``ray.serve.application``);
* spans: a step span's parent is the Serve request's context: Serve's own ``replica_handle_request`` span when
  Serve's tracing is on (``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH``, for instance
  ``kserve_otel.instrumentation.ray_serve.tracing:otlp_span_processors``), which also carries the trace across
  ``DeploymentHandle`` calls; otherwise the ``traceparent`` of the HTTP request. The ``TracerProvider`` Serve
  installs in a replica is used as it is (span processors are added to it, never a new provider).

A driver that never instruments Ray Serve still gets the ``@instrument_step`` steps of its replicas into Ray's
metrics, with one warning in each such replica's log saying what else it misses (:mod:`.adoption`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from opentelemetry.instrumentation.instrumentor import BaseInstrumentor  # type: ignore[attr-defined]

from ...config.settings import Settings
from .deployments import deployments_of, with_environment
from .package import _instruments
from .replica import ReplicaHooks

__all__ = ["RayServeInstrumentor", "describe_application"]


class RayServeInstrumentor(BaseInstrumentor):  # type: ignore[misc]
    """Instruments Ray Serve deployments, in the driver (``serve.run``) and in each replica process."""

    settings: Settings | None = None
    _replica_hooks: ReplicaHooks | None = None

    def instrumentation_dependencies(self) -> Collection[str]:
        return _instruments

    def _instrument(self, **kwargs: Any) -> None:
        from wrapt import wrap_function_wrapper

        settings: Settings | None = kwargs.get("settings")
        explicit = {key: value for key, value in kwargs.items() if key in Settings.field_names()}
        self.settings = settings or (Settings.load(**explicit) if explicit else None)
        self._replica_hooks = ReplicaHooks(self.settings)
        self._replica_hooks.patch()
        wrap_function_wrapper("ray.serve", "run", self._wrap_run)

    def _uninstrument(self, **kwargs: Any) -> None:
        import ray.serve
        from opentelemetry.instrumentation.utils import unwrap

        unwrap(ray.serve, "run")
        if self._replica_hooks is not None:
            self._replica_hooks.unpatch()
            self._replica_hooks = None

    def _wrap_run(self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            args = (self.instrument_application(args[0]), *args[1:])
        elif "target" in kwargs:
            kwargs["target"] = self.instrument_application(kwargs["target"])
        return wrapped(*args, **kwargs)

    def replica_environment(self) -> dict[str, str]:
        """What each replica's environment gets: auto-instrumentation on, with the driver's explicit settings."""
        explicit = self.settings.explicit_environ() if self.settings is not None else {}
        return {"KSERVE_OTEL_ENABLED": "true", **explicit}

    def instrument_application(self, app: Any) -> Any:
        """``app`` (an ``Application`` or a ``Deployment``) with every deployment starting instrumented replicas."""
        if type(app).__name__ == "Deployment":
            app = app.bind()
        if type(app).__name__ != "Application" or getattr(app, "_kserve_otel_instrumented", False):
            return app
        instrumented = with_environment(app, self.replica_environment())
        instrumented._kserve_otel_instrumented = True
        return instrumented

    def summary(self) -> str:
        """Where the replicas' telemetry goes, in one line."""
        settings = self.settings or Settings.load()
        metrics = {
            "ray": "step metrics in Ray's metrics (ray_request_<step>_seconds on each node's Ray metrics endpoint)",
            "otlp": "step metrics pushed over OTLP by each replica",
            "none": "no step metrics",
        }[settings.ray_metrics]
        traces = ", ".join(settings.traces_exporter) or "Serve's tracing, if on"
        return f"kserve-otel: {metrics}; traces: {traces}"


def describe_application(app: Any) -> str:
    """Its deployments and the class or function each runs, for the start-up summary."""
    parts = []
    for deployment in deployments_of(app):
        target = deployment.func_or_class
        parts.append(f"{deployment.name} ({getattr(target, '__qualname__', target)})")
    return "deployments " + ", ".join(parts)


def instrument_on_import(module: object = None) -> None:
    """Auto-instrumentation's hook (``KSERVE_OTEL_ENABLED``): instrument Ray Serve as it is imported, which in
    a replica process instruments that replica."""
    instrumentor = RayServeInstrumentor()
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument()
