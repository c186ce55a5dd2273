"""The C extension and its pure-Python twin behave the same: every test runs against both.

``kserve_otel.recording.speedups`` uses the C classes when ``kserve_otel.recording._speedups`` imports and the
Python ones otherwise, so a user gets whichever the install produced. Only the tests here keep them
interchangeable: bucket placement, snapshots, mirrors, exact counts under threads, and the HTTP request
bookkeeping the ASGI middleware relies on. The project's set-up always builds the extension, so a missing one
fails, never skips.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import threading
import time
import uuid
from bisect import bisect_left
from collections import Counter
import mmap
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from conftest import run_python
from opentelemetry import propagate
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from starlette.routing import Route as StarletteRoute

from kserve_otel.spans import propagation
from kserve_otel.recording import speedups
from kserve_otel.names import KSERVE_BUCKETS
from kserve_otel.request_path.request_spans import KNOWN_METHODS, HTTPServerMetrics
from kserve_otel.recording.series import HistogramSeries

BOUNDS = (0.1, 0.5, 1.0)
EMPTY = ((0, 0, 0, 0), 0.0, math.inf, -math.inf, math.inf, -math.inf)  #: an empty histogram's snapshot


@dataclass(frozen=True)
class Impl:
    Histogram: Any
    HTTPRecorder: Any
    Request: Any
    Counter: Any


@pytest.fixture(params=["c", "python"])
def impl(request: pytest.FixtureRequest) -> Impl:
    """One implementation's classes; the C ones imported directly, so a missing extension is an error."""
    if request.param == "c":
        from kserve_otel.recording import _speedups

        return Impl(_speedups.Histogram, _speedups.HTTPRecorder, _speedups.Request, _speedups.Counter)
    return Impl(speedups.PyHistogram, speedups.PyHTTPRecorder, speedups.PyRequest, speedups.PyCounter)


def _bucket_of(impl: Impl, value: float) -> int:
    """The index of the bucket one observation of ``value`` lands in (of ``BOUNDS``' four)."""
    histogram = impl.Histogram(BOUNDS)
    histogram.observe(value)
    counts = histogram.snapshot()[0]
    assert sum(counts) == 1 and len(counts) == 4
    return counts.index(1)


# ------------------------------------------------------------------------------------------------ Histogram


@pytest.mark.parametrize(("value", "bucket"), [
    (0.1, 0), (0.5, 1), (1.0, 2),            # exactly on a bound: that bound's bucket
    (0.05, 0), (0.0, 0), (-3.0, 0),          # below the first bound
    (0.1000001, 1), (0.75, 2),               # between bounds
    (1.0000001, 3), (1e300, 3), (math.inf, 3),  # above the last: the overflow bucket
    (-math.inf, 0), (1, 2), (0, 0), (2, 3),  # ints are values too
])
def test_bucket_i_holds_values_above_bound_i_minus_1_up_to_bound_i(impl: Impl, value: float,
                                                                     bucket: int) -> None:
    assert _bucket_of(impl, value) == bucket == bisect_left(BOUNDS, value)


def test_nan_lands_in_bucket_0_like_bisect_left_and_makes_the_sum_nan(impl: Impl) -> None:
    histogram = impl.Histogram(BOUNDS)
    histogram.observe(0.75)
    histogram.observe(math.nan)
    counts, total, low, high, interval_low, interval_high = histogram.snapshot()
    assert counts == (1, 0, 1, 0)
    assert math.isnan(total)
    assert (low, high, interval_low, interval_high) == (0.75, 0.75, 0.75, 0.75)  # NaN compares false
    assert histogram.count == 2


def test_snapshot_reports_sum_extremes_and_resets_only_the_interval_ones(impl: Impl) -> None:
    histogram = impl.Histogram(BOUNDS)
    assert (histogram.snapshot(), histogram.count) == (EMPTY, 0)
    for value in (0.25, 2.0, 0.125):
        histogram.observe(value)
    snap = histogram.snapshot(reset_interval=True)
    assert isinstance(snap, tuple) and isinstance(snap[0], tuple)
    assert snap == ((0, 2, 0, 1), 2.375, 0.125, 2.0, 0.125, 2.0)
    assert histogram.snapshot() == ((0, 2, 0, 1), 2.375, 0.125, 2.0, math.inf, -math.inf)
    histogram.observe(0.5)
    assert histogram.snapshot() == ((0, 3, 0, 1), 2.875, 0.125, 2.0, 0.5, 0.5)
    assert histogram.snapshot(True)[4:] == (0.5, 0.5)
    assert histogram.snapshot()[4:] == (math.inf, -math.inf)
    assert histogram.count == 4


def test_bounds_are_the_given_ones_as_a_tuple_of_floats(impl: Impl) -> None:
    histogram = impl.Histogram([1, 2.5, 10])
    assert histogram.bounds == (1.0, 2.5, 10.0)
    assert type(histogram.bounds) is tuple and all(type(b) is float for b in histogram.bounds)
    assert impl.Histogram(KSERVE_BUCKETS).bounds == KSERVE_BUCKETS
    assert impl.Histogram(iter(BOUNDS)).bounds == BOUNDS


@pytest.mark.parametrize("bounds", [(1.0, 1.0), (0.5, 0.25), (0.1, 0.5, 0.5, 1.0), (0.1, 1.0, 0.9)])
def test_bounds_not_strictly_increasing_are_rejected(impl: Impl, bounds: tuple[float, ...]) -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        impl.Histogram(bounds)


@pytest.mark.parametrize("value", ["0.5", None, b"1", [0.5]])
def test_a_non_numeric_value_is_a_type_error_and_counts_nothing(impl: Impl, value: object) -> None:
    histogram = impl.Histogram(BOUNDS)
    with pytest.raises(TypeError):
        histogram.observe(value)
    assert histogram.snapshot() == EMPTY


def test_mirror_sees_every_value_after_it_is_counted_until_unset(impl: Impl) -> None:
    histogram = impl.Histogram(BOUNDS)
    assert histogram.mirror is None
    seen: list[tuple[float, int]] = []

    def mirror(value: float) -> None:
        seen.append((value, histogram.count))

    histogram.mirror = mirror
    assert histogram.mirror is mirror
    histogram.observe(0.25)
    histogram.observe(3)
    histogram.mirror = None
    assert histogram.mirror is None
    histogram.observe(0.75)
    assert seen == [(0.25, 1), (3, 2)]
    assert histogram.count == 3


def _failing_mirror(value: float) -> None:
    raise RuntimeError(f"mirror failed on {value}")


def test_an_exception_from_the_mirror_propagates_after_the_value_is_counted(impl: Impl) -> None:
    histogram = impl.Histogram(BOUNDS)
    histogram.mirror = _failing_mirror
    with pytest.raises(RuntimeError, match="mirror failed on 0.25"):
        histogram.observe(0.25)
    assert histogram.snapshot() == ((0, 1, 0, 0), 0.25, 0.25, 0.25, 0.25, 0.25)


def test_both_implementations_give_identical_snapshots_for_the_same_values() -> None:
    from kserve_otel.recording import _speedups

    rng = random.Random(20240611)
    values = [rng.choice([rng.expovariate(4.0), rng.choice(KSERVE_BUCKETS), rng.uniform(-1.0, 20.0), 0.0])
              for _ in range(10_000)]
    c, python = _speedups.Histogram(KSERVE_BUCKETS), speedups.PyHistogram(KSERVE_BUCKETS)
    for value in values:
        c.observe(value)
        python.observe(value)
    expected = Counter(bisect_left(KSERVE_BUCKETS, value) for value in values)
    snapshot = c.snapshot(reset_interval=True)
    assert snapshot == python.snapshot(reset_interval=True)
    assert snapshot[0] == tuple(expected[i] for i in range(len(KSERVE_BUCKETS) + 1))
    assert snapshot[2:4] == (min(values), max(values))
    assert c.snapshot() == python.snapshot()
    assert c.count == python.count == 10_000


def test_threads_observing_one_histogram_are_counted_exactly(impl: Impl) -> None:
    histogram = impl.Histogram(KSERVE_BUCKETS)
    values = (0.25, 0.5, 1.0, 20.0)  # exact in binary: the sum is exact too
    start = threading.Barrier(8)

    def worker() -> None:
        start.wait()
        for i in range(20_000):
            histogram.observe(values[i % 4])

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    try:
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(interval)
    counts, total, low, high, _, _ = histogram.snapshot()
    assert histogram.count == 160_000
    # 0.25, 0.5 and 1.0 on their bounds (buckets 6, 7, 9); 20.0 in the overflow bucket (14)
    assert counts == tuple(40_000 if i in (6, 7, 9, 14) else 0 for i in range(15))
    assert (total, low, high) == (40_000 * 21.75, 0.25, 20.0)


def test_a_python_subclass_with_slots_works(impl: Impl) -> None:
    class Series(impl.Histogram):  # type: ignore[name-defined,misc]
        __slots__ = ("attributes",)

        def __init__(self, attributes: dict[str, object], bounds: tuple[float, ...]) -> None:
            super().__init__(bounds)
            self.attributes = attributes

    series = Series({"model_name": "m"}, BOUNDS)
    series.observe(0.5)
    assert series.attributes == {"model_name": "m"}
    assert series.snapshot() == ((0, 1, 0, 0), 0.5, 0.5, 0.5, 0.5, 0.5)
    assert not hasattr(series, "__dict__")


def test_histogram_series_is_the_speedups_histogram_with_labels_and_start_time() -> None:
    before = time.time_ns()
    series = HistogramSeries({"model_name": "m"}, KSERVE_BUCKETS)
    assert isinstance(series, speedups.Histogram)
    assert series.attributes == {"model_name": "m"}
    assert before <= series.start_time_ns <= time.time_ns()
    series.observe(0.3)
    assert series.count == 1 and series.snapshot()[0][7] == 1
    assert series.bounds == KSERVE_BUCKETS


def test_the_c_extension_is_in_use() -> None:
    assert speedups.IMPLEMENTATION == "c"
    assert speedups.Histogram.__module__ == "kserve_otel.recording._speedups"


def test_kserve_otel_no_extension_selects_the_python_implementation() -> None:
    result = run_python("""
        from kserve_otel.recording import series, speedups
        print(speedups.IMPLEMENTATION, issubclass(series.HistogramSeries, speedups.PyHistogram),
              speedups.HTTPRecorder is speedups.PyHTTPRecorder)
    """, env={"KSERVE_OTEL_NO_EXTENSION": "1"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["python", "True", "True"]


# ------------------------------------------------------------------------------------ HTTPRecorder, Request


@dataclass
class Route:
    path: object


def _scope(method: str = "GET", headers: list[tuple[bytes, bytes]] | None = None,
           **extra: Any) -> dict[str, Any]:
    return {"type": "http", "method": method, "path": "/v1/models/m:predict",
            "headers": [(b"host", b"localhost")] if headers is None else headers, **extra}


def _route() -> str:
    """A route template no other test uses: duration series are process-global."""
    return f"/t/{uuid.uuid4().hex[:12]}/{{model_name}}:predict"


def _recorder(impl: Impl, metrics: HTTPServerMetrics | None = None, **watch: Any) -> Any:
    metrics = metrics or HTTPServerMetrics()
    return impl.HTTPRecorder(metrics, KNOWN_METHODS, propagation.header_names, **watch)


def _ignore(message: Any) -> None:
    return None


@pytest.mark.parametrize(("method", "label"), [("GET", "GET"), ("BREW", "_OTHER")])
def test_a_request_is_in_flight_from_start_to_finish_and_finish_is_idempotent(impl: Impl, method: str,
                                                                              label: str) -> None:
    metrics = HTTPServerMetrics()
    before = metrics.active(label).value
    route = _route()
    scope = _scope(method, route=Route(route))
    request = _recorder(impl, metrics).start(scope, _ignore)
    assert isinstance(request, impl.Request)
    assert request.method == label  # a method HTTP does not define is "_OTHER": bounded label values
    assert metrics.active(label).value == before + 1
    for _ in range(2):  # the second finish changes nothing
        request.finish(scope)
        assert metrics.active(label).value == before
        assert request.status == 500  # the app never answered: what the client gets
        assert metrics.duration(label, route, 500).count == 1
    assert metrics.duration(method, route, 500).count == (method == label)


def test_the_request_is_the_apps_send_and_notes_the_status(impl: Impl) -> None:
    metrics = HTTPServerMetrics()
    sentinel = object()
    sent: list[Any] = []

    def send(message: Any) -> object:
        sent.append(message)
        return sentinel

    route = _route()
    scope = _scope("POST", route=Route(route))
    request = _recorder(impl, metrics).start(scope, send)
    assert request.status == 500
    start = {"type": "http.response.start", "status": 201, "headers": []}
    body = {"type": "http.response.body", "body": b"{}", "status": 404}
    assert (request(start), request.status) == (sentinel, 201)
    time.sleep(0.02)
    partial = {"type": "http.response.body", "body": b"{", "more_body": True}
    assert request(partial) is sentinel
    assert metrics.duration("POST", route, 201).count == 0, "not answered yet"
    assert (request(body), request.status) == (sentinel, 201)  # only a response start sets it
    assert sent == [start, partial, body] and sent[0] is start
    # counted as the last body message went out, before the client could see the answer complete
    counts, total, low, high, _, _ = metrics.duration("POST", route, 201).snapshot()
    assert sum(counts) == 1
    assert isinstance(total, float) and 0.02 <= total == low == high < 5.0
    assert metrics.active("POST").value == 0
    time.sleep(0.01)
    request.finish(scope)  # the app returns: nothing more to count
    assert metrics.duration("POST", route, 201).snapshot()[1] == total
    assert metrics.duration("POST", route, 500).count == 0


def test_only_the_responses_last_message_goes_through_last_send_once(impl: Impl) -> None:
    """What the request path uses to send that message with the request's context no longer current."""
    sent: list[tuple[str, Any]] = []

    def send(message: Any) -> str:
        sent.append(("send", message))
        return "sent"

    def last_send(inner: Any, message: Any) -> str:
        assert inner is send
        sent.append(("last_send", message))
        return "last"

    request = _recorder(impl).start(_scope(), send)
    assert request.last_send is None
    request.last_send = last_send
    assert request.last_send is last_send
    start = {"type": "http.response.start", "status": 200, "headers": []}
    part = {"type": "http.response.body", "body": b"{", "more_body": True}
    last = {"type": "http.response.body", "body": b"}"}
    assert [request(start), request(part), request(last), request(last)] == ["sent", "sent", "last", "sent"]
    assert sent == [("send", start), ("send", part), ("last_send", last), ("send", last)]
    assert request.last_send is None  # called once, then let go
    request.finish(_scope())


async def test_an_async_send_is_awaited_through_the_request(impl: Impl) -> None:
    sentinel = object()

    async def send(message: Any) -> object:
        await asyncio.sleep(0)
        return sentinel

    request = _recorder(impl).start(_scope(), send)
    assert await request({"type": "http.response.start", "status": 204, "headers": []}) is sentinel
    assert request.status == 204
    request.finish(_scope())


@pytest.mark.parametrize(("route", "templated"), [
    (Route, True), (lambda template: StarletteRoute(template, _ignore), True),
    (None, False), (lambda template: None, False), (lambda template: Route(42), False),
    (lambda template: object(), False),
], ids=["path-attribute", "starlette", "no-route-key", "route-none", "path-not-str", "no-path"])
def test_the_route_label_is_the_path_of_scope_route_else_empty(
        impl: Impl, route: Callable[[str], object] | None, templated: bool) -> None:
    metrics = HTTPServerMetrics()
    template = _route()
    scope = _scope("PATCH") if route is None else _scope("PATCH", route=route(template))
    label = template if templated else ""
    before = metrics.duration("PATCH", label, 500).count  # "" is shared with other tests
    _recorder(impl, metrics).start(scope, _ignore).finish(scope)
    assert metrics.duration("PATCH", label, 500).count == before + 1


@pytest.mark.parametrize(("headers", "traced"), [
    ([(b"traceparent", b"00-" + b"1" * 32 + b"-" + b"2" * 16 + b"-01")], True),
    ([(b"host", b"h"), (b"x-b3-traceid", b"1" * 32)], True),
    ([(b"host", b"h"), (b"content-type", b"application/json")], False),
    ([], False),
    ([(b"Traceparent", b"x")], False),  # ASGI header names are lower case
    (None, False),  # a scope without "headers"
])
def test_traced_says_whether_a_trace_header_is_present(impl: Impl, headers: list[tuple[bytes, bytes]] | None,
                                                       traced: bool) -> None:
    scope = _scope(headers=headers or [])
    if headers is None:
        del scope["headers"]
    request = _recorder(impl).start(scope, _ignore)
    assert request.traced is traced
    request.finish(scope)


class CustomPropagator(TextMapPropagator):
    """A propagator reading one header of its own."""

    def extract(self, carrier: Any, context: Context | None = None, getter: Any = None) -> Context:
        return context if context is not None else Context()

    def inject(self, carrier: Any, context: Context | None = None, setter: Any = None) -> None:
        return None

    @property
    def fields(self) -> set[str]:
        return {"x-custom-trace"}


@pytest.mark.parametrize("watched", [True, False], ids=["watched", "unwatched"])
def test_the_recorder_follows_changes_of_the_global_propagator(impl: Impl, watched: bool) -> None:
    watch = propagation.header_names_watch()
    assert watch, "header_names_watch() found no global propagator in opentelemetry.propagate"
    recorder = _recorder(impl, **(watch if watched else {}))

    def traced(name: bytes) -> bool:
        scope = _scope(headers=[(name, b"1")])
        request = recorder.start(scope, _ignore)
        request.finish(scope)
        return bool(request.traced)

    original = propagate.get_global_textmap()
    assert (traced(b"x-custom-trace"), traced(b"traceparent")) == (False, True)
    try:
        propagate.set_global_textmap(CustomPropagator())
        assert (traced(b"x-custom-trace"), traced(b"traceparent")) == (True, False)
        assert traced(b"x-b3-traceid")  # B3 is always read
    finally:
        propagate.set_global_textmap(original)
    assert (traced(b"x-custom-trace"), traced(b"traceparent")) == (False, True)


# ------------------------------------------------------------------------------------ cells in a shared buffer


def test_a_bound_histogram_counts_in_the_buffer_in_the_documented_layout(impl):
    histogram = impl.Histogram(BOUNDS)
    histogram.observe(0.2)
    buffer = mmap.mmap(-1, 4096)
    assert histogram.cells_size == 8 * 4 + 24
    histogram.bind(buffer, 64)  # what was counted goes along
    histogram.observe(2.0)
    histogram.observe(0.05)

    layout = struct.unpack_from("=4Q3d", buffer, 64)
    assert layout == (1, 1, 0, 1, pytest.approx(2.25), 0.05, 2.0)
    assert histogram.snapshot() == ((1, 1, 0, 1), pytest.approx(2.25), 0.05, 2.0, 0.05, 2.0)
    assert histogram.count == 3
    struct.pack_into("=Q", buffer, 64 + 8 * 3, 10)  # the buffer is where the counts live
    assert histogram.count == 12


def test_a_histogram_bound_without_carry_starts_again_from_nothing(impl):
    histogram = impl.Histogram(BOUNDS)
    histogram.observe(0.2)
    fresh = bytearray(256)
    fresh[:] = b"\xff" * 256  # whatever was there before is overwritten
    histogram.bind(fresh, 8, carry=False)
    assert histogram.snapshot() == EMPTY
    histogram.observe(0.7)
    assert struct.unpack_from("=4Q3d", fresh, 8) == (0, 0, 1, 0, 0.7, 0.7, 0.7)


@pytest.mark.parametrize(("offset", "size"), [(4, 256), (0, 40), (-8, 256), (248, 256)])
def test_bind_refuses_a_misaligned_or_short_place(impl, offset, size):
    histogram = impl.Histogram(BOUNDS)
    with pytest.raises(ValueError, match="do not fit, 8-byte aligned"):
        histogram.bind(bytearray(size), offset)
    with pytest.raises((TypeError, BufferError)):
        histogram.bind(b"read-only bytes" * 10, 0)
    histogram.observe(0.2)
    assert histogram.count == 1, "a refused bind leaves the histogram as it was"


def test_counter_adds_increments_decrements_and_binds(impl):
    counter = impl.Counter()
    seen: list[int] = []
    counter.mirror = seen.append
    counter.add(5)
    counter.add()
    counter.increment()
    counter.decrement()
    counter.decrement()
    assert counter.value == 5 and seen == [5, 1], "the mirror sees add() only"
    buffer = bytearray(16)
    counter.bind(buffer, 8)
    counter.add(-10)
    assert counter.value == -5 and struct.unpack_from("=q", buffer, 8) == (-5,)
    counter.bind(bytearray(8), 0, carry=False)
    assert counter.value == 0
    with pytest.raises(TypeError):
        counter.add(1.5)
    with pytest.raises(ValueError, match="do not fit"):
        counter.bind(bytearray(8), 4)


def test_exemplars_keep_the_latest_observation_of_each_bucket_with_its_ids(impl):
    histogram = impl.Histogram(BOUNDS, exemplars=True)
    assert histogram.cells_size == 8 * 4 + 24 + 48 * 4
    histogram.observe(0.05)  # no exemplar
    histogram.observe_exemplar(0.3, (1 << 127) | 5, 7)
    histogram.observe_exemplar(0.4, 11, (1 << 64) - 1)  # the same bucket: replaces the one before
    histogram.observe_exemplar(2.0, 13, 17)
    found = histogram.exemplars()
    assert found[0] is None and found[2] is None
    assert found[1][0] == 0.4 and found[1][2:] == (11, (1 << 64) - 1)
    assert found[3][0] == 2.0 and found[3][2:] == (13, 17)
    assert abs(found[3][1] - time.time()) < 60 and found[3][1] >= found[1][1]
    assert histogram.snapshot()[0] == (1, 2, 0, 1), "an exemplar observation is counted too"
    buffer = bytearray(4096)
    histogram.bind(buffer, 64)  # the exemplars go along, in the documented layout
    assert histogram.exemplars() == found
    seq, value, when, high, low, span = speedups.EXEMPLAR_SLOT.unpack_from(buffer, 64 + 8 * 4 + 24 + 48 * 3)
    assert (seq % 2, value, when, (high << 64) | low, span) == (0, 2.0, found[3][1], 13, 17) and seq > 0
    histogram.bind(bytearray(4096), 0, carry=False)
    assert histogram.exemplars() == (None,) * 4


def test_a_histogram_without_exemplar_cells_counts_exemplar_observations(impl):
    histogram = impl.Histogram(BOUNDS)
    histogram.observe_exemplar(0.3, 1, 2)
    assert histogram.count == 1 and histogram.exemplars() == (None,) * 4 and histogram.cells_size == 56


def test_a_request_given_a_span_observes_through_observe_traced(impl: Impl) -> None:
    class Traced(HTTPServerMetrics):
        def __init__(self) -> None:
            super().__init__()
            self.traced: list[tuple[Any, float, Any]] = []

        def observe_traced(self, series: Any, seconds: float, span: Any) -> None:  # type: ignore[override]
            self.traced.append((series, seconds, span))

    metrics, route, span = Traced(), _route(), object()
    scope = _scope("GET", route=Route(route))
    request = _recorder(impl, metrics).start(scope, _ignore)
    assert request.span is None
    request.span = span
    assert request.span is span
    request.finish(scope)
    [(series, seconds, seen)] = metrics.traced
    assert series is metrics.duration("GET", route, 500) and seen is span and 0 <= seconds < 5
    assert series.count == 0  # observe_traced decides how it is observed
    untraced = _recorder(impl, metrics).start(scope, _ignore)
    untraced.span = None
    untraced.finish(scope)
    assert len(metrics.traced) == 1 and series.count == 1
