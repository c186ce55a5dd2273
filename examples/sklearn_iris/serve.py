"""Serve the iris model with KServe and full kserve-otel instrumentation (the README's main job).

    python -m examples.sklearn_iris.serve [--http_port 8080] [--grpc_port 8081] [--workers 1]

KServe reads its own flags from the command line. Where metrics and traces go is printed at start: with the
defaults, ``http://127.0.0.1:8080/metrics`` on the model server's own port, as KServe's annotations say.
Settings come from ``KSERVE_OTEL_*``/``OTEL_*`` variables and pod annotations (README, "Settings"); for
example ``OTEL_TRACES_EXPORTER=console`` prints every request's spans.

Try it:

    curl -s localhost:8080/v1/models/iris:predict -H 'content-type: application/json' \
        -d '{"instances": [[6.8, 2.8, 4.8, 1.4]]}'
    curl -s localhost:8080/metrics | grep request_predict_seconds_count
"""

from __future__ import annotations

import kserve

from kserve_otel.instrumentation.kserve import KServeInstrumentor

from .model import IrisModel


def main() -> None:
    KServeInstrumentor().instrument(print_summary=True)
    model = IrisModel("iris")
    model.load()
    kserve.ModelServer().start([model])


if __name__ == "__main__":
    main()
