"""Series one Ray node exports, per Ray Serve replica instrumented by kserve-otel and for the node itself: the
numbers behind the sizing advice of the README ("Ray Serve: every replica").

    .venv/bin/python -m benchmarks.ray_series [--models 4] [--steps 3] [--replicas 2] [--requests 40]

Starts a one-node Ray cluster of its own (node address 127.0.0.2, a private temporary directory, Ray's default
metrics export interval), scrapes the node's metrics endpoint before Serve starts, then deploys one deployment
of ``--replicas`` replicas whose every request runs ``--steps`` steps for each of ``--models`` model names,
sends ``--requests`` requests, waits until Ray has exported all of them, and counts the endpoint's series
(sample lines) by origin:

* kserve-otel's step histograms (``ray_request_*``), per replica;
* Ray Serve's own series labelled with the replica (latency histograms, counters, queue gauges), per replica;
* Ray's per-process series of each replica's worker process (labelled with its ``WorkerId`` only);
* everything else: Ray's node, raylet and agent series, Serve's controller and proxy.

It prints one Markdown table. Counts depend on Ray's version (2.60 here) and grow with Serve's routes and
error types; kserve-otel's part is exact: 17 series per (model, step) and replica with the default buckets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict

NODE_IP = "127.0.0.2"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("preprocess", "predict", "postprocess", "explain", "tokenize", "rerank")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(url: str) -> tuple[str, float]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    return text, time.perf_counter() - started


def _samples(text: str) -> list[tuple[str, dict[str, str]]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [(s.name, dict(s.labels)) for f in text_string_to_metric_families(text) for s in f.samples]


def _identity(value: object) -> object:
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, choices=range(1, len(STEPS) + 1))
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=40)
    options = parser.parse_args()

    os.environ.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    import ray
    from ray import serve

    from kserve_otel import instrument_step
    from kserve_otel.instrumentation.ray_serve import RayServeInstrumentor

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    metrics_port, http_port = _free_port(), _free_port()
    url = f"http://{NODE_IP}:{metrics_port}/metrics"
    try:
        ray.init(address="local", _node_ip_address=NODE_IP, _temp_dir=temp_dir, num_cpus=2, include_dashboard=False,
                 log_to_driver=False, _metrics_export_port=metrics_port,
                 runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
        time.sleep(15)  # Ray's first exports of its own series
        baseline = _samples(_scrape(url)[0])
        RayServeInstrumentor().instrument()
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})

        @serve.deployment(num_replicas=options.replicas, ray_actor_options={"num_cpus": 0})
        class Sized:
            """Every request: each step of each model once (``__call__`` is the first; the class declaring a
            step, the ``ray_steps`` default adds none)."""

            def __init__(self, models: int, steps: int) -> None:
                self.calls = [instrument_step(step, model_name=f"model-{m}")(_identity)
                              for m in range(models) for step in STEPS[:steps]][1:]

            @instrument_step(STEPS[0], model_name="model-0")
            def __call__(self, request: object) -> str:
                for call in self.calls:
                    call(1)
                return "ok"

        serve.run(Sized.bind(options.models, options.steps), name="sized", route_prefix="/")
        for _ in range(options.requests):
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=60) as response:
                response.read()
        first = f"{STEPS[0]}_seconds_count"
        deadline = time.monotonic() + 60
        while True:
            text, seconds = _scrape(url)
            samples = _samples(text)
            done = sum(1 for name, labels in samples
                       if name == f"ray_request_{first}" and labels.get("model_name") == "model-0")
            counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                          if line.startswith(f"ray_request_{first}{{") and 'model_name="model-0"' in line)
            if (done == options.replicas and counted >= options.requests) or time.monotonic() > deadline:
                break
            time.sleep(1)
        time.sleep(12)  # one more export of every series (Serve's gauges included)
        text, seconds = _scrape(url)
        samples = _samples(text)
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        finally:
            shutil.rmtree(temp_dir, ignore_errors=True)

    replica_workers = {labels["WorkerId"] for name, labels in samples
                       if name.startswith("ray_request_") and "WorkerId" in labels}
    per_replica: dict[str, Counter[str]] = defaultdict(Counter)
    worker_replica = {labels["WorkerId"]: labels["replica"] for name, labels in samples
                      if name.startswith("ray_request_") and "WorkerId" in labels}
    rest = 0
    for name, labels in samples:
        if name.startswith("ray_request_"):
            per_replica[labels["replica"]]["kserve-otel steps"] += 1
        elif labels.get("replica") and labels.get("application") == "sized":
            per_replica[labels["replica"]]["Ray Serve, per replica"] += 1
        elif labels.get("WorkerId") in replica_workers:
            per_replica[worker_replica[labels["WorkerId"]]]["Ray, the replica's worker process"] += 1
        else:
            rest += 1
    print(json.dumps({"models": options.models, "steps": options.steps, "replicas": options.replicas,
                      "requests": options.requests}))
    print("| series on the node's endpoint | count |\n|---|---|")
    print(f"| before Serve (Ray's node, raylet, agent) | {len(baseline)} |")
    for replica, counts in sorted(per_replica.items()):
        for origin, count in counts.items():
            print(f"| replica {replica}: {origin} | {count} |")
        print(f"| replica {replica}: total | {sum(counts.values())} |")
    print(f"| everything else (node, Serve's controller and proxy) | {rest} |")
    print(f"| total | {len(samples)} |")
    print(f"| scrape: {len(text.encode()) / 1024:.0f} KiB in {seconds * 1000:.0f} ms | |")


if __name__ == "__main__":
    main()
