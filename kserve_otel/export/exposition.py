"""The Prometheus endpoint: one exact path, served standalone on a port of its own or inside an ASGI app.

One core, thin adapters (as prometheus_client does it): :func:`render` turns a registry into a response
(Prometheus text or OpenMetrics by the ``Accept`` header, gzip when asked; this package's series written by
:mod:`kserve_otel.export.text_exposition`, every other family by prometheus_client's own encoders);
:class:`MetricsServer` serves it from one daemon thread's event loop, with bounded connections, threads and
timeouts (it shares a process with the model server), :class:`MetricsMiddleware` from an existing ASGI app on
the app's own port. Both answer only the configured path (404 elsewhere, for the
standalone server) and only GET and HEAD (405 with ``Allow: GET, HEAD`` for any other method; HEAD as GET
without the body, as HTTP requires of a general-purpose server), and never redirect ``/metrics`` to
``/metrics/`` as a mounted sub-app would: scrapers do not follow redirects.

The registry is this package's own ``CollectorRegistry``, never prometheus_client's global one, so a process
that also holds KServe's global-registry histograms never shows a metric name twice.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import logging
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from http import HTTPStatus
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import protobuf_exposition
from .metrics_bridge import capturing_series
from .text_exposition import direct_format
from .text_exposition import write as write_text

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
    if protobuf_exposition.accepts(accept):
        encoder, content_type = _PROTOBUF, protobuf_exposition.CONTENT_TYPE
    else:
        encoder, content_type = choose_encoder(accept or "")
    with _render_lock:
        body = _encode(registry, encoder)
    headers = [("Content-Type", content_type)]
    if gzip_accepted(accept_encoding or ""):
        import gzip

        body = gzip.compress(body)
        headers.append(("Content-Encoding", "gzip"))
    headers.append(("Content-Length", str(len(body))))
    return headers, body


def _encode(registry: Collector, encoder: Callable[[Collector], bytes]) -> bytes:
    """What ``encoder(registry)`` writes, with this package's series written from their snapshot instead.

    Each collector (each of a :class:`MergedCollector`'s, in order) is collected while
    :func:`~kserve_otel.export.metrics_bridge.capturing_series` is active: a bridged Prometheus reader in it
    then hands over its series as a snapshot, and its other families (``target_info``, the SDK's metrics) come
    back as prometheus_client families. Those go through ``encoder``, the series through
    :func:`kserve_otel.export.text_exposition.write` right after them (where the reader would have put
    them), with :class:`MergedCollector`'s rule of one family per name. Formats the writer does not write
    (name escapings other than underscores and UTF-8) go through ``encoder`` whole.
    """
    protobuf = encoder is _PROTOBUF
    direct = (False, "") if protobuf else direct_format(encoder)
    if direct is None:
        return encoder(registry)
    openmetrics, escaping = direct
    merged = isinstance(registry, MergedCollector)
    collectors = registry.collectors if isinstance(registry, MergedCollector) else (registry,)
    seen: set[str] | None = set(GLOBAL_REGISTRY_WINS) if merged else None  # a bare registry dedupes nothing
    parts: list[bytes] = []
    for index, collector in enumerate(collectors):
        if seen is not None and index == 1:
            seen -= GLOBAL_REGISTRY_WINS
        with capturing_series() as captured:
            families = list(collector.collect())
        if seen is not None:
            kept = []
            for family in families:
                if family.name not in seen:
                    seen.add(family.name)
                    kept.append(family)
            families = kept
        if families:
            body = protobuf_exposition.write_families(families) if protobuf else encoder(_Families(families))
            if openmetrics and body.endswith(_EOF):
                body = body[:-len(_EOF)]
            parts.append(body)
        for snapshot in captured:
            if protobuf:
                parts.append(protobuf_exposition.write_snapshot(snapshot, seen))
            else:
                parts.append(write_text(snapshot, openmetrics, escaping, seen).encode("utf-8"))
    if openmetrics:
        parts.append(_EOF)
    return b"".join(parts)


_EOF = b"# EOF\n"


def _PROTOBUF(registry: Collector) -> bytes:  # noqa: N802 - stands for an encoder, as choose_encoder's are
    """The protobuf exposition's encoder (served when the scraper asks for it: :mod:`.protobuf_exposition`)."""
    return _encode(registry, _PROTOBUF)


class _Families:
    """Families already collected, as a collector an encoder takes."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


#: Metric names that prometheus_client's global registry counts again while this package's families of the same
#: names no longer change (KServe's step histograms after ``uninstrument()``): there, the global family is served.
GLOBAL_REGISTRY_WINS: set[str] = set()


class MergedCollector:
    """Collects several registries as one, each metric family name once: the first registry's wins, except for
    the names in :data:`GLOBAL_REGISTRY_WINS`, which only the later registries serve.

    The KServe and ASGI integrations serve this package's registry with prometheus_client's global one after it
    (process metrics, a model's own metrics, as KServe's own ``/metrics`` does).
    """

    def __init__(self, *collectors: Collector) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        seen: set[str] = set(GLOBAL_REGISTRY_WINS)
        for index, collector in enumerate(self.collectors):
            if index == 1:
                seen -= GLOBAL_REGISTRY_WINS
            for family in collector.collect():
                if family.name not in seen:
                    seen.add(family.name)
                    yield family


# --------------------------------------------------------------------------------------------- standalone
#
# The endpoint shares a process with the model server, so a client must cost it neither a thread nor unbounded
# memory: one asyncio loop on one thread accepts and reads every connection (selector-based, a few KB each),
# a small fixed pool renders, and the limits below bound the rest.

LISTEN_BACKLOG = 128
"""Connections the kernel queues for the endpoint before they are accepted (the ``listen()`` backlog)."""

MAX_CONNECTIONS = 256
"""Connections the endpoint keeps open. One more closes the connection that has waited longest for a request
(never one being answered), so a flood of idle connections cannot lock a scraper out."""

IDLE_TIMEOUT = 75.0
"""Seconds a connection may wait for a request (its first, or the next on a kept-alive connection) before
the endpoint closes it. Above Prometheus's default scrape interval (1 minute), so its kept-alive connection
stays."""

REQUEST_TIMEOUT = 10.0
"""Seconds a client has to send a request's line, headers and body once it has begun, and again to take the
answer: a client that trickles its request (slow loris) or never reads is closed then."""

MAX_REQUEST_HEAD = 16384
"""Bytes of request line and headers accepted; a longer head is answered 431 and the connection closed."""

RENDER_THREADS = 2
"""Threads that render scrapes: with the loop's own thread, all the endpoint ever runs, whatever clients do."""

_MAX_DISCARDED_BODY = 65536  # a request body up to this size is read and dropped; the connection stays usable
_LINGER = 2.0  # seconds spent draining a client's unread input before closing, so the close does not reset


class _Rejected(Exception):
    """A request the endpoint answers with ``status`` and then closes the connection."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


class _Endpoint:
    """The standalone endpoint's connections, on the server thread's event loop."""

    def __init__(self, registry: Collector, path: str, executor: ThreadPoolExecutor) -> None:
        self.registry = registry
        self.path = path
        self.executor = executor
        self.connections: set[asyncio.StreamWriter] = set()
        # connections waiting for a request, longest-waiting first (the ones to close when there are too many)
        self.waiting: dict[asyncio.StreamWriter, None] = {}

    async def serve(self, sock: socket.socket, stopping: asyncio.Event) -> None:
        server = await asyncio.start_server(self.connection, sock=sock, backlog=LISTEN_BACKLOG,
                                            limit=MAX_REQUEST_HEAD)
        try:
            await stopping.wait()
        finally:
            server.close()
            for writer in list(self.connections):
                writer.transport.abort()  # its task sees the end of the stream and ends
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            if tasks:
                _, pending = await asyncio.wait(tasks, timeout=1)
                for task in pending:  # waiting for a render
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections.add(writer)
        try:
            if len(self.connections) > MAX_CONNECTIONS and not self._close_longest_waiting():
                return  # every other connection is being answered: this one goes
            while await self._exchange(reader, writer):
                pass
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away
        except asyncio.CancelledError:
            pass  # the server is stopping (asyncio would log a cancelled connection task as an error)
        finally:
            self.connections.discard(writer)
            self.waiting.pop(writer, None)
            writer.transport.close()

    def _close_longest_waiting(self) -> bool:
        for writer in self.waiting:
            writer.transport.close()  # its reader sees the end of the stream; its task ends and forgets it
            del self.waiting[writer]
            return True
        return False

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Read one request and answer it; return whether the connection stays open for another."""
        self.waiting[writer] = None
        try:
            first = await asyncio.wait_for(reader.read(1), IDLE_TIMEOUT)
        except asyncio.TimeoutError:
            return False
        finally:
            self.waiting.pop(writer, None)
        if not first:
            return False
        self.waiting[writer] = None  # a request still arriving can be closed for a newcomer, like an idle one
        try:
            request = await asyncio.wait_for(self._read_request(first, reader), REQUEST_TIMEOUT)
        except asyncio.TimeoutError:
            await self._close_answering(reader, writer, 408)
            return False
        except _Rejected as rejected:
            await self._close_answering(reader, writer, rejected.status)
            return False
        finally:
            self.waiting.pop(writer, None)
        method, target, headers, keep_alive, read_whole = request
        status, response_headers, body = await self._answer(method, target, headers)
        await self._send(writer, status, response_headers, b"" if method == "HEAD" else body, keep_alive)
        if not read_whole:
            await self._linger(reader, writer)
        return keep_alive

    async def _read_request(self, first: bytes, reader: asyncio.StreamReader
                            ) -> tuple[str, str, http.client.HTTPMessage, bool, bool]:
        """The request's method, target, headers, whether the connection stays open, and whether the whole
        request (body included) was read."""
        head = first + await self._read_line(reader)
        skipped = 0
        while head in (b"\r\n", b"\n"):  # empty lines before a request are ignored (RFC 9112, section 2.2)
            skipped += len(head)
            if skipped > MAX_REQUEST_HEAD:
                raise _Rejected(400)
            head = await self._read_line(reader)
        lines = [head]
        while lines[-1] not in (b"\r\n", b"\n"):
            lines.append(await self._read_line(reader))
            head += lines[-1]
            if len(head) > MAX_REQUEST_HEAD:
                raise _Rejected(431)
        words = lines[0].decode("latin-1").split()
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            raise _Rejected(400)
        method, target, version = words
        if version not in ("HTTP/1.0", "HTTP/1.1"):
            raise _Rejected(505)
        try:
            headers = http.client.parse_headers(io.BytesIO(b"".join(lines[1:])))
        except http.client.HTTPException:  # more headers than http.client accepts
            raise _Rejected(431) from None
        connection = ",".join(headers.get_all("Connection", []))
        tokens = {token.strip().lower() for token in connection.split(",")}
        keep_alive = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
        length = (headers["Content-Length"] or "0").strip()
        if not length.isdigit():
            raise _Rejected(400)
        if "Transfer-Encoding" in headers or int(length) > _MAX_DISCARDED_BODY:
            return method, target, headers, False, False  # a body not worth reading: answer, then close
        if int(length):
            await reader.readexactly(int(length))
        return method, target, headers, keep_alive, True

    @staticmethod
    async def _read_line(reader: asyncio.StreamReader) -> bytes:
        try:
            line = await reader.readline()
        except ValueError:  # longer than the reader's limit
            raise _Rejected(431) from None
        if not line.endswith(b"\n"):
            raise asyncio.IncompleteReadError(line, None)
        return line

    async def _answer(self, method: str, target: str, headers: http.client.HTTPMessage
                      ) -> tuple[int, list[tuple[str, str]], bytes]:
        if urlsplit(target).path != self.path:
            return _plain(404)
        if method not in ALLOWED_METHODS:
            return _plain(405, [("Allow", _ALLOW_HEADER)])
        loop = asyncio.get_running_loop()
        try:
            response_headers, body = await loop.run_in_executor(
                self.executor, render, self.registry, headers.get("Accept"), headers.get("Accept-Encoding")
            )
        except Exception:  # a broken collector must not kill the server
            _logger.exception("kserve-otel: rendering the metrics failed")
            return _plain(500)
        return 200, response_headers, body

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, status: int, headers: list[tuple[str, str]], body: bytes,
                    keep_alive: bool) -> None:
        lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
                 *(f"{name}: {value}" for name, value in headers),
                 f"Date: {formatdate(usegmt=True)}", f"Connection: {'keep-alive' if keep_alive else 'close'}"]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)

    async def _close_answering(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               status: int) -> None:
        status, headers, body = _plain(status)
        await self._send(writer, status, headers, body, keep_alive=False)
        await self._linger(reader, writer)

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Close the sending side, then drop what the client still sends until it closes too (for a moment
        at most): closing a socket with unread input resets the connection, and the client could lose the
        answer."""
        if writer.can_write_eof():
            writer.write_eof()
        try:
            await asyncio.wait_for(_read_to_end(reader), _LINGER)
        except (asyncio.TimeoutError, OSError):
            pass


async def _read_to_end(reader: asyncio.StreamReader) -> None:
    while await reader.read(_MAX_DISCARDED_BODY):
        pass


def _plain(status: int, extra: list[tuple[str, str]] | None = None
           ) -> tuple[int, list[tuple[str, str]], bytes]:
    """A plain-text answer: the status's reason phrase as the body."""
    body = f"{HTTPStatus(status).phrase}\n".encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body))),
               *(extra or [])]
    return status, headers, body


class MetricsServer:
    """The endpoint on a port of its own, served by a daemon thread. :meth:`start` never raises for a busy port.

    However many clients connect, it runs one thread for its event loop and at most :data:`RENDER_THREADS`
    that render, keeps at most :data:`MAX_CONNECTIONS` connections, and closes idle or trickling ones
    (:data:`IDLE_TIMEOUT`, :data:`REQUEST_TIMEOUT`); kept-alive scrapers keep their connection.
    """

    def __init__(self, registry: Collector, host: str = "0.0.0.0", port: int = 8080, path: str = "/metrics") -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self.path = path
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None

    def start(self, source: str = "") -> bool:
        """Bind and serve; on failure log one clear error and return False, so inference goes on without it."""
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.host, self.port))
                sock.listen(LISTEN_BACKLOG)
            except OSError:
                sock.close()
                raise
        except OSError as exc:
            where = f" (port from {source})" if source else ""
            _logger.error(
                "kserve-otel: cannot serve metrics on %s:%s%s: %s%s; inference goes on without this endpoint",
                self.host, self.port, self.path, exc.strerror or exc, where,
            )
            return False
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._stopping = asyncio.Event()
        self._thread = threading.Thread(target=self._run, args=(self._loop, self._stopping, sock),
                                        name="kserve-otel-metrics", daemon=True)
        self._thread.start()
        return True

    def _run(self, loop: asyncio.AbstractEventLoop, stopping: asyncio.Event, sock: socket.socket) -> None:
        executor = ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="kserve-otel-metrics-render")
        try:
            loop.run_until_complete(_Endpoint(self.registry, self.path, executor).serve(sock, stopping))
        except Exception:
            _logger.exception("kserve-otel: the metrics endpoint stopped")
        finally:
            sock.close()
            executor.shutdown(wait=False, cancel_futures=True)
            loop.close()

    @property
    def running(self) -> bool:
        return self._thread is not None

    @property
    def url(self) -> str:
        """The endpoint's URL (with the loopback address when bound to all interfaces)."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}{self.path}"

    def stop(self) -> None:
        """Stop serving, close every connection and free the port."""
        if self._loop is not None and self._stopping is not None and self._thread is not None:
            try:
                self._loop.call_soon_threadsafe(self._stopping.set)
            except RuntimeError:  # the loop already ended
                pass
            self._thread.join(timeout=5)
        self._loop = self._stopping = self._thread = None


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
            status, headers, body = _plain(405, [("Allow", _ALLOW_HEADER)])
            await _respond(send, status, headers, body)
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
