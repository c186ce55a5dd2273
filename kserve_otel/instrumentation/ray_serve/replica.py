"""Inside a Ray Serve replica: wrap the deployment's steps and set up the replica's telemetry.

Ray Serve pickles a deployment's class into replica processes and strips wrapt proxies on the way, and module
code of the driver never runs there. So the instrumentation happens in the replica itself, at the one place
where Serve hands a replica its class: ``UserCallableWrapper.__init__`` (``ray.serve._private.replica``) gets
the class with its steps wrapped, and ``UserCallableWrapper.initialize_callable``, which Serve calls after it
has set up its own tracing (and so its ``TracerProvider``), configures the replica's telemetry. Both are
patched in the replica process by :class:`~kserve_otel.instrumentation.ray_serve.RayServeInstrumentor`, which
runs there through auto-instrumentation (the driver's instrumentor passes ``KSERVE_OTEL_ENABLED`` and its
settings in each deployment's ``runtime_env``).

Which methods are steps: the handlers of ``kserve.Model`` deployments (the KServe instrumentation wraps them),
methods already decorated with ``@instrument_step``, and the methods the ``ray_steps`` setting names
(``__call__=predict`` by default, applied to classes that decorate none of their methods). The model name is the object's ``name``, else the deployment's name.
Without Serve's own tracing, a step called with a Starlette ``Request`` continues the request's
``traceparent``.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import sys
from typing import Any

from ...spans import propagation
from ...names import STEP_NAME_PATTERN
from ...config.settings import Settings
from ...request_path.steps import STEP_ATTRIBUTE, wrap_step
from ...telemetry import configure, get_telemetry
from .batching import instrument_batch, keep_serve_method_check, lazy_queue_of

_logger = logging.getLogger(__name__)


def _is_kserve_model(deployment_def: Any) -> bool:
    kserve_model = sys.modules.get("kserve.model")
    model_cls = getattr(kserve_model, "Model", None)
    return inspect.isclass(deployment_def) and model_cls is not None and issubclass(deployment_def, model_cls)


def _continue_request_trace(func: Any) -> Any:
    """``func`` making the ``traceparent`` of a Starlette ``Request`` argument current, when nothing is."""
    from opentelemetry import context as context_api
    from opentelemetry import trace

    def context_of(args: tuple[Any, ...]) -> Any:
        if trace.get_current_span().get_span_context().is_valid:
            return None  # Serve's tracing (or a caller) already gave this call its context
        request = next((a for a in args if hasattr(a, "headers") and hasattr(a, "url")), None)
        if request is None:
            return None
        return propagation.extract({k.lower(): v for k, v in request.headers.items()})

    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def async_call(*args: Any, **kwargs: Any) -> Any:
            ctx = context_of(args)
            token = context_api.attach(ctx) if ctx is not None else None
            try:
                return await func(*args, **kwargs)
            finally:
                if token is not None:
                    context_api.detach(token)

        return async_call
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        return func

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        ctx = context_of(args)
        token = context_api.attach(ctx) if ctx is not None else None
        try:
            return func(*args, **kwargs)
        finally:
            if token is not None:
                context_api.detach(token)

    return call


def _declares_steps(deployment_def: Any) -> bool:
    members = [deployment_def] if inspect.isfunction(deployment_def) else [
        value for cls in inspect.getmro(deployment_def) for value in vars(cls).values()
    ]
    return any(getattr(member, STEP_ATTRIBUTE, None) for member in members)


def instrument_deployment_def(deployment_def: Any, settings: Settings, deployment: str) -> Any:
    """Wrap the steps of a deployment's class (in place: this process owns it) or function; returns it."""
    if _is_kserve_model(deployment_def):
        from ..kserve import KServeInstrumentor

        instrumentor = KServeInstrumentor()
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument(settings=settings)
        return deployment_def
    steps = dict(settings.ray_steps)
    if settings.source_of("ray_steps") == "default" and _declares_steps(deployment_def):
        steps = {}  # the class says which of its methods are steps: the default map is for classes that do not
    if inspect.isfunction(deployment_def):
        step = steps.get("__call__")
        if step is None or getattr(deployment_def, STEP_ATTRIBUTE, None):
            return deployment_def
        return _continue_request_trace(wrap_step(deployment_def, step, fallback_model=deployment))
    for name in dir(deployment_def):  # every @serve.batch method gets its batches measured, step or not
        func = inspect.getattr_static(deployment_def, name, None)
        if lazy_queue_of(func) is not None:
            step = steps.get(name) or (name if STEP_NAME_PATTERN.match(name) else "predict")
            setattr(deployment_def, name, instrument_batch(func, deployment, step))
    for method, step in steps.items():
        func = inspect.getattr_static(deployment_def, method, None)
        if func is None or not callable(func) or getattr(func, STEP_ATTRIBUTE, None):
            continue
        wrapped = _continue_request_trace(wrap_step(func, step, fallback_model=deployment))
        if lazy_queue_of(func) is not None:
            wrapped = keep_serve_method_check(wrapped, func)
        setattr(deployment_def, method, wrapped)
    return deployment_def


def set_up_replica(settings: Settings, deployment: str, application: str, replica: str) -> None:
    """Configure this replica's telemetry (once per process): its metrics go to Ray's metrics or to OTLP, never
    to a Prometheus port of its own (the replicas of a node would fight over it)."""
    if get_telemetry() is not None:
        return
    exporters = ("otlp",) if settings.ray_metrics == "otlp" else ()
    replica_settings = dataclasses.replace(settings, metrics_exporters=exporters)
    configure(replica_settings, serve_endpoint=False, resource_attributes={
        "service.instance.id": replica or str(os.getpid()),
        "ray.serve.deployment": deployment, "ray.serve.application": application,
    })
    if settings.ray_metrics == "ray":
        from .ray_metrics import forward_to_ray

        forward_to_ray()


class ReplicaHooks:
    """The two patches of ``ray.serve._private.replica.UserCallableWrapper``; undone by :meth:`unpatch`."""

    def __init__(self, settings: Settings | None) -> None:
        self.settings = settings

    def resolved(self) -> Settings:
        return self.settings or Settings.load()

    def patch(self) -> None:
        from wrapt import wrap_function_wrapper

        module = "ray.serve._private.replica"
        wrap_function_wrapper(module, "UserCallableWrapper.__init__", self._wrap_init)
        wrap_function_wrapper(module, "UserCallableWrapper.initialize_callable", self._wrap_initialize)

    def unpatch(self) -> None:
        from opentelemetry.instrumentation.utils import unwrap
        from ray.serve._private import replica

        unwrap(replica.UserCallableWrapper, "__init__")
        unwrap(replica.UserCallableWrapper, "initialize_callable")

    def _wrap_init(self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        deployment_id = kwargs.get("deployment_id")
        name = getattr(deployment_id, "name", "") or ""
        try:
            if args:
                args = (instrument_deployment_def(args[0], self.resolved(), name), *args[1:])
            elif "deployment_def" in kwargs:
                kwargs["deployment_def"] = instrument_deployment_def(kwargs["deployment_def"], self.resolved(), name)
        except Exception:  # noqa: BLE001 - a replica must serve even if it cannot be instrumented
            _logger.exception("kserve-otel: instrumenting deployment %s failed; it serves without it", name)
        return wrapped(*args, **kwargs)

    def _wrap_initialize(self, wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        deployment_id = getattr(instance, "_deployment_id", None)
        try:
            set_up_replica(self.resolved(), getattr(deployment_id, "name", ""), getattr(deployment_id, "app_name", ""),
                           _replica_id())
        except Exception:  # noqa: BLE001
            _logger.exception("kserve-otel: setting up the replica's telemetry failed; it serves without it")
        return wrapped(*args, **kwargs)


def _replica_id() -> str:
    try:
        from ray import serve

        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 - outside a replica, or an older Serve
        return ""
