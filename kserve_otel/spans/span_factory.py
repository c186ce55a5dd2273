"""Sampled step spans at a fraction of the SDK's cost: the SDK's own span class, its shared fields held once.

A sampled span through ``Tracer.start_span`` costs 9-11 µs on the project's machine, most of it spent on
work whose result is the same for every call of one step: cleaning the step's attributes against the span
limits (``BoundedAttributes``, 1.8 µs for two attributes), keyword-argument plumbing through ``Span.__init__``
and ``ReadableSpan.__init__``, asking the sampler, validating ids the generator just made; then each span
carries some twenty objects (its attributes, events and links containers with their locks). A
:class:`SpanFactory` pays that once per (tracer, step): it has the SDK build one reference ``Span`` with the
step's name and attributes (never started, so no processor sees it) and makes a subclass of the SDK's
``_Span`` (:class:`TemplateSpan`) whose class attributes are that span's fields shared by every span of the
step: name, kind, resource, scope, limits, processor, the cleaned attributes (immutable), no events, no links.
A span of the factory is an instance with only its own fields (context, parent, start time): an SDK span
to every reader, processors and exporters included. Its attributes, events and links become its own at the
first change (the SDK methods that change them are wrapped to copy first), so no span changes another.

Ending is the SDK's ``Span.end``, except where the tracer's only processor is one that encodes a span as it
ends and keeps nothing of it (kserve-otel's ``EncodingBatchSpanProcessor``, which says so by a true
``encodes_at_end`` and offers ``end_span``): then start skips the processors' no-op ``on_start``, and end has
that processor end the span itself (the SDK's end steps and its ``on_end`` in one call, in C where the
extension is built), with no ``ReadableSpan`` copy and no loop over processors. A processor added later,
while spans run, puts their ends back on the SDK's path (``TemplateSpan.end`` checks the processors each
time). In that case too, where the tracer's id generator is the SDK's and its span metrics are off, a step's
span is started and made current in one C call (:attr:`SpanFactory.fast_start`, used by
:mod:`kserve_otel.spans.tracing` with the extension ``kserve_otel.spans._spans``).
Measured (``benchmarks/server_instructions.py``, a KServe server tracing every request): 536k instructions a
request more than the untraced server before, 338k after.

The template relies on the SDK's private field names, so a factory is only made when the reference span's
fields are exactly the ones this module knows (checked per tracer, see :func:`span_factory`); any other SDK
version or tracer class falls back to ``tracer.start_span``. ``tests/test_span_factory.py`` compares spans
from both paths field by field, and their OTLP encodings byte by byte.

The factory never asks a sampler: :mod:`kserve_otel.spans.tracing` decides first, for the trace id it drew
with :class:`SpanIds` (the tracer's own id generator, called as the SDK calls it: trace id, then span id), and
hands that trace id to :meth:`SpanFactory.start` or :func:`start_sampled_span` (a request span: any kind and
attributes), so the span carries the very trace id the decision was made for.
"""

from __future__ import annotations

import logging
import random
from threading import Lock
from time import time_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanContext, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY

try:
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import Tracer, _Span
    from opentelemetry.sdk.trace._tracer_metrics import NoOpTracerMetrics as _NoOpTracerMetrics
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import Decision
    from opentelemetry.sdk.util import BoundedList
    _noop_on_start, _noop_on_ending = BatchSpanProcessor.on_start, BatchSpanProcessor._on_ending
except ImportError:  # pragma: no cover - the SDK is a dependency; without it every span takes the API path
    Tracer = None  # type: ignore[assignment,misc]

__all__ = ["CONTEXT_FIELD", "SpanFactory", "SpanIds", "TemplateSpan", "context_field_readers", "span_factory",
           "start_sampled_span", "supports"]

#: The fields of an SDK span this module fills, and of its containers: any other set means another SDK layout.
_SPAN_FIELDS = frozenset({
    "_name", "_context", "_kind", "_instrumentation_info", "_instrumentation_scope", "_parent", "_start_time",
    "_end_time", "_attributes", "_events", "_links", "_resource", "_status", "_sampler", "_trace_config",
    "_record_exception", "_set_status_on_exception", "_span_processor", "_limits", "_lock", "_record_end_metrics",
})
_PER_SPAN = frozenset({"_context", "_parent", "_attributes", "_events", "_links", "_lock", "_record_end_metrics",
                       "_start_time"})
_ATTRIBUTES_FIELDS = frozenset({"_dict", "maxlen", "dropped", "max_value_len", "_lock", "_immutable"})
_LIST_FIELDS = frozenset({"dropped", "_dq", "_lock"})

_new = object.__new__
#: The SDK span module's logger: warnings about ended spans reach the handlers they reach from SDK spans.
_sdk_logger = logging.getLogger("opentelemetry.sdk.trace")
_getrandbits = random.getrandbits
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SAMPLED_RANDOM = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_RANDOM_BIT = TraceFlags.RANDOM_TRACE_ID
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSAMPLED_RANDOM = TraceFlags(TraceFlags.RANDOM_TRACE_ID)
#: Attribute value types the SDK's cleaning keeps as they are (without a value length limit).
_PLAIN_TYPES = frozenset({str, bool, int, float})
_STR_ONLY = frozenset({str})
#: The request-span factory of each tracer (``None``: the tracer takes the SDK path), by ``id`` (the factory
#: holds its tracer, so the id stays that tracer's).
_request_factories: dict[int, SpanFactory | None] = {}
#: ``SpanFactory.start``'s default: read the parent from the context given.
_FROM_CONTEXT: Any = object()
_UNKNOWN: Any = object()
_ENDED: Any = object()


class SpanFactory:
    """Starts sampled INTERNAL spans of one name and one set of attributes for one SDK tracer."""

    __slots__ = ("tracer", "attributes", "fast_start", "_span_class", "_metrics", "_processor", "_ids", "_root_flags")

    def __init__(self, tracer: Any, name: str, attributes: dict[str, Any], reference: Any) -> None:
        self.tracer = tracer
        self.attributes = attributes  # kept alive: callers key factories by its id()
        shared = {key: value for key, value in reference.__dict__.items() if key not in _PER_SPAN}
        cleaned = reference._attributes
        cleaned._immutable = True  # shared by every span of the factory until one of them sets an attribute
        processor = tracer.span_processor
        fast = _fast_processors(processor)
        metrics = tracer._tracer_metrics
        # The SDK's span metrics when they are off (the default): start_span returns a function that does nothing.
        self._metrics = None if type(metrics) is _NoOpTracerMetrics else metrics  # noqa: E721
        # No events or links: a span's containers are made at its first one (TemplateSpan._append).
        self._span_class = type(TemplateSpan)("TemplateSpan", (TemplateSpan,), {
            **shared, "_attributes": cleaned, "_events": (), "_links": (), "_fast": fast, "_record_end_metrics": None,
            "_lock": Lock(), "__slots__": ()})
        self._processor = processor
        ids = tracer.id_generator
        self._ids = None if type(ids) is RandomIdGenerator else ids  # noqa: E721 - its exact behaviour is copied
        self._root_flags = _SAMPLED_RANDOM if ids.is_trace_id_random() else _SAMPLED
        #: ``(span class, tracer, root flags)`` where :meth:`start` is nothing but the making of a span of the
        #: template (the SDK's own id generator, no span metrics): what kserve_otel.spans._spans.start_current
        #: needs to do the same in C (it checks the processors and that the tracer is enabled itself); else None.
        self.fast_start = (self._span_class, tracer, self._root_flags) if self._ids is None and self._metrics is None \
            else None

    def start(self, parent_context: Any, parent: Any = _FROM_CONTEXT, trace_id: int = 0) -> Any:
        """A started, sampled span, child of the span in ``parent_context``: the current OpenTelemetry
        ``Context``. Processors see the start as from ``tracer.start_span(name, attributes=...)`` (called without
        a context argument, as for every step span).

        A caller that has already looked at the parent to decide sampling passes what it found: ``parent``, the
        parent's valid ``SpanContext`` or ``None`` for a root, and for a root ``trace_id``, the id the decision
        was made for (from :class:`SpanIds` of this tracer). Without them the parent is read from the context
        and a root gets a new trace id."""
        tracer = self.tracer
        if not tracer._tracer_config.is_enabled:  # tracer._is_enabled(), one call fewer (the SDK's Tracer only)
            return tracer.start_span(self._span_class._name, attributes=self.attributes)
        if parent is _FROM_CONTEXT:
            parent_span = parent_context.get(_SPAN_KEY)
            parent = parent_span.get_span_context() if parent_span is not None else None
            if parent is not None and not parent.is_valid:
                parent = None
        ids = self._ids
        if parent is None:
            if not trace_id:
                trace_id = _random_id(128) if ids is None else ids.generate_trace_id()
            flags = self._root_flags
            trace_state = trace.DEFAULT_TRACE_STATE
        else:  # SpanContext is a tuple: (trace_id, span_id, is_remote, trace_flags, trace_state, is_valid)
            trace_id = parent[0]
            flags = _SAMPLED_RANDOM if parent[3] & _RANDOM_BIT else _SAMPLED
            trace_state = parent[4]
        span_id = (_getrandbits(64) or _random_id(64)) if ids is None else ids.generate_span_id()
        span = _new(self._span_class)
        # SpanContext.__new__ only adds the validity check, and these ids are valid by construction.
        span._context = tuple.__new__(SpanContext, (trace_id, span_id, False, flags, trace_state, True))
        span._parent = parent
        if self._metrics is not None:
            span._record_end_metrics = self._metrics.start_span(parent, Decision.RECORD_AND_SAMPLE)
        span._start_time = time_ns()
        processor, fast = self._processor, span._fast
        if fast is None or processor._span_processors is not fast:  # the fast processor's on_start: a no-op
            processor.on_start(span, parent_context=None)  # what Tracer.start_span passes without a context
        return span

    def takes(self, attributes: dict[str, Any]) -> bool:
        """Whether ``attributes`` are what the SDK's cleaning would keep as they are: at most the limit's count of
        str, bool, int or float values (no sequences), under str keys, with no value length limit."""
        template = self._span_class._attributes
        if template.max_value_len is not None or (template.maxlen is not None
                                                  and len(attributes) > template.maxlen):
            return False
        # Set operations over the types, in C: a request's dozen attributes pass here on every traced request.
        return (_PLAIN_TYPES.issuperset(map(type, attributes.values())) and _STR_ONLY.issuperset(map(type, attributes))
                and "" not in attributes)

    def start_request(self, name: str, kind: trace.SpanKind, context: Any, parent: Any, trace_id: int,
                      attributes: dict[str, Any]) -> Any:
        """A started, sampled span ``name`` of ``kind`` with ``attributes`` (which :meth:`takes` accepted) under
        ``parent`` (the valid parent ``SpanContext`` found in ``context``, or ``None`` for a root of
        ``trace_id``): what :func:`start_sampled_span` makes, from this factory's template."""
        ids = self._ids
        if parent is None:
            flags, trace_state = self._root_flags, None
        else:  # a SpanContext, read by index as in start()
            trace_id = parent[0]
            flags = _SAMPLED_RANDOM if parent[3] & _RANDOM_BIT else _SAMPLED
            trace_state = parent[4]
        span_id = (_getrandbits(64) or _random_id(64)) if ids is None else ids.generate_span_id()
        span = _new(self._span_class)
        span._attributes = _attributes_like(self._span_class._attributes, dict(attributes), 0)
        span._name = name
        span._kind = kind
        span._context = SpanContext(trace_id, span_id, False, flags, trace_state)
        span._parent = parent
        if self._metrics is not None:
            span._record_end_metrics = self._metrics.start_span(parent, Decision.RECORD_AND_SAMPLE)
        span._start_time = time_ns()
        processor, fast = self._processor, span._fast
        if fast is None or processor._span_processors is not fast:
            processor.on_start(span, parent_context=context)  # as Span.start passes it
        return span


class TemplateSpan(_Span if Tracer is not None else object):  # type: ignore[misc]
    """The SDK's span, with what every span of one factory shares as class attributes of a subclass per factory
    (name, kind, resource, scope, limits, processor, the cleaned attributes, and the lock of the SDK's methods:
    each holds it for a few field operations and none takes another span's, so one lock serves all of them),
    so that a span is made with only its own three fields (context, parent, start time). Its attributes,
    events and links containers are its own from the first change: the shared attributes are immutable, and
    the SDK's methods that change them are wrapped here to copy first.

    ``end()`` is the SDK's, except where the tracer's only processor is one that encodes a span at its end and
    keeps nothing of it (``encodes_at_end``, see :func:`_fast_processors`): then that processor's ``on_end``
    gets the ended span itself, with no ``ReadableSpan`` copy and no loop over processors."""

    __slots__ = ()
    #: The tuple of processors (``SynchronousMultiSpanProcessor._span_processors``) for which start and end go
    #: straight to the one processor; any other tuple (a processor added since) takes the SDK's path.
    _fast: tuple[Any, ...] | None = None

    def get_span_context(self) -> SpanContext:
        return self._context  # the SDK's, without its typing.cast call

    def _own_attributes(self) -> Any:
        """The span's own attributes container, a copy of the shared one made at the first call."""
        state = self.__dict__
        own = state.get("_attributes")
        if own is None:
            shared = type(self)._attributes
            own = state["_attributes"] = _attributes_like(shared, dict(shared._dict), shared.dropped)
        return own

    def set_attribute(self, key: str, value: Any) -> None:
        attributes = self._own_attributes()
        # A str, bool, int or float value that the limits keep whole: what the SDK's set_attribute and
        # BoundedAttributes.__setitem__ do (under the same two locks), without their six calls. A request span
        # gets four such attributes at its end. Anything else takes the SDK's path.
        if type(key) is str and key and type(value) in _PLAIN_TYPES and (
                type(value) is not str or attributes.max_value_len is None):
            with self._lock:
                if self._end_time is None:
                    entries = attributes._dict
                    with attributes._lock:
                        if key in entries or attributes.maxlen is None or len(entries) < attributes.maxlen:
                            entries.pop(key, None)  # a key set again moves to the end, as in the SDK
                            entries[key] = value
                            return
                    # full: the SDK's path drops the oldest pair and counts it
                else:
                    value = _ENDED
            if value is _ENDED:
                _sdk_logger.warning("Setting attribute on ended span.")
                return
        super().set_attribute(key, value)

    def set_attributes(self, attributes: Any) -> None:
        self._own_attributes()
        super().set_attributes(attributes)

    def _add_event(self, event: Any) -> None:
        self._append("_events", self._limits.max_events, event, "_add_event")

    def _add_link(self, link: Any) -> None:
        self._append("_links", self._limits.max_links, link, "_add_link")

    def _append(self, field: str, limit: int | None, item: Any, method: str) -> None:
        """What the SDK's ``_add_event`` / ``_add_link`` do (append under the lock while the span runs, else
        warn), to the span's own container of ``field``, made at its first item."""
        with self._lock:
            if self._end_time is None:
                items = self.__dict__.get(field)
                if items is None:
                    items = self.__dict__[field] = BoundedList(limit)
                items.append(item)
                return
        _sdk_logger.warning("Tried calling %s on an ended span.", method)

    def end(self, end_time: int | None = None) -> None:
        fast = self._fast
        if fast is None or self._span_processor._span_processors is not fast:
            super().end(end_time)
        elif not fast[0].end_span(self, end_time):  # the SDK's steps, see _fast_processors
            _sdk_logger.warning("Calling end() on an ended span.")


def context_field_readers() -> frozenset[Any]:
    """The ``get_span_context`` functions known to return the span's ``_context`` field and nothing else:
    :class:`TemplateSpan`'s, the SDK span's and ``NonRecordingSpan``'s (each checked on a span of its own)."""
    from opentelemetry.trace import INVALID_SPAN_CONTEXT, NonRecordingSpan

    readers = set()
    for span in (NonRecordingSpan(INVALID_SPAN_CONTEXT),) + (() if Tracer is None else (
            _new(TemplateSpan), _Span("probe", SpanContext(1, 1, False, _SAMPLED)))):
        if not hasattr(span, "_context"):
            span._context = SpanContext(1, 1, False, _SAMPLED)
        if span.get_span_context() is span._context:
            readers.add(type(span).get_span_context)
    return frozenset(readers)


#: ``get_span_context`` functions of span classes whose span context is their ``_context`` field: where
#: ``type(span).get_span_context in CONTEXT_FIELD``, ``span._context`` is read in place of the call (one Python
#: call saved per step and span end). A subclass that overrides ``get_span_context`` has another function.
CONTEXT_FIELD = context_field_readers()


def _attributes_like(template: Any, items: dict[str, Any], dropped: int) -> Any:
    """A mutable ``BoundedAttributes`` with ``template``'s limits holding ``items`` (already clean), as the SDK's
    constructor would leave it, without cleaning them again."""
    attributes = _new(BoundedAttributes)
    attributes.__dict__ = {"_dict": items, "maxlen": template.maxlen, "dropped": dropped,
                           "max_value_len": template.max_value_len, "_lock": Lock(), "_immutable": False}
    return attributes


def _fast_processors(processor: Any) -> tuple[Any, ...] | None:
    """The SDK multi-processor's tuple of processors when it holds exactly one, which encodes each span as it
    ends and keeps nothing of it (a true ``encodes_at_end`` attribute: it may be given the ended span in place
    of its ``ReadableSpan`` copy), whose ``on_start`` and ``_on_ending`` are the SDK's no-ops, and which ends a
    span itself (``end_span(span, end_time)``: the SDK's ``Span.end`` with that processor's ``on_end``, false
    if the span had ended already; kserve_otel.otlp_export.py_end_span); else ``None``."""
    processors = getattr(processor, "_span_processors", None)
    if type(processors) is not tuple or len(processors) != 1:
        return None
    (only,) = processors
    if getattr(only, "encodes_at_end", False) is not True or not callable(getattr(only, "end_span", None)):
        return None
    kind = type(only)
    if getattr(kind, "on_start", None) is not _noop_on_start or getattr(kind, "_on_ending", None) is not _noop_on_ending:
        return None
    return processors


class SpanIds:
    """The ids and flags a tracer's ``start_span`` would give a span, drawn from the tracer's own id generator
    (``RandomIdGenerator``'s exact behaviour inlined: the same calls of ``random.getrandbits``)."""

    __slots__ = ("trace_id", "span_id", "root_flags")

    def __init__(self, tracer: Any) -> None:
        ids = tracer.id_generator
        fast = Tracer is not None and type(ids) is RandomIdGenerator  # noqa: E721 - its exact behaviour is copied
        #: A new root trace id, as ``Tracer.start_span`` draws it before asking the sampler.
        self.trace_id = _random_trace_id if fast else ids.generate_trace_id
        #: A new span id.
        self.span_id = _random_span_id if fast else ids.generate_span_id
        #: Flags of a root span, indexed by the sampling decision (0: dropped, 1: sampled).
        self.root_flags = (_UNSAMPLED_RANDOM, _SAMPLED_RANDOM) if ids.is_trace_id_random() else (_UNSAMPLED, _SAMPLED)


def _random_trace_id() -> int:
    value = _getrandbits(128)
    while not value:
        value = _getrandbits(128)
    return value


def _random_span_id() -> int:
    value = _getrandbits(64)
    while not value:
        value = _getrandbits(64)
    return value


def _random_id(bits: int) -> int:
    """What ``RandomIdGenerator`` returns: random bits, never the invalid id 0."""
    value = _getrandbits(bits)
    while not value:
        value = _getrandbits(bits)
    return value


def span_factory(tracer: Any, name: str, attributes: dict[str, Any]) -> SpanFactory | None:
    """A factory for sampled spans ``name`` with ``attributes`` on ``tracer``, or ``None`` when ``tracer`` is not
    the SDK's own (or the SDK's span layout is not the one this module knows): then use ``tracer.start_span``."""
    if Tracer is None or type(tracer) is not Tracer:  # noqa: E721 - a subclass may start spans its own way
        return None
    if (not callable(getattr(tracer, "_is_enabled", None)) or not hasattr(tracer, "_tracer_metrics")
            or tracer._is_enabled() is not getattr(getattr(tracer, "_tracer_config", None), "is_enabled", None)):
        return None  # an SDK without the tracer configuration and span metrics this module reproduces
    try:
        reference = _Span(
            name=name, context=SpanContext(1, 1, False, _SAMPLED), parent=None, sampler=tracer.sampler,
            resource=tracer.resource, attributes=attributes, span_processor=tracer.span_processor,
            kind=trace.SpanKind.INTERNAL, links=(), instrumentation_info=tracer.instrumentation_info,
            record_exception=True, set_status_on_exception=True, limits=tracer._span_limits,
            instrumentation_scope=tracer._instrumentation_scope, record_end_metrics=None,
        )
        if (
            set(reference.__dict__) != _SPAN_FIELDS
            or not isinstance(reference._attributes, BoundedAttributes)
            or set(reference._attributes.__dict__) != _ATTRIBUTES_FIELDS
            or {type(reference._events), type(reference._links)} != {BoundedList}
            or set(reference._events.__dict__) != _LIST_FIELDS
            or set(reference._links.__dict__) != _LIST_FIELDS
        ):
            return None
        return SpanFactory(tracer, name, attributes, reference)
    except Exception:  # noqa: BLE001 - an SDK this module does not know: the ordinary path works everywhere
        return None


def supports(tracer: Any) -> bool:
    """Whether sampled spans of ``tracer`` can be made here for a decision already taken (the SDK's own
    ``Tracer``, with the span layout this module knows); otherwise every span must go through
    ``tracer.start_span``, which decides by itself."""
    return span_factory(tracer, "kserve-otel", {}) is not None


def start_sampled_span(
    tracer: Any, ids: SpanIds, name: str, context: Any, parent: Any, trace_id: int, kind: trace.SpanKind,
    attributes: dict[str, Any] | None,
) -> Any:
    """What ``tracer.start_span(name, context, kind, attributes)`` starts when its sampler decides "record and
    sample" for ``trace_id`` (the SDK's own steps after the sampler's, in its order): for a request span, whose
    kind and attributes vary. ``parent`` is the valid parent ``SpanContext`` found in ``context`` (``None`` for a
    root, whose ``trace_id`` was drawn from ``ids``); ``tracer`` must be one that :func:`supports` accepts."""
    if not tracer._tracer_config.is_enabled:  # tracer._is_enabled(), inlined as in SpanFactory.start
        return tracer.start_span(name, context=context, kind=kind, attributes=attributes)
    factory = _request_factories.get(id(tracer), _UNKNOWN)
    if factory is _UNKNOWN:
        factory = span_factory(tracer, "request", {}) if len(_request_factories) < 64 else None
        _request_factories[id(tracer)] = factory
    if factory is not None and attributes and factory.takes(attributes):
        # The same span, without cleaning attributes that are clean or the SDK's keyword plumbing (issue 14)
        return factory.start_request(name, kind, context, parent, trace_id, attributes)
    if parent is None:
        flags, trace_state = ids.root_flags[1], None
    else:
        trace_id = parent.trace_id
        flags = _SAMPLED_RANDOM if parent.trace_flags & _RANDOM_BIT else _SAMPLED
        trace_state = parent.trace_state
    span = _Span(
        name=name, context=SpanContext(trace_id, ids.span_id(), False, flags, trace_state), parent=parent,
        sampler=tracer.sampler, resource=tracer.resource, attributes=attributes,
        span_processor=tracer.span_processor, kind=kind, links=(), instrumentation_info=tracer.instrumentation_info,
        record_exception=True, set_status_on_exception=True, limits=tracer._span_limits,
        instrumentation_scope=tracer._instrumentation_scope,
        record_end_metrics=tracer._tracer_metrics.start_span(parent, Decision.RECORD_AND_SAMPLE),
    )
    span.start(parent_context=context)
    return span
