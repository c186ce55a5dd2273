"""``kserve-otel report``: KServe's debugging procedure for a slow model, automated.

End to end, a real instrumented KServe model server (``tests/report_serve.py``: a model whose preprocess
sleeps, a quick one with a step of its own, a failing one; GPU metrics from the fake NVML) is scraped by the
console script while traffic flows, and by a real Prometheus (Debian's ``/usr/bin/prometheus``) that the
``--prometheus`` mode then queries. The report must name the slow step, exit 1 over a tight SLO and 0 under a
loose one, and its quantile estimator must agree with Prometheus' ``histogram_quantile`` on the same bucket
data. Unreachable URLs, HTML, text that is not metrics and endpoints without step metrics each get one line
and exit 2. The rest (quantile edge cases, verdict rules, durations) runs on synthetic data.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from rich.console import Console
from conftest import ROOT, KServeProcess, PrometheusProcess, free_port, wait_until
from otlp_receiver import OTLPReceiver

from kserve_otel.cli.main import main
from kserve_otel.report.analysis import analyse
from kserve_otel.report.command import Options, run
from kserve_otel.report.document import document
from kserve_otel.report.exposition import Scrape
from kserve_otel.report.prometheus import PrometheusAPI
from kserve_otel.report.quantile import bucket_quantile
from kserve_otel.report.scrapes import window_from_scrapes
from kserve_otel.report.units import parse_bytes, parse_duration
from kserve_otel.report.verdict import Limits, judge
from kserve_otel.report.render import render
from kserve_otel.report.window import Gpu, Histogram, Stopped, Window

PROMETHEUS = "/usr/bin/prometheus"
FAKE_NVML = os.path.join(ROOT, "tests", "fake_nvml")
GIB = 2**30
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, math.inf)
REPORT_SECONDS = 3
TIGHT_SLO, LOOSE_SLO = "30ms", "2s"


def _command() -> list[str]:
    script = os.path.join(ROOT, ".venv", "bin", "kserve-otel")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "kserve_otel.cli.main"]


def _report(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*_command(), "report", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


@dataclass
class Finished:
    code: int
    stdout: str
    stderr: str

    @property
    def json(self) -> dict:
        return json.loads(self.stdout)


def _finish(process: subprocess.Popen) -> Finished:
    stdout, stderr = process.communicate(timeout=60)
    return Finished(process.returncode, stdout, stderr)


# --------------------------------------------------------------------------------------------- servers


class ReportServer(KServeProcess):
    """A KServeProcess serving ``tests/report_serve.py`` on 127.0.0.1 only, without gRPC, with the fake NVML
    first on the path (KServeProcess builds the e2e module's command; waiting, logs and stopping are its own)."""

    def __init__(self, traces_endpoint: str) -> None:  # not super().__init__(): it would start the e2e module
        import tempfile

        self.http_port, self.grpc_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        descriptor, self.log_path = tempfile.mkstemp(prefix="kserve-report-", suffix=".log")
        self._log = os.fdopen(descriptor, "w")
        path = os.pathsep.join(p for p in (FAKE_NVML, os.environ.get("PYTHONPATH")) if p)
        env = {**os.environ, "PYTHONPATH": path, "KSERVE_OTEL_ANNOTATIONS_FILE": "/nonexistent",
               "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": traces_endpoint,
               "OTEL_BSP_SCHEDULE_DELAY": "200"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.report_serve", "--http_port", str(self.http_port),
             "--grpc_port", str(self.grpc_port), "--enable_grpc", "false"],
            cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)


def _prometheus(targets: dict[str, str], tmp: Path, native: bool = False) -> PrometheusProcess:
    """Debian's Prometheus scraping each job's target every second (test_integrations' launcher); with
    ``native``, one that stores kserve-otel's durations as native histograms (no ``_bucket`` series)."""
    jobs = ", ".join(f"{{job_name: {job}, static_configs: [{{targets: ['{target}']}}]}}" for job, target in targets.items())
    config = tmp / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s, scrape_timeout: 1s, evaluation_interval: 1s}\n"
                      f"scrape_configs: [{jobs}]\n")
    return PrometheusProcess(config, tmp, features=("exemplar-storage",) + (("native-histograms",) if native else ()))


def _scrapes(prometheus: PrometheusProcess, job: str) -> int:
    result = prometheus.query(f'count_over_time(up{{job="{job}"}}[10m])').get("data", {}).get("result")
    return int(float(result[0]["value"][1])) if result else 0


class Traffic:
    """Requests to the slow and quick models, and now and then to the failing one, until stopped."""

    def __init__(self, url: str) -> None:
        self.url, self.sent, self._stop = url, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(timeout=30)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while not self._stop.is_set():
                client.post("/v1/models/slow:predict", json={"instances": [[1, 2]]}).raise_for_status()
                client.post("/v1/models/quick:predict", json={"instances": [1, 2]}).raise_for_status()
                if self.sent % 5 == 0:  # KServe resets the connection after a step raised: one of its own
                    assert httpx.post(f"{self.url}/v1/models/failing:predict", json={"instances": [1]},
                                      timeout=30).status_code == 500
                self.sent += 1


class _Answer(BaseHTTPRequestHandler):
    """Answers every GET with the server's ``content_type`` and ``body`` (a string, or a function giving one)."""

    def do_GET(self) -> None:  # noqa: N802
        body = self.server.body  # type: ignore[attr-defined]
        data = (body() if callable(body) else body).encode()
        self.send_response(200)
        self.send_header("Content-Type", self.server.content_type)  # type: ignore[attr-defined]
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def _answering(content_type: str, body) -> ThreadingHTTPServer:
    """A loopback HTTP server answering ``body``, in a daemon thread; ``shutdown()`` and ``server_close()`` it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answer)
    server.content_type, server.body = content_type, body  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


RAY_MODEL_LABELS = 'model_name="ray-model",deployment="RayModel",replica="r1",application="app"'
RAY_WAIT_BOUNDS_MS = (1.0, 5.0, 10.0, 50.0, 100.0, 500.0, math.inf)


def _ray_node_exposition() -> Callable[[], str]:
    """What a Ray node's metrics endpoint shows of a Ray Serve replica instrumented by kserve-otel: each scrape
    finds one more batch of 10 predict calls (8 in (0.1, 0.25], 2 in (0.25, 0.5]) that waited 50-100 ms."""
    scrapes = itertools.count(1)

    def text() -> str:
        n = next(scrapes)
        return (_histogram_text("ray_request_predict_seconds", RAY_MODEL_LABELS, [0] * 6 + [8 * n, 2 * n], 2.0 * n)
                + _histogram_text("ray_request_batch_execution_seconds", 'model_name="ray-model",step="predict"',
                                  [0] * 6 + [n], 0.2 * n)
                + _histogram_text("ray_serve_batch_wait_time_ms", 'deployment="RayModel"', [0] * 4 + [10 * n],
                                  750.0 * n, RAY_WAIT_BOUNDS_MS))

    return text


@dataclass
class Stack:
    server: ReportServer
    prometheus: PrometheusProcess
    native: PrometheusProcess  # the same targets, with native histograms on
    receiver: OTLPReceiver
    tight: Finished
    loose: Finished
    table: Finished


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    assert os.path.exists(PROMETHEUS), "Debian's prometheus is missing: scripts/setup.sh installs it"
    receiver = OTLPReceiver().__enter__()
    server = ReportServer(receiver.endpoint)
    ray_node = _answering("text/plain; version=0.0.4", _ray_node_exposition())
    targets = {"report": f"127.0.0.1:{server.http_port}", "ray": f"127.0.0.1:{ray_node.server_address[1]}"}
    prometheus = _prometheus(targets, tmp_path_factory.mktemp("prometheus"))
    native = _prometheus(targets, tmp_path_factory.mktemp("prometheus-native"), native=True)
    try:
        server.wait_ready()
        for each in (prometheus, native):
            wait_until(each.ready, "Prometheus to be ready")
            wait_until(lambda: _scrapes(each, "report") >= 1, "Prometheus' first scrape of the model server")
        with Traffic(server.url) as traffic:
            runs = [_report(server.url, "--interval", f"{REPORT_SECONDS}s", "--slo", slo, *extra)
                    for slo, extra in ((TIGHT_SLO, ["--json"]), (LOOSE_SLO, ["--json"]), (TIGHT_SLO, []))]
            tight, loose, table = (_finish(run) for run in runs)
        assert traffic.sent > 10, traffic.sent
        for each in (prometheus, native):
            after = _scrapes(each, "report")
            wait_until(lambda: _scrapes(each, "report") >= after + 2, "two scrapes after the traffic")
        yield Stack(server, prometheus, native, receiver, tight, loose, table)
    finally:
        prometheus.stop()
        native.stop()
        server.stop()
        receiver.__exit__(None, None, None)
        ray_node.shutdown()
        ray_node.server_close()


# ------------------------------------------------------------------------------- against a real server


pytest_e2e = pytest.mark.e2e


@pytest_e2e
def test_it_names_the_slow_step_and_breaches_a_tight_slo(stack):
    assert stack.tight.code == 1, stack.tight.stderr
    assert stack.tight.stderr == ""
    verdict = stack.tight.json["verdict"]
    assert (verdict["model"], verdict["dominant_step"], verdict["slo_status"]) == ("slow", "preprocess", "breached")
    assert verdict["dominant_share"] > 0.9
    assert 0.05 < verdict["dominant_p99_seconds"] <= 0.25  # one call in 100 may be descheduled past 0.1
    assert verdict["next"].startswith("optimise preprocess of slow")
    failed = {check["scope"] for check in verdict["slo_checks"] if not check["holds"]}
    assert {"model slow", "server"} <= failed
    models = {model["model"]: model for model in stack.tight.json["models"]}
    assert models["slow"]["dominant_step"] == "preprocess"
    assert {step["step"] for step in models["quick"]["steps"]} == {"preprocess", "predict", "postprocess", "tokenize"}


@pytest_e2e
def test_a_loose_slo_holds_and_points_at_the_client_side(stack):
    assert stack.loose.code == 0, stack.loose.stderr
    verdict = stack.loose.json["verdict"]
    assert verdict["slo_status"] == "holds" and verdict["exit_code"] == 0
    assert (verdict["model"], verdict["dominant_step"]) == ("slow", "preprocess")
    assert "client-side and network latency" in verdict["next"]


@pytest_e2e
def test_the_json_document_has_every_number(stack):
    doc = stack.tight.json
    assert set(doc) == {"schema_version", "source", "models", "server", "verdict"}
    assert doc["source"]["mode"] == "scrape" and doc["source"]["target"] == f"{stack.server.url}/metrics"
    assert REPORT_SECONDS <= doc["source"]["window_seconds"] < REPORT_SECONDS + 2
    slow = next(model for model in doc["models"] if model["model"] == "slow")
    (preprocess,) = [step for step in slow["steps"] if step["step"] == "preprocess"]
    assert set(preprocess) == {"step", "calls", "rate_per_second", "p50_seconds", "p90_seconds", "p99_seconds",
                               "mean_seconds", "time_share", "errors", "error_ratio", "error_types",
                               "first_item_p99_seconds"}
    assert preprocess["calls"] > 5 and preprocess["rate_per_second"] > 1
    assert 0.05 < preprocess["p50_seconds"] <= 0.075 and preprocess["p50_seconds"] <= preprocess["p99_seconds"] <= 0.25
    assert 0.06 <= preprocess["mean_seconds"] < 0.1
    assert slow["latency_p99_seconds"] >= preprocess["p99_seconds"]
    failing = next(model for model in doc["models"] if model["model"] == "failing")
    (predict,) = [step for step in failing["steps"] if step["step"] == "predict"]
    assert predict["error_ratio"] == 1.0 and list(predict["error_types"]) == ["ValueError"]

    server = doc["server"]
    assert server["http_requests"] > 10 and 0.05 < server["http_p99_seconds"] <= 0.25
    assert server["in_flight"] is not None and server["concurrency"] > 0.3
    assert server["queue_wait_source"] is None and server["queue_wait_p99_seconds"] is None
    assert server["process_source"] == "process_cpu_seconds_total" and 0 <= server["cpu_cores"] < 2
    assert server["memory_bytes"] > 50 * 2**20
    gpus = {gpu["index"]: gpu for gpu in server["gpus"]}  # the fake NVML's two devices
    assert gpus["0"] == {"index": "0", "uuid": "GPU-00000000-fake-4000-8000-000000000000",
                         "memory_used_bytes": 4 * GIB, "memory_total_bytes": 16 * GIB, "utilization_ratio": 0.37}
    assert gpus["1"]["memory_used_bytes"] == 60 * GIB and gpus["1"]["utilization_ratio"] == 0.62

    findings = {finding["check"]: finding for finding in doc["verdict"]["findings"]}
    assert list(findings) == ["concurrency", "cpu", "memory", "gpu", "queue", "steps", "errors"]
    assert findings["queue"]["status"] == "unknown" and "not known" in findings["queue"]["detail"]
    assert findings["gpu"]["status"] == "ok" and findings["steps"]["status"] == "problem"
    assert findings["errors"]["status"] == "problem" and "predict of failing" in findings["errors"]["detail"]


@pytest_e2e
def test_the_table_for_people(stack):
    assert stack.table.code == 1, stack.table.stderr
    text = stack.table.stdout
    for expected in ("Steps", "Server", "slow", "preprocess", "tokenize", "GPU 1 GPU-11111111", "queue wait",
                     "not known", "Verdict: SLO 30 ms: breached", "Dominant step: preprocess of slow",
                     "Next: optimise preprocess of slow"):
        assert expected in text, expected
    assert not text.lstrip().startswith("{")


@pytest_e2e
def test_the_endpoint_serves_every_family_once_with_process_and_gpu_metrics(stack):
    with urllib.request.urlopen(f"{stack.server.url}/metrics", timeout=10) as response:
        text = response.read().decode()
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))
    for name in ("process_cpu_seconds_total", "process_cpu_time_seconds_total", "process_resident_memory_bytes",
                 "process_memory_usage_bytes", "gpu_memory_used_bytes", "gpu_utilization_ratio"):
        assert name in types, name


@pytest_e2e
@pytest.mark.parametrize("kind", ["classic", "native"])
def test_prometheus_mode_names_the_same_step(stack, kind):
    prometheus = stack.prometheus if kind == "classic" else stack.native
    if kind == "native":  # what makes this case different: the steps are stored as native histograms only
        assert not prometheus.query('request_preprocess_seconds_bucket{job="report"}')["data"]["result"]
        assert prometheus.query('histogram_count(request_preprocess_seconds{job="report"})')["data"]["result"]
    finished = _finish(_report("--prometheus", prometheus.url, "--selector", 'job="report"',
                               "--interval", "60s", "--slo", TIGHT_SLO, "--json"))
    assert finished.code == 1, finished.stderr
    doc = finished.json
    assert doc["source"]["mode"] == "prometheus" and doc["source"]["selector"] == 'job="report"'
    verdict = doc["verdict"]
    assert (verdict["model"], verdict["dominant_step"], verdict["slo_status"]) == ("slow", "preprocess", "breached")
    slow = next(model for model in doc["models"] if model["model"] == "slow")
    (preprocess,) = [step for step in slow["steps"] if step["step"] == "preprocess"]
    assert 0.05 < preprocess["p99_seconds"] <= 0.25 and preprocess["time_share"] > 0.9
    assert doc["server"]["http_p99_seconds"] > 0.05 and len(doc["server"]["gpus"]) == 2


def _received_preprocess_spans(stack: Stack) -> dict[str, float]:
    """The trace ids of the preprocess spans of model "slow" the receiver got, with their durations."""
    wait_until(lambda: stack.receiver.spans(), "spans at the receiver")
    return {span.trace_id.hex(): (span.end_time_unix_nano - span.start_time_unix_nano) / 1e9
            for span in stack.receiver.spans() if span.name == "preprocess slow"}


@pytest_e2e
def test_both_modes_name_the_slowest_traced_requests_of_the_dominant_step(stack):
    prometheus, native = (_finish(_report("--prometheus", each.url, "--selector", 'job="report"',
                                          "--interval", "60s", "--slo", TIGHT_SLO, "--json"))
                          for each in (stack.prometheus, stack.native))
    received = _received_preprocess_spans(stack)
    for finished in (stack.tight, prometheus, native):
        traces = finished.json["verdict"]["slowest_traces"]
        assert 1 <= len(traces) <= 3, finished.json["verdict"]
        assert [seconds for seconds, _ in traces] == sorted((seconds for seconds, _ in traces), reverse=True)
        for seconds, trace_id in traces:
            assert trace_id in received, "an exemplar's trace is a trace the receiver got"
            assert seconds == pytest.approx(received[trace_id], abs=0.01) and seconds > 0.04
    assert "slowest traced requests of preprocess:" in stack.table.stdout


@pytest_e2e
def test_prometheus_mode_reads_the_families_ray_serve_exports_with_its_prefix(stack):
    finished = _finish(_report("--prometheus", stack.prometheus.url, "--selector", 'job="ray"', "--interval", "60s",
                               "--json"))
    assert finished.code == 0, finished.stderr
    doc = finished.json
    assert doc["source"]["metric_prefix"] == "ray_"
    (model,) = doc["models"]  # the batch execution histogram (it has a step label) is no step
    assert model["model"] == "ray-model" and [step["step"] for step in model["steps"]] == ["predict"]
    (predict,) = model["steps"]
    assert predict["p99_seconds"] == pytest.approx(0.25 + 0.25 * (9.9 - 8) / 2)
    assert predict["mean_seconds"] == pytest.approx(0.2)
    server = doc["server"]
    assert server["queue_wait_source"] == "ray_serve_batch_wait_time_ms"
    assert server["queue_wait_p99_seconds"] == pytest.approx(0.0995)
    assert server["queue_wait_mean_seconds"] == pytest.approx(0.075)
    assert server["http_requests"] is None and server["cpu_cores"] is None
    queue = next(finding for finding in doc["verdict"]["findings"] if finding["check"] == "queue")
    assert queue["status"] == "ok"  # a 99.5 ms wait is under a quarter of the 487.5 ms p99
    assert doc["verdict"]["dominant_step"] == "predict"


@pytest_e2e
def test_the_estimator_agrees_with_prometheus_histogram_quantile_on_the_same_data(stack):
    """Prometheus' bucket increases at one instant, fed to the report's estimator, give what Prometheus'
    histogram_quantile gives over the same increases at the same instant."""
    api = PrometheusAPI(stack.prometheus.url)
    compared = 0
    for family in ("request_preprocess_seconds", "request_predict_seconds", "request_tokenize_seconds",
                   "http_server_request_duration_seconds"):
        for grouping in ("le, model_name", "le"):
            increases = f'sum by ({grouping}) (increase({family}_bucket{{job="report"}}[60s]))'
            buckets: dict[str, list[tuple[float, float]]] = {}
            for labels, value in api.query(increases):
                buckets.setdefault(labels.get("model_name", ""), []).append((float(labels["le"]), value))
            assert buckets, increases
            for q in (0, 0.1, 0.25, 0.5, 0.9, 0.95, 0.99, 1):
                theirs = {labels.get("model_name", ""): value
                          for labels, value in api.query(f"histogram_quantile({q}, {increases})")}
                assert set(theirs) == set(buckets)
                for key, counts in buckets.items():
                    ours = bucket_quantile(q, counts)
                    assert ours == pytest.approx(theirs[key], rel=1e-12, abs=1e-15, nan_ok=True), (family, key, q, counts)
                    compared += 1
    assert compared >= 8 * 6


# ----------------------------------------------------------------------------------- one-line failures


@pytest.fixture
def answering() -> Iterator:
    servers: list[ThreadingHTTPServer] = []

    def start(content_type: str, body: str) -> str:
        servers.append(_answering(content_type, body))
        return f"http://127.0.0.1:{servers[-1].server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _one_line_failure(capsys, *argv: str) -> str:
    assert main(["report", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_an_unreachable_url_gets_one_line_from_the_console_script():
    url = f"http://127.0.0.1:{free_port()}/metrics"
    finished = _finish(_report(url, "--interval", "1s"))
    assert finished.code == 2 and finished.stdout == ""
    assert finished.stderr == f"kserve-otel report: cannot reach {url}: connection refused (is the server running, " \
                              f"and is this its port?)\n"


def test_an_unreachable_prometheus(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert _one_line_failure(capsys, "--prometheus", url) == \
        f"kserve-otel report: cannot reach Prometheus at {url}: connection refused (is the server running, and is " \
        f"this its port?)"


def test_an_html_page_is_not_prometheus_metrics(capsys, answering):
    url = answering("text/html; charset=utf-8", "<html><body>KServe</body></html>")
    line = _one_line_failure(capsys, url, "--interval", "1s")
    assert line == f"kserve-otel report: {url}/metrics answered text/html, not Prometheus metrics " \
                   f"(is this the metrics path? KServe serves /metrics)"
    line = _one_line_failure(capsys, "--prometheus", url)
    assert line.startswith(f"kserve-otel report: {url} is not a Prometheus server")


def test_text_that_is_not_metrics(capsys, answering):
    url = answering("text/plain", "hello world\n")
    line = _one_line_failure(capsys, f"{url}/metrics", "--interval", "1s")
    assert line.startswith(f"kserve-otel report: {url}/metrics is not in the Prometheus text format (")


def test_an_endpoint_without_step_metrics(capsys, answering):
    url = answering("text/plain; version=0.0.4", "# TYPE up gauge\nup 1\nprocess_cpu_seconds_total 3\n")
    line = _one_line_failure(capsys, url, "--interval", "1s")
    assert line == (f"kserve-otel report: {url}/metrics has no step metrics (request_<step>_seconds histograms "
                    f"with a model_name label): is the model server instrumented by kserve-otel, and has it "
                    f"served a request?")


@pytest_e2e
def test_prometheus_without_step_metrics_for_the_selector(capsys, stack):
    line = _one_line_failure(capsys, "--prometheus", stack.prometheus.url, "--selector", 'job="elsewhere"')
    assert line.startswith(f"kserve-otel report: Prometheus at {stack.prometheus.url} has no step metrics")
    line = _one_line_failure(capsys, "--prometheus", stack.prometheus.url, "--selector", "job=")
    assert "is not a list of label matchers" in line


@pytest.mark.parametrize("argv, message", [
    ([], "give the metrics URL of a model server, or --prometheus URL, and not both"),
    (["http://127.0.0.1:1", "--prometheus", "http://127.0.0.1:1"], "and not both"),
    (["http://127.0.0.1:1", "--slo", "fast"], "argument --slo: 'fast' is not a duration"),
    (["http://127.0.0.1:1", "--memory-limit", "lots"], "argument --memory-limit: 'lots' is not a size"),
    (["ftp://127.0.0.1:1"], "is not an http:// or https:// URL"),
])
def test_bad_usage_is_one_line_and_exit_2(capsys, argv, message):
    assert message in _one_line_failure(capsys, *argv)


# ------------------------------------------------------------------------- the estimator, exactly


def _cumulative(counts: list[float]) -> list[tuple[float, float]]:
    """KServe's buckets, cumulative, from the counts of the first buckets (the rest empty)."""
    total, result = 0.0, []
    for bound, count in zip(BUCKETS, [*counts, *[0] * (len(BUCKETS) - len(counts))], strict=True):
        total += count
        result.append((bound, total))
    return result


def test_quantile_interpolates_linearly_inside_the_bucket():
    buckets = _cumulative([0, 0, 0, 0, 10, 10])  # 10 in (0.05, 0.075], 10 in (0.075, 0.1]
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.075)
    assert bucket_quantile(0.25, buckets) == pytest.approx(0.0625)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.075 + 0.025 * 0.98)
    assert bucket_quantile(1, buckets) == pytest.approx(0.1)
    assert math.isnan(bucket_quantile(0, buckets))  # rank 0 in an empty lowest bucket: 0/0, as in Go
    assert bucket_quantile(0, _cumulative([3, 1])) == 0.0


def test_quantile_special_cases_are_prometheus():
    buckets = [(0.1, 5.0), (1.0, 10.0), (math.inf, 20.0)]
    assert bucket_quantile(0.9, buckets) == 1.0  # in +Inf: the second-highest bound
    assert bucket_quantile(0.1, buckets) == pytest.approx(0.04)  # lowest bucket: from 0
    assert bucket_quantile(0.25, [(-1.0, 5.0), (1.0, 10.0), (math.inf, 10.0)]) == -1.0  # lowest bound <= 0
    assert math.isnan(bucket_quantile(0.5, [(0.1, 1.0), (1.0, 2.0)]))  # no +Inf bucket
    assert math.isnan(bucket_quantile(0.5, [(math.inf, 3.0)]))  # fewer than two buckets
    assert math.isnan(bucket_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]))  # no observations
    assert math.isnan(bucket_quantile(math.nan, buckets))
    assert bucket_quantile(-0.1, buckets) == -math.inf and bucket_quantile(1.1, buckets) == math.inf


def test_quantile_sorts_merges_and_forces_monotonicity():
    shuffled = [(math.inf, 20.0), (0.1, 5.0), (1.0, 10.0)]
    assert bucket_quantile(0.5, shuffled) == bucket_quantile(0.5, sorted(shuffled))
    assert bucket_quantile(0.5, [(0.1, 2.0), (0.1, 3.0), (1.0, 10.0), (math.inf, 20.0)]) == \
        bucket_quantile(0.5, [(0.1, 5.0), (1.0, 10.0), (math.inf, 20.0)])
    # A decrease (inconsistent data) is removed: 1.0's count is taken as 0.5's.
    assert bucket_quantile(0.5, [(0.5, 8.0), (1.0, 6.0), (2.0, 12.0), (math.inf, 12.0)]) == pytest.approx(
        bucket_quantile(0.5, [(0.5, 8.0), (1.0, 8.0), (2.0, 12.0), (math.inf, 12.0)]))
    # Floating-point noise (1e-13 relative) is ignored in both directions: no bucket of "0" width.
    noisy = [(0.1, 10.0), (0.2, 10.0 * (1 + 1e-13)), (0.3, 20.0), (math.inf, 20.0)]
    assert bucket_quantile(0.5, noisy) == pytest.approx(0.1)


# -------------------------------------------------------------------------- windows and verdicts


def _scrape(wall: float, text: str, url: str = "http://server/metrics") -> Scrape:
    from prometheus_client.parser import text_string_to_metric_families

    scrape = Scrape(url, wall, wall)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            scrape.samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return scrape


def _histogram_text(name: str, labels: str, counts: list[int], total: float, bounds=BUCKETS) -> str:
    """Prometheus text of one histogram series: ``counts`` of the first buckets of ``bounds``, the rest empty."""
    lines, cumulative = [], 0
    for bound, count in zip(bounds, counts + [0] * (len(bounds) - len(counts)), strict=True):
        cumulative += count
        le = "+Inf" if math.isinf(bound) else repr(bound)
        lines.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}')
    lines += [f"{name}_count{{{labels}}} {cumulative}", f"{name}_sum{{{labels}}} {total}"]
    return "\n".join(lines) + "\n"


def test_two_scrapes_give_the_increase_and_a_reset_counts_from_zero():
    first = _scrape(100, _histogram_text("request_predict_seconds", 'model_name="m"', [5, 5], 0.05)
                    + _histogram_text("request_preprocess_seconds", 'model_name="m"', [100], 0.2)
                    + "process_cpu_seconds_total 10\n")
    second = _scrape(110, _histogram_text("request_predict_seconds", 'model_name="m"', [5, 5, 10], 0.3)
                     + _histogram_text("request_preprocess_seconds", 'model_name="m"', [20], 0.04)  # reset
                     + 'request_step_errors_total{model_name="m",step="predict",error_type="KeyError"} 2\n'
                     + "process_cpu_seconds_total 15\n")
    window = window_from_scrapes(first, second)
    assert window.seconds == 10
    predict = window.steps[("m", "predict")]
    assert (predict.count, predict.sum) == (10, pytest.approx(0.25))
    assert dict(predict.buckets)[0.025] == 10 and dict(predict.buckets)[0.01] == 0
    preprocess = window.steps[("m", "preprocess")]
    assert (preprocess.count, preprocess.sum) == (20, 0.04)
    assert window.errors == {("m", "predict"): {"KeyError": 2}}
    assert window.cpu_cores == 0.5 and window.http is None and window.in_flight is None
    report = analyse(window)
    (model,) = report.models
    assert model.dominant_step == "predict" and model.requests == 20


def test_scrapes_of_a_ray_node_read_the_prefixed_families_and_the_batch_wait():
    def text(n: int) -> str:
        return (_histogram_text("ray_request_predict_seconds", RAY_MODEL_LABELS, [0] * 6 + [8 * n, 2 * n], 2.0 * n)
                + _histogram_text("ray_request_batch_execution_seconds", 'model_name="ray-model",step="predict"',
                                  [0] * 6 + [n], 0.2 * n)
                + _histogram_text("ray_request_batch_wait_seconds", 'model_name="ray-model",step="predict"',
                                  [0, 0, 10 * n], 0.2 * n)
                + f'ray_request_step_errors_total{{{RAY_MODEL_LABELS},step="predict",error_type="OSError"}} {n}\n')

    window = window_from_scrapes(_scrape(0, text(1)), _scrape(5, text(3)))
    assert window.prefix == "ray_" and list(window.steps) == [("ray-model", "predict")]
    assert window.steps[("ray-model", "predict")].count == 20
    assert window.errors == {("ray-model", "predict"): {"OSError": 2}}
    assert window.queue_source == "ray_request_batch_wait_seconds" and window.queue_wait.count == 20
    assert window.queue_wait.quantile(0.5) == pytest.approx(0.0175)


def test_on_a_ray_node_the_dominant_step_is_named_with_its_deployment():
    labels = 'model_name="ranker",application="ranker",replica="r{n}"'

    def text(n: int) -> str:
        return (_histogram_text("ray_request_preprocess_seconds", labels.format(n=1) + ',deployment="Gateway"',
                                [0, 0, 0, 10 * n], 0.4 * n)
                + _histogram_text("ray_request_predict_seconds", labels.format(n=2) + ',deployment="Scorer"',
                                  [10 * n], 0.01 * n)
                + _histogram_text("ray_request_predict_seconds", labels.format(n=3) + ',deployment="Scorer"',
                                  [5 * n], 0.005 * n))

    window = window_from_scrapes(_scrape(0, text(1)), _scrape(5, text(2)))
    assert window.deployments == {("ranker", "preprocess"): ["Gateway"], ("ranker", "predict"): ["Scorer"]}
    verdict = judge(analyse(window), None)
    assert (verdict.dominant_step, verdict.deployments) == ("preprocess", ["Gateway"])
    assert verdict.next.startswith("optimise preprocess of ranker (deployment Gateway): it takes 96.4%")


def test_what_stopped_reporting_during_the_window_is_a_problem_the_verdict_names():
    stopped = [Stopped("target", "10.0.0.3:8080", "no longer scraped", node="10.0.0.3", job="ray"),
               Stopped("replica", "abc123", "no longer reported", node="10.0.0.3", deployment="Scorer",
                       application="ranker")]
    verdict = _verdict(_window(source="prometheus", stopped=stopped))
    finding = verdict.findings[-1]
    assert (finding.check, finding.status) == ("reporting", "problem")
    assert finding.detail == ("stopped reporting during the window: target 10.0.0.3:8080 (node 10.0.0.3): no longer "
                              "scraped; replica abc123 of Scorer (application ranker, node 10.0.0.3): no longer "
                              "reported (the numbers cover only what still reports)")
    window = _window(source="prometheus", stopped=stopped)
    doc = document(window, analyse(window), verdict)
    assert doc["server"]["stopped_reporting"][1] == {
        "kind": "replica", "name": "abc123", "state": "no longer reported", "node": "10.0.0.3", "job": None,
        "deployment": "Scorer", "application": "ranker"}
    out = io.StringIO()
    render(Console(file=out, width=300), window, analyse(window), verdict)
    expected = "[!!] reporting: stopped reporting during the window: target 10.0.0.3:8080 (node 10.0.0.3)"
    assert expected in out.getvalue()
    assert _verdict(_window(source="prometheus", stopped=[])).findings[-1].status == "ok"
    assert "reporting" not in {f.check for f in _verdict(_window()).findings}  # two scrapes cannot tell


def _window(**overrides) -> Window:
    """A server where predict of "m" takes 80 ms and preprocess 20 ms, 10 requests a second."""
    window = Window("scrape", "http://server/metrics", 10.0, 0.0)
    window.steps = {("m", "preprocess"): Histogram(100, 2.0, tuple(_cumulative([0, 0, 100]))),
                    ("m", "predict"): Histogram(100, 8.0, tuple(_cumulative([0, 0, 0, 0, 0, 100])))}
    window.http = Histogram(100, 10.5, tuple(_cumulative([0] * 6 + [100])))
    window.in_flight, window.cpu_cores, window.memory_bytes, window.processes = 1, 0.3, 2**30, 1
    for key, value in overrides.items():
        setattr(window, key, value)
    return window


def _verdict(window: Window, slo: float | None = 0.05, limits: Limits | None = None):
    return judge(analyse(window), slo, limits)


def test_the_slo_is_checked_on_the_sum_of_step_p99s_and_on_the_http_p99():
    verdict = _verdict(_window(), slo=0.5)
    assert verdict.slo_status == "holds" and verdict.exit_code == 0
    assert [(check.scope, check.holds) for check in verdict.slo_checks] == [("model m", True), ("server", True)]
    assert verdict.slo_checks[0].p99_seconds == pytest.approx(0.02485 + 0.09975)
    verdict = _verdict(_window(), slo=0.11)  # the steps' sum is over it, the HTTP p99 (0.2475) too
    assert verdict.slo_status == "breached" and verdict.exit_code == 1
    assert (verdict.model, verdict.dominant_step, verdict.dominant_share) == ("m", "predict", 0.8)
    assert verdict.next.startswith("optimise predict of m: it takes 80% of the time")
    assert _verdict(_window(), slo=None).slo_status == "not given"


def test_requests_waiting_outside_the_steps_mean_overload():
    # 4.5 requests in the server on average (45 s of HTTP time in 10 s), 1 in a step: 3.5 wait.
    window = _window(http=Histogram(100, 45.0, tuple(_cumulative([0] * 7 + [100]))), in_flight=5)
    verdict = _verdict(window)
    finding = verdict.findings[0]
    assert (finding.check, finding.status) == ("concurrency", "problem")
    assert verdict.next.startswith("the server is overloaded: add replicas or workers")


@pytest.mark.parametrize("overrides, limits, check", [
    ({"cpu_cores": 0.95}, None, "cpu"),
    ({"cpu_cores": 1.9}, Limits(cpu_cores_per_process=2), "cpu"),
    ({"memory_bytes": 1.9 * GIB}, Limits(memory_bytes=2 * GIB), "memory"),
    ({"gpus": [Gpu("0", "GPU-a", 15 * GIB, 16 * GIB, 0.5)]}, None, "gpu"),
    ({"gpus": [Gpu("0", "GPU-a", 1 * GIB, 16 * GIB, 0.97)]}, None, "gpu"),
    ({"queue_wait": Histogram(100, 5.0, tuple(_cumulative([0] * 5 + [100]))),
      "queue_source": "ray_serve_batch_wait_time_ms"}, None, "queue"),
])
def test_resources_and_queues_near_their_limits_come_before_the_steps(overrides, limits, check):
    verdict = _verdict(_window(**overrides), limits=limits)
    problems = [finding.check for finding in verdict.findings if finding.status == "problem"]
    assert problems[0] == check and "steps" in problems
    advice = {"cpu": "CPU is the limit", "memory": "memory is near the limit", "gpu": "the GPUs are at capacity",
              "queue": "requests wait in the queue: add replicas"}
    assert verdict.next.startswith(advice[check])


def test_without_traffic_an_slo_cannot_be_checked():
    idle = _window(steps={("m", "predict"): Histogram(0, 0.0, tuple(_cumulative([])))}, http=None)
    assert math.isnan(bucket_quantile(0.5, idle.steps[("m", "predict")].buckets))
    verdict = _verdict(idle)
    assert (verdict.slo_status, verdict.exit_code, verdict.dominant_step) == ("not checked", 2, None)
    assert verdict.next.startswith("no request reached a step")
    doc = document(idle, analyse(idle), verdict)
    assert doc["models"][0]["steps"][0]["p99_seconds"] is None  # NaN is null in JSON
    json.dumps(doc, allow_nan=False)


def test_run_prints_json_and_returns_the_exit_status(monkeypatch):
    from kserve_otel.report import command

    monkeypatch.setattr(command, "scrape_window", lambda url, seconds: _window())
    out = io.StringIO()
    assert run(Options(url="server:8080", slo_seconds=0.11, json=True), stdout=out) == 1
    assert json.loads(out.getvalue())["verdict"]["dominant_step"] == "predict"


def test_durations_and_sizes():
    assert parse_duration("200ms") == pytest.approx(0.2)
    assert parse_duration("1m30s") == 90 and parse_duration("0.25") == 0.25 and parse_duration("1.5s") == 1.5
    assert parse_duration("500us") == pytest.approx(5e-4)
    assert parse_bytes("2Gi") == 2 * GIB and parse_bytes("512Mi") == 512 * 2**20 and parse_bytes("1G") == 1e9
    for bad in ("", "fast", "10 s", "-1s", "0", "5x"):
        with pytest.raises(ValueError):
            parse_duration(bad)
