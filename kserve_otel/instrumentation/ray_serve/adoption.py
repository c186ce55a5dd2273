"""Steps in a Ray Serve replica whose driver never instrumented Ray Serve: forwarded to Ray's metrics anyway.

What a new user writes: ``@instrument_step`` methods, ``kserve_otel.configure()`` in the driver, ``serve.run``,
and no ``RayServeInstrumentor().instrument()``. The replica runs the decorated steps and records them in its
own registry, which nothing in that process exports (``configure()`` ran in the driver, a process the steps
never run in): every step count would be lost, silently.

The step wrappers arrive in the replica with the deployment's pickled class, and
``kserve_otel.request_path.steps`` calls
:func:`adopt_unpickled_steps` when it rebuilds them in a process where ``ray.serve`` is imported. Unless Ray
Serve's instrumentation is on in that process (it then sets the replica up itself, settings and all) or the
process configured kserve-otel, a mirror factory is installed that decides at the first step series created:
inside a Serve replica, the steps are forwarded into Ray's metrics (as with ``ray_metrics=ray``, the
default), and the replica's log (Serve's ``ray.serve`` logger: its log file and stderr) says once what the
driver did not do and what is therefore missing. Outside a replica (a Ray task, the controller) nothing
changes.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from ...recording.series import Family, set_mirror_factory
from ...telemetry import get_telemetry
from .ray_metrics import mirror_into_ray

#: Serve's own logger: in a replica it writes to the replica's log file (logs/serve/replica_*.log) and stderr.
_logger = logging.getLogger("ray.serve")
_lock = threading.Lock()
_installed = False
#: None until decided in a replica: whether this process forwards its steps without the instrumentation.
_adopted: bool | None = None

MESSAGE = (
    "kserve-otel: deployment %r (application %r) records @instrument_step steps, but the driver did not "
    "instrument Ray Serve: they go to Ray's metrics anyway (ray_request_<step>_seconds on each node's Ray "
    "metrics endpoint). Call RayServeInstrumentor().instrument() before serve.run (or run the driver with "
    "kserve-otel-run, or set KSERVE_OTEL_ENABLED=true on the cluster) for the rest: the driver's kserve-otel "
    "settings, the ray_steps default (__call__ as predict), @serve.batch metrics, kserve.Model deployments, "
    "OTLP metrics and the traceparent of HTTP requests without Serve's tracing."
)


def adopt_unpickled_steps() -> None:
    """Called when a step wrapper is unpickled in a process that imported ``ray.serve``; cheap after the first."""
    global _installed
    if _installed:
        return
    with _lock:
        if _installed:
            return
        _installed = True
    if _in_an_actor() and not _instrumented() and get_telemetry() is None:
        set_mirror_factory(_adopting_mirror)


def _adopting_mirror(family: Family, attributes: dict[str, object]) -> Callable[[float], object] | None:
    return mirror_into_ray(family, attributes) if _decide() else None


def _decide() -> bool:
    """In a Serve replica that nothing else set up: forward (and say so once). Elsewhere: not yet."""
    global _adopted
    if _adopted is not None:
        return _adopted
    context = _replica_context()
    if context is None:
        return False  # not in a replica (yet): a later series decides
    with _lock:
        if _adopted is None:
            _adopted = not _instrumented() and get_telemetry() is None
            if _adopted:
                deployment = getattr(context, "deployment", "") or ""
                application = getattr(context, "app_name", "") or ""
                _logger.warning(MESSAGE, deployment, application)
    return _adopted


def _instrumented() -> bool:
    from . import RayServeInstrumentor

    return bool(RayServeInstrumentor().is_instrumented_by_opentelemetry)


def _in_an_actor() -> bool:
    """Whether this process is a Ray actor's (replicas are actors; a driver or a test process is not)."""
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except Exception:  # noqa: BLE001
        return False


def _replica_context() -> Any:
    try:
        from ray import serve

        return serve.get_replica_context()
    except Exception:  # noqa: BLE001 - outside a replica Serve raises
        return None
