"""Step spans at the lowest cost the OpenTelemetry API allows, and none at all when nothing would be recorded.

The SDK builds a span object, ids and all, even when its sampler drops it (about 15 µs here). When the
provider's sampler is known to drop a span, the step skips the SDK entirely: for the SDK's built-in samplers
``always_off`` and ``parentbased_*`` (the default), the decision is read from the parent's ``sampled`` flag
in well under a microsecond. A skipped span leaves the current context as it was, so code inside the step
(and outgoing requests) still carries the request's trace id; nothing is lost, since a dropped span records
nothing and is never exported. Any other sampler or provider gets the ordinary ``tracer.start_span`` path.

The provider is the one given to :func:`set_tracer_provider` (``configure(tracer_provider=...)``), else the
global one, looked up on each call so that a provider installed after the step was decorated is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

from ._version import __version__
from .names import ATTR_ERROR_TYPE, SCOPE_NAME

_OFF, _SDK, _PARENT_BASED = 0, 1, 2

SpanHandle = tuple[Span, object]


class _ProviderState:
    __slots__ = ("provider", "tracer", "mode", "root_off")

    def __init__(self, provider: object, tracer: Any, mode: int, root_off: bool) -> None:
        self.provider = provider
        self.tracer = tracer
        self.mode = mode
        self.root_off = root_off


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
        state = _ProviderState(provider, tracer, mode, root_off)
    _state = state
    return state


def _sampler_mode(sampler: Any) -> tuple[int, bool]:
    try:
        from opentelemetry.sdk.trace import sampling
    except ImportError:  # pragma: no cover - the SDK is a dependency
        return _SDK, False
    if sampler is None:
        return _SDK, False
    if sampler is sampling.ALWAYS_OFF:
        return _OFF, True
    if type(sampler) is sampling.ParentBased:  # noqa: E721 - subclasses may decide differently
        # ParentBased's delegates are private attributes; if they are not the SDK defaults (or cannot be read),
        # fall back to asking the SDK on every span.
        delegates = [getattr(sampler, f"_{kind}", None) for kind in (
            "remote_parent_sampled", "local_parent_sampled", "remote_parent_not_sampled", "local_parent_not_sampled"
        )]
        if delegates[:2] == [sampling.ALWAYS_ON] * 2 and delegates[2:] == [sampling.ALWAYS_OFF] * 2:
            return _PARENT_BASED, getattr(sampler, "_root", None) is sampling.ALWAYS_OFF
    return _SDK, False


def _tracer_if_recording(parent: trace.SpanContext) -> Any:
    """The tracer to start a span under ``parent`` with, or ``None`` when the span would not be recorded."""
    provider = current_provider()
    state = _state
    if provider is not state.provider:
        state = _analyse(provider)
    mode = state.mode
    if mode == _OFF:
        return None
    if mode == _PARENT_BASED:
        if parent.is_valid:
            if not parent.trace_flags.sampled:
                return None
        elif state.root_off:
            return None
    return state.tracer


def current_provider() -> Any:
    """The tracer provider step and request spans go to (``configure(tracer_provider=...)``, else the global)."""
    return _explicit_provider or trace.get_tracer_provider()


def would_record(parent: context_api.Context | None) -> bool:
    """Whether a span started under ``parent`` (``None``: no parent) could be recorded; ``False`` only when
    it certainly would not (no provider, ``always_off``, or a parent-based sampler and an unsampled parent)."""
    return _tracer_if_recording(trace.get_current_span(parent).get_span_context()) is not None


def start_step_span(name: str, attributes: dict[str, Any]) -> SpanHandle | None:
    """Start a span, child of the current one, and make it current; ``None`` when no span would be recorded."""
    tracer = _tracer_if_recording(trace.get_current_span().get_span_context())
    if tracer is None:
        return None
    span = tracer.start_span(name, attributes=attributes)
    return span, context_api.attach(trace.set_span_in_context(span))


def start_server_span(
    name: str, attributes: Callable[[], dict[str, Any]], parent: context_api.Context | None
) -> tuple[Span | None, object]:
    """Start the SERVER span of an incoming request under ``parent`` (the context extracted from its headers,
    ``None`` for none) and make it current; ``attributes()`` is called only if the span is recorded. Returns ``(span, token)``; ``span`` is ``None`` when it would not be
    recorded, and then ``parent`` alone is made current, so the request's trace id still reaches step spans,
    outgoing calls and log lines. Pass the token to :func:`end_server_span`.
    """
    parent_span_context = trace.get_current_span(parent).get_span_context()
    tracer = _tracer_if_recording(parent_span_context)
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
