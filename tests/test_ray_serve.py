"""Ray Serve on a real local Ray cluster, started once for the module: step metrics from real replicas on
Ray's own metrics endpoint, spans across deployments through Serve's tracing, batching, a KServe model on Ray,
OTLP metrics, and the driver-side walk of an application.

The cluster is the module's own, on a loopback node address, whatever ran on the machine before
(``tests/ray_loopback.py``); ``tests/test_ray_multinode.py`` runs a 2-node cluster."""

from __future__ import annotations

import asyncio
import json
import os
import time
import urllib.request
import uuid
from collections import defaultdict

import pytest
from conftest import ROOT, free_port
from otlp_receiver import OTLPReceiver
from prometheus_client.parser import text_string_to_metric_families
from ray_loopback import HEAD_IP, loopback_environment, private_temp_dir, remove_temp_dir

pytestmark = pytest.mark.e2e

import ray
from ray import serve

from kserve_otel.instrumentation.ray_serve import RayServeInstrumentor
from kserve_otel.instrumentation.ray_serve.deployments import deployments_of

ROWS = [[6.8, 2.8, 4.8, 1.4]]


@pytest.fixture(scope="module")
def cluster():
    receiver = OTLPReceiver().__enter__()
    metrics_port, http_port = free_port(), free_port()
    temp_dir = private_temp_dir()
    # Serve's own tracing, exporting (with the steps' spans) to the test's OTLP receiver. Set before ray.init,
    # so that every Ray process (proxy, controller, replicas) sees it.
    saved = dict(os.environ)
    os.environ.update({
        **loopback_environment(),
        "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": "kserve_otel.instrumentation.ray_serve.tracing:otlp_span_processors",
        "RAY_SERVE_TRACING_SAMPLING_RATIO": "1.0",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
    })
    # A cluster of the module's own ("local": never the one /tmp/ray/ray_current_cluster names) on a loopback
    # node address, its files in a directory of its own.
    ray.init(address="local", _node_ip_address=HEAD_IP, _temp_dir=temp_dir, num_cpus=2, include_dashboard=False,
             log_to_driver=False, _metrics_export_port=metrics_port, runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    instrumentor = RayServeInstrumentor()
    instrumentor.instrument()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port})
        from examples.ray_serve import app
        from tests.ray_apps.apps import Doubler, RayIris, echo

        serve.run(app, name="iris", route_prefix="/")
        serve.run(Doubler.bind(), name="batch", route_prefix="/batch")
        serve.run(RayIris.bind(), name="kserve", route_prefix="/kserve")
        serve.run(echo.options(ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": {
            "KSERVE_OTEL_RAY_METRICS": "otlp"}}}).bind(), name="otlp", route_prefix="/otlp")
        yield {"url": f"http://127.0.0.1:{http_port}", "metrics": f"http://{HEAD_IP}:{metrics_port}/metrics",
               "receiver": receiver, "temp_dir": temp_dir}
    finally:
        serve.shutdown()
        ray.shutdown()
        instrumentor.uninstrument()
        os.environ.clear()
        os.environ.update(saved)
        receiver.__exit__(None, None, None)
        remove_temp_dir(temp_dir)


def post(url: str, body: object, headers: dict[str, str] | None = None) -> object:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def ray_counts(cluster, metric: str, wanted: float, **labels: str) -> dict[str, float]:
    """``<metric>_count`` per replica on Ray's metrics endpoint, polled until they add up to ``wanted``
    (Ray exports every few seconds)."""
    deadline = time.monotonic() + 60
    while True:
        with urllib.request.urlopen(cluster["metrics"], timeout=10) as response:
            text = response.read().decode()
        counts: dict[str, float] = defaultdict(float)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == f"{metric}_count" and all(sample.labels.get(k) == v for k, v in labels.items()):
                    counts[sample.labels["replica"]] += sample.value
        if sum(counts.values()) >= wanted or time.monotonic() > deadline:
            return dict(counts)
        time.sleep(1)


def test_the_cluster_is_the_modules_own_on_a_loopback_address(cluster):
    (node,) = ray.nodes()
    assert node["NodeManagerAddress"] == HEAD_IP and node["Alive"]
    assert ray.get_runtime_context().gcs_address.startswith(f"{HEAD_IP}:")
    assert "session_latest" in os.listdir(cluster["temp_dir"])  # its sessions and logs are not /tmp/ray's


def test_step_counts_from_both_replicas_add_up_to_the_requests(cluster):
    requests = 30
    for _ in range(requests):
        assert post(cluster["url"] + "/", {"instances": ROWS}) == {"predictions": [1]}
    counts = ray_counts(cluster, "ray_request_predict_seconds", requests, model_name="iris",
                        deployment="IrisClassifier", application="iris")
    assert len(counts) == 2, f"both replicas report: {counts}"
    assert sum(counts.values()) == requests
    preprocess = ray_counts(cluster, "ray_request_preprocess_seconds", requests, deployment="Preprocessor")
    assert sum(preprocess.values()) == requests


def test_one_trace_across_the_preprocessor_and_the_model(cluster):
    trace_id = uuid.uuid4().hex
    traceparent = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"
    post(cluster["url"] + "/", {"instances": ROWS}, headers={"traceparent": traceparent})
    receiver = cluster["receiver"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spans = {s.span_id: s for s in receiver.spans() if s.trace_id.hex() == trace_id}
        names = {s.name for s in spans.values()}
        if {"preprocess iris", "predict iris", "postprocess iris"} <= names:
            break
        time.sleep(0.2)
    by_name = defaultdict(list)
    for span in spans.values():
        by_name[span.name].append(span)
    assert {"preprocess iris", "predict iris", "postprocess iris"} <= set(by_name), sorted(by_name)

    def ancestors(span) -> list[str]:
        chain = []
        while span.parent_span_id in spans:
            span = spans[span.parent_span_id]
            chain.append(span.name)
        return chain

    predict_chain = ancestors(by_name["predict iris"][0])
    # The model's step sits under the model replica's request span, which sits under the preprocessor's.
    assert any("IrisClassifier" in name for name in predict_chain), predict_chain
    assert any("Preprocessor" in name for name in predict_chain), predict_chain
    assert any("Preprocessor" in name for name in ancestors(by_name["preprocess iris"][0]))


def test_batch_execution_size_and_queue_wait(cluster):
    async def burst() -> list[object]:
        loop = asyncio.get_running_loop()
        return await asyncio.gather(*(loop.run_in_executor(None, post, cluster["url"] + "/batch", n)
                                      for n in range(16)))

    assert sorted(asyncio.run(burst())) == [2 * n for n in range(16)]
    predict = ray_counts(cluster, "ray_request_predict_seconds", 16, model_name="doubler")
    assert sum(predict.values()) == 16  # one predict step per request
    waits = ray_counts(cluster, "ray_request_batch_wait_seconds", 16, model_name="doubler")
    assert sum(waits.values()) == 16  # each request's wait in the queue
    batches = ray_counts(cluster, "ray_request_batch_execution_seconds", 2, model_name="doubler")
    sizes = ray_counts(cluster, "ray_request_batch_size", 2, model_name="doubler")
    assert 2 <= sum(batches.values()) < 16, "requests were batched"
    assert sum(sizes.values()) == sum(batches.values())


def test_a_kserve_model_deployed_on_ray_records_its_steps_in_the_replica(cluster):
    handle = serve.get_app_handle("kserve")
    response, _ = handle.remote({"instances": ROWS}).result(timeout_s=60)
    assert response == {"predictions": [1]}
    for step in ("preprocess", "predict", "postprocess"):
        counts = ray_counts(cluster, f"ray_request_{step}_seconds", 1, model_name="iris-on-ray")
        assert sum(counts.values()) == 1, step


def test_otlp_mode_pushes_step_metrics_with_the_replica_as_resource(cluster):
    assert post(cluster["url"] + "/otlp", {"x": 1}) == {"x": 1}
    receiver = cluster["receiver"]
    deadline = time.monotonic() + 30
    points = []
    while time.monotonic() < deadline:
        points = [(rm.resource, p) for request in receiver.metrics for rm in request.resource_metrics
                  for sm in rm.scope_metrics for m in sm.metrics if m.name == "request_predict"
                  for p in m.histogram.data_points]
        if points:
            break
        time.sleep(0.2)
    assert points, "the replica pushed its step histogram over OTLP"
    resource, point = points[-1]
    attributes = {a.key: a.value.string_value for a in resource.attributes}
    assert attributes["ray.serve.deployment"] == "echo"
    assert attributes["ray.serve.application"] == "otlp"
    assert {a.key: a.value.string_value for a in point.attributes} == {"model_name": "echo"}
    assert point.count >= 1


def test_the_driver_walks_the_whole_application():
    from examples.ray_serve import app

    instrumented = RayServeInstrumentor().instrument_application(app)
    deployments = deployments_of(instrumented)
    assert [d.name for d in deployments] == ["Preprocessor", "IrisClassifier"]
    for deployment in deployments:
        assert deployment.ray_actor_options["runtime_env"]["env_vars"]["KSERVE_OTEL_ENABLED"] == "true"
    assert deployments[1].num_replicas == 2  # the rest of the deployment's options are kept


#: The dashboard's Ray Serve row (integrations/grafana): evaluated here, where a Ray cluster exports data.
RAY_PANELS = ("Predict p99 per replica (ms)", "Queries being processed per replica",
              "Replica processing latency p99 (ms)")


def test_the_dashboards_ray_serve_panels_have_data_in_prometheus(cluster, tmp_path):
    import threading

    from conftest import PrometheusProcess, wait_until
    from dashboard import dashboard, dashboard_queries, substitute

    queries = [(title, expr) for title, _, expr in dashboard_queries(dashboard()) if title in RAY_PANELS]
    assert {title for title, _ in queries} == set(RAY_PANELS)
    metrics = cluster["metrics"].removeprefix("http://").removesuffix("/metrics")
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "ray-nodes", "static_configs": [
            {"targets": [metrics], "labels": {"namespace": "ray-test"}}]}],
    }))
    prometheus = PrometheusProcess(config, tmp_path)
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            post(cluster["url"] + "/", {"instances": ROWS})
            time.sleep(0.05)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        wait_until(prometheus.ready, "Prometheus to be ready")
        values = {"namespace": "ray-test", "model": "(iris)", "__rate_interval": "1m"}

        def has_data(expr: str) -> bool:
            result = prometheus.query(substitute(expr, values))
            assert result["status"] == "success", result
            return any(sample["value"][1] != "NaN" for sample in result["data"]["result"])

        for title, expr in queries:  # Ray exports every few seconds; rate() needs two changed scrapes
            wait_until(lambda: has_data(expr), f"data for the panel {title!r}", timeout=90)
    finally:
        stop.set()
        sender.join(timeout=30)
        prometheus.stop()
