"""Serves models for the KServe end-to-end tests, in a process of its own.

    python -m kserve_e2e.serve --models iris,echo [--bare] [KServe's own flags: --http_port ... --workers ...]

Instrumented by ``KServeInstrumentor().instrument()`` unless ``--bare``; settings come from the environment
the test gives (``KSERVE_OTEL_*``, ``OTEL_*``).
"""

from __future__ import annotations

import argparse
import sys

import kserve

from examples.sklearn_iris.model import IrisModel

from examples.transformer_predictor.transformer import IrisTransformer

from .models import EchoModel, FailingModel, StallingModel, StreamingModel

MODELS = {
    "iris": IrisModel, "echo": EchoModel, "failing": FailingModel, "stream": StreamingModel,
    "stall": StallingModel, "transformer": IrisTransformer,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", required=True)
    parser.add_argument("--bare", action="store_true")
    options, _ = parser.parse_known_args()
    if not options.bare:
        from kserve_otel.instrumentation.kserve import KServeInstrumentor

        KServeInstrumentor().instrument(print_summary=True)
    models = []
    for name in options.models.split(","):
        model = MODELS[name]()
        model.load()
        models.append(model)
    print("serving", options.models, file=sys.stderr, flush=True)
    kserve.ModelServer().start(models)


if __name__ == "__main__":
    main()
