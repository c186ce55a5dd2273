"""Serves iris for the uninstrument test, with two routes of the test's own on KServe's app that switch the
instrumentation off and on in the running server (on its event loop, between requests):

    python -m tests.kserve_e2e.uninstrument_serve [KServe's own flags: --http_port ... --grpc_port ...]

    POST /test/uninstrument    KServeInstrumentor().uninstrument()
    POST /test/instrument      KServeInstrumentor().instrument()
"""

from __future__ import annotations

import sys

import kserve
import kserve.model_server

from examples.sklearn_iris.model import IrisModel
from kserve_otel.instrumentation.kserve import KServeInstrumentor


def main() -> None:
    instrumentor = KServeInstrumentor()  # one per process: OpenTelemetry instrumentors are singletons
    instrumentor.instrument(print_summary=True)
    app = kserve.model_server.app

    @app.post("/test/uninstrument")
    async def uninstrument() -> dict[str, bool]:
        instrumentor.uninstrument()
        return {"instrumented": instrumentor.is_instrumented_by_opentelemetry}

    @app.post("/test/instrument")
    async def instrument() -> dict[str, bool]:
        instrumentor.instrument()
        return {"instrumented": instrumentor.is_instrumented_by_opentelemetry}

    model = IrisModel("iris")
    model.load()
    print("serving iris", file=sys.stderr, flush=True)
    kserve.ModelServer().start([model])


if __name__ == "__main__":
    main()
