"""Zero-code auto-instrumentation: an unmodified KServe program (``tests/kserve_e2e/serve.py --bare`` calls
nothing but ``kserve.ModelServer().start(...)``) instrumented by the environment, the pod annotations or
OpenTelemetry's own ``opentelemetry-instrument``; and nothing at all when it is off."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
from conftest import ROOT, KServeProcess, families, free_port, histogram_count, scrape, serving

pytestmark = pytest.mark.e2e

V1_BODY = {"instances": [[6.8, 2.8, 4.8, 1.4]]}


def _send(server: KServeProcess, count: int, model: str = "iris") -> None:
    for _ in range(count):
        with httpx.Client(base_url=server.url, timeout=30) as client:  # a new connection: any worker
            client.post(f"/v1/models/{model}:predict", json=V1_BODY).raise_for_status()


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    annotations = tmp_path_factory.mktemp("podinfo") / "annotations"
    annotated_port = free_port()
    annotations.write_text('serving.kserve.io/enable-prometheus-scraping="true"\n'
                           f'prometheus.kserve.io/port="{annotated_port}"\nprometheus.kserve.io/path="/prom"\n')
    started = {
        "env": KServeProcess("iris", bare=True, env={"KSERVE_OTEL_ENABLED": "true"}),
        "env_workers": KServeProcess("iris", bare=True, env={"KSERVE_OTEL_ENABLED": "true"}, args=["--workers", "2"]),
        "annotations": KServeProcess("iris", bare=True, env={"KSERVE_OTEL_ANNOTATIONS_FILE": str(annotations)}),
        "otel_instrument": KServeProcess("iris", bare=True, prefix=[os.path.join(os.path.dirname(sys.executable),
                                                                                 "opentelemetry-instrument")],
                                         env={"OTEL_TRACES_EXPORTER": "none", "OTEL_LOGS_EXPORTER": "none"}),
        "off": KServeProcess("iris", bare=True),
    }
    started["annotations"].metrics_url = f"http://127.0.0.1:{annotated_port}/prom"  # type: ignore[attr-defined]
    yield from serving(started)


@pytest.mark.parametrize("name", ["env", "env_workers"])
def test_environment_variable_instruments_an_unmodified_program(servers, name):
    server = servers[name]
    before = histogram_count(scrape(f"{server.url}/metrics"), "request_predict_seconds", model_name="iris")
    _send(server, 30)
    for _ in range(4):  # with two workers each scrape lands on either one: all must show the total
        text = scrape(f"{server.url}/metrics")
        assert histogram_count(text, "request_predict_seconds", model_name="iris") - before == 30
        assert "target_info" in families(text)  # served by kserve-otel, not KServe's prometheus_client
    assert "kserve-otel: metrics:" in server.log()  # the start-up summary, printed once
    assert server.log().count("kserve-otel: metrics:") == 1


def test_pod_annotation_instruments_and_places_the_endpoint(servers):
    server = servers["annotations"]
    _send(server, 5)
    text = scrape(server.metrics_url)
    assert histogram_count(text, "request_predict_seconds", model_name="iris") == 5
    assert "request_predict_seconds" not in scrape(f"{server.url}/metrics")  # KServe's own, now without them


def test_opentelemetry_instrument_finds_the_entry_point(servers):
    server = servers["otel_instrument"]
    _send(server, 3)
    text = scrape(f"{server.url}/metrics")
    assert histogram_count(text, "request_predict_seconds", model_name="iris") == 3
    assert "target_info" in families(text)


def test_off_means_kserve_untouched(servers):
    server = servers["off"]
    _send(server, 2)
    text = scrape(f"{server.url}/metrics")
    assert histogram_count(text, "request_predict_seconds", model_name="iris") == 2  # KServe's own histogram
    assert "target_info" not in families(text)


def test_the_start_up_check_imports_nothing_when_off():
    code = "import sys; print(sorted(m for m in sys.modules if m.startswith(('kserve_otel', 'opentelemetry'))))"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KSERVE_OTEL_")}
    off = subprocess.run([sys.executable, "-c", code], env={**env, "KSERVE_OTEL_ANNOTATIONS_FILE": "/nonexistent"},
                         capture_output=True, text=True, cwd="/", timeout=60)
    assert off.stdout.strip() == "[]", off.stderr
    disabled = subprocess.run([sys.executable, "-c", code + "; import kserve.model as m; print(type(m.PREDICT_HIST_TIME).__name__)"],
                              env={**env, "KSERVE_OTEL_ENABLED": "false"}, capture_output=True, text=True, cwd=ROOT,
                              timeout=60)
    assert disabled.stdout.splitlines()[-1] == "Histogram", disabled.stderr  # checked, and left alone
    bad = subprocess.run([sys.executable, "-c", "pass"], env={**env, "KSERVE_OTEL_ENABLED": "maybe"},
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 0
    assert "setting enabled: 'maybe' from environment variable KSERVE_OTEL_ENABLED is not valid" in bad.stderr
