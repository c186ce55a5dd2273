"""The Prometheus endpoint: exact path, methods, formats, gzip, busy ports, ASGI mounting, valid exposition."""

from __future__ import annotations

import gzip
import http.client
import logging
import os
import resource
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import httpx
import pytest
from conftest import ServerThread, families, free_port, histogram_count, run_python, scrape
from prometheus_client import CollectorRegistry, Histogram

from kserve_otel import instrument_step
from kserve_otel.export import exposition
from kserve_otel.export.exposition import MetricsMiddleware, MetricsServer

PROMTOOL = shutil.which("promtool")


def request(method: str, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def promtool_check(text: str) -> subprocess.CompletedProcess:
    assert PROMTOOL, "promtool is installed by the project's set-up (Debian package prometheus)"
    return subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)


def test_endpoint_serves_kserve_names_label_and_buckets(telemetry, model):
    class Iris:
        name = model

        @instrument_step("predict")
        def predict(self):
            return 1

    Iris().predict()
    Iris().predict()
    text = scrape(telemetry.metrics_url)
    family = families(text)["request_predict_seconds"]
    assert family.type == "histogram"
    samples = [s for s in family.samples if s.labels.get("model_name") == model]
    buckets = [s.labels["le"] for s in samples if s.name == "request_predict_seconds_bucket"]
    assert buckets == ["0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25", "0.5", "0.75", "1.0",
                       "2.5", "5.0", "7.5", "10.0", "+Inf"]
    assert {frozenset(s.labels) for s in samples} == {frozenset({"model_name", "le"}), frozenset({"model_name"})}
    assert histogram_count(text, "request_predict_seconds", model_name=model) == 2
    assert "otel_scope" not in text


def test_exact_path_methods_and_status_codes(telemetry):
    url = telemetry.metrics_url
    base = url.rsplit("/", 1)[0]
    status, headers, body = request("GET", url)
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    status, headers, body = request("HEAD", url)
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert request("GET", url + "?name[]=x")[0] == 200  # query strings are not part of the path
    for path in ("/", "/metrics/", "/metricsx", "/other"):
        assert request("GET", base + path)[0] == 404, path
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        status, headers, _ = request(method, url)
        assert status == 405 and headers["Allow"] == "GET, HEAD"


def test_openmetrics_by_accept_header_and_gzip(telemetry, model):
    instrument_step("predict", model_name=model)(lambda: None)()
    status, headers, body = request("GET", telemetry.metrics_url, {"Accept": "application/openmetrics-text; version=1.0.0"})
    assert status == 200 and headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")
    status, headers, body = request("GET", telemetry.metrics_url, {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert b"request_predict_seconds_bucket" in gzip.decompress(body)


def test_custom_path_and_port():
    registry = CollectorRegistry()
    Histogram("h_seconds", "h", registry=registry).observe(1)
    server = MetricsServer(registry, "127.0.0.1", 0, "/custom/metrics")
    assert server.start()
    try:
        assert server.url.endswith("/custom/metrics")
        assert "h_seconds_count 1.0" in scrape(server.url)
        assert request("GET", server.url.replace("/custom/metrics", "/metrics"))[0] == 404
    finally:
        server.stop()


def test_busy_port_logs_one_clear_error_and_inference_goes_on(caplog, model):
    port = free_port()
    first = MetricsServer(CollectorRegistry(), "127.0.0.1", port)
    assert first.start()
    try:
        with caplog.at_level(logging.ERROR):
            second = MetricsServer(CollectorRegistry(), "127.0.0.1", port)
            assert second.start(source="environment variable KSERVE_OTEL_METRICS_PORT") is False
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1
        message = errors[0].getMessage()
        assert f"127.0.0.1:{port}/metrics" in message and "KSERVE_OTEL_METRICS_PORT" in message
        assert "inference goes on" in message
        assert instrument_step("predict", model_name=model)(lambda: 42)() == 42
    finally:
        first.stop()


def test_configure_with_busy_port_still_instruments(caplog, spans, model):
    import kserve_otel

    port = free_port()
    blocker = MetricsServer(CollectorRegistry(), "127.0.0.1", port)
    assert blocker.start()
    kserve_otel.shutdown()
    try:
        with caplog.at_level(logging.ERROR):
            telemetry = kserve_otel.configure(metrics_host="127.0.0.1", metrics_port=port,
                                              annotations_file="/nonexistent")
        assert telemetry.metrics_server is None and telemetry.metrics_url is None
        assert "cannot serve metrics" in caplog.text
        assert instrument_step("predict", model_name=model)(lambda: "ok")() == "ok"
    finally:
        kserve_otel.shutdown()
        blocker.stop()


def test_promtool_accepts_the_exposition(telemetry, model):
    assert PROMTOOL is not None, "promtool is missing: scripts/setup.sh installs Debian's prometheus"
    class Model:
        name = model

        @instrument_step("preprocess")
        def preprocess(self):
            return 1

        @instrument_step("predict")
        def predict(self):
            raise RuntimeError("x")

        @instrument_step("postprocess")
        def postprocess(self):
            yield 1

    m = Model()
    m.preprocess()
    list(m.postprocess())
    with pytest.raises(RuntimeError):
        m.predict()
    text = scrape(telemetry.metrics_url)
    result = promtool_check(text)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------------------- ASGI mounting


def test_asgi_middleware_answers_on_the_apps_own_port_without_redirect(telemetry, model):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    @instrument_step("predict", model_name=model)
    async def handler(request):
        return JSONResponse({"ok": True})

    app = telemetry.asgi_middleware(Starlette(routes=[Route("/predict", handler, methods=["POST"])]))
    with ServerThread(app) as server, httpx.Client(base_url=server.url, follow_redirects=False) as client:
        assert client.post("/predict").json() == {"ok": True}
        response = client.get("/metrics")
        assert response.status_code == 200
        assert histogram_count(response.text, "request_predict_seconds", model_name=model) == 1
        assert client.head("/metrics").status_code == 200
        assert client.post("/metrics").status_code == 405
        assert client.get("/metrics/").status_code == 404  # the app's own 404: no redirect to or from /metrics
        gz = client.get("/metrics", headers={"Accept-Encoding": "gzip"})
        assert gz.headers["content-encoding"] == "gzip" and "request_predict_seconds" in gz.text
        om = client.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert om.headers["content-type"].startswith("application/openmetrics-text")


def test_asgi_middleware_before_configure_passes_through():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    inner = Starlette(routes=[Route("/metrics", lambda r: PlainTextResponse("app's own"))])
    registry: list = []
    app = MetricsMiddleware(inner, lambda: registry[0] if registry else None)
    with ServerThread(app) as server:
        assert httpx.get(server.url + "/metrics").text == "app's own"
        registry.append(CollectorRegistry())
        Histogram("late_seconds", "h", registry=registry[0])
        assert "late_seconds" in httpx.get(server.url + "/metrics").text


# ----------------------------------------------------------------------------------------- KServe's globals


def test_kserve_global_registry_and_endpoint_give_one_valid_exposition():
    """A process holding KServe's own prometheus_client histograms serves each name exactly once."""
    result = run_python(
        """
        import sys, urllib.request
        sys.argv = ["model"]
        import kserve.metrics  # registers KServe's request_*_seconds histograms in the global REGISTRY
        from prometheus_client import REGISTRY, generate_latest
        assert b"request_predict_seconds" in generate_latest(REGISTRY)
        import kserve_otel
        from kserve_otel import instrument_step
        t = kserve_otel.configure(metrics_host="127.0.0.1", metrics_port=0, annotations_file="/nonexistent")
        instrument_step("predict", model_name="iris")(lambda: None)()
        sys.stdout.write(urllib.request.urlopen(t.metrics_url).read().decode())
        """
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    type_lines = [line for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(type_lines) == len(set(type_lines))
    assert sum(line.startswith("# TYPE request_predict_seconds ") for line in type_lines) == 1
    assert histogram_count(text, "request_predict_seconds", model_name="iris") == 1
    if PROMTOOL:
        check = promtool_check(text)
        assert check.returncode == 0, check.stdout + check.stderr


# ----------------------------------------------------------------------------------------- methods, both ports


def _served_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    Histogram("h_seconds", "h", registry=registry).observe(1)
    return registry


def _answer(port: int, method: str, path: str) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request(method, path)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


def _assert_method_answers(port: int, methods: tuple[str, ...]) -> None:
    status, headers, body = _answer(port, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    assert "h_seconds_count 1.0" in body.decode()
    status, headers, body = _answer(port, "HEAD", "/metrics")  # GET's headers without the body
    assert status == 200 and body == b"" and int(headers["content-length"]) == len(scrape_body(port))
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    for method in methods:
        status, headers, body = _answer(port, method, "/metrics")
        assert (status, headers.get("allow")) == (405, "GET, HEAD"), method
        assert headers["content-type"] == "text/plain; charset=utf-8", method
        assert body == b"Method Not Allowed\n", method


def scrape_body(port: int) -> bytes:
    return _answer(port, "GET", "/metrics")[2]


def test_standalone_endpoint_methods_405_with_allow_and_plain_404_elsewhere():
    server = MetricsServer(_served_registry(), "127.0.0.1", 0)
    assert server.start()
    try:
        _assert_method_answers(server.port, ("POST", "PROPFIND", "OPTIONS", "PUT", "DELETE", "PATCH", "BREW"))
        for method in ("GET", "POST", "PROPFIND", "OPTIONS"):
            status, headers, body = _answer(server.port, method, "/other")
            assert (status, body) == (404, b"Not Found\n"), method
            assert headers["content-type"] == "text/plain; charset=utf-8", method
        status, headers, body = _answer(server.port, "HEAD", "/other")
        assert status == 404 and body == b""
    finally:
        server.stop()


def test_app_port_endpoint_methods_match_the_standalone_one():
    """HEAD answers like GET without the body on both endpoints (plain KServe's /metrics answers HEAD 405)."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    inner = Starlette(routes=[Route("/other", lambda r: PlainTextResponse("app"))])
    app = MetricsMiddleware(inner, _served_registry())
    with ServerThread(app) as server:
        _assert_method_answers(server.port, ("POST", "PROPFIND", "OPTIONS"))
        assert _answer(server.port, "POST", "/other")[0] == 405  # other paths are the app's own


# ----------------------------------------------------------------------------------------- connections


def _closed_by_server(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_idle_connection_flood_holds_no_threads_and_scrapes_still_answer(monkeypatch):
    monkeypatch.setattr(exposition, "IDLE_TIMEOUT", 2.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2000 + exposition.MAX_CONNECTIONS + 256
    if soft < needed:  # each idle connection costs this process two descriptors, client's and server's
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    flood = min(2000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] - exposition.MAX_CONNECTIONS - 256)
    assert flood > 2 * exposition.MAX_CONNECTIONS, f"RLIMIT_NOFILE {hard} is too low for this test"
    server = MetricsServer(_served_registry(), "127.0.0.1", 0)
    assert server.start()
    sockets: list[socket.socket] = []
    try:
        assert "h_seconds_count 1.0" in scrape(server.url)
        threads, tasks = threading.active_count(), len(os.listdir("/proc/self/task"))
        descriptors = len(os.listdir("/proc/self/fd"))
        for i in range(flood):
            sockets.append(socket.create_connection(("127.0.0.1", server.port), timeout=10))
            if i % 100 == 99:
                assert threading.active_count() <= threads + exposition.RENDER_THREADS, f"{i + 1} connections"
        # the server's side of the flood is bounded too (once it has accepted and closed what is queued)
        bound = descriptors + flood + exposition.MAX_CONNECTIONS + 8
        deadline = time.monotonic() + 30
        while len(os.listdir("/proc/self/fd")) > bound and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(os.listdir("/proc/self/fd")) <= bound
        # a scraper still gets its answer, and keeps its connection between scrapes
        scraper = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
        for _ in range(3):
            scraper.request("GET", "/metrics")
            response = scraper.getresponse()
            assert response.status == 200 and b"h_seconds_count 1.0" in response.read()
            if _ == 0:
                kept = scraper.sock
            assert scraper.sock is kept
        scraper.close()
        assert threading.active_count() <= threads + exposition.RENDER_THREADS
        assert len(os.listdir("/proc/self/task")) <= tasks + exposition.RENDER_THREADS
        # every idle connection is closed by the server once IDLE_TIMEOUT has passed
        for sock in sockets:
            sock.setblocking(False)
        deadline = time.monotonic() + exposition.IDLE_TIMEOUT + 30
        open_ones = sockets
        while open_ones and time.monotonic() < deadline:
            open_ones = [sock for sock in open_ones if not _closed_by_server(sock)]
            time.sleep(0.1)
        assert not open_ones, f"{len(open_ones)} idle connections still open"
    finally:
        for sock in sockets:
            sock.close()
        server.stop()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_client_trickling_its_request_is_closed_and_holds_nothing(monkeypatch):
    """A slow-loris client sends a header line now and then and never finishes its request."""
    monkeypatch.setattr(exposition, "REQUEST_TIMEOUT", 1.0)
    server = MetricsServer(_served_registry(), "127.0.0.1", 0)
    assert server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as slow:
            slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            slow.settimeout(0.1)
            answer = b""
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                try:
                    slow.sendall(b"X-Slow: 1\r\n")
                    chunk = slow.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    break
                answer += chunk
                if not chunk:
                    break
            else:
                pytest.fail("the server still waits for the trickling request after 10 s")
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert "h_seconds_count 1.0" in scrape(server.url)
    finally:
        server.stop()
