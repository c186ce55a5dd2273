"""Serves the ``kserve-otel report`` tests' models (``tests/report_models.py``, and the failing model of the
KServe end-to-end tests) in a process of its own, instrumented, with resource metrics on.

    python -m tests.report_serve [KServe's own flags: --http_port ... --enable_grpc false ...]

GPU metrics come from whatever ``pynvml`` imports first: the tests put ``tests/fake_nvml`` on PYTHONPATH. KServe
binds its REST server to 0.0.0.0; here it binds 127.0.0.1 only (the tests also turn gRPC off).
"""

from __future__ import annotations

import sys

import kserve

import kserve_otel
from kserve_otel.instrumentation.kserve import KServeInstrumentor
from kserve_otel.export.resource_metrics import enable_resource_metrics

from .kserve_e2e.models import FailingModel
from .report_models import QuickModel, SlowPreprocessModel


def _loopback_only() -> None:
    import uvicorn

    original = uvicorn.Config.__init__

    def loopback(self, app, *args, **kwargs):  # type: ignore[no-untyped-def]
        kwargs["host"] = "127.0.0.1"
        original(self, app, *args, **kwargs)

    uvicorn.Config.__init__ = loopback  # type: ignore[method-assign]


def main() -> None:
    _loopback_only()
    KServeInstrumentor().instrument()
    telemetry = kserve_otel.configure()  # the endpoint stays on the model server's port (the instrumentor's)
    enable_resource_metrics(telemetry.meter_provider)  # idempotent: configure() may do it itself one day
    print("serving slow, quick, failing", file=sys.stderr, flush=True)
    kserve.ModelServer().start([SlowPreprocessModel(), QuickModel(), FailingModel()])


if __name__ == "__main__":
    main()
