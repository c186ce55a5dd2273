"""The request path's bookkeeping, in C when the optional extension ``kserve_otel._speedups`` is built, else in
pure Python: the same classes, the same behaviour.

Why two implementations: every step observation and every HTTP request passes through :class:`Histogram` and
:class:`HTTPRecorder`. Measured with callgrind (instruction counts, repeatable on a noisy machine:
``benchmarks/instructions.py``), the ASGI middleware adds about 21,600 instructions to a bare Starlette request
of about 154,000 with the pure-Python classes below, and about 9,700 with the C ones; a pure-Python histogram
observation with its series lookup alone is about 3,900. No library offers this: prometheus_client's histogram
is pure Python with a lock too, and the OpenTelemetry SDK's record path costs 9-15 µs.

The C version is used when it imports; ``KSERVE_OTEL_NO_EXTENSION=1`` (read once, at import) forces the
pure-Python one, and also stops ``pip install`` from building the extension. :data:`IMPLEMENTATION` says which
is in use. Both are tested against the same assertions (``tests/test_speedups.py``).

Thread safety: the C functions run under the GIL without calling Python code before their update is complete,
so each observation is atomic without a lock; the pure-Python ones take a lock where they need one.
"""

from __future__ import annotations

import math
import os
import threading
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping
from time import perf_counter
from typing import Any

__all__ = ["IMPLEMENTATION", "HTTPRecorder", "Histogram", "PyHTTPRecorder", "PyHistogram", "PyRequest", "Request"]


class PyHistogram:
    """Cumulative explicit-bucket histogram of one label set; :meth:`observe` is the hot path."""

    __slots__ = ("bounds", "_counts", "_sum", "_min", "_max", "_interval_min", "_interval_max", "_lock", "mirror")

    def __init__(self, bounds: Iterable[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        if any(not a < b for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError("Histogram bounds must be strictly increasing")
        self._counts = [0] * (len(self.bounds) + 1)
        self._sum = 0.0
        self._min = self._interval_min = math.inf
        self._max = self._interval_max = -math.inf
        self._lock = threading.Lock()
        #: Called with every observed value too, when set (see :func:`kserve_otel.series.set_mirror_factory`).
        self.mirror: Callable[[float], object] | None = None

    def observe(self, value: float) -> None:
        """Count ``value`` (seconds) in its bucket: bucket i holds bounds[i-1] < value <= bounds[i]."""
        try:  # first, so that a value that is no number raises before anything is counted
            number = value.__float__()  # not float(value), which would parse strings
        except AttributeError:
            raise TypeError(f"must be a real number, not {type(value).__name__}") from None
        index = bisect_left(self.bounds, number)
        # acquire/try/finally rather than ``with``: the same guarantee without the context-manager protocol's
        # two method lookups (70 ns of the 240 ns an observation took).
        lock = self._lock
        lock.acquire()
        try:
            self._counts[index] += 1
            self._sum += number
            # The cumulative extremes are never inside the interval's: only a new interval extreme can be one.
            if number < self._interval_min:
                self._interval_min = number
                if number < self._min:
                    self._min = number
            if number > self._interval_max:
                self._interval_max = number
                if number > self._max:
                    self._max = number
        finally:
            lock.release()
        mirror = self.mirror
        if mirror is not None:
            mirror(value)

    def snapshot(self, reset_interval: bool = False) -> tuple[tuple[int, ...], float, float, float, float, float]:
        """(bucket counts, sum, min, max, interval min, interval max), read consistently.

        The interval min/max cover the observations since the last ``reset_interval=True`` snapshot; delta
        readers use them, since a cumulative min or max says nothing about one export interval.
        """
        with self._lock:
            snap = (tuple(self._counts), self._sum, self._min, self._max, self._interval_min, self._interval_max)
            if reset_interval:
                self._interval_min, self._interval_max = math.inf, -math.inf
        return snap

    @property
    def count(self) -> int:
        """Observations so far."""
        with self._lock:
            return sum(self._counts)


_RESPONSE_START = "http.response.start"


class PyRequest:
    """One HTTP request being recorded (from :meth:`PyHTTPRecorder.start`): call it as the app's ``send``; it
    notes the response status. :meth:`finish` ends it."""

    __slots__ = ("send", "method", "status", "traced", "_recorder", "_decrement", "_started", "_finished")

    def __init__(self, recorder: PyHTTPRecorder, send: Callable[[Any], Awaitable[None]], method: str,
                 decrement: Callable[[], object], traced: bool) -> None:
        self._recorder = recorder
        self.send = send
        self.method = method
        self._decrement = decrement
        #: The response status: 500 (what the client gets if the app fails before answering) until it starts one.
        self.status: Any = 500
        #: Whether a header the trace propagators read is present.
        self.traced = traced
        self._finished = False
        self._started = perf_counter()

    def __call__(self, message: Mapping[str, Any]) -> Awaitable[None]:
        # Returns ``send``'s awaitable: no coroutine frame of its own per message.
        if message.get("type") == _RESPONSE_START:
            self.status = message.get("status", self.status)
        return self.send(message)

    def finish(self, scope: Mapping[str, Any]) -> None:
        """The request is over: one in flight less, and its duration observed by method, route template and
        status. Calls after the first do nothing."""
        if self._finished:
            return
        self._finished = True
        elapsed = perf_counter() - self._started
        self._decrement()
        route = scope.get("route")
        path = getattr(route, "path", "") if route is not None else ""
        key = (self.method, path if isinstance(path, str) else "", self.status)
        metrics = self._recorder.metrics
        (metrics.duration_series.get(key) or metrics.duration(*key)).observe(elapsed)


class PyHTTPRecorder:
    """Records HTTP server requests into ``metrics`` (a :class:`kserve_otel.request_spans.HTTPServerMetrics`):
    requests in flight by method, durations by method, route template and status.

    ``trace_fields()`` returns the header names (lower-case bytes) the trace propagators read; with
    ``watch_dict`` and ``watch_key`` its answer is kept while ``watch_dict[watch_key]`` stays the same object.
    """

    __slots__ = ("metrics", "known_methods", "trace_fields", "_watch", "_cache")

    def __init__(self, metrics: Any, known_methods: Iterable[str], trace_fields: Callable[[], frozenset[bytes]],
                 watch_dict: dict[str, Any] | None = None, watch_key: str | None = None) -> None:
        self.metrics = metrics
        self.known_methods = frozenset(known_methods)
        self.trace_fields = trace_fields
        self._watch = (watch_dict, watch_key) if watch_dict is not None else None
        self._cache: tuple[object, frozenset[bytes]] | None = None

    def _fields(self) -> frozenset[bytes]:
        if self._watch is None:
            return self.trace_fields()
        current = self._watch[0].get(self._watch[1])  # type: ignore[arg-type]
        cache = self._cache
        if cache is not None and current is not None and cache[0] is current:
            return cache[1]
        fields = self.trace_fields()
        if current is not None:
            self._cache = (current, fields)
        return fields

    def start(self, scope: Mapping[str, Any], send: Callable[[Any], Awaitable[None]]) -> PyRequest:
        """A request begins: one more in flight, its clock started. Returns the request to hand to the app as
        its ``send``, and to :meth:`PyRequest.finish` when the request is over."""
        method = scope["method"]
        if method not in self.known_methods:
            method = "_OTHER"
        metrics = self.metrics
        active = metrics.active_series.get(method) or metrics.active(method)
        fields = self._fields()
        traced = False
        for key, _ in scope.get("headers") or ():
            if key in fields:
                traced = True
                break
        request = PyRequest(self, send, method, active.decrement, traced)
        active.increment()
        return request


try:
    if os.environ.get("KSERVE_OTEL_NO_EXTENSION"):
        raise ImportError("KSERVE_OTEL_NO_EXTENSION is set")
    from ._speedups import Histogram, HTTPRecorder, Request  # type: ignore[import-not-found]

    #: Which implementation is in use: ``"c"`` (the extension) or ``"python"``.
    IMPLEMENTATION = "c"
except ImportError:
    Histogram = PyHistogram  # type: ignore[assignment,misc]
    HTTPRecorder = PyHTTPRecorder  # type: ignore[assignment,misc]
    Request = PyRequest  # type: ignore[assignment,misc]
    IMPLEMENTATION = "python"
