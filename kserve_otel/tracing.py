"""Step spans at the lowest cost the OpenTelemetry API allows, and none at all when nothing would be recorded.

The SDK builds a span object, ids and all, even when its sampler drops it (about 15 µs here). When the
provider's sampler is known to drop a span, the step skips the SDK entirely: for the SDK's built-in samplers
``always_off`` and ``parentbased_*`` (the default), the decision is read from the parent's ``sampled`` flag
in well under a microsecond. A skipped span leaves the current context as it was, so code inside the step
(and outgoing requests) still carries the request's trace id; nothing is lost, since a dropped span records
nothing and is never exported. When the decision is known to be "sample" (``always_on``, or ``parentbased_*``
with a sampled parent or an always-on root), the step's span is made by a :mod:`kserve_otel.span_factory`
template, half the SDK's cost. Any other sampler or provider gets the ordinary ``tracer.start_span`` path.

The provider is the one given to :func:`set_tracer_provider` (``configure(tracer_provider=...)``), else the
global one, looked up on each call so that a provider installed after the step was decorated is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode
# Where the API keeps the current span in a Context: one dictionary lookup, where ``trace.get_current_span()``
# costs 0.15 µs more per step (tests/test_steps.py checks it is still there).
from opentelemetry.trace.propagation import _SPAN_KEY

from ._version import __version__
from .names import ATTR_ERROR_TYPE, SCOPE_NAME
from .span_factory import span_factory

_OFF, _SDK, _PARENT_BASED, _ALWAYS = 0, 1, 2, 3
#: Step span factories kept per provider (one per step of each model); beyond this, spans take the SDK path.
_MAX_FACTORIES = 4096
_NO_FACTORY = object()

SpanHandle = tuple[Span, object]


class _ProviderState:
    __slots__ = ("provider", "tracer", "mode", "root_off", "factories", "unsampled_parent")

    def __init__(self, provider: object, tracer: Any, mode: int, root_off: bool) -> None:
        self.provider = provider
        self.tracer = tracer
        self.mode = mode
        self.root_off = root_off
        #: (span name, id of its attributes dict) -> SpanFactory, or None where the SDK path must be taken.
        self.factories: dict[tuple[str, int], Any] = {}
        #: The last parent span found unsampled: a request's later steps have the same parent, and a span's
        #: context never changes, so they are decided by one identity check.
        self.unsampled_parent: object = None


_explicit_provider: trace.TracerProvider | None = None
_state = _ProviderState(None, None, _OFF, True)


def set_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Use ``provider`` for step spans instead of the global one (``None``: the global one again)."""
    global _explicit_provider
    _explicit_provider = provider


def _analyse(provider: Any) -> _ProviderState:
    """Work out once per provider how spans can be decided: never, by the parent's flag, or by the SDK."""
    global _state
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        # Without a real provider the API would hand back a non-recording span: skipping it is equivalent.
        state = _ProviderState(provider, None, _OFF, True)
    else:
        tracer = provider.get_tracer(SCOPE_NAME, __version__)
        mode, root_off = _sampler_mode(getattr(provider, "sampler", None))
        if mode == _PARENT_BASED and hasattr(tracer, "sampler"):
            # Spans reach this tracer only once the parent-based decision is known to be "sample" (see
            # start_step_span): give this tracer (ours alone; the provider makes one per call) a sampler that
            # says so directly instead of walking ParentBased's delegates again.
            tracer.sampler = _SAMPLED
        state = _ProviderState(provider, tracer, mode, root_off)
    _state = state
    return state


class _Sampled:
    """The decision ``ParentBased(ALWAYS_ON)`` reaches for a sampled parent or a root: record and sample,
    keeping the parent's trace state."""

    def should_sample(self, parent_context: Any, trace_id: int, name: str, kind: Any = None,
                      attributes: Any = None, links: Any = None, trace_state: Any = None) -> Any:
        from opentelemetry.sdk.trace.sampling import Decision, SamplingResult

        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, parent.trace_state if parent.is_valid else None)

    def get_description(self) -> str:
        return "ParentBased{root:AlwaysOnSampler} (decided by kserve-otel)"


_SAMPLED = _Sampled()


def _sampler_mode(sampler: Any) -> tuple[int, bool]:
    try:
        from opentelemetry.sdk.trace import sampling
    except ImportError:  # pragma: no cover - the SDK is a dependency
        return _SDK, False
    if sampler is None:
        return _SDK, False
    if sampler is sampling.ALWAYS_OFF:
        return _OFF, True
    if sampler is sampling.ALWAYS_ON:
        return _ALWAYS, False
    if type(sampler) is sampling.ParentBased:  # noqa: E721 - subclasses may decide differently
        # ParentBased's delegates are private attributes; if they are not the SDK defaults (or cannot be read),
        # fall back to asking the SDK on every span.
        delegates = [getattr(sampler, f"_{kind}", None) for kind in (
            "remote_parent_sampled", "local_parent_sampled", "remote_parent_not_sampled", "local_parent_not_sampled"
        )]
        if delegates[:2] == [sampling.ALWAYS_ON] * 2 and delegates[2:] == [sampling.ALWAYS_OFF] * 2:
            return _PARENT_BASED, getattr(sampler, "_root", None) is sampling.ALWAYS_OFF
    return _SDK, False


def tracer_if_recording(parent_context: context_api.Context | None = None) -> Any:
    """The tracer to start a span under ``parent_context`` (default: the current context) with, or ``None``
    when the span would not be recorded. The parent is only looked at when the sampler needs it. Unless the
    provider's mode is ``_SDK``, a tracer returned means the span will be recorded and sampled."""
    provider = current_provider()
    state = _state
    if provider is not state.provider:
        state = _analyse(provider)
    mode = state.mode
    if mode == _OFF:
        return None
    if mode == _PARENT_BASED:
        span = (parent_context if parent_context is not None else _current_context()).get(_SPAN_KEY)
        if span is not None:
            if span is state.unsampled_parent:
                return None
            # As ParentBased decides: a valid parent's sampled flag, else the root sampler. SpanContext is a
            # tuple (trace_id, span_id, is_remote, trace_flags, trace_state, is_valid): indexing it saves two
            # property calls on every step under an unsampled parent, the commonest case when tracing samples
            # a fraction (tests/test_steps.py checks the layout).
            parent = span.get_span_context()
            if parent[5]:
                if parent[3] & _SAMPLED_FLAG:
                    return state.tracer
                state.unsampled_parent = span
                return None
        if state.root_off:
            return None
    return state.tracer


#: ``trace.get_tracer_provider()`` looks ``OTEL_PYTHON_TRACER_PROVIDER`` up in ``os.environ`` on every call until
#: a global provider is set: 0.57 µs measured, a third of a metrics-only step. The API keeps the global provider
#: in ``trace._TRACER_PROVIDER`` (``tests/test_steps.py`` fails loudly if that changes); while it is unset and
#: that variable was not given, the answer is always the API's proxy provider.
_PROVIDER_FROM_ENVIRONMENT = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
_NOT_KNOWN = object()


def current_provider() -> Any:
    """The tracer provider step and request spans go to (``configure(tracer_provider=...)``, else the global)."""
    if _explicit_provider is not None:
        return _explicit_provider
    provider = getattr(trace, "_TRACER_PROVIDER", _NOT_KNOWN)
    if provider is None and not _PROVIDER_FROM_ENVIRONMENT:
        return _PROXY_PROVIDER
    return provider if provider is not _NOT_KNOWN and provider is not None else trace.get_tracer_provider()


_PROXY_PROVIDER = trace.ProxyTracerProvider()
_SAMPLED_FLAG = trace.TraceFlags.SAMPLED


def _context_reader() -> Callable[[], context_api.Context]:
    """The fastest way to read the current OpenTelemetry context: the runtime context's own ContextVar when
    the API keeps it in one (its default runtime context does; ``context_api.get_current()`` adds two calls,
    0.1 µs a step), else ``context_api.get_current``."""
    runtime = getattr(context_api, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    return variable.get if isinstance(variable, ContextVar) else context_api.get_current


_current_context = _context_reader()


def start_step_span(name: str, attributes: dict[str, Any]) -> SpanHandle | None:
    """Start a span, child of the current one, and make it current; ``None`` when no span would be recorded.

    ``attributes`` must not change after the first call with it: spans of one (name, attributes dict) are made
    from one template."""
    tracer = tracer_if_recording()
    if tracer is None:
        return None
    state = _state
    if state.mode == _SDK or state.tracer is not tracer:
        span = tracer.start_span(name, attributes=attributes)
    else:
        # Sampled for certain: made from the step's template (kserve_otel.span_factory), half the SDK's cost.
        factories = state.factories
        key = (name, id(attributes))
        factory = factories.get(key, _NO_FACTORY)
        if factory is _NO_FACTORY:
            factory = span_factory(tracer, name, attributes)
            if len(factories) < _MAX_FACTORIES:
                factories[key] = factory
        span = factory.start(_current_context()) if factory is not None else tracer.start_span(name, attributes=attributes)
    return span, context_api.attach(trace.set_span_in_context(span))


def start_server_span(
    name: str, attributes: Callable[[], dict[str, Any]], parent: context_api.Context | None
) -> tuple[Span | None, object]:
    """Start the SERVER span of an incoming request under ``parent`` (the context extracted from its headers,
    ``None`` for none) and make it current; ``attributes()`` is called only if the span is recorded. Returns ``(span, token)``; ``span`` is ``None`` when it would not be
    recorded, and then ``parent`` alone is made current, so the request's trace id still reaches step spans,
    outgoing calls and log lines. Pass the token to :func:`end_server_span`.
    """
    tracer = tracer_if_recording(parent)
    if tracer is None:
        return None, (context_api.attach(parent) if parent is not None else None)
    span = tracer.start_span(name, context=parent, kind=trace.SpanKind.SERVER, attributes=attributes())
    return span, context_api.attach(trace.set_span_in_context(span, parent))


def end_server_span(span: Span | None, token: object, error: BaseException | None = None) -> None:
    """End what :func:`start_server_span` started, recording ``error`` (if any) with error status."""
    if token is not None:
        context_api.detach(token)  # type: ignore[arg-type]
    if span is not None:
        if error is not None:
            _record_error(span, error)
        span.end()


def end_step_span(handle: SpanHandle, error: BaseException | None = None) -> None:
    """End a span from :func:`start_step_span`, recording ``error`` (if any) with error status."""
    span, token = handle
    context_api.detach(token)  # type: ignore[arg-type]
    if error is not None:
        _record_error(span, error)
    span.end()


def _record_error(span: Span, error: BaseException) -> None:
    if span.is_recording():
        span.set_attribute(ATTR_ERROR_TYPE, type(error).__qualname__)
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__qualname__}: {error}"))


def suspend(handle: SpanHandle) -> None:
    """Make the span not current (a generator step yields to its consumer); :func:`resume` makes it current again."""
    context_api.detach(handle[1])  # type: ignore[arg-type]


def resume(handle: SpanHandle) -> SpanHandle:
    """Make the span of ``handle`` current again; returns the new handle to end or suspend."""
    span = handle[0]
    return span, context_api.attach(trace.set_span_in_context(span))
