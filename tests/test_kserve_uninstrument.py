"""``KServeInstrumentor().uninstrument()`` and ``instrument()`` again, in a running KServe model server: after
uninstrument the model server's ``/metrics`` is KServe's own, its restored histograms counting new requests as
plain KServe's do, and kserve-otel's middleware and gRPC handler let requests through untouched (no span, no
HTTP metric); after instrument kserve-otel counts and traces again. Eleven times over, every count exact.

Real KServe model servers on loopback (``tests/kserve_e2e/uninstrument_serve.py``, which switches the
instrumentation from two HTTP routes of its own), real REST and gRPC clients, a real OTLP receiver for spans.
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import httpx
import pytest
from conftest import ServerProcess, free_port, histogram_count, scrape, serving, wait_until
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from otlp_receiver import OTLPReceiver

pytestmark = pytest.mark.e2e

ROWS = [[6.8, 2.8, 4.8, 1.4], [5.1, 3.5, 1.4, 0.2]]
V1_ROUTE = {"http_request_method": "POST", "http_route": "/v1/models/{model_name}:predict",
            "http_response_status_code": "200"}
REST_PER_PERIOD, GRPC_PER_PERIOD = 3, 1
CYCLES = 11


class ToggledServer(ServerProcess):
    """``uninstrument_serve`` on free loopback ports."""

    ready_path = "/v2/health/ready"

    def __init__(self, env: dict[str, str]) -> None:
        self.grpc_port = free_port()
        http_port = free_port()
        super().__init__([sys.executable, "-m", "tests.kserve_e2e.uninstrument_serve", "--http_port",
                          str(http_port), "--grpc_port", str(self.grpc_port)], http_port, env=env)

    def switch(self, on: bool) -> None:
        answer = httpx.post(f"{self.url}/test/{'instrument' if on else 'uninstrument'}", timeout=30).json()
        assert answer == {"instrumented": on}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver


@pytest.fixture(scope="module")
def servers(receiver: OTLPReceiver) -> Iterator[dict[str, ToggledServer]]:
    spans = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
             "OTEL_BSP_SCHEDULE_DELAY": "100"}
    standalone_port = free_port()
    started = {
        "mounted": ToggledServer(spans),  # the endpoint on the model server's port: KServe's default
        "standalone": ToggledServer({**spans, "KSERVE_OTEL_METRICS_HOST": "127.0.0.1",
                                     "KSERVE_OTEL_METRICS_PORT": str(standalone_port)}),
    }
    started["standalone"].metrics_url = f"http://127.0.0.1:{standalone_port}/metrics"  # type: ignore[attr-defined]
    yield from serving(started)


@dataclass
class Traffic:
    """Requests sent so far, split by whether kserve-otel was instrumenting when they were served."""

    predicts: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    rest: dict[bool, int] = field(default_factory=lambda: {True: 0, False: 0})
    trace_ids: dict[bool, set[str]] = field(default_factory=lambda: {True: set(), False: set()})

    def send(self, server: ToggledServer, instrumented: bool) -> None:
        """REST v1 and gRPC predicts, each continuing a trace of the test's own."""
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for _ in range(REST_PER_PERIOD):
                traceparent = self._traceparent(instrumented)
                response = client.post("/v1/models/iris:predict", json={"instances": ROWS},
                                       headers={"traceparent": traceparent})
                assert response.json() == {"predictions": [1, 0]}
        request = pb.ModelInferRequest(model_name="iris", id=uuid.uuid4().hex)
        tensor = request.inputs.add(name="x", datatype="FP64", shape=[2, 4])
        tensor.contents.fp64_contents.extend(sum(ROWS, []))
        with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            for _ in range(GRPC_PER_PERIOD):
                metadata = [("traceparent", self._traceparent(instrumented))]
                answer = stub.ModelInfer(request, metadata=metadata, timeout=30)
                assert list(answer.outputs[0].contents.int64_contents) == [1, 0]
        self.rest[instrumented] += REST_PER_PERIOD
        self.predicts[instrumented] += REST_PER_PERIOD + GRPC_PER_PERIOD

    def _traceparent(self, instrumented: bool) -> str:
        trace_id = uuid.uuid4().hex
        self.trace_ids[instrumented].add(trace_id)
        return f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"


def _predict_count(text: str) -> float:
    return histogram_count(text, "request_predict_seconds", model_name="iris")


def _received_trace_ids(receiver: OTLPReceiver) -> set[str]:
    return {span.trace_id.hex() for span in receiver.spans()}


def test_uninstrument_and_instrument_again_eleven_times_on_the_model_servers_port(servers, receiver):
    server, traffic = servers["mounted"], Traffic()
    for _ in range(2):  # a head start, so that the two families' counts never coincide
        traffic.send(server, instrumented=True)
    assert _predict_count(scrape(f"{server.url}/metrics")) == traffic.predicts[True]
    for _ in range(CYCLES):
        server.switch(on=False)
        traffic.send(server, instrumented=False)
        text = scrape(f"{server.url}/metrics")
        # KServe's own handler answers: its histograms, back in prometheus_client's registry, counted every
        # predict served while uninstrumented (REST and gRPC), and kserve-otel's families are gone.
        assert _predict_count(text) == traffic.predicts[False]
        assert histogram_count(text, "request_preprocess_seconds", model_name="iris") == traffic.predicts[False]
        assert "http_server_request_duration_seconds" not in text

        server.switch(on=True)
        traffic.send(server, instrumented=True)
        text = scrape(f"{server.url}/metrics")
        # kserve-otel's families again, counting only what was served while instrumented: its middleware
        # recorded nothing while switched off.
        assert _predict_count(text) == traffic.predicts[True]
        assert histogram_count(text, "http_server_request_duration_seconds", **V1_ROUTE) == traffic.rest[True]

    wait_until(lambda: traffic.trace_ids[True] <= _received_trace_ids(receiver),
               "the spans of every request served while instrumented")
    assert not traffic.trace_ids[False] & _received_trace_ids(receiver), "a span of an uninstrumented request"
    assert traffic.predicts == {True: (CYCLES + 2) * 4, False: CYCLES * 4}


def test_the_endpoint_on_a_port_of_its_own_follows_uninstrument(servers):
    server, traffic = servers["standalone"], Traffic()
    metrics_url = server.metrics_url  # type: ignore[attr-defined]
    for _ in range(2):  # a head start, so that the two families' counts never coincide
        traffic.send(server, instrumented=True)
    assert _predict_count(scrape(metrics_url)) == traffic.predicts[True]
    for _ in range(3):
        server.switch(on=False)
        traffic.send(server, instrumented=False)
        # Both ports show KServe's restored histogram, counting: the frozen family of kserve-otel's own
        # registry no longer hides it on the endpoint's port.
        assert _predict_count(scrape(metrics_url)) == traffic.predicts[False]
        assert _predict_count(scrape(f"{server.url}/metrics")) == traffic.predicts[False]

        server.switch(on=True)
        traffic.send(server, instrumented=True)
        assert _predict_count(scrape(metrics_url)) == traffic.predicts[True]
        # KServe's own /metrics does not show the step histograms while kserve-otel serves them elsewhere.
        assert "request_predict_seconds" not in scrape(f"{server.url}/metrics")
