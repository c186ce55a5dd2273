"""Cost of encoding a batch of spans for OTLP/HTTP, against the SDK exporter's own encoder.

Why: with every request traced, the ``BatchSpanProcessor``'s thread spent about 15 % of a KServe server's
samples in the SDK's ``encode_spans`` (protobuf message objects, one per span, attribute and value), holding
the GIL the event loop needs (issue 14). :mod:`kserve_otel.export.otlp_encoding` writes the same bytes
directly.

What is timed: one export batch of 512 spans (the ``BatchSpanProcessor``'s ``max_export_batch_size``) as a
traced KServe request makes them, 128 requests of one SERVER span with the stable HTTP attributes and three
step spans (``preprocess``, ``predict``, ``postprocess``) with ``model_name``, all from a real SDK tracer:
``encode_spans(spans).SerializePartialToString()`` (what the SDK exporter sends), against the C extension's
``encode_spans`` and its pure-Python twin. The bytes of the three are checked equal before timing.
"""

from __future__ import annotations

from typing import Any

from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from kserve_otel.export import otlp_encoding

from .harness import Case, Section, Table, Target, fmt_spread, fmt_time, measure, module_main, ratio

REQUESTS = 128  # x 4 spans = 512, one full export batch
C_LIMIT = 0.25
PYTHON_LIMIT = 0.6


def request_spans(requests: int = REQUESTS) -> list[Any]:
    """The finished spans of ``requests`` traced KServe v1 predict requests."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create({"service.name": "sklearn-iris", "k8s.pod.name": "iris-0"}))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("kserve_otel", "0.4.0")
    for i in range(requests):
        with tracer.start_as_current_span("POST /v1/models/{model_name}:predict", kind=SpanKind.SERVER, attributes={
            "http.request.method": "POST", "url.path": "/v1/models/sklearn-iris:predict", "url.scheme": "http",
            "server.address": "127.0.0.1", "server.port": 8080, "client.address": "127.0.0.1",
            "client.port": 40000 + i, "network.protocol.version": "1.1", "user_agent.original": "wrk/4.2.0",
            "http.route": "/v1/models/{model_name}:predict", "kserve.model.name": "sklearn-iris",
            "kserve.protocol": "v1", "http.response.status_code": 200,
        }):
            for step in ("preprocess", "predict", "postprocess"):
                with tracer.start_as_current_span(step, attributes={"model_name": "sklearn-iris"}):
                    pass
    provider.shutdown()
    return list(exporter.get_finished_spans())


def _repeat(encode: Any, spans: list[Any]) -> Any:
    def loop(n: int) -> None:
        for _ in range(n):
            encode(spans)
    return loop


def _sdk(spans: list[Any]) -> bytes:
    return sdk_encode_spans(spans).SerializePartialToString()


def run(quick: bool) -> Section:
    rounds, target_ns = (3, 20e6) if quick else (21, 100e6)
    spans = request_spans()
    expected = _sdk(spans)
    if otlp_encoding.encode_spans(spans) != expected or otlp_encoding.py_encode_spans(spans) != expected:
        raise RuntimeError("the fast encoder's bytes differ from the SDK encoder's")
    cases = {"sdk": _sdk, "python": otlp_encoding.py_encode_spans}
    if otlp_encoding.IMPLEMENTATION == "c":
        cases["c"] = otlp_encoding.encode_spans
    timings = measure([Case(name, _repeat(encode, spans)) for name, encode in cases.items()], rounds, target_ns)
    section = Section(f"OTLP span encoding: one batch of {len(spans)} spans ({len(expected):,} bytes)",
                      __doc__.split("\n\n", 1)[1].strip() if __doc__ else "")
    rows = []
    for name in cases:
        value = ratio(timings.median(name), timings.median("sdk"))
        rows.append([name, fmt_time(timings.median(name)), fmt_spread(timings, name),
                     fmt_time(timings.median(name) / len(spans)), "—" if value is None else f"{value:.2f}"])
    section.tables.append(Table("Encoding one batch", ["encoder", "median", "quartiles", "per span", "vs SDK"], rows))
    for name, limit in (("c", C_LIMIT), ("python", PYTHON_LIMIT)):
        section.targets.append(Target(
            f"OTLP encoding, {name} / SDK", ratio(timings.median(name), timings.median("sdk")) if name in cases
            else None, limit, f"{len(spans)}-span batch, median of {rounds}"))
    return section


if __name__ == "__main__":
    module_main(run)
