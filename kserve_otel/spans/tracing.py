"""Step and request spans at the lowest cost the OpenTelemetry API allows, sampled exactly as the SDK samples.

The SDK builds a span object, ids and all, even when its sampler drops it (about 15 µs here), and a sampled span
through ``Tracer.start_span`` costs 9-11 µs. So, for the SDK's own samplers, this module takes the SDK's
decision itself, then makes only what the SDK would have made:

* Every sampler ``OTEL_TRACES_SAMPLER`` names (``always_on``, ``always_off``, ``traceidratio``, ``parentbased_*``,
  whether built by the SDK, by its configurator's entry points or by ``configure()``) decides by the parent's
  validity, remoteness and ``sampled`` flag, then either always, never, or by ``TraceIdRatioBased``'s rule
  ``trace_id & 0xFFFFFFFFFFFFFFFF < bound``. Each case reduces to a bound (never: 0, always: 2**64, a ratio: the
  sampler's own ``bound``), read once per provider; the decision is one comparison of the trace id, which for
  a root is drawn first from the tracer's id generator, as ``Tracer.start_span`` draws it.
* Sampled: the span is made with that trace id by :mod:`kserve_otel.spans.span_factory` (a step's template, or
  the SDK's own span class for a request span), a fraction of the SDK's cost.
* Dropped under an unsampled parent: nothing is made and the parent stays current, where that changes no
  later decision (spans inside would be dropped under the SDK's non-recording span too) nor what outgoing
  calls carry (the flag is off either way). That is the commonest case, a parent-based sampler under an
  unsampled parent, and a request's later steps are then decided by one identity check. Dropped otherwise
  (under a sampled parent, or at the root): the SDK's non-recording span, with the trace id the decision was
  made for, is made current, so a request's steps and outgoing calls belong to that one dropped trace. Only
  where every root and every child of an unsampled span is dropped (``always_off``,
  ``parentbased_always_off``) is nothing made for a dropped root.

Any other sampler (a ``Sampler`` of the user's own, one loaded from another entry point, ``ParentBased`` with
such a delegate), tracer or provider gets the ordinary ``tracer.start_span``, which asks its sampler as always.
``tests/test_tracing_samplers.py`` compares the decisions with the SDK's, trace id by trace id.

The provider is the one given to :func:`set_tracer_provider` (``configure(tracer_provider=...)``), else the
global one, looked up on each call so that a provider installed after the step was decorated is used.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from functools import partial
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, Status, StatusCode
# Where the API keeps the current span in a Context: one dictionary lookup, where ``trace.get_current_span()``
# costs 0.15 µs more per step (tests/test_steps.py checks it is still there).
from opentelemetry.trace.propagation import _SPAN_KEY

from . import span_factory as _factory
from .._version import __version__
from ..names import ATTR_ERROR_TYPE, SCOPE_NAME

#: Modes of a provider: nothing is ever recorded (no SDK provider); the SDK decides (``tracer.start_span``);
#: decided here.
_OFF, _SDK, _DECIDED = 0, 1, 2
#: Step span factories kept per provider (one per step of each model); beyond this, spans are made without one.
_MAX_FACTORIES = 4096
_NO_FACTORY = object()
#: ``TraceIdRatioBased.TRACE_ID_LIMIT``: its rule looks at the low 64 bits of the trace id.
_LOW_64 = (1 << 64) - 1
#: The bound of a sampler that samples every trace id (``trace_id & _LOW_64`` is always below it).
_ALL = 1 << 64
_SERVER = trace.SpanKind.SERVER
try:
    from opentelemetry.sdk.trace.sampling import Decision as _Decision

    _DROP: Any = _Decision.DROP
except ImportError:  # pragma: no cover - the SDK is a dependency
    _DROP = None

SpanHandle = tuple[Span, object]


class _ProviderState:
    """What one provider's sampler decides, as bounds on ``trace_id & _LOW_64``: a span is sampled when below."""

    __slots__ = ("provider", "tracer", "mode", "root", "local", "remote", "quiet_root", "quiet_unsampled",
                 "ids", "count_dropped", "factories", "dropping_parent", "dropping_context")

    def __init__(self, provider: object, tracer: Any, mode: int,
                 bounds: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)) -> None:
        self.provider = provider
        self.tracer = tracer
        self.mode = mode
        root, local_sampled, local_unsampled, remote_sampled, remote_unsampled = bounds
        self.root = root
        #: Bounds under a valid local / remote parent, indexed by the parent's sampled flag (0 or 1).
        self.local = (local_unsampled, local_sampled)
        self.remote = (remote_unsampled, remote_sampled)
        #: A root dropped here may be left without any span: every root and every child of an unsampled
        #: local span is dropped, whatever its trace id (so steps inside are dropped all the same).
        self.quiet_root = root == 0 and local_unsampled == 0
        #: Bound under which a child of an unsampled local span is sampled: a span dropped under an unsampled
        #: parent needs no span of its own when that would drop its children too.
        self.quiet_unsampled = local_unsampled
        self.ids = _factory.SpanIds(tracer) if mode == _DECIDED else None
        #: The SDK's count of started spans (``otel.sdk.span.started``, when its self-observability metrics are
        #: on), called for each span dropped here as ``Tracer.start_span`` calls it; else ``None``.
        self.count_dropped = _span_metrics(tracer) if mode == _DECIDED else None
        #: (span name, id of its attributes dict) -> SpanFactory, or None where one cannot be made.
        self.factories: dict[tuple[str, int], Any] = {}
        #: The last parent span whose children are dropped without a span of their own: a request's later
        #: steps have the same parent, and a span's context never changes, so they are decided by one
        #: identity check.
        self.dropping_parent: object = None
        #: The context that parent was current in: a Context is immutable (the API's class refuses every
        #: change), so while it is still the current one the decision is one identity check, no lookup.
        self.dropping_context: object = None


_explicit_provider: trace.TracerProvider | None = None
#: Analysed for no provider yet: the first call analyses whatever the provider is (one from
#: ``OTEL_PYTHON_TRACER_PROVIDER`` included, which the API loads at its first lookup).
_state = _ProviderState(object(), None, _OFF)


def set_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Use ``provider`` for step spans instead of the global one (``None``: the global one again)."""
    global _explicit_provider
    _explicit_provider = provider


def _analyse(provider: Any) -> _ProviderState:
    """Work out once per provider how spans are decided: never, here (by bounds), or by the SDK."""
    global _state
    if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
        # Without a real provider the API would hand back a non-recording span: skipping it is equivalent.
        state = _ProviderState(provider, None, _OFF)
    else:
        tracer = provider.get_tracer(SCOPE_NAME, __version__)
        bounds = sampler_bounds(getattr(provider, "sampler", None))
        if bounds is None or not _factory.supports(tracer):
            state = _ProviderState(provider, tracer, _SDK)
        else:
            # ALWAYS_OFF too: under a sampled parent the SDK makes a dropped span, which outgoing calls carry.
            state = _ProviderState(provider, tracer, _DECIDED, bounds)
    _state = state
    return state


def _span_metrics(tracer: Any) -> Callable[[Any, Any], Any] | None:
    try:
        from opentelemetry.sdk.trace._tracer_metrics import NoOpTracerMetrics
    except ImportError:  # pragma: no cover - an SDK without self-observability metrics
        return None
    metrics = getattr(tracer, "_tracer_metrics", None)
    return None if metrics is None or isinstance(metrics, NoOpTracerMetrics) else metrics.start_span


def _count_dropped(state: _ProviderState, parent: SpanContext | None) -> None:
    if state.count_dropped is not None:
        state.count_dropped(parent, _DROP)


def sampler_bounds(sampler: Any) -> tuple[int, int, int, int, int] | None:
    """The SDK's decision of ``sampler`` as bounds on ``trace_id & 0xFFFFFFFFFFFFFFFF`` (sampled when below):
    ``(root, local sampled parent, local unsampled parent, remote sampled parent, remote unsampled parent)``;
    ``None`` for a sampler whose decision is not one of these (the SDK must be asked)."""
    bound = _bound(sampler)
    if bound is not None:
        return (bound,) * 5
    try:
        from opentelemetry.sdk.trace import sampling
    except ImportError:  # pragma: no cover - the SDK is a dependency
        return None
    if _is_sdk_class(sampler, sampling.ParentBased, "should_sample"):
        bounds = tuple(_bound(getattr(sampler, f"_{which}", None)) for which in (
            "root", "local_parent_sampled", "local_parent_not_sampled", "remote_parent_sampled",
            "remote_parent_not_sampled",
        ))
        if None not in bounds:
            return bounds  # type: ignore[return-value]
    return None


def _bound(sampler: Any) -> int | None:
    """The bound of a sampler that ignores the parent's flags: ``ALWAYS_ON``/``ALWAYS_OFF`` (and the SDK
    configurator's ``always_on``/``always_off``), ``TraceIdRatioBased``; else ``None``."""
    try:
        from opentelemetry.sdk.trace import sampling
    except ImportError:  # pragma: no cover - the SDK is a dependency
        return None
    if _is_sdk_class(sampler, sampling.StaticSampler, "should_sample"):
        decision = getattr(sampler, "_decision", None)
        if decision is sampling.Decision.RECORD_AND_SAMPLE:
            return _ALL
        if decision is sampling.Decision.DROP:
            return 0
        return None  # RECORD_ONLY: recorded, never sampled; the SDK makes such spans
    if _is_sdk_class(sampler, sampling.TraceIdRatioBased, "should_sample") and sampler.TRACE_ID_LIMIT == _LOW_64:
        bound = sampler.bound
        return bound if isinstance(bound, int) else None
    return None


def _is_sdk_class(sampler: Any, base: type, method: str) -> bool:
    """``sampler`` is an instance of the SDK's ``base`` or of one of the SDK's own subclasses of it that
    decide by ``base``'s ``method`` (a class of anyone else may decide otherwise: it is asked)."""
    cls = type(sampler)
    return (isinstance(sampler, base) and cls.__module__ == base.__module__
            and getattr(cls, method, None) is getattr(base, method))


def _provider_state() -> _ProviderState:
    """What is known of the provider spans go to now (analysed again whenever it is another one)."""
    # current_provider() inlined for the common cases (a request's path, every request).
    provider = _explicit_provider
    if provider is None:
        provider = trace._TRACER_PROVIDER
        if provider is None and not _PROVIDER_FROM_ENVIRONMENT:
            provider = _PROXY_PROVIDER
    state = _state
    return state if provider is state.provider else _analyse(current_provider())


def tracer_if_recording(parent_context: context_api.Context | None = None) -> Any:
    """The tracer to start a span under ``parent_context`` (default: the current context) with, or ``None``
    when no span is needed there: it would be dropped, and leaving ``parent_context`` current instead decides
    everything inside alike (see :func:`start_step_span`). A tracer returned means the span may be sampled
    (a root's decision waits for its trace id) or must be made non-recording: ``tracer.start_span`` decides."""
    state = _provider_state()
    mode = state.mode
    if mode == _OFF:
        return None
    if mode == _DECIDED:
        span = (parent_context if parent_context is not None else _current_context()).get(_SPAN_KEY)
        if span is not None:
            if span is state.dropping_parent:
                return None
            parent = span.get_span_context()
            if parent[5]:
                trace_id = parent[0] & _LOW_64
                if (trace_id >= (state.remote if parent[2] else state.local)[parent[3] & 1]
                        and not parent[3] & 1 and trace_id >= state.quiet_unsampled):
                    return None
                return state.tracer
        if state.quiet_root:
            return None
    return state.tracer


#: ``trace.get_tracer_provider()`` looks ``OTEL_PYTHON_TRACER_PROVIDER`` up in ``os.environ`` on every call until
#: a global provider is set: 0.57 µs measured, a third of a metrics-only step. The API keeps the global provider
#: in ``trace._TRACER_PROVIDER`` (``tests/test_steps.py`` fails loudly if that changes); while it is unset and
#: that variable was not given, the answer is always the API's proxy provider.
_PROVIDER_FROM_ENVIRONMENT = "OTEL_PYTHON_TRACER_PROVIDER" in os.environ
_NOT_KNOWN = object()


def no_provider() -> bool:
    """Whether no tracer provider exists at all (the default without an exporter), so nothing can be recorded:
    two reads, for request paths that skip all span work then (no call of :func:`current_provider`)."""
    return _explicit_provider is None and trace._TRACER_PROVIDER is None and not _PROVIDER_FROM_ENVIRONMENT


def current_provider() -> Any:
    """The tracer provider step and request spans go to (``configure(tracer_provider=...)``, else the global)."""
    if _explicit_provider is not None:
        return _explicit_provider
    provider = getattr(trace, "_TRACER_PROVIDER", _NOT_KNOWN)
    if provider is None and not _PROVIDER_FROM_ENVIRONMENT:
        return _PROXY_PROVIDER
    return provider if provider is not _NOT_KNOWN and provider is not None else trace.get_tracer_provider()


_PROXY_PROVIDER = trace.ProxyTracerProvider()


def _context_reader() -> Callable[[], context_api.Context]:
    """The fastest way to read the current OpenTelemetry context: the runtime context's own ContextVar when
    the API keeps it in one (its default runtime context does; ``context_api.get_current()`` adds two calls,
    0.1 µs a step), else ``context_api.get_current``."""
    runtime = getattr(context_api, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    return variable.get if isinstance(variable, ContextVar) else context_api.get_current


_current_context = _context_reader()

#: ``get_span_context`` functions that return the span's ``_context`` field (see
#: :data:`kserve_otel.spans.span_factory.CONTEXT_FIELD`): the field is read in place of the call.
_CONTEXT_FIELD = _factory.CONTEXT_FIELD


def _context_writers() -> tuple[Callable[[context_api.Context], Any], Callable[[Any], None]]:
    """``(attach, reset)``: the runtime context's own ContextVar's ``set`` and ``reset`` where its ``attach``
    and ``detach`` are the API's default runtime context's (which call just these: two Python calls a span
    saved at start, two at end), else ``context_api.attach`` and ``context_api.detach``."""
    from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext

    runtime = getattr(context_api, "_RUNTIME_CONTEXT", None)
    variable = getattr(runtime, "_current_context", None)
    if (isinstance(variable, ContextVar) and type(runtime).attach is ContextVarsRuntimeContext.attach
            and type(runtime).detach is ContextVarsRuntimeContext.detach):
        return variable.set, variable.reset
    return context_api.attach, context_api.detach


_attach, _reset = _context_writers()
#: The runtime context's ContextVar where _attach is its ``set`` (else ``None``), and its value where unset.
_VARIABLE: ContextVar[Any] | None = getattr(_attach, "__self__", None)
_UNSET_VALUE = contextvars.Context().run(_VARIABLE.get) if _VARIABLE is not None else None


def sender_outside(token: object) -> Callable[[Callable[[Any], Awaitable[None]], Any], Awaitable[None]] | None:
    """For a request whose context was made current by ``token`` (an attach of this module's): a
    ``last_send(send, message)`` that sends the response's last message with the context before it current
    again (then restores the request's), or ``None`` where the runtime context is not the API's default one.

    Why: the server's keep-alive timer, set while that message is sent, copies the current context, and a
    cancelled timer lingers in the event loop's heap until it is purged, about a hundred requests later:
    each would keep its request's context, span included, alive long enough to reach the garbage collector's
    older generations (under full tracing they had set off a full collection every few seconds)."""
    if _VARIABLE is None or type(token) is not contextvars.Token:
        return None
    outer = token.old_value
    return partial(_send_outside, _UNSET_VALUE if outer is contextvars.Token.MISSING else outer)


async def _send_outside(outer: Any, send: Callable[[Any], Awaitable[None]], message: Any) -> None:
    inner = _VARIABLE.set(outer)  # type: ignore[union-attr]
    try:
        await send(message)
    finally:
        _VARIABLE.reset(inner)  # type: ignore[union-attr]


_Context = context_api.Context
_DEFAULT_TRACE_STATE = trace.DEFAULT_TRACE_STATE


def _c_spans() -> Any:
    """The extension ``kserve_otel.spans._spans``, bound to the API's classes, where it is built and allowed
    and the runtime context is the API's default one (whose ContextVar it sets); else ``None``: the Python
    path. Its ``start_current`` starts a step span from its template and makes it current, its
    ``dropped_current`` makes a dropped span's non-recording span current, each in one call."""
    if os.environ.get("KSERVE_OTEL_NO_EXTENSION") or _VARIABLE is None:
        return None
    try:
        from . import _spans  # type: ignore[attr-defined]
    except ImportError:
        return None
    import random

    flags = trace.TraceFlags
    _spans.bind(SpanContext, _Context, flags(flags.SAMPLED), flags(flags.SAMPLED | flags.RANDOM_TRACE_ID),
                random.getrandbits, _VARIABLE, _SPAN_KEY)
    return _spans


_C_SPANS = _c_spans()
_start_current: Callable[..., SpanHandle | None] | None = None if _C_SPANS is None else _C_SPANS.start_current
_dropped_current: Callable[..., SpanHandle] | None = None if _C_SPANS is None else _C_SPANS.dropped_current


def _make_current(span: Span, context: context_api.Context) -> object:
    """``context_api.attach(trace.set_span_in_context(span, context))``, the same steps inlined; the token."""
    values = context.copy()
    values[_SPAN_KEY] = span
    return _attach(_Context(values))


def _detach(token: Any) -> None:
    """``context_api.detach(token)``: a token that cannot be reset is logged by the API, never raised."""
    try:
        _reset(token)
    except Exception:  # noqa: BLE001 - as the API's detach: "Failed to detach context", logged
        context_api.detach(token)


def start_step_span(name: str, attributes: dict[str, Any]) -> SpanHandle | None:
    """Start a span, child of the current one, and make it current; ``None`` when no span is needed (it would
    be dropped, and so would any span started inside it).

    ``attributes`` must not change after the first call with it: spans of one (name, attributes dict) are made
    from one template."""
    # The prologue of _provider_state with current_provider inlined: this is every step's path, metrics-only
    # included, and each Python call saved is one on every step.
    provider = _explicit_provider
    if provider is None:
        provider = trace._TRACER_PROVIDER
        if provider is None and not _PROVIDER_FROM_ENVIRONMENT:
            provider = _PROXY_PROVIDER
    state = _state
    if provider is not state.provider:
        state = _analyse(current_provider())
    mode = state.mode
    if mode == _OFF:
        return None
    context = _current_context()
    if mode == _DECIDED:
        if context is state.dropping_context:
            if state.count_dropped is not None:
                state.count_dropped(state.dropping_parent.get_span_context(), _DROP)  # type: ignore[attr-defined]
            return None
        span = context.get(_SPAN_KEY)
        if span is not None:
            if span is state.dropping_parent:
                state.dropping_context = context
                if state.count_dropped is not None:
                    state.count_dropped(span.get_span_context(), _DROP)
                return None
            # As ParentBased / TraceIdRatioBased decide. SpanContext is a tuple (trace_id, span_id, is_remote,
            # trace_flags, trace_state, is_valid): indexing it saves property calls on every step under an
            # unsampled parent, the commonest case when tracing samples a fraction (tests/test_steps.py checks
            # the layout). Spans of the classes whose get_span_context() returns their _context field are read
            # there: the request span and step spans of this package, the SDK's non-recording span.
            parent = span._context if type(span).get_span_context in _CONTEXT_FIELD else span.get_span_context()
            if parent[5]:
                trace_id = parent[0]
                if trace_id & _LOW_64 < (state.remote if parent[2] else state.local)[parent[3] & 1]:
                    return _sampled_step(state, name, attributes, context, parent, trace_id)
                if not parent[3] & 1 and trace_id & _LOW_64 >= state.quiet_unsampled:
                    state.dropping_parent, state.dropping_context = span, context
                    _count_dropped(state, parent)
                    return None
                return _dropped(state, context, parent, trace_id)
        if state.quiet_root:
            if state.count_dropped is not None:
                state.count_dropped(None, _DROP)
            return None
        trace_id = state.ids.trace_id()  # type: ignore[union-attr]
        if trace_id & _LOW_64 < state.root:
            return _sampled_step(state, name, attributes, context, None, trace_id)
        return _dropped(state, context, None, trace_id)
    span = state.tracer.start_span(name, attributes=attributes)  # the SDK asks its sampler
    return span, _make_current(span, context)


def _sampled_step(state: _ProviderState, name: str, attributes: dict[str, Any], context: context_api.Context,
                  parent: SpanContext | None, trace_id: int) -> SpanHandle:
    """The step's span, sampled for ``trace_id``, made from the step's template (a fraction of the SDK's cost)."""
    factories = state.factories
    key = (name, id(attributes))
    factory = factories.get(key, _NO_FACTORY)
    if factory is _NO_FACTORY:
        # Past the limit (attributes dicts made per call, say) a template would serve one span: none is made.
        factory = factories.setdefault(key, _factory.span_factory(state.tracer, name, attributes)) \
            if len(factories) < _MAX_FACTORIES else None
    if factory is not None:
        fast = factory.fast_start
        if fast is not None and _start_current is not None:  # in C: the same span, made current, or None
            handle = _start_current(fast[0], fast[1], context, parent, trace_id, fast[2], _DEFAULT_TRACE_STATE)
            if handle is not None:
                return handle
        span = factory.start(context, parent, trace_id)
    else:
        span = _factory.start_sampled_span(
            state.tracer, state.ids, name, None, parent, trace_id,  # type: ignore[arg-type]
            trace.SpanKind.INTERNAL, attributes,
        )
    return span, _make_current(span, context)


def _dropped(
    state: _ProviderState, context: context_api.Context, parent: SpanContext | None, trace_id: int
) -> SpanHandle:
    """The non-recording span the SDK makes for a dropped span, made current: its children are decided as
    children of a dropped local span of this trace, and outgoing calls carry the trace with its flag off."""
    if state.count_dropped is not None:
        state.count_dropped(parent, _DROP)
    ids = state.ids
    if parent is None:
        flags, trace_state = ids.root_flags[0], _DEFAULT_TRACE_STATE  # type: ignore[union-attr]
    else:
        flags, trace_state = _DROPPED_FLAGS[parent[3] & _RANDOM_FLAG], parent[4]
    if _dropped_current is not None and ids.span_id is _RANDOM_SPAN_ID:  # type: ignore[union-attr]
        return _dropped_current(NonRecordingSpan, context, trace_id, flags, trace_state)  # the same, in C
    span = NonRecordingSpan(SpanContext(trace_id, ids.span_id(), False, flags, trace_state))  # type: ignore[union-attr]
    return span, _make_current(span, context)


_RANDOM_FLAG = trace.TraceFlags.RANDOM_TRACE_ID
#: The span ids of the SDK's RandomIdGenerator (random.getrandbits(64), never 0), as C's dropped_current draws them.
_RANDOM_SPAN_ID = _factory._random_span_id
#: Flags of a dropped child, by its parent's random-trace-id flag (the SDK passes only that one on).
_DROPPED_FLAGS = {0: trace.TraceFlags(trace.TraceFlags.DEFAULT), _RANDOM_FLAG: trace.TraceFlags(_RANDOM_FLAG)}


def start_server_span(
    name: str, attributes: Callable[[], dict[str, Any]], parent: context_api.Context | None
) -> tuple[Span | None, object]:
    """Start the SERVER span of an incoming request under ``parent`` (the context extracted from its headers,
    ``None`` for the current one) and make it current; ``attributes()`` is called only if the span may be
    recorded. Returns ``(span, token)``; ``span`` is ``None`` when it is not recorded: then what the SDK
    would make current is (a non-recording span of the request's trace, or ``parent`` itself where that
    decides its children alike), so the request's trace id still reaches step spans, outgoing calls and log
    lines, and its steps are dropped with it. Pass the token to :func:`end_server_span`.
    """
    state = _provider_state()
    mode = state.mode
    if mode == _DECIDED:
        context = parent if parent is not None else _current_context()
        span = context.get(_SPAN_KEY)
        parent_span = None if span is None else (
            span._context if type(span).get_span_context in _CONTEXT_FIELD else span.get_span_context())
        if parent_span is not None and parent_span[5]:
            trace_id = parent_span[0]
            if trace_id & _LOW_64 >= (state.remote if parent_span[2] else state.local)[parent_span[3] & 1]:
                if not parent_span[3] & 1 and trace_id & _LOW_64 >= state.quiet_unsampled:
                    _count_dropped(state, parent_span)
                    return None, (context_api.attach(parent) if parent is not None else None)
                return None, _dropped(state, context, parent_span, trace_id)[1]
        else:
            parent_span = None
            if state.quiet_root:
                _count_dropped(state, None)
                return None, (context_api.attach(parent) if parent is not None else None)
            trace_id = state.ids.trace_id()  # type: ignore[union-attr]
            if trace_id & _LOW_64 >= state.root:
                return None, _dropped(state, context, None, trace_id)[1]
        span = _factory.start_sampled_span(
            state.tracer, state.ids, name, parent, parent_span, trace_id,  # type: ignore[arg-type]
            _SERVER, attributes(),
        )
        return span, _make_current(span, context)
    if mode == _OFF:
        return None, (context_api.attach(parent) if parent is not None else None)
    span = state.tracer.start_span(name, context=parent, kind=_SERVER, attributes=attributes())  # the SDK decides
    token = context_api.attach(trace.set_span_in_context(span, parent))
    return (span if span.is_recording() else None), token


def end_server_span(span: Span | None, token: object, error: BaseException | None = None) -> None:
    """End what :func:`start_server_span` started, recording ``error`` (if any) with error status."""
    if token is not None:
        _detach(token)
    if span is not None:
        if error is not None:
            _record_error(span, error)
        span.end()


def end_step_span(handle: SpanHandle, error: BaseException | None = None) -> None:
    """End a span from :func:`start_step_span`, recording ``error`` (if any) with error status."""
    span, token = handle
    _detach(token)
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
