"""KServe end to end: real model servers on loopback, real REST v1/v2 and gRPC clients, real scrapes and an OTLP
receiver for spans. One set of servers is shared by the whole module (KServe takes seconds to start):

* ``main``: iris, a second model (echo), a failing model and a streaming model, instrumented, spans to OTLP;
* ``predictor`` + ``transformer``: the transformer calls the predictor through KServe's ``predictor_host``;
  the predictor's endpoint is on an annotated port of its own;
* ``bare``: the failing model on uninstrumented KServe, to compare error responses with;
* ``workers``: iris and echo with ``--workers 2``.
"""

from __future__ import annotations

import re
import subprocess
import time
import uuid
from collections.abc import Iterator

import grpc
import httpx
import pytest
from conftest import KServeProcess, families, free_port, histogram_count, scrape, serving
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc
from otlp_receiver import OTLPReceiver
from prometheus_client.parser import text_string_to_metric_families

from tests.kserve_e2e.models import CHUNK_DELAY, CHUNKS

pytestmark = pytest.mark.e2e

KSERVE_BUCKETS = ["0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0", "2.5", "5.0",
                  "7.5", "10.0", "+Inf"]
ROWS = [[6.8, 2.8, 4.8, 1.4], [5.1, 3.5, 1.4, 0.2]]
V1_BODY = {"instances": ROWS}
V2_BODY = {"inputs": [{"name": "x", "shape": [2, 4], "datatype": "FP64", "data": sum(ROWS, [])}]}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OTLPReceiver]:
    with OTLPReceiver() as receiver:
        yield receiver


def _span_env(receiver: OTLPReceiver, service: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": service,
    }


@pytest.fixture(scope="module")
def servers(receiver: OTLPReceiver, tmp_path_factory) -> Iterator[dict[str, KServeProcess]]:
    annotations = tmp_path_factory.mktemp("podinfo") / "annotations"
    predictor_metrics_port = free_port()
    annotations.write_text(f'prometheus.kserve.io/port="{predictor_metrics_port}"\n'
                           'prometheus.kserve.io/path="/custom-metrics"\n')
    predictor = KServeProcess("iris", env={**_span_env(receiver, "predictor"),
                                           "KSERVE_OTEL_ANNOTATIONS_FILE": str(annotations)})
    predictor.metrics_url = f"http://127.0.0.1:{predictor_metrics_port}/custom-metrics"  # type: ignore[attr-defined]
    started = {
        "main": KServeProcess("iris,echo,failing,stream", env=_span_env(receiver, "main")),
        "predictor": predictor,
        "transformer": KServeProcess("transformer", env=_span_env(receiver, "transformer"),
                                     args=["--predictor_host", f"127.0.0.1:{predictor.http_port}"]),
        "bare": KServeProcess("failing", bare=True),
        "workers": KServeProcess("iris,echo", args=["--workers", "2"], env={"OTEL_TRACES_EXPORTER": "none"}),
    }
    yield from serving(started)


def _grpc_infer(server: KServeProcess, model: str, metadata: list[tuple[str, str]] | None = None) -> pb.ModelInferResponse:
    request = pb.ModelInferRequest(model_name=model, id=uuid.uuid4().hex)
    tensor = request.inputs.add(name="x", datatype="FP64", shape=[2, 4])
    tensor.contents.fp64_contents.extend(sum(ROWS, []))
    with grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, metadata=metadata or [], timeout=30)


def _counts(text: str, model: str) -> dict[str, float]:
    return {step: histogram_count(text, f"request_{step}_seconds", model_name=model)
            for step in ("preprocess", "predict", "postprocess")}


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def _trace(receiver: OTLPReceiver, trace_id: str, names: set[str], timeout: float = 15, named: str = "",
           at_least: int = 0) -> list:
    """Spans of ``trace_id`` received so far, waiting until every name in ``names`` is among them, and at least
    ``at_least`` spans ``named`` (each process exports its own spans, in batches of its own)."""
    deadline = time.monotonic() + timeout
    while True:
        spans = [s for s in receiver.spans() if s.trace_id.hex() == trace_id]
        if (names <= {s.name for s in spans} and sum(s.name == named for s in spans) >= at_least) \
                or time.monotonic() > deadline:
            return spans
        time.sleep(0.1)


# ----------------------------------------------------------------------------------------------- metrics


def test_v1_v2_and_grpc_requests_are_counted_per_step_and_model(servers):
    main = servers["main"]
    before = scrape(f"{main.url}/metrics")
    with httpx.Client(base_url=main.url, timeout=30) as client:
        for _ in range(3):
            assert client.post("/v1/models/iris:predict", json=V1_BODY).json() == {"predictions": [1, 0]}
            v2 = client.post("/v2/models/iris/infer", json=V2_BODY).json()
            assert v2["outputs"][0]["data"] == [1, 0]
            assert client.post("/v1/models/echo:predict", json={"instances": [1]}).status_code == 200
    for _ in range(3):
        assert list(_grpc_infer(main, "iris").outputs[0].contents.int64_contents) == [1, 0]

    after = scrape(f"{main.url}/metrics")
    iris_before, iris_after = _counts(before, "iris"), _counts(after, "iris")
    assert {step: iris_after[step] - iris_before[step] for step in iris_after} == {
        "preprocess": 9, "predict": 9, "postprocess": 9,
    }
    echo = _counts(after, "echo")
    assert echo["predict"] >= 3 and echo["preprocess"] >= 3

    # KServe's names, label and buckets, each family once, next to prometheus_client's process metrics.
    predict = families(after)["request_predict_seconds"]
    buckets = [s.labels["le"] for s in predict.samples if s.name.endswith("_bucket") and s.labels["model_name"] == "iris"]
    assert buckets == KSERVE_BUCKETS
    assert {s.labels.get("model_name") for s in predict.samples} >= {"iris", "echo"}
    assert all(set(s.labels) <= {"model_name", "le"} for s in predict.samples)
    type_lines = re.findall(r"^# TYPE (\S+)", after, re.M)
    assert len(type_lines) == len(set(type_lines))
    assert "process_cpu_seconds" in families(after)

    # HTTP server metrics of the REST app, labelled by route template, and requests in flight.
    v1_route = {"http_request_method": "POST", "http_route": "/v1/models/{model_name}:predict",
                "http_response_status_code": "200"}
    assert histogram_count(after, "http_server_request_duration_seconds", **v1_route) >= 6
    active = [s for s in families(after)["http_server_active_requests"].samples
              if s.labels == {"http_request_method": "POST"}]
    assert active and active[0].value == 0


def test_exposition_passes_promtool(servers):
    text = scrape(f"{servers['main'].url}/metrics")
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    # promtool lints too (exit 3 for lint warnings such as missing HELP on third-party metrics); errors exit 1.
    assert result.returncode in (0, 3), result.stdout + result.stderr
    assert "error" not in (result.stdout + result.stderr).lower()


def test_endpoint_on_the_annotated_port_and_path(servers):
    predictor = servers["predictor"]
    httpx.post(f"{predictor.url}/v1/models/iris:predict", json=V1_BODY, timeout=30).raise_for_status()
    text = scrape(predictor.metrics_url)
    assert histogram_count(text, "request_predict_seconds", model_name="iris") >= 1
    # KServe's own /metrics on the model server's port no longer shows the step histograms at all:
    # they were replaced, so nothing is counted twice.
    own = scrape(f"{predictor.url}/metrics")
    assert "request_predict_seconds" not in own
    assert "process_cpu_seconds_total" in own


def test_streaming_predict_is_timed_to_the_last_chunk(servers):
    main = servers["main"]
    before = scrape(f"{main.url}/metrics")
    started = time.perf_counter()
    with httpx.Client(base_url=main.url, timeout=30) as client:
        response = client.post("/v1/models/stream:predict", json={"instances": [1]})
    elapsed = time.perf_counter() - started
    assert response.text == "".join(f"chunk {i}\n" for i in range(CHUNKS))
    after = scrape(f"{main.url}/metrics")

    def predict_sum(text: str) -> float:
        family = families(text).get("request_predict_seconds")
        samples = [s for s in family.samples if s.name == "request_predict_seconds_sum"
                   and s.labels["model_name"] == "stream"] if family else []
        return samples[0].value if samples else 0.0

    duration = predict_sum(after) - predict_sum(before)
    assert CHUNKS * CHUNK_DELAY * 0.9 <= duration <= elapsed
    assert histogram_count(after, "request_time_to_first_item_seconds", model_name="stream", step="predict") >= 1


# ----------------------------------------------------------------------------------------------- errors


def test_errors_are_labelled_and_the_response_is_kserves_own(servers):
    main, bare = servers["main"], servers["bare"]
    instrumented = httpx.post(f"{main.url}/v1/models/failing:predict", json=V1_BODY, timeout=30)
    uninstrumented = httpx.post(f"{bare.url}/v1/models/failing:predict", json=V1_BODY, timeout=30)
    assert (instrumented.status_code, instrumented.json()) == (uninstrumented.status_code, uninstrumented.json())

    def grpc_error(server: KServeProcess) -> tuple:
        with pytest.raises(grpc.RpcError) as error:
            _grpc_infer(server, "failing")
        return error.value.code(), error.value.details()

    assert grpc_error(main) == grpc_error(bare)

    errors = families(scrape(f"{main.url}/metrics"))["request_step_errors"]
    counted = {(s.labels["model_name"], s.labels["step"], s.labels["error_type"]): s.value
               for s in errors.samples if s.name == "request_step_errors_total"}
    assert counted[("failing", "predict", "ValueError")] >= 2
    assert histogram_count(scrape(f"{main.url}/metrics"), "request_predict_seconds", model_name="failing") >= 2


# ----------------------------------------------------------------------------------------------- traces


def test_rest_request_continues_the_incoming_trace_with_step_spans_under_the_request_span(servers, receiver):
    traceparent, trace_id, parent_id = _traceparent()
    httpx.post(f"{servers['main'].url}/v1/models/iris:predict", json=V1_BODY, headers={"traceparent": traceparent},
               timeout=30).raise_for_status()
    spans = _trace(receiver, trace_id, {"POST /v1/models/{model_name}:predict", "predict iris"})
    by_name = {s.name: s for s in spans}
    request = by_name["POST /v1/models/{model_name}:predict"]
    assert request.parent_span_id.hex() == parent_id
    attributes = {a.key: a.value for a in request.attributes}
    assert attributes["kserve.model.name"].string_value == "iris"
    assert attributes["kserve.protocol"].string_value == "v1"
    assert attributes["http.route"].string_value == "/v1/models/{model_name}:predict"
    # the one request path's attributes, as on any ASGI app (tests/test_asgi.py), plus kserve.*
    assert set(attributes) == {
        "http.request.method", "url.path", "url.scheme", "server.address", "server.port", "client.address",
        "client.port", "network.protocol.version", "user_agent.original", "http.route",
        "http.response.status_code", "kserve.model.name", "kserve.protocol"}
    for step in ("preprocess", "predict", "postprocess"):
        assert by_name[f"{step} iris"].parent_span_id == request.span_id


def test_v2_and_grpc_requests_get_request_spans(servers, receiver):
    main = servers["main"]
    traceparent, trace_id, _ = _traceparent()
    httpx.post(f"{main.url}/v2/models/iris/infer", json=V2_BODY, headers={"traceparent": traceparent},
               timeout=30).raise_for_status()
    spans = _trace(receiver, trace_id, {"POST /v2/models/{model_name}/infer", "predict iris"})
    assert {s.name for s in spans} >= {"POST /v2/models/{model_name}/infer", "predict iris"}

    traceparent, trace_id, parent_id = _traceparent()
    _grpc_infer(main, "iris", metadata=[("traceparent", traceparent)])
    name = "inference.GRPCInferenceService/ModelInfer"
    spans = _trace(receiver, trace_id, {name, "predict iris"})
    by_name = {s.name: s for s in spans}
    assert by_name[name].parent_span_id.hex() == parent_id
    assert by_name["predict iris"].parent_span_id == by_name[name].span_id
    protocol = {a.key: a.value.string_value for a in by_name[name].attributes}["kserve.protocol"]
    assert protocol == "grpc-v2"


def test_istio_b3_headers_are_continued(servers, receiver):
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    headers = {"x-b3-traceid": trace_id, "x-b3-spanid": span_id, "x-b3-sampled": "1"}
    httpx.post(f"{servers['main'].url}/v1/models/iris:predict", json=V1_BODY, headers=headers,
               timeout=30).raise_for_status()
    spans = _trace(receiver, trace_id, {"POST /v1/models/{model_name}:predict"})
    request = [s for s in spans if s.name == "POST /v1/models/{model_name}:predict"]
    assert request and request[0].parent_span_id.hex() == span_id


def test_transformer_and_predictor_spans_form_one_trace(servers, receiver):
    traceparent, trace_id, _ = _traceparent()
    response = httpx.post(f"{servers['transformer'].url}/v1/models/iris:predict", json=V1_BODY,
                          headers={"traceparent": traceparent}, timeout=30)
    assert response.json() == {"predictions": [1, 0]}
    spans = _trace(receiver, trace_id, {"predict iris", "postprocess iris"},
                   named="POST /v1/models/{model_name}:predict", at_least=2)
    request_spans = [s for s in spans if s.name == "POST /v1/models/{model_name}:predict"]
    assert len(request_spans) == 2  # the transformer's and the predictor's, in one trace
    transformer_predict = [s for s in spans if s.name == "predict iris" and
                           s.parent_span_id in {r.span_id for r in request_spans}]
    predictor_request = [r for r in request_spans if r.parent_span_id in {p.span_id for p in transformer_predict}]
    assert predictor_request, "the predictor's request span is a child of the transformer's predict span"


def test_latency_log_line_carries_the_trace_id(servers):
    main = servers["main"]
    traceparent, trace_id, _ = _traceparent()
    httpx.post(f"{main.url}/v1/models/iris:predict", json=V1_BODY, headers={"traceparent": traceparent},
               timeout=30).raise_for_status()
    deadline = time.monotonic() + 10
    while f"trace_id: {trace_id}" not in main.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [line for line in main.log().splitlines() if trace_id in line]
    assert any(re.search(r"requestId: .*predict_ms: .*, trace_id: " + trace_id, line) for line in lines), lines


# ----------------------------------------------------------------------------------------------- workers


def test_two_workers_every_scrape_shows_the_exact_total(servers):
    workers = servers["workers"]
    requests, grpc_requests = 40, 5
    pids = set()
    first = scrape(f"{workers.url}/metrics")
    before = _counts(first, "echo")["predict"], _counts(first, "iris")["predict"]
    for _ in range(requests):
        with httpx.Client(base_url=workers.url, timeout=30) as client:  # a new connection each time
            pids.add(client.post("/v1/models/echo:predict", json={"instances": [1]}).json()["pid"])
    assert len(pids) == 2, "both workers served requests, so the scrape must add them up"
    for _ in range(grpc_requests):  # KServe serves gRPC from the parent process: its counts join in too
        _grpc_infer(workers, "iris")
    for _ in range(6):  # each scrape lands on either worker: every one must show the total
        with httpx.Client(base_url=workers.url, timeout=30) as client:
            text = client.get("/metrics").text
        assert _counts(text, "echo")["predict"] - before[0] == requests
        assert _counts(text, "iris")["predict"] - before[1] == grpc_requests
        names = [family.name for family in text_string_to_metric_families(text)]
        assert len(names) == len(set(names))
