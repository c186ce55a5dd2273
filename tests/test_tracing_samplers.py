"""Step and request spans are sampled exactly as the OpenTelemetry SDK samples them, trace id by trace id.

Each case runs one sequence of spans twice on one ``TracerProvider``: through kserve-otel (``instrument_step``
and ``tracing.start_server_span``, what the KServe request middleware calls), then through the SDK's own tracer
of the same provider, with the same trace ids (a fixed id generator restarted between the runs, or the SDK's
default generator with the ``random`` module reseeded), and compares every span's (trace id, sampled) pair and
the spans exported. Samplers: the six ``OTEL_TRACES_SAMPLER`` values as the SDK builds them from the
environment, as its configurator builds them from its entry points, and as ``configure()`` builds them; a
sampler loaded from an entry point of a test-only distribution; ``Sampler`` objects of the user's own;
``ParentBased`` with delegates of the user's choice. End to end: a real KServe server with
``parentbased_traceidratio`` 0.1 exporting to a real OTLP/HTTP receiver.
"""

from __future__ import annotations

import random
import re
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import httpx
import pytest
from conftest import KServeProcess, wait_until
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.sdk._configuration import _import_sampler
from opentelemetry.sdk.trace import TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.util import _importlib_metadata
from otlp_receiver import OTLPReceiver

from kserve_otel import instrument_step
from kserve_otel.spans import tracing
from kserve_otel.names import ATTR_MODEL_NAME, ATTR_STEP
from kserve_otel.config.settings import Settings
from kserve_otel.telemetry import _sampler as configure_sampler

SIX = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
       "parentbased_traceidratio")
RATIO = "0.1"
STEPS = ("preprocess", "predict", "postprocess")
REQUEST = "POST /v1/models/{model_name}:predict"
LOW_64 = (1 << 64) - 1

Observed = tuple[Any, bool]  # (trace id, or None when no trace is current; sampled)


class FixedIds(IdGenerator):
    """Trace ids and span ids from two seeded streams of their own, restartable: two runs that draw the same
    number of trace ids get the same ones, however many span ids each draws."""

    def __init__(self, seed: int = 14) -> None:
        self.seed = seed
        self.restart()

    def restart(self) -> None:
        self.traces, self.spans = random.Random(self.seed), random.Random(self.seed + 1)

    def generate_trace_id(self) -> int:
        return self.traces.getrandbits(128) or 1

    def generate_span_id(self) -> int:
        return self.spans.getrandbits(64) or 1

    def is_trace_id_random(self) -> bool:
        return True


def _observe(span_context: SpanContext) -> Observed:
    return (span_context.trace_id if span_context.is_valid else None, span_context.trace_flags.sampled)


def _current() -> Observed:
    return _observe(trace.get_current_span().get_span_context())


def _parents(count: int, seed: int = 7) -> list[context_api.Context]:
    """Parent contexts of every kind the SDK tells apart (local or remote, sampled or not), with random trace
    ids (a ratio decides by them), the random-trace-id flag on some and a trace state on some."""
    rng = random.Random(seed)
    parents = []
    for i in range(count):
        flags = (TraceFlags.SAMPLED if i % 2 else 0) | (TraceFlags.RANDOM_TRACE_ID if i % 3 else 0)
        state = TraceState([("vendor", str(i))]) if i % 5 == 0 else None
        parent = SpanContext(rng.getrandbits(128) or 1, rng.getrandbits(64) or 1, is_remote=bool(i // 2 % 2),
                             trace_flags=TraceFlags(flags), trace_state=state)
        parents.append(trace.set_span_in_context(NonRecordingSpan(parent)))
    return parents


class Rig:
    """One provider, its exporter and what one scenario observed through kserve-otel and through the SDK."""

    def __init__(self, sampler: sampling.Sampler | None, ids: IdGenerator | None = None, **options: Any) -> None:
        self.ids = ids
        options["shutdown_on_exit"] = False
        if ids is not None:
            options["id_generator"] = ids
        # sampler None: the SDK reads OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG itself
        self.provider = TracerProvider(sampler=sampler, **options)
        self.exporter = InMemorySpanExporter()
        self.provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        self.sdk = self.provider.get_tracer("sdk-reference")
        self.model = f"m{random.getrandbits(40):x}"
        self.steps = {step: instrument_step(step, model_name=self.model)(_current) for step in STEPS}
        self.outer = instrument_step("predict", model_name=self.model)(
            lambda: [_current(), self.steps["postprocess"]()])

    def restart(self, seed: int) -> None:
        if isinstance(self.ids, FixedIds):
            self.ids.restart()
        random.seed(seed)  # the SDK's RandomIdGenerator draws from the random module
        self.exporter.clear()

    def exported(self) -> list[tuple[int, str]]:
        return sorted((span.context.trace_id, span.name) for span in self.exporter.get_finished_spans())

    # ------------------------------------------------------------------ scenarios, run both ways

    def root_steps(self, count: int, ours: bool) -> list[Observed]:
        """``count`` predict steps, each with no span around it."""
        if ours:
            return [self.steps["predict"]() for _ in range(count)]
        observed = []
        for _ in range(count):
            span = self.sdk.start_span(f"predict {self.model}", attributes=self._attributes("predict"))
            observed.append(_observe(span.get_span_context()))
            span.end()
        return observed

    def steps_under(self, parents: Sequence[context_api.Context], ours: bool) -> list[Observed]:
        """A predict step under each parent, and a postprocess step nested in it."""
        observed = []
        for parent in parents:
            token = context_api.attach(parent)
            try:
                observed += self.outer() if ours else self._nested_sdk()
            finally:
                context_api.detach(token)
        return observed

    def _nested_sdk(self) -> list[Observed]:
        outer = self.sdk.start_span(f"predict {self.model}", attributes=self._attributes("predict"))
        with trace.use_span(outer, end_on_exit=True):
            inner = self.sdk.start_span(f"postprocess {self.model}", attributes=self._attributes("postprocess"))
            inner.end()
        return [_observe(outer.get_span_context()), _observe(inner.get_span_context())]

    def requests(self, parents: Sequence[context_api.Context | None], ours: bool) -> list[list[Observed]]:
        """A request span under each parent (``None``: none) with the three KServe steps inside it."""
        traced = []
        for parent in parents:
            if ours:
                span, token = tracing.start_server_span(REQUEST, lambda: {"url.path": "/v1/models/m:predict"}, parent)
                try:
                    request = [_current(), *(self.steps[step]() for step in STEPS)]
                    assert span.is_recording() if span is not None else not request[0][1], "span: None when dropped"
                finally:
                    tracing.end_server_span(span, token)
            else:
                span = self.sdk.start_span(REQUEST, context=parent, kind=SpanKind.SERVER,
                                           attributes={"url.path": "/v1/models/m:predict"})
                with trace.use_span(span, end_on_exit=True):
                    request = [_observe(span.get_span_context())]
                    for step in STEPS:
                        child = self.sdk.start_span(f"{step} {self.model}", attributes=self._attributes(step))
                        request.append(_observe(child.get_span_context()))
                        child.end()
            traced.append(request)
        return traced

    def _attributes(self, step: str) -> dict[str, str]:
        return {ATTR_MODEL_NAME: self.model, ATTR_STEP: step}

    def run(self, scenario: Callable[[bool], Any], ours: bool, seed: int = 1) -> tuple[Any, list]:
        """The scenario through kserve-otel (``ours``) or through the SDK; what it observed and exported."""
        random_state = random.getstate()
        tracing.set_tracer_provider(self.provider)
        try:
            self.restart(seed)
            return scenario(ours), self.exported()
        finally:
            tracing.set_tracer_provider(None)
            random.setstate(random_state)

    def both(self, scenario: Callable[[bool], Any], seed: int = 1) -> tuple[Any, Any, list, list]:
        """The scenario through kserve-otel and through the SDK, from the same id sequence."""
        ours, ours_exported = self.run(scenario, True, seed)
        sdk, sdk_exported = self.run(scenario, False, seed)
        return ours, sdk, ours_exported, sdk_exported


def assert_same(ours: list, sdk: list) -> None:
    """Decision by decision; where kserve-otel made no span at all (nothing current), the SDK's must be a
    dropped one."""
    assert len(ours) == len(sdk)
    flat_ours = [o for item in ours for o in (item if isinstance(item, list) else [item])]
    flat_sdk = [o for item in sdk for o in (item if isinstance(item, list) else [item])]
    mismatches = [(i, o, s) for i, (o, s) in enumerate(zip(flat_ours, flat_sdk))
                  if o[1] != s[1] or (o[0] is not None and o[0] != s[0])]
    assert not mismatches, f"{len(mismatches)} of {len(flat_sdk)} decisions differ, first: {mismatches[:3]}"


# ------------------------------------------------------------------------------------------- samplers


def _from_environment(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", name)
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", RATIO)
    return None  # TracerProvider(sampler=None) builds it from the environment


def _from_entry_point(name: str, monkeypatch: pytest.MonkeyPatch) -> sampling.Sampler:
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", RATIO)
    sampler = _import_sampler(name)  # what opentelemetry-instrument's configurator does
    assert isinstance(sampler, sampling.Sampler)
    return sampler


def _from_configure(name: str, monkeypatch: pytest.MonkeyPatch) -> sampling.Sampler:
    return configure_sampler(Settings.load({}, traces_sampler=name, traces_sampler_arg=float(RATIO)))


SOURCES = {"environment": _from_environment, "entry-point": _from_entry_point, "configure": _from_configure}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", SIX)
def test_each_of_the_six_samplers_decides_every_span_as_the_sdk(name, source, monkeypatch):
    rig = Rig(SOURCES[source](name, monkeypatch), FixedIds())
    roots = 10_000 if "ratio" in name else 1_000
    ours, sdk, ours_exported, sdk_exported = rig.both(lambda mine: rig.root_steps(roots, mine))
    assert_same(ours, sdk)
    assert ours_exported == sdk_exported
    if "ratio" in name:
        assert 0 < sum(sampled for _, sampled in sdk) < roots  # the ratio is at work, not all or nothing

    parents = _parents(400)
    ours, sdk, ours_exported, sdk_exported = rig.both(lambda mine: rig.steps_under(parents, mine))
    assert_same(ours, sdk)
    assert ours_exported == sdk_exported

    ours, sdk, ours_exported, sdk_exported = rig.both(lambda mine: rig.requests([None] * 1_000 + parents, mine))
    assert_same(ours, sdk)
    assert ours_exported == sdk_exported
    for request in ours:  # a request is traced whole or not at all
        assert {sampled for _, sampled in request} in ({True}, {False}), request


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", ["traceidratio", "parentbased_traceidratio"])
def test_ten_thousand_roots_with_the_sdks_own_id_generator_give_the_sdks_decisions(name, source, monkeypatch):
    """The default RandomIdGenerator, reseeded: the same trace ids, and 10,000 identical decisions."""
    rig = Rig(SOURCES[source](name, monkeypatch))
    ours, sdk, ours_exported, sdk_exported = rig.both(lambda mine: rig.root_steps(10_000, mine), seed=14)
    assert ours == sdk  # trace ids too: the SDK's generator was called in the same order
    assert ours_exported == sdk_exported
    bound = sampling.TraceIdRatioBased(float(RATIO)).bound
    assert [sampled for _, sampled in ours] == [trace_id & LOW_64 < bound for trace_id, _ in ours]


@pytest.mark.parametrize("sampler", [
    sampling.ParentBased(sampling.TraceIdRatioBased(0.3), remote_parent_sampled=sampling.TraceIdRatioBased(0.5),
                         remote_parent_not_sampled=sampling.ALWAYS_ON,
                         local_parent_not_sampled=sampling.TraceIdRatioBased(0.2)),
    sampling.ParentBased(sampling.ALWAYS_ON, local_parent_sampled=sampling.ALWAYS_OFF),
    sampling.TraceIdRatioBased(0.0),
    sampling.TraceIdRatioBased(1.0),
    sampling.AlwaysRecordSampler(sampling.TraceIdRatioBased(0.1)),
    sampling.StaticSampler(sampling.Decision.RECORD_ONLY),
], ids=["parentbased-own-delegates", "parentbased-local-sampled-off", "ratio-0", "ratio-1", "always-record",
        "record-only"])
def test_samplers_built_by_the_user_from_the_sdks_decide_as_the_sdk(sampler):
    rig = Rig(sampler, FixedIds())
    parents = _parents(400)
    for scenario in (lambda mine: rig.root_steps(2_000, mine), lambda mine: rig.steps_under(parents, mine),
                     lambda mine: rig.requests([None] * 500 + parents, mine)):
        ours, sdk, ours_exported, sdk_exported = rig.both(scenario)
        assert_same(ours, sdk)
        assert ours_exported == sdk_exported


#: A sampler of the user's own: samples a trace id divisible by ``modulus`` except postprocess steps, whatever
#: the parent (no bound can express it, so the SDK must ask it), and notes every call with its arguments.
OWN_SAMPLER = '''
from opentelemetry import trace
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult


class ModuloSampler(Sampler):
    def __init__(self, modulus):
        self.modulus = modulus
        self.calls = []

    def should_sample(self, parent_context, trace_id, name, kind=None, attributes=None, links=None,
                      trace_state=None):
        parent = trace.get_current_span(parent_context).get_span_context()
        self.calls.append((parent, trace_id, name, kind, dict(attributes or {}), list(links or ()), trace_state))
        sampled = trace_id % self.modulus == 0 and not name.startswith("postprocess")
        return SamplingResult(Decision.RECORD_AND_SAMPLE if sampled else Decision.DROP, attributes,
                              parent.trace_state if parent.is_valid else None)

    def get_description(self):
        return f"ModuloSampler{{{self.modulus}}}"


def modulo(argument):
    return ModuloSampler(int(argument or 3))
'''


def _own_sampler_calls(rig: Rig, sampler: Any) -> None:
    """Decisions, exports and the sampler's calls, argument by argument, are those of the SDK."""
    parents = _parents(200)
    scenarios = (lambda mine: rig.root_steps(600, mine), lambda mine: rig.steps_under(parents, mine),
                 lambda mine: rig.requests([None] * 300 + parents, mine))
    for scenario in scenarios:
        calls = {}
        for mine in (True, False):
            sampler.calls.clear()
            observed, exported = rig.run(scenario, mine)
            calls[mine] = (observed, exported, list(sampler.calls))
        assert_same(calls[True][0], calls[False][0])
        assert calls[True][1] == calls[False][1]
        assert calls[True][2] == calls[False][2]
        assert calls[True][2], "the sampler was asked"


def test_a_sampler_loaded_from_an_entry_point_decides_as_the_sdk(tmp_path, monkeypatch):
    """A test-only distribution on sys.path registers the sampler in the ``opentelemetry_traces_sampler``
    group; the SDK's configurator finds it by the name OTEL_TRACES_SAMPLER gives, as in a deployment."""
    (tmp_path / "kserve_otel_test_sampler.py").write_text(textwrap.dedent(OWN_SAMPLER))
    info = tmp_path / "kserve_otel_test_sampler-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kserve-otel-test-sampler\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[opentelemetry_traces_sampler]\nkserve_otel_modulo = "
                                           "kserve_otel_test_sampler:modulo\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _importlib_metadata._original_entry_points_cached.cache_clear()
    try:
        monkeypatch.setenv("OTEL_TRACES_SAMPLER", "kserve_otel_modulo")
        monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "3")
        from opentelemetry.sdk._configuration import _get_sampler

        sampler = _import_sampler(_get_sampler())
        assert type(sampler).__name__ == "ModuloSampler" and sampler.modulus == 3
        _own_sampler_calls(Rig(sampler, FixedIds()), sampler)
    finally:
        monkeypatch.undo()
        _importlib_metadata._original_entry_points_cached.cache_clear()


def test_a_sampler_object_of_the_users_own_decides_as_the_sdk():
    namespace: dict[str, Any] = {}
    exec(compile(textwrap.dedent(OWN_SAMPLER), "own_sampler", "exec"), namespace)  # noqa: S102 - our constant
    sampler = namespace["ModuloSampler"](4)
    _own_sampler_calls(Rig(sampler, FixedIds()), sampler)
    sampler = sampling.ParentBased(root=namespace["ModuloSampler"](2))  # a delegate of the user's own
    rig = Rig(sampler, FixedIds())
    ours, sdk, ours_exported, sdk_exported = rig.both(lambda mine: rig.requests([None] * 500 + _parents(200), mine))
    assert_same(ours, sdk)
    assert ours_exported == sdk_exported


@pytest.mark.parametrize("name", SIX)
def test_the_six_samplers_are_decided_without_asking_the_sdk(name, monkeypatch):
    """The SDK's own samplers keep the fast paths: no SDK span for a dropped step, a template for a sampled one."""
    rig = Rig(_from_environment(name, monkeypatch))
    tracing.set_tracer_provider(rig.provider)
    try:
        rig.steps["predict"]()
        state = tracing._state
        assert state.provider is rig.provider and state.mode == tracing._DECIDED
        rig.root_steps(50, True)
        if name in ("always_on", "parentbased_always_on"):
            assert list(state.factories.values()) and all(state.factories.values())
    finally:
        tracing.set_tracer_provider(None)


def test_the_sdks_count_of_started_spans_sees_every_dropped_and_sampled_span(monkeypatch):
    """``otel.sdk.span.started`` (the SDK's self-observability, on with OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED)
    counts the spans kserve-otel decided, dropped ones included, as it counts the SDK's own."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
    parents = _parents(200)
    counts = {}
    for mine in (True, False):
        reader = InMemoryMetricReader()
        rig = Rig(sampling.ParentBased(sampling.TraceIdRatioBased(0.1)), FixedIds(),
                  meter_provider=MeterProvider(metric_readers=[reader], shutdown_on_exit=False))
        rig.run(lambda ours: [rig.requests([None] * 500 + parents, ours), rig.steps_under(parents, ours),
                              rig.root_steps(500, ours)], mine)
        by_result: dict[str, int] = {}
        for resource_metrics in reader.get_metrics_data().resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    for point in metric.data.data_points if metric.name == "otel.sdk.span.started" else ():
                        result = point.attributes["otel.span.sampling_result"]
                        by_result[result] = by_result.get(result, 0) + point.value
        counts[mine] = by_result
    assert counts[True] == counts[False]
    assert set(counts[True]) == {"DROP", "RECORD_AND_SAMPLE"}


# ------------------------------------------------------------------------------------------- end to end


@pytest.mark.e2e
def test_kserve_with_parentbased_traceidratio_traces_a_tenth_of_requests_whole(tmp_path):
    """A real KServe iris server, OTEL_TRACES_SAMPLER=parentbased_traceidratio with 0.1, spans to a real
    OTLP/HTTP receiver: each request without a trace is traced whole exactly when the SDK's rule says so for
    its trace id (which KServe's latency line shows), an incoming sampled trace always, an unsampled never."""
    roots, parented = 400, 20
    names = {REQUEST, *(f"{step} iris" for step in STEPS)}
    with OTLPReceiver() as receiver:
        server = KServeProcess("iris", env={
            "OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_SERVICE_NAME": "sampled",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": RATIO,
        }, log_path=str(tmp_path / "server.log"))
        try:
            server.wait_ready()
            body = {"instances": [[6.8, 2.8, 4.8, 1.4], [5.1, 3.5, 1.4, 0.2]]}
            incoming = {flag: [f"{random.getrandbits(128):032x}" for _ in range(parented)] for flag in ("01", "00")}
            with httpx.Client(base_url=server.url, timeout=30) as client:
                for _ in range(roots):
                    client.post("/v1/models/iris:predict", json=body).raise_for_status()
                for flag, trace_ids in incoming.items():
                    for trace_id in trace_ids:
                        headers = {"traceparent": f"00-{trace_id}-{random.getrandbits(64):016x}-{flag}"}
                        client.post("/v1/models/iris:predict", json=body, headers=headers).raise_for_status()
                # Spans leave the batch processor in the order they ended: once this sampled request's have
                # arrived, every earlier request's have too.
                last = f"{random.getrandbits(128):032x}"
                client.post("/v1/models/iris:predict", json=body,
                            headers={"traceparent": f"00-{last}-{random.getrandbits(64):016x}-01"}).raise_for_status()
            wait_until(lambda: names <= {s.name for s in receiver.spans() if s.trace_id.hex() == last},
                       "the last request's spans at the receiver")
            logged = lambda: re.findall(r"trace_id: ([0-9a-f]{32})", server.log())  # noqa: E731
            wait_until(lambda: len(logged()) == roots + 2 * parented + 1, "a latency line for every request")
        finally:
            server.stop()
    root_ids = [t for t in logged() if t not in {last, *incoming["01"], *incoming["00"]}]
    assert len(set(root_ids)) == roots, "each request without a trace got a trace id of its own"
    bound = sampling.TraceIdRatioBased(float(RATIO)).bound
    sampled_roots = {t for t in root_ids if int(t, 16) & LOW_64 < bound}
    by_trace: dict[str, list[str]] = {}
    for span in receiver.spans():
        by_trace.setdefault(span.trace_id.hex(), []).append(span.name)
    assert set(by_trace) == sampled_roots | set(incoming["01"]) | {last}
    assert all(sorted(spans) == sorted(names) for spans in by_trace.values()), "each traced request whole"
    assert 16 <= len(sampled_roots) <= 70, f"{len(sampled_roots)} of {roots} requests traced at a ratio of 0.1"
