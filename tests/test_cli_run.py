"""``kserve-otel-run``, run as users run it: the console script in a subprocess, scraped over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from conftest import ROOT, ServerProcess, families, free_port, histogram_count, scrape, serving

pytestmark = pytest.mark.e2e

RUN = os.path.join(os.path.dirname(sys.executable), "kserve-otel-run")
V1_BODY = {"instances": [[6.8, 2.8, 4.8, 1.4]]}


def run_server(*arguments: str, ready_path: str = "/", env: dict[str, str] | None = None) -> ServerProcess:
    port = free_port()
    return ServerProcess([RUN, "--host", "127.0.0.1", "--http-port", str(port), "--grpc-port", str(free_port()),
                          *arguments], port, ready_path=ready_path, env=env)


@pytest.fixture(scope="module")
def servers():
    started = {
        "model_class": run_server("examples/sklearn_iris/model.py:IrisModel", "--model-name", "flower",
                                  ready_path="/v2/health/ready"),
        "model_list": run_server("tests.cli_targets:models", "--workers", "2", ready_path="/v2/health/ready"),
        "fastapi_factory": run_server("tests.cli_targets:make_app", ready_path="/healthz"),
        "bare_asgi": run_server("tests/cli_targets.py:bare_asgi", "--metrics-path", "/prom"),
        "command": ServerProcess([RUN, "--metrics-path", "/telemetry", "--", sys.executable, "-m",
                                  "tests.kserve_e2e.serve", "--bare", "--models", "iris",
                                  "--http_port", str(port := free_port()), "--grpc_port", str(free_port())],
                                 port, ready_path="/v2/health/ready"),
    }
    yield from serving(started)


def test_a_kserve_model_class_is_instantiated_served_and_summarised(servers):
    server = servers["model_class"]
    assert httpx.post(f"{server.url}/v1/models/flower:predict", json=V1_BODY).json() == {"predictions": [1]}
    assert histogram_count(scrape(f"{server.url}/metrics"), "request_predict_seconds", model_name="flower") == 1
    log = server.log()
    assert "serving KServe models flower (IrisModel: preprocess, predict, postprocess; KServe's explain)" in log
    assert f"kserve-otel: metrics: http://127.0.0.1:{server.http_port}/metrics" in log


def test_a_list_of_models_with_two_workers_counts_exactly(servers):
    server = servers["model_list"]
    for _ in range(20):
        with httpx.Client(base_url=server.url) as client:
            client.post("/v1/models/iris:predict", json=V1_BODY).raise_for_status()
            client.post("/v1/models/echo:predict", json={"instances": [1]}).raise_for_status()
    for _ in range(3):
        text = scrape(f"{server.url}/metrics")
        assert histogram_count(text, "request_predict_seconds", model_name="iris") == 20
        assert histogram_count(text, "request_predict_seconds", model_name="echo") == 20


def test_a_fastapi_factory_gets_route_template_labels(servers):
    server = servers["fastapi_factory"]
    for item in range(12):
        assert httpx.get(f"{server.url}/items/{item}").json() == {"item": item}
    text = scrape(f"{server.url}/metrics")
    routes = {s.labels["http_route"] for s in families(text)["http_server_request_duration_seconds"].samples}
    assert "/items/{item_id}" in routes and not any(r.startswith("/items/") and "{" not in r for r in routes)
    assert histogram_count(text, "http_server_request_duration_seconds", http_route="/items/{item_id}") == 12
    assert "serving the ASGI app tests.cli_targets:make_app (FastAPI)" in server.log()


def test_a_bare_asgi_callable_with_a_custom_metrics_path(servers):
    server = servers["bare_asgi"]
    assert httpx.get(f"{server.url}/whatever").text == "ok"
    text = scrape(f"{server.url}/prom")
    assert histogram_count(text, "http_server_request_duration_seconds", http_route="") >= 1
    assert httpx.get(f"{server.url}/metrics").text == "ok"  # only the configured path is the endpoint's


def test_command_mode_auto_instruments_any_program(servers):
    server = servers["command"]
    httpx.post(f"{server.url}/v1/models/iris:predict", json=V1_BODY).raise_for_status()
    text = scrape(f"{server.url}/telemetry")
    assert histogram_count(text, "request_predict_seconds", model_name="iris") == 1


@pytest.mark.parametrize(("target", "message"), [
    ("no_such_module:app", "cannot import 'no_such_module': No module named 'no_such_module'"),
    ("tests.cli_targets:nothing_here", "tests.cli_targets has no attribute 'nothing_here'"),
    ("tests.cli_targets:answer", "tests.cli_targets:answer is a int (42); accepted: a kserve.Model instance or class"),
    ("tests.cli_targets:broken_factory", "tests.cli_targets:broken_factory (a factory) raised RuntimeError"),
    ("tests/missing.py:app", "no file 'tests/missing.py'"),
    ("tests.cli_targets", "is not MODULE:ATTR"),
    ("tests.cli_targets:make_app --workers 2", "--workers applies to KServe models"),
    ("tests.cli_targets:make_app --metrics-port 99999", "setting metrics_port: '99999' from argument metrics_port"),
])
def test_bad_targets_print_one_line_and_exit_2(target, message):
    result = subprocess.run([RUN, *target.split()], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_help_and_readme_name_every_option_from_the_settings_table():
    from kserve_otel.cli.run import SERVE_OPTIONS, SETTING_OPTIONS
    from kserve_otel.config.settings import SETTINGS_TABLE

    result = subprocess.run([RUN, "--help"], capture_output=True, text=True, timeout=60)
    help_text = " ".join(result.stdout.split())
    readme = " ".join((Path(ROOT) / "README.md").read_text().split())
    specs = {spec.name: spec for spec in SETTINGS_TABLE}
    for option, variable, *_ in SERVE_OPTIONS:
        assert variable in help_text and f"`{option}`" in readme
    for option, name, variable, _ in SETTING_OPTIONS:
        spec = specs[name]
        assert variable == spec.env and f"[{variable}]" in help_text and f"`{option}`" in readme
        for choice in spec.choices or ():
            assert choice in help_text


def test_a_ray_serve_application_is_served_with_step_metrics_on_rays_endpoint():
    import signal
    import time

    http_port, metrics_port = free_port(), free_port()
    server = ServerProcess([RUN, "examples.ray_serve:app", "--host", "127.0.0.1", "--http-port", str(http_port),
                            "--metrics-port", str(metrics_port)], http_port, ready_path="/-/routes")
    try:
        deadline = time.monotonic() + 120
        while "Ray's metrics endpoint" not in server.log():  # printed once the application is deployed
            assert server.process.poll() is None and time.monotonic() < deadline, server.log()
            time.sleep(0.5)
        for _ in range(10):
            assert httpx.post(f"{server.url}/", json=V1_BODY, timeout=60).json() == {"predictions": [1]}
        assert "serving the Ray Serve application examples.ray_serve:app" in server.log()
        assert "deployments Preprocessor (Preprocessor), IrisClassifier (IrisClassifier)" in server.log()
        total = 0.0
        while time.monotonic() < deadline and total < 10:  # Ray exports every few seconds
            text = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
            total = sum(s.value for f in families(text).values() for s in f.samples
                        if s.name == "ray_request_predict_seconds_count" and s.labels.get("model_name") == "iris")
            time.sleep(1)
        assert total == 10
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
        assert "shutting down Ray Serve" in server.log()
    finally:
        server.stop()
