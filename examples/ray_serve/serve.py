"""Run the Ray Serve iris application on a local Ray cluster, instrumented, until Ctrl-C.

    python -m examples.ray_serve.serve [--port 8000] [--metrics-port 8080]

The step metrics of both replicas appear on Ray's metrics endpoint (``--metrics-port``), as
``ray_request_predict_seconds{model_name="iris", deployment=..., replica=...}``, after Ray's export delay
(about ten seconds). Or, equivalently: ``kserve-otel-run examples.ray_serve:app``.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

import ray
from ray import serve

from kserve_otel.instrumentation.ray_serve import RayServeInstrumentor

from .app import app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8080)
    options = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    ray.init(num_cpus=2, include_dashboard=False, _metrics_export_port=options.metrics_port,
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    RayServeInstrumentor().instrument()
    serve.start(http_options={"host": "0.0.0.0", "port": options.port})
    serve.run(app)
    print(f"iris on http://127.0.0.1:{options.port}/ ; step metrics on "
          f"http://127.0.0.1:{options.metrics_port}/metrics (ray_request_<step>_seconds)", flush=True)
    stopped = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
