"""Serve a loaded target, instrumented: KServe models through ``kserve.ModelServer``, Ray Serve apps through
``serve.run``, ASGI apps through uvicorn. Each prints one short summary when it starts: what was instrumented
(models and steps) and where metrics and traces go."""

from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from ..config.settings import Settings
from .targets import Target, TargetError


@dataclass
class ServeOptions:
    """The serving options of ``kserve-otel-run`` (settings go through :class:`Settings`)."""

    host: str
    http_port: int
    grpc_port: int
    workers: int
    settings: Settings


def _say(message: str) -> None:
    print(f"kserve-otel-run: {message}", file=sys.stderr, flush=True)


def serve(target: Target, options: ServeOptions) -> int:
    if target.kind != "kserve" and options.workers > 1:
        raise TargetError(f"--workers applies to KServe models; {target.spec} is a {target.kind} target "
                          f"(scale Ray Serve with num_replicas, an ASGI app with more pods)")
    return {"kserve": _serve_kserve, "asgi": _serve_asgi, "ray": _serve_ray}[target.kind](target, options)


def _model_steps(model: Any) -> str:
    import kserve

    from ..instrumentation.kserve.models import STEP_TIMERS

    own = [step for step in STEP_TIMERS if getattr(type(model), step, None) is not getattr(kserve.Model, step, None)]
    kserves = [step for step in STEP_TIMERS if step not in own]
    return f"{model.name} ({type(model).__qualname__}: {', '.join(own) or 'no handlers of its own'}" + (
        f"; KServe's {', '.join(kserves)})" if kserves else ")")


def _serve_kserve(target: Target, options: ServeOptions) -> int:
    import kserve

    from ..instrumentation.kserve import KServeInstrumentor

    for model in target.models:
        if not model.ready:
            model.load()
    header = (f"serving KServe models {'; '.join(_model_steps(m) for m in target.models)} on "
              f"http://{options.host}:{options.http_port} (REST v1, v2) and port {options.grpc_port} (gRPC)")
    KServeInstrumentor().instrument(settings=options.settings, print_summary=f"kserve-otel-run: {header}")
    server = kserve.ModelServer(http_port=options.http_port, grpc_port=options.grpc_port, workers=options.workers)
    server.start(target.models)
    return 0


def _serve_asgi(target: Target, options: ServeOptions) -> int:
    import uvicorn

    from ..instrumentation.asgi import instrument_app
    from ..telemetry import configure

    telemetry = configure(options.settings, serve_endpoint=False)
    app = instrument_app(target.value, http_port=options.http_port)
    _say(f"serving the ASGI app {target.spec} ({type(target.value).__qualname__}) on "
         f"http://{options.host}:{options.http_port}: request spans and HTTP metrics by route")
    print(telemetry.summary(http_port=None if telemetry.metrics_url else options.http_port), file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=options.host, port=options.http_port, log_level="info")
    return 0


def _serve_ray(target: Target, options: ServeOptions) -> int:
    import os

    import ray
    from ray import serve

    from ..instrumentation.ray_serve import RayServeInstrumentor, describe_application

    application = target.value.bind() if type(target.value).__name__ == "Deployment" else target.value
    settings = options.settings
    if not ray.is_initialized():
        # Replicas import the application's module by name: give them the directories it was found in.
        path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH", "")) if p)
        init: dict[str, Any] = {"runtime_env": {"env_vars": {"PYTHONPATH": path}}}
        if settings.source_of("metrics_port") != "default":
            init["_metrics_export_port"] = settings.metrics_port  # Ray's metrics endpoint, where the steps go
        ray.init(**init)
    instrumentor = RayServeInstrumentor()
    instrumentor.instrument(settings=settings)
    serve.start(http_options={"host": options.host, "port": options.http_port})
    serve.run(application, blocking=False)
    from ray._private.worker import global_worker

    metrics_port = getattr(getattr(global_worker, "node", None), "metrics_export_port", None)
    _say(f"serving the Ray Serve application {target.spec} on http://{options.host}:{options.http_port}: "
         f"{describe_application(application)}; Ray's metrics endpoint: http://127.0.0.1:{metrics_port}/metrics")
    print(instrumentor.summary(), file=sys.stderr, flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    _say("shutting down Ray Serve")
    serve.shutdown()
    ray.shutdown()
    return 0
