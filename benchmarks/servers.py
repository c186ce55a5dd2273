"""The servers that :mod:`benchmarks.throughput` drives, each run in a process of its own.

Why a separate module: a server under load must not share its interpreter (its GIL, its garbage collector, its
process-global OpenTelemetry providers) with the load generator or with another server. Each is started as::

    BENCH_HTTP_PORT=P BENCH_GRPC_PORT=Q python -m benchmarks.servers KIND

and answers ``POST /v1/models/iris:predict`` with a KServe v1 body (``{"instances": [...]}``). Ports come from
the environment, not from arguments, because ``import kserve`` parses ``sys.argv`` itself.

Kinds (``KINDS``): ``starlette`` (a trivial Starlette JSON endpoint under uvicorn: the floor of any Python
server) and ``kserve`` (KServe's ``ModelServer`` with a trivial ``kserve.Model``), each plain or
``-instrumented``. The instrumented kinds are hooks: see :func:`instrument_starlette` and
:func:`instrument_kserve`; :func:`pending` says why one cannot run yet.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

MODEL_NAME = "iris"
PREDICT_PATH = f"/v1/models/{MODEL_NAME}:predict"
#: Where each kind answers 200 once it is ready to serve.
READY_PATHS = {"starlette": "/ready", "kserve": f"/v1/models/{MODEL_NAME}"}
KINDS = ("starlette", "starlette-instrumented", "kserve", "kserve-instrumented")
#: The request body: two iris rows, as in KServe's sklearn example.
REQUEST_BODY = b'{"instances": [[6.8, 2.8, 4.8, 1.4], [6.0, 3.4, 4.5, 1.6]]}'


def _predictions(payload: dict[str, Any]) -> dict[str, Any]:
    return {"predictions": [1 for _ in payload["instances"]]}


# --------------------------------------------------------------------------------------------- hooks


def pending(kind: str) -> str | None:
    """Why ``kind`` cannot be benchmarked yet (its instrumentation does not exist), or None when it can."""
    if kind == "starlette-instrumented":
        # HOOK (ASGI): when kserve_otel has ASGI instrumentation, return None here and fill in
        # instrument_starlette() below.
        return "kserve_otel has no ASGI instrumentation yet"
    if kind == "kserve-instrumented":
        try:
            found = importlib.util.find_spec("kserve_otel.instrumentation.kserve") is not None
        except ModuleNotFoundError:
            found = False
        return None if found else "kserve_otel.instrumentation.kserve (KServeInstrumentor) does not exist yet"
    return None


def instrument_starlette(app: Any) -> Any:
    """HOOK (ASGI): wrap ``app`` with kserve-otel's ASGI instrumentation and return what uvicorn should serve."""
    raise NotImplementedError("kserve_otel has no ASGI instrumentation yet")


def instrument_kserve(http_port: int) -> None:
    """HOOK (KServe): instrument KServe before the ``ModelServer`` starts, as a user would.

    The endpoint goes on the model server's own port, as KServe's default ``prometheus.kserve.io/port``
    annotation says in a pod; no span exporter is configured (the default), so this is the metrics-only cost
    plus whatever the request path adds.
    """
    from kserve_otel.instrumentation.kserve import KServeInstrumentor

    KServeInstrumentor().instrument(metrics_port=http_port, annotations_file="/nonexistent")


# --------------------------------------------------------------------------------------------- servers


def serve_starlette(port: int, instrumented: bool) -> None:
    import uvicorn
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
    if instrumented:
        app = instrument_starlette(app)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


def serve_kserve(http_port: int, grpc_port: int, instrumented: bool) -> None:
    if instrumented:
        instrument_kserve(http_port)
    import kserve

    class Iris(kserve.Model):  # type: ignore[misc]
        """A trivial model: the request path of KServe is all there is to time."""

        def __init__(self, name: str) -> None:
            super().__init__(name)
            self.ready = True

        def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
            return _predictions(payload)

    # KServe's defaults otherwise (latency logging on), as a user runs it.
    kserve.ModelServer(http_port=http_port, grpc_port=grpc_port, enable_grpc=False, workers=1).start([Iris(MODEL_NAME)])


def main(argv: list[str]) -> None:
    if len(argv) != 1 or argv[0] not in KINDS:
        raise SystemExit(f"usage: BENCH_HTTP_PORT=P [BENCH_GRPC_PORT=Q] python -m benchmarks.servers {{{','.join(KINDS)}}}")
    kind = argv[0]
    http_port = int(os.environ["BENCH_HTTP_PORT"])
    instrumented = kind.endswith("-instrumented")
    if kind.startswith("starlette"):
        serve_starlette(http_port, instrumented)
    else:
        sys.argv = sys.argv[:1]  # import kserve parses sys.argv
        serve_kserve(http_port, int(os.environ["BENCH_GRPC_PORT"]), instrumented)


if __name__ == "__main__":
    main(sys.argv[1:])
