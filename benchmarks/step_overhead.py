"""Per-call cost of ``@instrument_step``, against what a model server would otherwise pay.

Why: the package's promise is that an instrumented step costs less than KServe's own prometheus_client
histogram, and far less than doing the same with the OpenTelemetry SDK directly (README, "How it works").
This measure checks that promise on a trivial function, where the instrumentation is all there is to time.

What is timed (each case is a loop of calls of ``step(1)``; overhead = case - bare call):

* ``bare``: the undecorated function.
* ``kserve-native``: ``with Histogram(...).labels(model_name=m).time():`` around the call, as KServe's
  ``Model.__call__`` does, on a fresh ``CollectorRegistry`` with KServe's buckets.
* ``naive-otel``: ``tracer.start_as_current_span`` (SDK ``TracerProvider``, sampled) + SDK
  ``histogram.record(duration, {"model_name": m})`` (SDK ``MeterProvider`` with an ``InMemoryMetricReader``).
* ``ours-metrics``: ``@instrument_step("predict")`` with no tracer provider installed (no spans).
* ``ours-sampled``: the same with an SDK ``TracerProvider(sampler=ParentBased(ALWAYS_ON))`` (the package's
  default sampler) and no parent, so every step span is sampled.
* ``ours-unsampled-parent``: the same provider, run under an unsampled remote parent span context.
* ``ours-always-off``: an SDK ``TracerProvider(sampler=ALWAYS_OFF)``.

Spans of the SDK providers go to a ``BatchSpanProcessor`` (what ``configure()`` installs) whose exporter counts
and drops them: the queueing and the export thread are paid, no I/O is. Step spans use the package's seam
``kserve_otel.spans.tracing.set_tracer_provider`` (what ``configure(tracer_provider=...)`` calls), so no
global provider is ever installed in this process and "no tracer provider" stays true for ``ours-metrics``.
The async variants time the same cases as coroutine functions awaited in one event-loop task.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags
from prometheus_client import CollectorRegistry, Histogram

from kserve_otel import instrument_step
from kserve_otel.spans import tracing
from kserve_otel.names import KSERVE_BUCKETS, step_instrument_name
from kserve_otel.recording.series import REGISTRY, HistogramSeries

from .harness import Case, Section, Table, Target, Timings, fmt_spread, fmt_time, measure, module_main, ratio

STEP = "predict"

#: (case name, table label, tracing mode). Tracing modes: "none" (no provider), "sampled",
#: "unsampled-parent" (sampled provider, unsampled parent attached), "always-off".
VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("bare", "bare call", "none"),
    ("kserve-native", "KServe native: prometheus_client `labels().time()`", "none"),
    ("naive-otel", "naive OTel step: sampled span + SDK `histogram.record`", "sampled"),
    ("naive-otel-unsampled", "naive OTel step under an unsampled parent", "unsampled-parent"),
    ("ours-metrics", "`@instrument_step`, metrics only (no tracer provider)", "none"),
    ("ours-sampled", "`@instrument_step`, sampled span (parentbased_always_on, root)", "sampled"),
    ("ours-unsampled-parent", "`@instrument_step`, unsampled parent (parentbased_always_on)", "unsampled-parent"),
    ("ours-always-off", "`@instrument_step`, ALWAYS_OFF sampler", "always-off"),
)
LABELS = {name: label for name, label, _ in VARIANTS}


class DropExporter(SpanExporter):
    """Counts the spans it is handed and drops them: the export pipeline runs, without any I/O."""

    def __init__(self) -> None:
        self.exported = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exported += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _unsampled_parent() -> Context:
    parent = SpanContext(
        trace_id=0x5B8EFFF798038103D269B633813FC60C, span_id=0xEEE19B7EC3C1B174, is_remote=True,
        trace_flags=TraceFlags(TraceFlags.DEFAULT),
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


class Rig:
    """The providers, registries and instruments the cases share; :meth:`close` leaves the process as it was."""

    def __init__(self) -> None:
        self.exporter = DropExporter()
        self.processor = BatchSpanProcessor(self.exporter)
        self.sampled_provider = TracerProvider(sampler=sampling.ParentBased(sampling.ALWAYS_ON), shutdown_on_exit=False)
        self.sampled_provider.add_span_processor(self.processor)
        # ALWAYS_OFF records nothing, so it needs no processor.
        self.off_provider = TracerProvider(sampler=sampling.ALWAYS_OFF, shutdown_on_exit=False)
        self.providers: dict[str, TracerProvider | None] = {
            "none": None, "sampled": self.sampled_provider, "unsampled-parent": self.sampled_provider,
            "always-off": self.off_provider,
        }
        self.unsampled_parent = _unsampled_parent()
        self.prom_registry = CollectorRegistry()
        self.prom_histogram = Histogram(
            "request_predict_seconds", "KServe's predict histogram", ["model_name"],
            registry=self.prom_registry, buckets=KSERVE_BUCKETS,
        )
        self.metric_reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.metric_reader], shutdown_on_exit=False)
        self.otel_histogram = self.meter_provider.get_meter("benchmarks").create_histogram(
            "request_predict", unit="s", description="naive step", explicit_bucket_boundaries_advisory=KSERVE_BUCKETS,
        )
        self.naive_tracer = self.sampled_provider.get_tracer("benchmarks")

    def use(self, mode: str) -> None:
        """Make ``mode``'s tracer provider the one step spans go to."""
        tracing.set_tracer_provider(self.providers[mode])

    def naive_count(self, model: str) -> int:
        """Observations of the naive OTel histogram for ``model``, as its reader sees them."""
        data = self.metric_reader.get_metrics_data()
        for resource in data.resource_metrics if data else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.data.data_points:
                        if isinstance(point, HistogramDataPoint) and point.attributes.get("model_name") == model:
                            return point.count
        return 0

    def spans_exported(self) -> int:
        """Spans handed to the exporter so far, after flushing the batch processor's queue."""
        self.processor.force_flush()
        return self.exporter.exported

    def close(self) -> None:
        tracing.set_tracer_provider(None)
        self.sampled_provider.shutdown()
        self.off_provider.shutdown()
        self.meter_provider.shutdown()


def _target(x: Any) -> Any:
    return x


async def _async_target(x: Any) -> Any:
    return x


def _kserve_native(rig: Rig, model: str, is_async: bool) -> Callable[[Any], Any]:
    """KServe's ``Model.__call__``: ``with HIST.labels(**prom_labels).time():`` around the step."""
    hist = rig.prom_histogram

    async def async_step(x: Any) -> Any:
        with hist.labels(model_name=model).time():
            return await _async_target(x)

    def sync_step(x: Any) -> Any:
        with hist.labels(model_name=model).time():
            return _target(x)

    return async_step if is_async else sync_step


def _naive_otel(rig: Rig, model: str, is_async: bool) -> Callable[[Any], Any]:
    """What one would write with the SDK alone: a span around the step, the duration recorded inside it."""
    tracer, record = rig.naive_tracer, rig.otel_histogram.record
    span_name, attributes = f"{STEP} {model}", {"kserve.model.name": model, "kserve.step": STEP}

    async def async_step(x: Any) -> Any:
        start = perf_counter()
        with tracer.start_as_current_span(span_name, attributes=attributes):
            result = await _async_target(x)
            record(perf_counter() - start, {"model_name": model})
        return result

    def sync_step(x: Any) -> Any:
        start = perf_counter()
        with tracer.start_as_current_span(span_name, attributes=attributes):
            result = _target(x)
            record(perf_counter() - start, {"model_name": model})
        return result

    return async_step if is_async else sync_step


def _step(rig: Rig, name: str, model: str, is_async: bool) -> Callable[[Any], Any]:
    """The function a case calls: the bare target, a baseline around it, or it decorated by kserve-otel."""
    if name == "kserve-native":
        return _kserve_native(rig, model, is_async)
    if name.startswith("naive-otel"):
        return _naive_otel(rig, model, is_async)
    target = _async_target if is_async else _target
    return target if name == "bare" else instrument_step(STEP, target, model_name=model)


def _sync_loop(step: Callable[[Any], Any]) -> Callable[[int], None]:
    def loop(n: int) -> None:
        for _ in range(n):
            step(1)

    return loop


def _async_loop(step: Callable[[Any], Any], event_loop: asyncio.AbstractEventLoop) -> Callable[[int], None]:
    async def body(n: int) -> None:
        for _ in range(n):
            await step(1)

    def loop(n: int) -> None:
        event_loop.run_until_complete(body(n))

    return loop


def _in_context(ctx: Context, loop: Callable[[int], None]) -> Callable[[int], None]:
    """``loop`` run with ``ctx`` current (an asyncio task copies the context current when it is created)."""

    def run(n: int) -> None:
        token = context_api.attach(ctx)
        try:
            loop(n)
        finally:
            context_api.detach(token)

    return run


def series_count(model: str) -> int:
    family = REGISTRY.get(step_instrument_name(STEP))
    return 0 if family is None else family.series(model).count  # type: ignore[attr-defined, no-any-return]


def _counter(rig: Rig, name: str, model: str) -> Callable[[], int] | None:
    if name.startswith("ours-"):
        return lambda: series_count(model)
    if name.startswith("naive-otel"):
        return lambda: rig.naive_count(model)
    if name == "kserve-native":
        return lambda: int(rig.prom_registry.get_sample_value(
            "request_predict_seconds_count", {"model_name": model}) or 0)
    return None


def build_cases(rig: Rig, event_loop: asyncio.AbstractEventLoop | None = None, prefix: str | None = None) -> list[Case]:
    """The cases of every variant, sync ones, or async ones driven by ``event_loop`` when it is given.

    Every case has a model name of its own (``prefix`` + variant), so that its series counts only its calls:
    kserve-otel's series registry is process-global and cumulative.
    """
    prefix = prefix or f"bench-{uuid.uuid4().hex[:8]}"
    kind = "async" if event_loop is not None else "sync"
    models = {name: f"{prefix}-{kind}-{name}" for name, _, _ in VARIANTS}
    cases = []
    for name, _, mode in VARIANTS:
        step = _step(rig, name, models[name], event_loop is not None)
        loop = _async_loop(step, event_loop) if event_loop is not None else _sync_loop(step)
        if mode == "unsampled-parent":
            loop = _in_context(rig.unsampled_parent, loop)
        cases.append(Case(
            name=name, loop=loop, prepare=lambda mode=mode: rig.use(mode), count=_counter(rig, name, models[name]),
        ))
    return cases


SAMPLED_CASES = tuple(name for name, _, mode in VARIANTS if mode == "sampled")


# --------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class _Claim:
    name: str
    numerator: str
    denominator: str
    limit: float


CLAIMS = (
    _Claim("metrics-only overhead / KServe-native overhead", "ours-metrics", "kserve-native", 0.5),  # issue 16: native histograms and exemplars included
    _Claim("(sampled span + metrics) overhead / naive OTel step overhead", "ours-sampled", "naive-otel", 0.5),
    _Claim("unsampled-parent step overhead / metrics-only overhead", "ours-unsampled-parent", "ours-metrics", 1.2),
    _Claim("ALWAYS_OFF step overhead / metrics-only overhead", "ours-always-off", "ours-metrics", 1.2),
)


def _report(kind: str, timings: Timings) -> tuple[Table, list[Target], Table]:
    bare = timings.median("bare")
    rows = []
    for name, label, _ in VARIANTS:
        median = timings.median(name)
        rows.append([
            label, fmt_time(median), fmt_spread(timings, name),
            "—" if name == "bare" else fmt_time(median - bare), f"{timings.calls_per_sample[name]:,}",
        ])
    table = Table(
        f"{kind} steps: time per call (median of {len(timings.samples['bare'])} samples)",
        ["case", "median", "p25 – p75", "overhead (median − bare)", "calls per sample"], rows,
    )
    targets, ratio_rows = [], []
    for claim in CLAIMS:
        over_num = timings.median(claim.numerator) - bare
        over_den = timings.median(claim.denominator) - bare
        value = ratio(over_num, over_den)
        whole = ratio(timings.median(claim.numerator), timings.median(claim.denominator))
        targets.append(Target(
            f"{kind}: {claim.name}", value, claim.limit,
            f"({fmt_time(over_num)}) / ({fmt_time(over_den)})",
        ))
        ratio_rows.append([
            claim.name, fmt_time(over_num), fmt_time(over_den), "—" if value is None else f"{value:.2f}",
            "—" if whole is None else f"{whole:.2f}",
        ])
    ratios = Table(
        f"{kind} steps: ratios (overheads are medians minus the bare call)",
        ["ratio", "numerator overhead", "denominator overhead", "overhead ratio", "whole-call ratio"], ratio_rows,
    )
    return table, targets, ratios


#: Pieces of the metrics-only hot path, timed alone to explain its overhead: (label, expression).
COMPONENTS = (
    ("`trace.get_tracer_provider()` with no provider installed", "trace.get_tracer_provider()"),
    ("`trace.get_current_span().get_span_context()`", "trace.get_current_span().get_span_context()"),
    ("`HistogramSeries.observe(0.001)`", "series.observe(0.001)"),
    ("two `perf_counter()` calls", "perf_counter(); perf_counter()"),
)


def _component_cases() -> list[Case]:
    """One case per piece of the hot path, plus a bare loop, compiled so that each loop does only that."""
    series = HistogramSeries({}, KSERVE_BUCKETS)
    namespace = {"trace": trace, "series": series, "perf_counter": perf_counter}
    cases = []
    for name, statement in (("bare", "pass"), *COMPONENTS):
        code = f"def loop(n):\n    for _ in range(n):\n        {statement}\n"
        exec(code, namespace)  # noqa: S102 - our own constant statements, as timeit does
        cases.append(Case(name, namespace["loop"]))
    return cases


def _components_table(timings: Timings) -> Table:
    bare = timings.median("bare")
    rows = [[label, fmt_time(timings.median(label) - bare), fmt_spread(timings, label)] for label, _ in COMPONENTS]
    return Table(
        "pieces of the metrics-only hot path, timed alone (median − empty loop)",
        ["piece", "cost per call", "p25 – p75 (whole loop)"], rows,
    )


def run(quick: bool) -> Section:
    rounds, target_ns = (3, 2e6) if quick else (31, 30e6)
    rig = Rig()
    event_loop = asyncio.new_event_loop()
    try:
        sync_cases = build_cases(rig)
        async_cases = build_cases(rig, event_loop)
        sync_timings = measure(sync_cases, rounds, target_ns)
        async_timings = measure(async_cases, rounds, target_ns)
        component_timings = measure(_component_cases(), rounds, target_ns / 3)
        started = sum(c.count() for c in sync_cases + async_cases if c.name in SAMPLED_CASES and c.count)
        exported = rig.spans_exported()
    finally:
        event_loop.close()
        rig.close()
    section = Section(
        "Per-step overhead of `@instrument_step(\"predict\")`",
        __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
    )
    for kind, timings in (("sync", sync_timings), ("async", async_timings)):
        table, targets, ratios = _report(kind, timings)
        section.tables += [table, ratios]
        section.targets += targets
    section.tables.append(_components_table(component_timings))
    section.notes.append(
        "Targets compare overheads (median case − median bare call); the whole-call ratio includes the bare call "
        "and the loop, for reference. Async targets are nice-to-have."
    )
    section.notes.append(
        f"Sampled spans started (ours-sampled + naive-otel, sync + async): {started:,}; handed to the dropping "
        f"exporter by the BatchSpanProcessor: {exported:,}"
        + ("" if exported == started else f" ({started - exported:,} dropped by the full queue)") + "."
    )
    return section


if __name__ == "__main__":
    module_main(run)
