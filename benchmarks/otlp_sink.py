"""A real OTLP/HTTP receiver for the throughput benchmark, in a process of its own: it decodes every export and
counts the spans, so the benchmark can check that a traced server lost none.

Why a process: decoding protobuf costs CPU, and inside the load generator or the server it would be charged to
them. Run as ``python -m benchmarks.otlp_sink PORT``; ``POST /v1/traces`` takes exports, ``GET /count`` answers
``{"spans": N, "exports": M}`` (spans by service name under ``"by_service"``).
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

_lock = threading.Lock()
_spans: Counter[str] = Counter()
_exports = 0


def _service(resource_spans) -> str:  # noqa: ANN001 - a protobuf message
    for attribute in resource_spans.resource.attributes:
        if attribute.key == "service.name":
            return attribute.value.string_value
    return ""


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        global _exports
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path != "/v1/traces":
            self._answer(404, b"")
            return
        request = ExportTraceServiceRequest.FromString(body)
        counted = Counter({_service(r): sum(len(s.spans) for s in r.scope_spans) for r in request.resource_spans})
        with _lock:
            _spans.update(counted)
            _exports += 1
        self._answer(200, b"", "application/x-protobuf")

    def do_GET(self) -> None:  # noqa: N802
        with _lock:
            body = json.dumps({"spans": sum(_spans.values()), "exports": _exports, "by_service": dict(_spans)})
        self._answer(200, body.encode(), "application/json")

    def _answer(self, status: int, body: bytes, content_type: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main(argv: list[str]) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(argv[0])), _Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
