"""The Prometheus endpoint: one exact path, served standalone on a port of its own or inside an ASGI app.

One core, thin adapters (as prometheus_client does it): :func:`render` turns a registry into a response
(Prometheus text or OpenMetrics by the ``Accept`` header, gzip when asked, both through prometheus_client's
own encoders); :class:`MetricsServer` serves it from a daemon thread, :class:`MetricsMiddleware` from an
existing ASGI app on the app's own port. Both answer only the configured path (404 elsewhere, for the
standalone server) and only GET and HEAD (405 otherwise), and never redirect ``/metrics`` to ``/metrics/``
as a mounted sub-app would: scrapers do not follow redirects.

The registry is this package's own ``CollectorRegistry``, never prometheus_client's global one, so a process
that also holds KServe's global-registry histograms never shows a metric name twice.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

_logger = logging.getLogger(__name__)

ALLOWED_METHODS = ("GET", "HEAD")
_ALLOW_HEADER = ", ".join(ALLOWED_METHODS)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The OpenTelemetry Prometheus reader keeps state between its collect callback and the registry's collect:
# two scrapes at once must not interleave.
_render_lock = threading.Lock()


def render(registry: Collector, accept: str | None, accept_encoding: str | None) -> tuple[list[tuple[str, str]], bytes]:
    """The headers and body answering a scrape of ``registry``."""
    encoder, content_type = choose_encoder(accept or "")
    with _render_lock:
        body = encoder(registry)
    headers = [("Content-Type", content_type)]
    if gzip_accepted(accept_encoding or ""):
        import gzip

        body = gzip.compress(body)
        headers.append(("Content-Encoding", "gzip"))
    headers.append(("Content-Length", str(len(body))))
    return headers, body


class MergedCollector:
    """Collects several registries as one, each metric family name once (the first registry's wins).

    The KServe integration serves this package's registry together with prometheus_client's global one
    (process metrics, a model's own metrics), as KServe's own ``/metrics`` did.
    """

    def __init__(self, *collectors: Collector) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        seen: set[str] = set()
        for collector in self.collectors:
            for family in collector.collect():
                if family.name not in seen:
                    seen.add(family.name)
                    yield family


# --------------------------------------------------------------------------------------------- standalone


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: Collector
    metrics_path: str


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(head=True)

    def _not_allowed(self) -> None:
        if urlsplit(self.path).path != self.server.metrics_path:
            self._plain(404, b"Not Found\n")
        else:
            self._plain(405, b"Method Not Allowed\n", [("Allow", _ALLOW_HEADER)])

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815

    def _serve(self, head: bool) -> None:
        if urlsplit(self.path).path != self.server.metrics_path:
            self._plain(404, b"Not Found\n", head=head)
            return
        try:
            headers, body = render(self.server.registry, self.headers.get("Accept"), self.headers.get("Accept-Encoding"))
        except Exception:  # a broken collector must not kill the server thread
            _logger.exception("kserve-otel: rendering the metrics failed")
            self._plain(500, b"Internal Server Error\n", head=head)
            return
        self.send_response(200)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _plain(self, status: int, body: bytes, extra: list[tuple[str, str]] | None = None, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in extra or []:
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes are not worth a log line
        pass


class MetricsServer:
    """The endpoint on a port of its own, served by a daemon thread. :meth:`start` never raises for a busy port."""

    def __init__(self, registry: Collector, host: str = "0.0.0.0", port: int = 8080, path: str = "/metrics") -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.path = path
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self, source: str = "") -> bool:
        """Bind and serve; on failure log one clear error and return False, so inference goes on without it."""
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            server_class = type("_BoundServer", (_Server,), {"address_family": family})
            server = server_class((self.host, self.port), _Handler)
        except OSError as exc:
            where = f" (port from {source})" if source else ""
            _logger.error(
                "kserve-otel: cannot serve metrics on %s:%s%s: %s%s; inference goes on without this endpoint",
                self.host, self.port, self.path, exc.strerror or exc, where,
            )
            return False
        server.registry = self.registry
        server.metrics_path = self.path
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="kserve-otel-metrics", daemon=True)
        self._thread.start()
        return True

    @property
    def running(self) -> bool:
        return self._server is not None

    @property
    def url(self) -> str:
        """The endpoint's URL (with the loopback address when bound to all interfaces)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}{self.path}"

    def stop(self) -> None:
        """Stop serving and free the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# --------------------------------------------------------------------------------------------- ASGI


class MetricsMiddleware:
    """ASGI middleware answering the metrics path itself and passing every other request to ``app``.

    ``registry`` may be a callable returning the registry, so the middleware can be added before
    :func:`kserve_otel.configure` runs (KServe workers build their app before their models are loaded).
    """

    def __init__(self, app: ASGIApp, registry: Collector | Callable[[], Collector | None], path: str = "/metrics") -> None:
        self.app = app
        self.path = path
        self._registry = registry

    def registry(self) -> Collector | None:
        registry = self._registry
        if callable(registry) and not hasattr(registry, "collect"):
            return registry()  # type: ignore[no-any-return]
        return registry  # type: ignore[return-value]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != self.path:
            await self.app(scope, receive, send)
            return
        registry = self.registry()
        if registry is None:
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "GET")
        if method not in ALLOWED_METHODS:
            await _respond(send, 405, [("Allow", _ALLOW_HEADER), ("Content-Type", "text/plain; charset=utf-8")],
                           b"Method Not Allowed\n")
            return
        request_headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        loop = asyncio.get_running_loop()
        # Rendering collects every reader's data: keep it off the event loop that serves inference.
        headers, body = await loop.run_in_executor(
            None, render, registry, request_headers.get("accept"), request_headers.get("accept-encoding")
        )
        await _respond(send, 200, headers, b"" if method == "HEAD" else body)


async def _respond(send: Send, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    })
    await send({"type": "http.response.body", "body": body})
