"""A metrics endpoint that cannot start on its own port (the port is busy, the host is invalid) never leaves the
step metrics served nowhere: on the KServe path they are served on the model server's own port instead, as plain
KServe serves them, and one log line says why and where. The plain ``configure()`` path keeps its own line.

Real KServe model servers on loopback (one worker and two), a port held busy by a socket of the test's own.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import httpx
import pytest
from conftest import KServeProcess, free_port, histogram_count, scrape, serving, wait_until

import kserve_otel

pytestmark = pytest.mark.e2e

V1_BODY = {"instances": [[6.8, 2.8, 4.8, 1.4], [5.1, 3.5, 1.4, 0.2]]}
INVALID_HOST = "999.1.1.1"
LINE = "cannot serve metrics"


@pytest.fixture(scope="module")
def busy_port() -> Iterator[int]:
    """A loopback port held by a listening socket for as long as the module's servers run."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


QUIET = {"OTEL_TRACES_EXPORTER": "none"}


@pytest.fixture(scope="module")
def servers(busy_port: int) -> Iterator[dict[str, KServeProcess]]:
    invalid_port = free_port()
    started = {
        # KSERVE_OTEL_METRICS_HOST unset: the endpoint would bind 0.0.0.0, which the busy loopback port blocks.
        "busy": KServeProcess("iris", env={**QUIET, "KSERVE_OTEL_METRICS_PORT": str(busy_port)}),
        "invalid": KServeProcess("iris", env={**QUIET, "KSERVE_OTEL_METRICS_HOST": INVALID_HOST,
                                              "KSERVE_OTEL_METRICS_PORT": str(invalid_port)}),
    }
    started["busy"].metrics_at = f"0.0.0.0:{busy_port}/metrics"  # type: ignore[attr-defined]
    started["invalid"].metrics_at = f"{INVALID_HOST}:{invalid_port}/metrics"  # type: ignore[attr-defined]
    yield from serving(started)


@pytest.fixture(scope="module")
def workers(busy_port: int) -> Iterator[KServeProcess]:
    server = KServeProcess("iris,echo", args=["--workers", "2"],
                           env={**QUIET, "KSERVE_OTEL_METRICS_PORT": str(busy_port)})
    server.metrics_at = f"0.0.0.0:{busy_port}/metrics"  # type: ignore[attr-defined]
    for started in serving({"workers": server}):
        yield started["workers"]


def _fallback_line(server: KServeProcess) -> str:
    lines = [line for line in server.log().splitlines() if LINE in line]
    assert len(lines) == 1, server.log()
    return lines[0]


@pytest.mark.parametrize("name", ["busy", "invalid"])
def test_step_metrics_are_served_on_the_model_servers_port_instead(servers, name):
    server = servers[name]
    requests = 7
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for _ in range(requests):
            assert client.post("/v1/models/iris:predict", json=V1_BODY).json() == {"predictions": [1, 0]}
    text = scrape(f"{server.url}/metrics")
    assert histogram_count(text, "request_predict_seconds", model_name="iris") == requests
    assert histogram_count(text, "request_preprocess_seconds", model_name="iris") == requests
    assert "process_cpu_seconds_total" in text  # prometheus_client's process metrics, as KServe serves them

    line = _fallback_line(server)
    reason = "Address already in use" if name == "busy" else "Name or service not known"
    assert f"{LINE} on {server.metrics_at}: {reason}" in line
    assert "port from environment variable KSERVE_OTEL_METRICS_PORT" in line
    if name == "invalid":  # the setting at fault is named too
        assert "host from environment variable KSERVE_OTEL_METRICS_HOST" in line
    assert line.rstrip().endswith(f"serving them on the model server's port {server.http_port} instead")


def test_two_workers_serve_the_exact_total_on_the_model_servers_port(workers):
    server = workers
    pids: set[int] = set()
    requests = 0

    def both_workers_answered() -> bool:  # the second worker may still be starting when the first is ready
        nonlocal requests
        with httpx.Client(base_url=server.url, timeout=30) as client:  # a new connection: either worker
            pids.add(client.post("/v1/models/echo:predict", json={"instances": [1]}).json()["pid"])
        requests += 1
        return len(pids) == 2 and requests >= 20

    wait_until(both_workers_answered, "both workers answering", timeout=120)
    for _ in range(4):  # each scrape lands on either worker: every one shows the total over both
        with httpx.Client(base_url=server.url, timeout=30) as client:
            text = client.get("/metrics").text
        assert histogram_count(text, "request_predict_seconds", model_name="echo") == requests
    line = _fallback_line(server)
    assert f"{LINE} on {server.metrics_at}: Address already in use" in line
    assert line.rstrip().endswith(f"serving them on the model server's port {server.http_port} instead")


def test_plain_configure_names_the_settings_and_goes_on_without_the_endpoint(caplog, model, monkeypatch):
    """No model server to fall back to: one line naming host, port and their settings; inference goes on."""
    port = free_port()
    monkeypatch.setenv("KSERVE_OTEL_METRICS_HOST", INVALID_HOST)
    monkeypatch.setenv("KSERVE_OTEL_METRICS_PORT", str(port))
    kserve_otel.shutdown()
    try:
        with caplog.at_level(logging.ERROR):
            telemetry = kserve_otel.configure(annotations_file="/nonexistent")
        assert telemetry.metrics_server is None
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        message = errors[0]
        assert f"{LINE} on {INVALID_HOST}:{port}/metrics: " in message
        assert "host from environment variable KSERVE_OTEL_METRICS_HOST" in message
        assert "port from environment variable KSERVE_OTEL_METRICS_PORT" in message
        assert message.endswith("inference goes on without this endpoint")
        assert "model server" not in message
        assert kserve_otel.instrument_step("predict", model_name=model)(lambda: "ok")() == "ok"
    finally:
        kserve_otel.shutdown()
