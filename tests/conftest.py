"""Shared test fixtures: real SDK providers, real HTTP scrapes, unique model names per test."""

from __future__ import annotations

import contextlib

import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

import kserve_otel
from kserve_otel.spans import tracing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def model() -> str:
    """A model name no other test uses: the step series are process-global and cumulative."""
    return f"m{uuid.uuid4().hex[:12]}"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Step spans go to an in-memory exporter through a real SDK TracerProvider."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.set_tracer_provider(provider)
    exporter.provider = provider  # type: ignore[attr-defined]
    yield exporter
    tracing.set_tracer_provider(None)


@pytest.fixture
def telemetry(spans: InMemorySpanExporter) -> Iterator[kserve_otel.Telemetry]:
    """configure() with the endpoint on a free loopback port; shut down after the test."""
    kserve_otel.shutdown()
    telemetry = kserve_otel.configure(
        metrics_host="127.0.0.1", metrics_port=0, annotations_file="/nonexistent",
        tracer_provider=spans.provider,  # type: ignore[attr-defined]
    )
    yield telemetry
    kserve_otel.shutdown()


def scrape(url: str, headers: dict[str, str] | None = None) -> str:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode()


def families(text: str) -> dict:
    """Metric families by name, parsed with prometheus_client's own parser (which rejects invalid text)."""
    return {family.name: family for family in text_string_to_metric_families(text)}


def histogram_count(text: str, metric: str, **labels: str) -> float:
    """The ``_count`` sample of a histogram family for the given labels (0 when absent)."""
    family = families(text).get(metric)
    if family is None:
        return 0.0
    for sample in family.samples:
        if sample.name == f"{metric}_count" and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    return 0.0


def run_python(code: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (for behaviour that depends on process-global providers)."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
        timeout=timeout, cwd=ROOT,
    )


def free_port() -> int:
    """A port that was free on loopback a moment ago."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """A real uvicorn server for an ASGI app, on a free loopback port, in a thread; stops on exit."""

    def __init__(self, app, port: int | None = None) -> None:
        import uvicorn

        self.port = port or free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="off"))
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ServerThread":
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=20)


class ServerProcess:
    """A real server in a process of its own (and its own process group, so worker processes stop with it),
    started from ``ROOT``; its output goes to ``log_path``. ``wait_ready`` polls ``ready_path`` on ``url``."""

    ready_path = "/"

    def __init__(self, command: list[str], http_port: int, *, env: dict[str, str] | None = None,
                 log_path: str | None = None, ready_path: str | None = None) -> None:
        import tempfile

        self.http_port = http_port
        self.url = f"http://127.0.0.1:{http_port}"
        self.ready_path = ready_path or self.ready_path
        self.log_path = log_path or tempfile.mkstemp(prefix="server-", suffix=".log")[1]
        full_env = {**os.environ, "KSERVE_OTEL_ANNOTATIONS_FILE": "/nonexistent", **(env or {})}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def wait_ready(self, timeout: float = 90) -> "ServerProcess":
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(f"{self.url}{self.ready_path}", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become ready in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        with open(self.log_path) as log:
            return log.read()

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever is left of the group (worker processes)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=10)
        self._log.close()


class KServeProcess(ServerProcess):
    """A real ``kserve.ModelServer`` serving test models (``tests/kserve_e2e/serve.py``) on free loopback ports."""

    ready_path = "/v2/health/ready"

    def __init__(self, models: str, *, env: dict[str, str] | None = None, args: list[str] | None = None,
                 bare: bool = False, log_path: str | None = None, prefix: list[str] | None = None) -> None:
        self.grpc_port = free_port()
        http_port = free_port()
        command = [*(prefix or []), sys.executable, "-m", "tests.kserve_e2e.serve", "--models", models,
                   "--http_port", str(http_port), "--grpc_port", str(self.grpc_port), *(args or [])]
        if bare:
            command.append("--bare")
        super().__init__(command, http_port, env=env, log_path=log_path)


def serving(servers: dict[str, ServerProcess]) -> Iterator[dict[str, ServerProcess]]:
    """For a module fixture: wait until every server (started at once, so they boot in parallel) is ready,
    yield them, and stop them all afterwards, whatever happened."""
    try:
        for server in servers.values():
            server.wait_ready()
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def wait_until(predicate, what: str, timeout: float = 30) -> None:
    """Poll ``predicate`` every 0.2 s until it is true; fail saying ``what`` did not happen in time."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


class PrometheusProcess:
    """Debian's Prometheus server on a free loopback port, with its data in ``tmp``; stops on ``stop()``."""

    def __init__(self, config: Path, tmp: Path, features: tuple[str, ...] = ()) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = tmp / "prometheus.log"
        self._log = open(self.log_path, "w")
        flags = [f"--enable-feature={','.join(features)}"] if features else []
        self.process = subprocess.Popen(
            ["/usr/bin/prometheus", f"--config.file={config}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn", *flags],
            stdout=self._log, stderr=subprocess.STDOUT)

    @classmethod
    @contextlib.contextmanager
    def scraping(cls, port: int, tmp: Path, features: tuple[str, ...] = ()) -> Iterator["PrometheusProcess"]:
        """A ready Prometheus scraping ``127.0.0.1:port`` every second (job ``kserve``); stopped after."""
        config = tmp / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, scrape_timeout: 900ms}\n"
            "scrape_configs:\n"
            f"  - job_name: kserve\n    static_configs: [{{targets: ['127.0.0.1:{port}']}}]\n")
        prometheus = cls(config, tmp, features)
        try:
            wait_until(prometheus.ready, "prometheus ready")
            yield prometheus
        finally:
            prometheus.stop()

    def ready(self) -> bool:
        if self.process.poll() is not None:
            log = self.log_path.read_text()
            raise RuntimeError(f"prometheus exited with {self.process.returncode}:\n{log}")
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: Any) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.load(response)
        except urllib.error.HTTPError as error:  # 400/422 carry {"status": "error", "error": ...}
            return json.load(error)

    def query(self, expr: str) -> dict:
        return self.api("query", query=expr)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()
