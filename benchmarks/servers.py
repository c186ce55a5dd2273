"""The servers that :mod:`benchmarks.throughput` drives, each run in a process of its own.

Why a separate module: a server under load must not share its interpreter (its GIL, its garbage collector, its
process-global OpenTelemetry providers) with the load generator or with another server. Each is started as::

    BENCH_HTTP_PORT=P BENCH_GRPC_PORT=Q python -m benchmarks.servers KIND

and answers ``POST /v1/models/iris:predict`` with a KServe v1 body (``{"instances": [...]}``). Ports come from
the environment, not from arguments, because ``import kserve`` parses ``sys.argv`` itself.

Kinds (``KINDS``): ``starlette`` (a trivial Starlette JSON endpoint under uvicorn: the floor of any Python
server) and ``kserve`` (KServe's ``ModelServer`` serving the iris example model), each plain or
``-instrumented`` as a user would instrument it (:func:`instrument_starlette`, :func:`instrument_kserve`).
Two reference wrappers of the Starlette app show what any ASGI middleware pays before it does anything of its
own: ``starlette-passthrough`` (:func:`passthrough_layer`, an empty layer) and ``starlette-status-layer``
(:func:`status_layer`: the layer, a ``send`` wrapper that reads the response status, and a clock read on
each side, the least a middleware that records HTTP durations by status must do).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

MODEL_NAME = "iris"
PREDICT_PATH = f"/v1/models/{MODEL_NAME}:predict"
#: Where each kind answers 200 once it is ready to serve.
READY_PATHS = {"starlette": "/ready", "kserve": f"/v1/models/{MODEL_NAME}", "kserve2w": f"/v1/models/{MODEL_NAME}"}
KINDS = (
    "starlette", "starlette-instrumented", "starlette-passthrough", "starlette-status-layer",
    "kserve", "kserve-instrumented", "kserve-traced", "kserve-ratio", "kserve2w", "kserve2w-instrumented",
    "starlette-traced", "starlette-contrib",
)
#: Kinds whose spans are exported, by OTLP/HTTP to the receiver at ``BENCH_OTLP_ENDPOINT``, and their sampler.
TRACED = {"kserve-traced": "always_on", "kserve-ratio": "parentbased_traceidratio",
          "starlette-traced": "always_on", "starlette-contrib": "always_on"}
#: Spans one request makes, for each traced kind whose requests are all sampled: the count the receiver must get.
SPANS_PER_REQUEST = {"kserve-traced": 4, "starlette-traced": 1}
#: The request body: two iris rows, as in KServe's sklearn example.
REQUEST_BODY = b'{"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}'


def _predictions(payload: dict[str, Any]) -> dict[str, Any]:
    return {"predictions": [1 for _ in payload["instances"]]}


# --------------------------------------------------------------------------------------------- hooks


def pending(kind: str) -> str | None:
    """Why ``kind`` cannot be benchmarked (its instrumentation is missing), or None when it can."""
    module = {"starlette-instrumented": "kserve_otel.instrumentation.asgi",
              "starlette-traced": "kserve_otel.instrumentation.asgi",
              "starlette-contrib": "opentelemetry.instrumentation.asgi",
              "kserve-instrumented": "kserve_otel.instrumentation.kserve",
              "kserve-traced": "kserve_otel.instrumentation.kserve",
              "kserve-ratio": "kserve_otel.instrumentation.kserve",
              "kserve2w-instrumented": "kserve_otel.instrumentation.kserve"}.get(kind)
    if module is None:
        return None
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    return None if found else f"{module} is not installed"


def instrument_starlette(app: Any, http_port: int) -> Any:
    """Wrap ``app`` with kserve-otel's ASGI instrumentation, default settings (no span exporter), the endpoint
    on the app's own port: what uvicorn should serve."""
    from kserve_otel.instrumentation.asgi import instrument_app

    return instrument_app(app, http_port=http_port)


def instrument_kserve(http_port: int) -> None:
    """HOOK (KServe): instrument KServe before the ``ModelServer`` starts, as a user would.

    The endpoint goes on the model server's own port, as KServe's default ``prometheus.kserve.io/port``
    annotation says in a pod; no span exporter is configured (the default), so this is the metrics-only cost
    plus whatever the request path adds.
    """
    from kserve_otel.instrumentation.kserve import KServeInstrumentor

    KServeInstrumentor().instrument(metrics_port=http_port, annotations_file="/nonexistent")


def trace_to_receiver(kind: str) -> None:
    """For a traced kind: export every span by OTLP/HTTP to the benchmark's receiver, with the kind's sampler
    (``parentbased_traceidratio`` at 0.1), through the standard variables a user would set."""
    os.environ.update({
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": os.environ["BENCH_OTLP_ENDPOINT"],
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_TRACES_SAMPLER": TRACED[kind],
        "OTEL_TRACES_SAMPLER_ARG": "0.1", "OTEL_SERVICE_NAME": kind,
    })


def contrib_middleware(app: Any) -> Any:
    """What a user would otherwise run: OpenTelemetry contrib's ASGI middleware, spans through the SDK's
    ``BatchSpanProcessor`` and its OTLP/HTTP exporter."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return OpenTelemetryMiddleware(app, tracer_provider=provider)


def passthrough_layer(app: Any) -> Any:
    """An ASGI middleware that does nothing: the cost of one more layer."""

    async def layer(scope: Any, receive: Any, send: Any) -> None:
        await app(scope, receive, send)

    return layer


def status_layer(app: Any) -> Any:
    """The least a middleware recording request durations by status does: time the request and read the
    status from the ``send`` messages (the values are computed and dropped)."""
    from time import perf_counter

    async def layer(scope: Any, receive: Any, send: Any) -> None:
        started = perf_counter()
        status = 500

        def send_reading_status(message: Any) -> Any:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            return send(message)

        try:
            await app(scope, receive, send_reading_status)
        finally:
            _ = (perf_counter() - started, status)

    return layer


# --------------------------------------------------------------------------------------------- servers


def starlette_app(kind: str, port: int) -> Any:
    """The trivial Starlette app of ``kind`` (bare, instrumented or wrapped in a reference layer), as uvicorn
    serves it on ``port`` (benchmarks.instructions drives the same app in process)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse
    from starlette.routing import Route

    async def predict(request: Request) -> JSONResponse:
        return JSONResponse(_predictions(await request.json()))

    async def ready(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app: Any = Starlette(routes=[
        Route(PREDICT_PATH, predict, methods=["POST"]), Route(READY_PATHS["starlette"], ready),
    ])
    if kind in ("starlette-instrumented", "starlette-traced"):
        app = instrument_starlette(app, port)
    elif kind == "starlette-contrib":
        app = contrib_middleware(app)
    elif kind == "starlette-passthrough":
        app = passthrough_layer(app)
    elif kind == "starlette-status-layer":
        app = status_layer(app)
    return app


def serve_starlette(port: int, kind: str) -> None:
    import uvicorn

    uvicorn.run(starlette_app(kind, port), host="127.0.0.1", port=port, log_level="warning", access_log=False,
                lifespan="off")


def serve_kserve(http_port: int, grpc_port: int, instrumented: bool, workers: int = 1) -> None:
    if instrumented:
        instrument_kserve(http_port)
    import kserve

    from examples.sklearn_iris.model import IrisModel

    model = IrisModel(MODEL_NAME)  # the README's example: scikit-learn's iris classifier, trained at start-up
    model.load()
    # KServe's defaults otherwise (latency logging on), as a user runs it.
    kserve.ModelServer(http_port=http_port, grpc_port=grpc_port, enable_grpc=False, workers=workers).start([model])


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0] not in KINDS:
        raise SystemExit(f"usage: BENCH_HTTP_PORT=P [BENCH_GRPC_PORT=Q] python -m benchmarks.servers {{{','.join(KINDS)}}}")
    kind = argv[0]
    http_port = int(os.environ["BENCH_HTTP_PORT"])
    if kind in TRACED:
        trace_to_receiver(kind)
    instrumented = kind.endswith(("-instrumented", "-traced", "-ratio"))
    if kind.startswith("starlette"):
        serve_starlette(http_port, kind)
    else:
        sys.argv = sys.argv[:1]  # import kserve parses sys.argv
        workers = 2 if kind.startswith("kserve2w") else 1
        serve_kserve(http_port, int(os.environ["BENCH_GRPC_PORT"]), instrumented, workers)


if __name__ == "__main__":
    main(sys.argv[1:])
