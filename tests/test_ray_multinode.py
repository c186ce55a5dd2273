"""Ray Serve on a real 2-node Ray cluster on this machine: the head on 127.0.0.2, a second node on 127.0.0.3,
each a ``ray start --block`` process with its own metrics export port, one replica of the scorer on each.

What operators of a real cluster rely on: every replica on every node instrumented; the step counts of both
nodes' Ray metrics endpoints adding up exactly to the requests sent, each series labelled with its replica and
node; one trace across deployments on different nodes; a real Prometheus finding every node from Ray's own
service-discovery file (``integrations/prometheus/ray-file-sd.yml``) and the dashboard's Ray Serve panels
answering for both; churn (a replica killed, the second node stopped) never making a series go down, and
``kserve-otel report --prometheus`` saying what stopped reporting and which deployment's step is slow; and a
driver that never instrumented Ray Serve still getting its decorated steps into Ray's metrics.

The tests run in file order on one cluster: the churn tests come last, the node stop at the very end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, PrometheusProcess, free_port, wait_until
from otlp_receiver import OTLPReceiver
from prometheus_client.parser import text_string_to_metric_families
from ray_loopback import (HEAD_IP, WORKER_IP, RayNode, loopback_environment, private_temp_dir, remove_temp_dir,
                          stop_nodes)

pytestmark = pytest.mark.e2e

import ray
from ray import serve

from kserve_otel.instrumentation.ray_serve import RayServeInstrumentor

FILE_SD_CONFIG = Path(ROOT) / "integrations" / "prometheus" / "ray-file-sd.yml"
RULES = Path(ROOT) / "integrations" / "prometheus" / "kserve-otel-rules.yaml"
DISCOVERY_FILE = "prom_metrics_service_discovery.json"
APP = "ranker"
REQUESTS = 40
#: kserve-otel's KServe buckets: 14 bounds, +Inf, _count and _sum make a step's series per model and replica.
SERIES_PER_STEP = 14 + 1 + 2


@dataclass
class Cluster:
    head: RayNode
    worker: RayNode
    temp_dir: str
    url: str
    receiver: OTLPReceiver

    def live_nodes(self) -> list[RayNode]:
        return [node for node in (self.head, self.worker) if node.process.poll() is None]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    receiver = OTLPReceiver().__enter__()
    temp_dir = private_temp_dir()
    env = {
        **loopback_environment(),
        # Serve's own tracing in every Ray process of both nodes, exporting (with the steps' spans) to the receiver.
        "RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH": "kserve_otel.instrumentation.ray_serve.tracing:otlp_span_processors",
        "RAY_SERVE_TRACING_SAMPLING_RATIO": "1.0",
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    saved = dict(os.environ)
    nodes: list[RayNode] = []
    instrumentor = RayServeInstrumentor()
    try:
        head = RayNode(HEAD_IP, temp_dir, env, dashboard=True)
        nodes.append(head)
        worker = RayNode(WORKER_IP, temp_dir, env, head_address=head.address)
        nodes.append(worker)
        os.environ.update(env)
        wait_until(head.answers, "the head's metrics endpoint", timeout=120)
        wait_until(worker.answers, "the second node's metrics endpoint", timeout=120)
        ray.init(address=head.address, _node_ip_address=HEAD_IP, log_to_driver=False)
        wait_until(lambda: sum(node["Alive"] for node in ray.nodes()) == 2, "both nodes in the cluster", timeout=60)
        instrumentor.instrument()
        http_port = free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": HEAD_IP, "port": http_port})
        from tests.ray_apps.multinode import ranker

        serve.run(ranker, name=APP, route_prefix="/")
        yield Cluster(head, worker, temp_dir, f"http://{HEAD_IP}:{http_port}", receiver)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        if instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.uninstrument()
        stop_nodes(nodes)
        _forget_serve_client()
        os.environ.clear()
        os.environ.update(saved)
        receiver.__exit__(None, None, None)
        remove_temp_dir(temp_dir)


def _forget_serve_client() -> None:
    """Serve caches its client of the cluster in the driver; the next test module starts a cluster of its own."""
    from ray.serve.context import _set_global_client

    _set_global_client(None)


# ------------------------------------------------------------------------------------------------ helpers


def post(url: str, body: object, headers: dict[str, str] | None = None) -> object:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def cumulative(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the counters and histograms in ``text``, by name and labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        if family.type in ("counter", "histogram"):
            for sample in family.samples:
                if not sample.name.endswith("_created"):
                    found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def step_counts(nodes: list[RayNode], step: str, **labels: str) -> dict[tuple[str, str, str], float]:
    """``ray_request_<step>_seconds_count`` on each node's endpoint, by (endpoint's node, NodeAddress, replica)."""
    counts: dict[tuple[str, str, str], float] = defaultdict(float)
    for node in nodes:
        for name, sample_labels, value in samples(node.metrics()):
            wanted = all(sample_labels.get(k) == v for k, v in labels.items())
            if name == f"ray_request_{step}_seconds_count" and wanted:
                counts[(node.ip, sample_labels.get("NodeAddress", ""), sample_labels["replica"])] += value
    return dict(counts)


def replicas(app: str) -> dict[str, tuple[str, str, str]]:
    """Alive replicas of ``app``: replica id -> (deployment, node address, actor name), from Ray's state API."""
    from ray.util.state import list_actors

    addresses = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
    found = {}
    for actor in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        kind, _, rest = (actor.class_name or "").partition(":")
        if kind == "ServeReplica" and rest.startswith(f"{app}:"):
            found[actor.name.rsplit("#", 1)[1]] = (rest.split(":", 1)[1], addresses[actor.node_id], actor.name)
    return found


class Traffic:
    """Requests to the ranker until stopped (some fail while a replica or a node goes away)."""

    def __init__(self, url: str) -> None:
        self.url, self.ok, self.failed = url, 0, 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                post(self.url, {"features": [1, 2]})
                self.ok += 1
            except OSError:
                self.failed += 1
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=70)


@pytest.fixture(scope="module")
def traffic(cluster) -> Iterator[Traffic]:
    sender = Traffic(cluster.url + "/")
    try:
        yield sender
    finally:
        sender.stop()


def prometheus_config(cluster: Cluster, tmp: Path) -> Path:
    """The example ``ray-file-sd.yml`` as it is, but for this cluster's temporary directory and with 1 s intervals."""
    config = yaml.safe_load(FILE_SD_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    (job,) = config["scrape_configs"]
    (sd,) = job["file_sd_configs"]
    assert sd["files"] == [f"/tmp/ray/session_latest/{DISCOVERY_FILE}"], "the example reads Ray's default place"
    sd["files"] = [os.path.join(cluster.temp_dir, "session_latest", DISCOVERY_FILE)]
    path = tmp / "prometheus.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


@pytest.fixture(scope="module")
def prometheus(cluster, tmp_path_factory) -> Iterator[PrometheusProcess]:
    tmp = tmp_path_factory.mktemp("prometheus-ray")
    server = PrometheusProcess(prometheus_config(cluster, tmp), tmp)
    try:
        wait_until(server.ready, "Prometheus to be ready")
        yield server
    finally:
        server.stop()


def active_targets(prometheus: PrometheusProcess) -> dict[str, dict]:
    return {t["labels"]["instance"]: t for t in prometheus.api("targets")["data"]["activeTargets"]
            if t["labels"].get("job") == "ray"}


def report(prometheus: PrometheusProcess, *args: str) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("kserve-otel")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "kserve_otel.cli.main"]
    return subprocess.run([*command, "report", "--prometheus", prometheus.url, "--selector", 'job="ray"',
                           "--interval", "1m", *args], capture_output=True, text=True, cwd=ROOT, timeout=60)


def healthy_lately(prometheus: PrometheusProcess, replicas: set[str]) -> list:
    """Which of ``replicas`` Serve reported healthy in the last quarter of the report's 1 m window (what the
    report asks: the gauge comes and goes between the controller's health checks)."""
    matcher = "|".join(replicas)
    expr = f'max_over_time(ray_serve_deployment_replica_healthy{{replica=~"{matcher}"}}[15s]) == 1'
    return prometheus.query(expr)["data"]["result"]


def never_decreased(before: dict, after: dict) -> list[str]:
    return [f"{name}{dict(labels)}: {before[(name, labels)]} -> {after[(name, labels)]}"
            for name, labels in before.keys() & after.keys() if after[(name, labels)] < before[(name, labels)]]


# -------------------------------------------------------------------------------------------------- tests


def test_every_replica_on_every_node_is_instrumented_and_the_counts_add_up(cluster):
    placed = replicas(APP)
    scorers = {replica: node for replica, (deployment, node, _) in placed.items() if deployment == "Scorer"}
    assert sorted(scorers.values()) == [HEAD_IP, WORKER_IP], f"one scorer replica on each node: {placed}"
    nodes = [cluster.head, cluster.worker]
    before = step_counts(nodes, "predict", application=APP, deployment="Scorer")
    for n in range(REQUESTS):
        assert post(cluster.url + "/", {"features": [n, 1]}) == {"score": n + 1.0}

    def sent() -> float:
        return sum(step_counts(nodes, "predict", application=APP, deployment="Scorer").values()) - sum(before.values())

    wait_until(lambda: sent() >= REQUESTS, "Ray to export the predict counts of both nodes", timeout=60)
    after = step_counts(nodes, "predict", application=APP, deployment="Scorer")
    assert sum(after.values()) - sum(before.values()) == REQUESTS
    by_replica = {}
    for (endpoint, node_address, replica), count in after.items():
        assert endpoint == node_address == scorers[replica], "each replica's series is on its own node's endpoint"
        by_replica[replica] = count - before.get((endpoint, node_address, replica), 0.0)
    assert set(by_replica) == set(scorers) and all(count > 0 for count in by_replica.values()), by_replica
    # The ingress replica's own steps, on its node: every request went through each once.
    gateways = {(node, node, replica) for replica, (deployment, node, _) in placed.items() if deployment == "Gateway"}
    for step in ("preprocess", "postprocess"):
        wait_until(lambda: sum(step_counts(nodes, step, application=APP).values()) >= REQUESTS,
                   f"the gateway's {step} counts", timeout=60)
        gateway = step_counts(nodes, step, application=APP)
        assert set(gateway) == gateways and sum(gateway.values()) == REQUESTS, gateway


def test_each_step_of_each_model_costs_a_fixed_number_of_series_per_replica(cluster):
    for node in (cluster.head, cluster.worker):
        per_series: dict[tuple[str, str, str], int] = defaultdict(int)
        for name, labels, _ in samples(node.metrics()):
            if name.startswith("ray_request_") and labels.get("application") == APP:
                per_series[(name.rsplit("_seconds", 1)[0], labels["model_name"], labels["replica"])] += 1
        assert per_series and set(per_series.values()) == {SERIES_PER_STEP}, dict(per_series)


def test_one_trace_crosses_deployments_on_both_nodes(cluster):
    """The ingress runs on the head; a request whose scorer replica is on the other node gives one trace with
    replica spans from both nodes (the router picks the replica: a few requests find one)."""
    placed = replicas(APP)
    receiver = cluster.receiver
    for _ in range(30):
        trace_id = uuid.uuid4().hex
        post(cluster.url + "/", {"features": [1]}, headers={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"})

        def spans() -> dict[bytes, object]:
            return {s.span_id: s for s in receiver.spans() if s.trace_id.hex() == trace_id}

        wait_until(lambda: {"predict ranker", "postprocess ranker"} <= {s.name for s in spans().values()},
                   "the trace's step spans", timeout=30)
        trace = spans()
        replica_nodes = {placed[attribute.value.string_value][1]
                         for span in trace.values() for attribute in span.attributes if attribute.key == "replica_id"}
        if replica_nodes == {HEAD_IP, WORKER_IP}:
            break
    else:
        pytest.fail("no request of 30 reached the scorer on the second node")
    (predict,) = [span for span in trace.values() if span.name == "predict ranker"]
    chain, span = [], predict
    while span.parent_span_id in trace:
        span = trace[span.parent_span_id]
        chain.append(span.name)
    # The scorer's step under its replica's request span, under the gateway's, on the other node.
    assert any("Scorer" in name for name in chain) and any("Gateway" in name for name in chain), chain


def test_prometheus_finds_both_nodes_in_rays_discovery_file_and_the_panels_answer_for_both(cluster, prometheus,
                                                                                         traffic):
    from dashboard import dashboard, dashboard_queries, substitute
    from test_ray_serve import RAY_PANELS

    endpoints = {f"{node.ip}:{node.metrics_port}" for node in (cluster.head, cluster.worker)}
    discovered = json.loads(Path(cluster.temp_dir, "session_latest", DISCOVERY_FILE).read_text())
    assert endpoints <= {target for group in discovered for target in group["targets"]}
    wait_until(lambda: all(active_targets(prometheus).get(e, {}).get("health") == "up" for e in endpoints),
               "Prometheus to scrape both nodes it discovered", timeout=60)
    assert {active_targets(prometheus)[e]["labels"]["ray_io_cluster"] for e in endpoints} == {"ray-cluster"}

    placed = replicas(APP)
    queries = [(title, expr) for title, _, expr in dashboard_queries(dashboard()) if title in RAY_PANELS]
    assert {title for title, _ in queries} == set(RAY_PANELS)
    values = {"namespace": ".*", "model": f"({APP})", "__rate_interval": "1m"}  # Grafana's "All" is .*

    def nodes_with_numbers(expr: str) -> set[str]:
        result = prometheus.query(substitute(expr, values))
        assert result["status"] == "success", result
        return {placed[sample["metric"]["replica"]][1] for sample in result["data"]["result"]
                if sample["metric"].get("deployment") == "Scorer" and sample["value"][1] != "NaN"}

    for title, expr in queries:  # rate() needs two changed exports of Ray's (every 2 s here) in the window
        wait_until(lambda: nodes_with_numbers(expr) == {HEAD_IP, WORKER_IP},
                   f"numbers for both nodes in the panel {title!r}", timeout=90)


def test_steps_reach_rays_metrics_when_the_driver_did_not_instrument_ray_serve(cluster):
    """A new user's driver calls ``kserve_otel.configure()`` and ``serve.run`` only: the replica's decorated
    steps still reach its node's Ray metrics endpoint, and the replica's log says once what was missing."""
    env = {**os.environ, "KSERVE_OTEL_METRICS_HOST": "127.0.0.1", "KSERVE_OTEL_METRICS_PORT": str(free_port()),
           "KSERVE_OTEL_ANNOTATIONS_FILE": "/nonexistent"}
    env.pop("KSERVE_OTEL_ENABLED", None)
    driver = subprocess.run([sys.executable, "-m", "tests.ray_apps.unconfigured_driver", cluster.head.address,
                             HEAD_IP, "/unconfigured"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert driver.returncode == 0, driver.stderr[-3000:]
    for x in range(5):
        assert post(cluster.url + "/unconfigured", {"x": x}) == {"y": x + 1}
    nodes = cluster.live_nodes()
    for step in ("preprocess", "predict"):
        wait_until(lambda: sum(step_counts(nodes, step, model_name="unconfigured").values()) >= 5,
                   f"the unconfigured deployment's {step} steps on Ray's metrics endpoint", timeout=60)
        assert sum(step_counts(nodes, step, model_name="unconfigured").values()) == 5
    (log,) = Path(cluster.temp_dir, "session_latest", "logs", "serve").glob("replica_unconfigured_Unconfigured_*.log")
    lines = [line for line in log.read_text().splitlines() if "RayServeInstrumentor().instrument()" in line]
    assert len(lines) == 1, lines
    assert "ray_request_<step>_seconds" in lines[0] and "Unconfigured" in lines[0]


def test_a_killed_replica_is_replaced_no_series_decreases_and_the_report_names_it(cluster, prometheus, traffic):
    placed = replicas(APP)
    (victim,) = [replica for replica, (deployment, node, _) in placed.items()
                 if deployment == "Scorer" and node == WORKER_IP]
    before = {node.ip: cumulative(node.metrics()) for node in (cluster.head, cluster.worker)}
    ray.kill(ray.get_actor(placed[victim][2], namespace="serve"), no_restart=True)

    def replacement() -> str | None:
        new = [r for r, (deployment, node, _) in replicas(APP).items()
               if deployment == "Scorer" and node == WORKER_IP and r != victim]
        return new[0] if new else None

    wait_until(lambda: replacement() is not None, "Serve to replace the killed replica", timeout=90)
    fresh = replacement()
    wait_until(lambda: any(replica == fresh for _, _, replica in step_counts([cluster.worker], "predict")),
               "the replacement's predict steps on its node's endpoint", timeout=60)
    for node in (cluster.head, cluster.worker):
        assert not never_decreased(before[node.ip], cumulative(node.metrics())), node.ip

    wait_until(lambda: not healthy_lately(prometheus, {victim}), "no healthy sample of the killed replica in the "
               "report's last quarter window", timeout=60)
    finished = report(prometheus, "--json")
    assert finished.returncode == 0, finished.stderr
    doc = json.loads(finished.stdout)
    stopped = {item["name"]: item for item in doc["server"]["stopped_reporting"]}
    assert stopped[victim]["kind"] == "replica" and stopped[victim]["node"] == WORKER_IP, stopped
    assert stopped[victim]["deployment"] == "Scorer" and stopped[victim]["application"] == APP
    assert fresh in replicas(APP) and not set(replicas(APP)) & set(stopped), stopped  # the living still report
    finding = next(f for f in doc["verdict"]["findings"] if f["check"] == "reporting")
    assert finding["status"] == "problem" and victim in finding["detail"]


def test_the_second_node_stopped_no_series_decreases_and_the_report_says_so(cluster, prometheus, traffic):
    worker = cluster.worker
    endpoint = f"{worker.ip}:{worker.metrics_port}"
    on_worker = {r for r, (deployment, node, _) in replicas(APP).items() if node == WORKER_IP}
    assert on_worker
    before = cumulative(cluster.head.metrics())
    worker.terminate()
    wait_until(worker.stopped, "the second node's processes to exit", timeout=60)
    discovery = Path(cluster.temp_dir, "session_latest", DISCOVERY_FILE)
    wait_until(lambda: endpoint not in discovery.read_text(), "the head to drop the node from discovery", timeout=60)
    wait_until(lambda: endpoint not in active_targets(prometheus), "Prometheus to drop the node's target", timeout=60)
    ok = traffic.ok
    wait_until(lambda: traffic.ok >= ok + 10, "requests served by the head alone", timeout=60)
    assert not never_decreased(before, cumulative(cluster.head.metrics()))
    wait_until(lambda: not healthy_lately(prometheus, on_worker), "no healthy sample of the second node's replicas "
               "in the report's last quarter window", timeout=60)
    alive = set(replicas(APP))

    finished = report(prometheus, "--json")
    assert finished.returncode == 0, finished.stderr
    doc = json.loads(finished.stdout)
    stopped = {item["name"]: item for item in doc["server"]["stopped_reporting"]}
    assert stopped[endpoint]["kind"] == "target" and stopped[endpoint]["node"] == WORKER_IP, stopped
    assert on_worker <= set(stopped), (on_worker, stopped)
    assert not alive & set(stopped), (alive, stopped)  # the head's replicas still report
    verdict = doc["verdict"]
    assert (verdict["model"], verdict["dominant_step"], verdict["deployments"]) == (APP, "preprocess", ["Gateway"])

    table = report(prometheus)
    assert table.returncode == 0, table.stderr
    assert f"target {endpoint} (node {WORKER_IP})" in table.stdout, table.stdout
    assert "Dominant step: preprocess of ranker (deployment Gateway)" in table.stdout, table.stdout


def test_the_example_discovery_config_passes_promtool(tmp_path):
    result = subprocess.run(["/usr/bin/promtool", "check", "config", str(FILE_SD_CONFIG)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
