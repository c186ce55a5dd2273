"""One HTTP GET with a one-line explanation of every way it can fail.

Why its own module: both sources of numbers (a metrics endpoint, a Prometheus server) are plain HTTP GETs
whose failures (nothing listening, no such host, a timeout, a 404 or an HTML page) must end as one readable
line, and the report depends on nothing beyond the standard library to make them (``httpx`` is a test-only
dependency of this package).
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from .errors import ReportError

#: Seconds one request may take.
TIMEOUT = 10.0


@dataclass
class Response:
    url: str
    status: int
    content_type: str
    body: str


class HTTPStatusError(ReportError):
    """The server answered, with a status other than 2xx."""

    def __init__(self, message: str, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body


def normalize_url(url: str, default_path: str = "") -> str:
    """``url`` with ``http://`` added when it has no scheme, and ``default_path`` when it has no path."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ReportError(f"{url!r} is not an http:// or https:// URL")
    if parts.path in ("", "/") and default_path:
        parts = parts._replace(path=default_path)
    return urllib.parse.urlunsplit(parts)


def get(url: str, accept: str, timeout: float = TIMEOUT, shown: str | None = None) -> Response:
    """GET ``url``; any answer but a 2xx, and any failure to get one, raises :class:`ReportError` (naming
    ``shown`` instead of the URL when given: an API URL with its query is no help in a one-line message)."""
    name = shown or url
    request = urllib.request.Request(url, headers={"Accept": accept, "User-Agent": "kserve-otel-report"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            body = answer.read().decode("utf-8", errors="replace")
            return Response(url, answer.status, answer.headers.get("Content-Type", ""), body)
    except urllib.error.HTTPError as error:
        body = error.read().decode("utf-8", errors="replace") if error.fp is not None else ""
        raise HTTPStatusError(f"{name} answered HTTP {error.code} {error.reason}", error.code, body) from None
    except urllib.error.URLError as error:
        raise ReportError(f"cannot reach {name}: {_reason(error.reason)}") from None
    except TimeoutError:
        raise ReportError(f"cannot reach {name}: no answer within {timeout:g} s") from None
    except (OSError, ValueError) as error:  # a connection reset mid-answer, a malformed URL
        raise ReportError(f"cannot reach {name}: {_reason(error)}") from None


def _reason(reason: object) -> str:
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the server running, and is this its port?)"
    if isinstance(reason, socket.gaierror):
        return "no such host"
    if isinstance(reason, TimeoutError):
        return "no answer in time"
    text = getattr(reason, "strerror", None) or str(reason)
    return text or type(reason).__name__
