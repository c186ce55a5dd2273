"""ASGI instrumentation: real uvicorn servers on loopback, real HTTP clients, spans in an in-memory exporter."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest
from conftest import ServerThread, families, free_port, histogram_count, wait_until
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

import kserve_otel
from kserve_otel import instrument_step
from kserve_otel.spans import tracing
from kserve_otel.instrumentation.asgi import instrument_app


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def configured(port: int, spans: InMemorySpanExporter) -> Iterator[kserve_otel.Telemetry]:
    """Telemetry whose metrics port is the app's own port: instrument_app mounts the endpoint in the app."""
    kserve_otel.shutdown()
    telemetry = kserve_otel.configure(metrics_port=port, annotations_file="/nonexistent", serve_endpoint=False,
                                      tracer_provider=spans.provider)  # type: ignore[attr-defined]
    yield telemetry
    kserve_otel.shutdown()


def fastapi_app(model: str) -> FastAPI:
    app = FastAPI()

    @instrument_step("predict", model_name=model)
    def predict(item_id: int) -> dict:
        return {"item": item_id, "trace_id": format(trace.get_current_span().get_span_context().trace_id, "032x")}

    @app.get("/items/{item_id}")
    def read_item(item_id: int) -> dict:
        return predict(item_id)

    return app


def test_route_templates_bound_the_series_and_the_endpoint_is_on_the_apps_port(configured, port, model):
    with ServerThread(instrument_app(fastapi_app(model), http_port=port), port=port) as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:
            for item in range(25):
                assert client.get(f"/items/{item}").json()["item"] == item
            assert client.get("/missing").status_code == 404
            metrics = client.get("/metrics")
            assert metrics.status_code == 200  # the exact path, answered by the app itself, no redirect
            assert client.get("/metrics/").status_code == 404
    text = metrics.text
    duration = families(text)["http_server_request_duration_seconds"]
    routes = {s.labels["http_route"] for s in duration.samples if s.name.endswith("_count")}
    assert {"/items/{item_id}", ""} <= routes  # "" for the unrouted 404
    assert not any(re.search(r"/items/\d", route) for route in routes), "raw paths must never become labels"
    labels = {"http_request_method": "GET", "http_route": "/items/{item_id}", "http_response_status_code": "200"}
    # one series for 25 item ids (series are process-wide: other tests may have counted there before)
    assert histogram_count(text, "http_server_request_duration_seconds", **labels) >= 25
    assert histogram_count(text, "request_predict_seconds", model_name=model) == 25
    active = [s.value for s in families(text)["http_server_active_requests"].samples
              if s.labels == {"http_request_method": "GET"}]
    assert active == [0.0]  # scrapes are answered before the request is counted: nothing is in flight
    type_lines = re.findall(r"^# TYPE (\S+)", text, re.M)
    assert len(type_lines) == len(set(type_lines)), "FastAPI's own HTTP metrics must not duplicate ours"


def test_request_span_continues_traceparent_and_steps_nest_under_it(configured, port, spans, model):
    trace_id, parent_id = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"
    with ServerThread(instrument_app(fastapi_app(model), http_port=port), port=port) as server:
        response = httpx.get(f"{server.url}/items/7", headers={"traceparent": f"00-{trace_id}-{parent_id}-01"})
    assert response.json()["trace_id"] == trace_id
    finished = spans.get_finished_spans()
    request = [s for s in finished if s.kind == trace.SpanKind.SERVER]
    assert [s.name for s in request] == ["GET /items/{item_id}"]
    assert request[0].parent.span_id == int(parent_id, 16)
    assert request[0].attributes["http.route"] == "/items/{item_id}"
    step = [s for s in finished if s.name == f"predict {model}"]
    assert step and step[0].parent.span_id == request[0].context.span_id
    # FastAPI's own spans are off: the only spans are contrib's request span and the step's.
    assert {s.name for s in finished} == {"GET /items/{item_id}", f"predict {model}"}


def test_unsampled_requests_bypass_the_span_machinery_but_keep_trace_id_and_metrics(configured, port, spans, model):
    trace_id = "1af7651916cd43dd8448eb211c80319c"
    with ServerThread(instrument_app(fastapi_app(model), http_port=port), port=port) as server:
        response = httpx.get(f"{server.url}/items/1", headers={"traceparent": f"00-{trace_id}-b7ad6b7169203331-00"})
        text = httpx.get(f"{server.url}/metrics").text
    assert response.json()["trace_id"] == trace_id
    assert spans.get_finished_spans() == ()
    assert histogram_count(text, "request_predict_seconds", model_name=model) == 1


def test_contrib_hooks_and_header_capture_pass_through(port, spans, model):
    kserve_otel.shutdown()
    kserve_otel.configure(metrics_port=port, annotations_file="/nonexistent", serve_endpoint=False,
                          tracer_provider=spans.provider)  # type: ignore[attr-defined]
    seen = []
    app = instrument_app(fastapi_app(model), http_port=port, server_request_hook=lambda span, scope: seen.append(scope["path"]),
                         http_capture_headers_server_request=["x-tenant"])
    try:
        with ServerThread(app, port=port) as server:
            httpx.get(f"{server.url}/items/3", headers={"x-tenant": "acme"})
    finally:
        kserve_otel.shutdown()
    assert seen == ["/items/3"]
    request = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER][0]
    assert request.attributes["http.request.header.x_tenant"] == ("acme",)


def test_starlette_and_bare_asgi_apps(configured, port):
    async def homepage(request):
        return JSONResponse({"user": request.path_params["user"]})

    starlette_app = Starlette(routes=[Route("/users/{user}", homepage)])

    async def bare(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})

    for app, path, route in [(starlette_app, "/users/ann", "/users/{user}"), (bare, "/anything/at/all", "")]:
        app_port = free_port() if app is bare else port
        with ServerThread(instrument_app(app, http_port=app_port), port=app_port) as server:
            assert httpx.get(f"{server.url}{path}").status_code == 200
        text = kserve_otel.get_telemetry().collector()  # type: ignore[union-attr]
        from prometheus_client import generate_latest

        exposition = generate_latest(text).decode()
        assert histogram_count(exposition, "http_server_request_duration_seconds", http_route=route,
                               http_response_status_code="200") >= 1


def test_separate_metrics_port(spans, model):
    kserve_otel.shutdown()
    metrics_port, app_port = free_port(), free_port()
    kserve_otel.configure(metrics_host="127.0.0.1", metrics_port=metrics_port, annotations_file="/nonexistent",
                          serve_endpoint=False)
    try:
        app = instrument_app(fastapi_app(model), http_port=app_port)
        with ServerThread(app, port=app_port) as server:
            httpx.get(f"{server.url}/items/1").raise_for_status()
            assert httpx.get(f"{server.url}/metrics").status_code == 404  # the app's own routes only
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert histogram_count(text, "request_predict_seconds", model_name=model) == 1
    finally:
        kserve_otel.shutdown()


def test_no_tracer_provider_means_no_span_work(port, model):
    kserve_otel.shutdown()
    tracing.set_tracer_provider(TracerProvider(sampler=ALWAYS_OFF))
    exporter = InMemorySpanExporter()
    tracing.current_provider().add_span_processor(SimpleSpanProcessor(exporter))
    kserve_otel.configure(metrics_port=port, annotations_file="/nonexistent", serve_endpoint=False)
    try:
        with ServerThread(instrument_app(fastapi_app(model), http_port=port), port=port) as server:
            assert httpx.get(f"{server.url}/items/2").status_code == 200
    finally:
        kserve_otel.shutdown()
    assert exporter.get_finished_spans() == ()


def test_the_request_span_follows_the_http_semantic_conventions_and_is_its_durations_exemplar(
        configured, port, spans, model):
    with ServerThread(instrument_app(fastapi_app(model), http_port=port), port=port) as server:
        httpx.get(f"{server.url}/items/5?verbose=1", headers={"user-agent": "probe/1.0"})
        text = httpx.get(f"{server.url}/metrics", headers={"accept": "application/openmetrics-text"}).text
    [request] = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    attributes = dict(request.attributes)
    assert attributes.pop("client.port") > 0 and attributes.pop("server.port") == port
    assert attributes == {
        "http.request.method": "GET", "url.path": "/items/5", "url.scheme": "http", "url.query": "verbose=1",
        "server.address": "127.0.0.1", "client.address": "127.0.0.1", "network.protocol.version": "1.1",
        "user_agent.original": "probe/1.0", "http.route": "/items/{item_id}", "http.response.status_code": 200,
    }
    span_id = format(request.context.span_id, "016x")
    exemplars = re.findall(r'^http_server_request_duration_seconds_bucket\{[^}]*http_route="/items/\{item_id\}"[^}]*\}'
                           r' \S+ # \{trace_id="([0-9a-f]{32})",span_id="([0-9a-f]{16})"\}', text, re.M)
    assert (format(request.context.trace_id, "032x"), span_id) in exemplars


def test_a_finished_request_leaves_nothing_of_its_trace_behind_on_a_kept_alive_connection(configured, port, spans):
    """The server's keep-alive timer is set while the response's last message is sent; it must not keep the
    request's context (and so its span) alive: kept-alive connections would otherwise hold a request span
    each until the timer goes, long enough for them to reach the collector's oldest generation. Work that
    runs after the response (a background task) is still part of the request's trace."""
    import gc
    import weakref

    from starlette.background import BackgroundTask

    tracer = spans.provider.get_tracer("test")  # type: ignore[attr-defined]
    seen: list[weakref.ref] = []

    def after_response() -> None:
        with tracer.start_as_current_span("after the response"):
            pass

    async def answer(request):
        seen.append(weakref.ref(trace.get_current_span()))
        return JSONResponse({"ok": True}, background=BackgroundTask(after_response))

    app = Starlette(routes=[Route("/answer", answer)])
    with ServerThread(instrument_app(app, http_port=port), port=port) as server:
        with httpx.Client(base_url=server.url, timeout=10) as client:  # one connection, kept alive
            for _ in range(5):
                assert client.get("/answer").json() == {"ok": True}
            wait_until(lambda: len([s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER]) == 5,
                       "the request spans' ends")

            def freed() -> bool:
                gc.collect()
                return not [ref for ref in seen if ref() is not None]

            # The last request's middleware may still be returning; well before the 5 s keep-alive timeout,
            # which would free its context anyway.
            wait_until(freed, "the request spans to be freed", timeout=2)
            assert len(seen) == 5
    finished = spans.get_finished_spans()
    requests = {s.context.span_id for s in finished if s.kind == trace.SpanKind.SERVER}
    after = [s for s in finished if s.name == "after the response"]
    assert len(requests) == 5 and all(s.parent is not None and s.parent.span_id in requests for s in after)
