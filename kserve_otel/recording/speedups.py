"""The request path's bookkeeping, in C when the optional extension ``kserve_otel.recording._speedups`` is
built, else in pure Python: the same classes, the same behaviour.

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
import operator
import os
import struct
import threading
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Mapping
from time import perf_counter, time
from typing import Any

__all__ = [
    "IMPLEMENTATION", "Counter", "HTTPRecorder", "Histogram", "PyCounter", "PyHTTPRecorder", "PyHistogram", "PyRequest",
    "Request",
]


#: An exemplar slot of a histogram's cells (both implementations'): sequence number (odd while written, 0 never
#: written), value, Unix time, trace id high and low 64 bits, span id.
EXEMPLAR_SLOT = struct.Struct("=QddQQQ")
_EXEMPLAR = EXEMPLAR_SLOT
_SEQ = struct.Struct("=Q")
#: One native bucket count.
_COUNT = _SEQ
_LOW_64 = (1 << 64) - 1

#: Native (exponential) histograms, as Prometheus defines them: bucket ``k`` of schema ``s`` holds
#: (2^((k-1)/2^s), 2^(k/2^s)]; values at or below the zero threshold count in the zero bucket. A histogram starts
#: at :data:`NATIVE_SCHEMA` (buckets about 9 % wide) and halves its resolution (schema - 1, pairs of buckets
#: merged) whenever its observations would span more than :data:`NATIVE_MAX_BUCKETS` buckets, as
#: OpenTelemetry's exponential aggregation does.
NATIVE_SCHEMA = 3
NATIVE_MAX_BUCKETS = 160
NATIVE_ZERO_THRESHOLD = 2.0 ** -128
#: The native block's header: sequence number (odd while written), schema, zero count, offset (the key of the
#: first bucket), buckets in use; then NATIVE_MAX_BUCKETS counts.
NATIVE_HEADER = struct.Struct("=QqQqQ")
NATIVE_SIZE = NATIVE_HEADER.size + 8 * NATIVE_MAX_BUCKETS
#: The lower bounds of the buckets of each positive schema within one power of two (Prometheus's
#: nativeHistogramBounds), for :func:`native_key`.
_NATIVE_BOUNDS = {s: tuple(2.0 ** (j / (1 << s) - 1) for j in range(1 << s)) for s in range(1, 9)}


def native_key(value: float, schema: int) -> int:
    """The native bucket ``value`` (> 0) falls in at ``schema``: Prometheus's own computation (``math.Frexp``)."""
    frac, exp = math.frexp(value)
    if schema > 0:
        bounds = _NATIVE_BOUNDS[schema]
        return bisect_left(bounds, frac) + (exp - 1) * len(bounds)
    key = exp - 1 if frac == 0.5 else exp
    return (key + (1 << -schema) - 1) >> -schema


def native_reduce(offset: int, counts: list[int], by: int) -> tuple[int, list[int]]:
    """Buckets ``counts`` (from key ``offset``) at a schema ``by`` lower: each ``2**by`` neighbours merged."""
    if by <= 0 or not counts:
        return offset, list(counts)
    merged: dict[int, int] = {}
    for index, count in enumerate(counts):
        key = offset + index
        for _ in range(by):
            key = (key + 1) >> 1
        merged[key] = merged.get(key, 0) + count
    low, high = min(merged), max(merged)
    return low, [merged.get(key, 0) for key in range(low, high + 1)]


def histogram_layout(buckets: int, exemplars: bool, native: bool) -> tuple[int, int, int]:
    """Where a histogram's cells keep their parts, in bytes from their start: (exemplar slots, native block,
    size). Counts come first (``buckets`` uint64), then sum, min and max (doubles), then an exemplar slot per
    bucket (with ``exemplars``), then the native block (with ``native``). The C twin and
    :mod:`kserve_otel.export.series_files` (which reads other processes' cells) use the same layout."""
    exemplars_at = 8 * buckets + 24
    native_at = exemplars_at + (_EXEMPLAR.size * buckets if exemplars else 0)
    return exemplars_at, native_at, native_at + (NATIVE_SIZE if native else 0)


def _cells(size: int, buffer: Any = None, offset: int = 0) -> memoryview:
    """``size`` bytes of cells: fresh zeroed memory, or the part of ``buffer`` at ``offset`` (8-byte aligned)."""
    if buffer is None:
        return memoryview(bytearray(size))
    view = memoryview(buffer)
    if view.readonly:
        raise TypeError("bind() needs a writable buffer")
    if offset < 0 or offset % 8 or offset + size > view.nbytes:
        raise ValueError(f"bind: {size} bytes at offset {offset} do not fit, 8-byte aligned, in a buffer of"
                         f" {view.nbytes} bytes")
    return view.cast("B")[offset: offset + size]


class PyHistogram:
    """Cumulative explicit-bucket histogram of one label set; :meth:`observe` is the hot path.

    Its cells (``len(bounds) + 1`` bucket counts as native uint64, then sum, min and max as native doubles) live
    in memory of its own until :meth:`bind` moves them into a shared buffer, where other processes read them
    (:mod:`kserve_otel.export.series_files`). The interval extremes stay in the object: only delta readers use
    them.
    """

    __slots__ = ("bounds", "with_exemplars", "with_native", "_exemplars_at", "_native_at", "cells_size", "_cells",
                 "_counts", "_totals", "_interval_min", "_interval_max", "_lock", "mirror")

    def __init__(self, bounds: Iterable[float], exemplars: bool = False, native: bool = False) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        if any(not a < b for a, b in zip(self.bounds, self.bounds[1:])):
            raise ValueError("Histogram bounds must be strictly increasing")
        #: Whether the cells hold an exemplar slot per bucket (see :meth:`observe_exemplar`).
        self.with_exemplars = bool(exemplars)
        #: Whether the cells hold a native (exponential) histogram too (see :data:`NATIVE_SCHEMA`).
        self.with_native = bool(native)
        #: Bytes that :meth:`bind` needs in its buffer (and where its exemplars and native block start).
        self._exemplars_at, self._native_at, self.cells_size = histogram_layout(
            len(self.bounds) + 1, self.with_exemplars, self.with_native)
        self._lock = threading.Lock()
        self._place(_cells(self.cells_size), carry=None)
        #: Called with every observed value too, when set (see
        #: :func:`kserve_otel.recording.series.set_mirror_factory`).
        self.mirror: Callable[[float], object] | None = None

    def _place(self, cells: memoryview, carry: bool | None) -> None:
        split = 8 * (len(self.bounds) + 1)
        counts, totals = cells[:split].cast("Q"), cells[split: split + 24].cast("d")
        if carry:
            cells[:] = self._cells
        else:
            cells[:] = bytes(len(cells))
            totals[0], totals[1], totals[2] = 0.0, math.inf, -math.inf
            if self.with_native:
                NATIVE_HEADER.pack_into(cells, self._native_at, 0, NATIVE_SCHEMA, 0, 0, 0)
            self._interval_min, self._interval_max = math.inf, -math.inf
        self._cells, self._counts, self._totals = cells, counts, totals

    def observe_exemplar(self, value: float, trace_id: int, span_id: int) -> None:
        """Observe ``value`` and keep it, with the time and the ids, as the exemplar of its bucket (the latest
        replaces the one before; nothing more without exemplar cells). Each slot: a sequence number (odd
        while written), value, Unix time, the trace id's high and low 64 bits, the span id."""
        self.observe(value)
        if not self.with_exemplars:
            return
        index = bisect_left(self.bounds, value.__float__())
        at = self._exemplars_at + _EXEMPLAR.size * index
        with self._lock:
            cells = self._cells
            (seq,) = _SEQ.unpack_from(cells, at)
            _SEQ.pack_into(cells, at, seq + 1)
            _EXEMPLAR.pack_into(cells, at, seq + 1, float(value), time(), trace_id >> 64, trace_id & _LOW_64,
                                span_id)
            _SEQ.pack_into(cells, at, seq + 2)

    def exemplars(self) -> tuple[tuple[float, float, int, int] | None, ...]:
        """Per bucket, ``None`` or (value, Unix time, trace id, span id) of its latest exemplar."""
        if not self.with_exemplars:
            return (None,) * (len(self.bounds) + 1)
        with self._lock:
            start = self._exemplars_at
            slots = [_EXEMPLAR.unpack_from(self._cells, start + _EXEMPLAR.size * i) for i in range(len(self.bounds) + 1)]
        return tuple(None if seq == 0 else (value, when, (hi << 64) | lo, span)
                     for seq, value, when, hi, lo, span in slots)

    def _native_add(self, value: float) -> None:
        """Count ``value`` in the native histogram (the lock held): the zero bucket, or its exponential bucket,
        the schema lowered as often as the span of buckets needs. NaN is not counted there."""
        cells, at = self._cells, self._native_at
        seq, schema, zero, offset, used = NATIVE_HEADER.unpack_from(cells, at)
        NATIVE_HEADER.pack_into(cells, at, seq + 1, schema, zero, offset, used)  # odd: being written
        counts_at = at + NATIVE_HEADER.size
        if value <= NATIVE_ZERO_THRESHOLD:  # durations are never negative: below the threshold is zero
            zero += 1
        elif value == value:
            key = native_key(value, schema)
            if used and offset <= key < offset + used:  # the common case: a bucket already spanned, counted in place
                cell = counts_at + _COUNT.size * (key - offset)
                _COUNT.pack_into(cells, cell, _COUNT.unpack_from(cells, cell)[0] + 1)
                NATIVE_HEADER.pack_into(cells, at, seq + 2, schema, zero, offset, used)  # even: whole
                return
            counts = list(struct.unpack_from(f"={used}Q", cells, counts_at)) if used else []
            if not counts:
                offset, counts = key, [0]
            low, high = min(offset, key), max(offset + len(counts) - 1, key)
            while high - low + 1 > NATIVE_MAX_BUCKETS:
                offset, counts = native_reduce(offset, counts, 1)
                schema -= 1
                key = native_key(value, schema)
                low, high = min(offset, key), max(offset + len(counts) - 1, key)
            counts = [0] * (offset - low) + counts + [0] * (high - (offset + len(counts) - 1))
            offset = low
            counts[key - offset] += 1
            used = len(counts)
            struct.pack_into(f"={used}Q", cells, counts_at, *counts)
        NATIVE_HEADER.pack_into(cells, at, seq + 2, schema, zero, offset, used)  # even: whole

    def native(self) -> tuple[int, float, int, int, tuple[int, ...]] | None:
        """(schema, zero threshold, zero count, offset, bucket counts from the key ``offset``) of the native
        histogram, or ``None`` without one."""
        if not self.with_native:
            return None
        with self._lock:
            _, schema, zero, offset, used = NATIVE_HEADER.unpack_from(self._cells, self._native_at)
            counts = struct.unpack_from(f"={used}Q", self._cells, self._native_at + NATIVE_HEADER.size)
        return schema, NATIVE_ZERO_THRESHOLD, zero, offset, counts

    def bind(self, buffer: Any, offset: int, carry: bool = True) -> None:
        """Keep the cells in the writable ``buffer`` at ``offset`` from now on, with what was counted so far
        unless ``carry`` is false."""
        cells = _cells(self.cells_size, buffer, offset)
        with self._lock:
            self._place(cells, carry=carry)

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
            if self.with_native:
                self._native_add(number)
            totals = self._totals
            totals[0] += number
            # The cumulative extremes are never inside the interval's: only a new interval extreme can be one.
            if number < self._interval_min:
                self._interval_min = number
                if number < totals[1]:
                    totals[1] = number
            if number > self._interval_max:
                self._interval_max = number
                if number > totals[2]:
                    totals[2] = number
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
            total, low, high = self._totals
            snap = (tuple(self._counts), total, low, high, self._interval_min, self._interval_max)
            if reset_interval:
                self._interval_min, self._interval_max = math.inf, -math.inf
        return snap

    @property
    def count(self) -> int:
        """Observations so far."""
        with self._lock:
            return sum(self._counts)


class PyCounter:
    """A 64-bit count of one label set: :meth:`add`, and :meth:`increment` / :meth:`decrement` for requests in
    flight. Its cell (one native int64) may be bound into a shared buffer, like a histogram's."""

    __slots__ = ("_cell", "_lock", "mirror")

    cells_size = 8

    def __init__(self) -> None:
        self._cell = _cells(8).cast("q")
        self._lock = threading.Lock()
        #: Called with every amount :meth:`add` adds, when set (see
        #: :func:`kserve_otel.recording.series.set_mirror_factory`).
        self.mirror: Callable[[int], object] | None = None

    def add(self, amount: int = 1) -> None:
        """Add ``amount`` (an int); the mirror, if any, sees it too."""
        amount = operator.index(amount)  # an int, as the C version requires
        with self._lock:
            self._cell[0] += amount
        mirror = self.mirror
        if mirror is not None:
            mirror(amount)

    def increment(self) -> None:
        """One more (no mirror)."""
        with self._lock:
            self._cell[0] += 1

    def decrement(self) -> None:
        """One less (no mirror)."""
        with self._lock:
            self._cell[0] -= 1

    def bind(self, buffer: Any, offset: int, carry: bool = True) -> None:
        """Keep the cell in the writable ``buffer`` at ``offset`` from now on, with its value so far unless
        ``carry`` is false."""
        cell = _cells(8, buffer, offset).cast("q")
        with self._lock:
            cell[0] = self._cell[0] if carry else 0
            self._cell = cell

    @property
    def value(self) -> int:
        """The count."""
        return int(self._cell[0])


_RESPONSE_START = "http.response.start"
_RESPONSE_BODY = "http.response.body"


class PyRequest:
    """One HTTP request being recorded (from :meth:`PyHTTPRecorder.start`): call it as the app's ``send``; it
    notes the response status, and ends the request (:meth:`finish`) when the response's last body message
    goes out: a request is counted before its client can see it answered, so a process killed right after
    has still counted it. :meth:`finish` ends a request that sent no complete response."""

    __slots__ = ("send", "method", "status", "traced", "span", "last_send", "_recorder", "_decrement", "_started",
                 "_finished", "_scope")

    def __init__(self, recorder: PyHTTPRecorder, send: Callable[[Any], Awaitable[None]], method: str,
                 decrement: Callable[[], object], traced: bool, scope: Mapping[str, Any]) -> None:
        self._recorder = recorder
        self._scope: Mapping[str, Any] | None = scope
        self.send = send
        self.method = method
        self._decrement = decrement
        #: The response status: 500 (what the client gets if the app fails before answering) until it starts one.
        self.status: Any = 500
        #: Whether a header the trace propagators read is present.
        self.traced = traced
        #: The request's recording span (``None`` by default): :meth:`finish` then observes the duration through
        #: ``metrics.observe_traced(series, seconds, span)``, which keeps its exemplar.
        self.span: Any = None
        #: ``None``, or what sends the response's last message in place of ``send``: ``last_send(send, message)``
        #: returns the awaitable (called once).
        self.last_send: Callable[[Callable[[Any], Awaitable[None]], Any], Awaitable[None]] | None = None
        self._finished = False
        self._started = perf_counter()

    def __call__(self, message: Mapping[str, Any]) -> Awaitable[None]:
        # Returns ``send``'s awaitable: no coroutine frame of its own per message.
        kind = message.get("type")
        if kind == _RESPONSE_START:
            self.status = message.get("status", self.status)
        elif kind == _RESPONSE_BODY and not self._finished and not message.get("more_body", False):
            self.finish(self._scope or {})
            last_send, self.last_send = self.last_send, None
            if last_send is not None:
                return last_send(self.send, message)
        return self.send(message)

    def finish(self, scope: Mapping[str, Any]) -> None:
        """The request is over: one in flight less, and its duration observed by method, route template and
        status. Calls after the first do nothing."""
        if self._finished:
            return
        self._finished = True
        self._scope = None
        elapsed = perf_counter() - self._started
        self._decrement()
        route = scope.get("route")
        path = getattr(route, "path", "") if route is not None else ""
        key = (self.method, path if isinstance(path, str) else "", self.status)
        metrics = self._recorder.metrics
        series = metrics.duration_series.get(key) or metrics.duration(*key)
        span, self.span = self.span, None
        if span is not None:
            metrics.observe_traced(series, elapsed, span)
        else:
            series.observe(elapsed)


class PyHTTPRecorder:
    """Records HTTP server requests into ``metrics`` (a
    :class:`kserve_otel.request_path.request_spans.HTTPServerMetrics`): requests in flight by method,
    durations by method, route template and status.

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
        request = PyRequest(self, send, method, active.decrement, traced, scope)
        active.increment()
        return request


try:
    if os.environ.get("KSERVE_OTEL_NO_EXTENSION"):
        raise ImportError("KSERVE_OTEL_NO_EXTENSION is set")
    from ._speedups import Counter, Histogram, HTTPRecorder, Request  # type: ignore[import-not-found]

    #: Which implementation is in use: ``"c"`` (the extension) or ``"python"``.
    IMPLEMENTATION = "c"
except ImportError:
    Counter = PyCounter  # type: ignore[assignment,misc]
    Histogram = PyHistogram  # type: ignore[assignment,misc]
    HTTPRecorder = PyHTTPRecorder  # type: ignore[assignment,misc]
    Request = PyRequest  # type: ignore[assignment,misc]
    IMPLEMENTATION = "python"
