"""Exemplars end to end: a real 2-worker KServe server whose traces go to a real OTLP receiver, scraped every
second by a real Prometheus with exemplar storage. What Prometheus returns from ``/api/v1/query_exemplars`` for
the step and the HTTP duration histograms are exemplars whose trace ids are all traces the receiver got."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import KServeProcess, PrometheusProcess, wait_until
from otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def server(receiver) -> Iterator[KServeProcess]:
    server = KServeProcess("iris", args=["--workers", "2"], env={
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_TRACES_SAMPLER": "always_on"})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def prometheus(server, tmp_path_factory) -> Iterator[PrometheusProcess]:
    tmp = tmp_path_factory.mktemp("prometheus-exemplars")
    with PrometheusProcess.scraping(server.http_port, tmp, features=("exemplar-storage",)) as prometheus:
        yield prometheus


def test_prometheus_exemplars_lead_to_traces_the_receiver_got(server, receiver, prometheus):
    with httpx.Client(timeout=10) as client:
        for _ in range(40):
            assert client.post(f"{server.url}/v1/models/iris:predict",
                               json={"instances": [[6.8, 2.8, 4.8, 1.4]]}).status_code == 200
    now = time.time()

    def exemplar_trace_ids(metric: str) -> set[str]:
        answer = prometheus.api("query_exemplars", query=metric, start=now - 300, end=time.time() + 60)
        return {exemplar["labels"]["trace_id"] for series in answer.get("data") or ()
                for exemplar in series["exemplars"]}

    for metric in ("request_predict_seconds_bucket", "http_server_request_duration_seconds_bucket"):
        wait_until(lambda: exemplar_trace_ids(metric), f"exemplars of {metric} in Prometheus", timeout=30)
    time.sleep(1)  # the last spans reach the receiver (100 ms batches)
    received = {span.trace_id.hex() for span in receiver.spans()}
    for metric in ("request_predict_seconds_bucket", "http_server_request_duration_seconds_bucket"):
        found = exemplar_trace_ids(metric)
        assert found and found <= received, f"{metric}: {found - received} not received"
