"""A KServe transformer in front of the iris predictor, instrumented: one trace spans both servers.

Run the predictor, then the transformer pointing at it (KServe's own ``--predictor_host`` flag):

    python -m examples.sklearn_iris.serve --http_port 8085 --grpc_port 8086
    python -m examples.transformer_predictor.transformer --http_port 8080 --grpc_port 8081 \\
        --predictor_host 127.0.0.1:8085
    curl -s localhost:8080/v1/models/iris:predict -H 'content-type: application/json' \\
        -d '{"instances": [[6.84, 2.81, 4.8, 1.4]]}'

The transformer's ``preprocess`` is its own; its ``predict`` is KServe's, which calls the predictor over REST.
kserve-otel writes the trace context into that call, so with a trace exporter on both sides (for example
``OTEL_TRACES_EXPORTER=console``) the predictor's request span is a child of the transformer's predict span.
"""

from __future__ import annotations

from typing import Any

import kserve

from kserve_otel.instrumentation.kserve import KServeInstrumentor


class IrisTransformer(kserve.Model):
    """Rounds the features to one decimal, as the iris data set has them; KServe's predict does the rest."""

    def __init__(self, name: str = "iris") -> None:
        super().__init__(name)
        self.ready = True

    def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        return {"instances": [[round(x, 1) for x in row] for row in payload["instances"]]}


def main() -> None:
    KServeInstrumentor().instrument(print_summary=True)
    kserve.ModelServer().start([IrisTransformer("iris")])


if __name__ == "__main__":
    main()
