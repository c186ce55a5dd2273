"""Shared test fixtures: real SDK providers, real HTTP scrapes, unique model names per test."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import urllib.request
import uuid
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families

import kserve_otel
from kserve_otel import tracing

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
