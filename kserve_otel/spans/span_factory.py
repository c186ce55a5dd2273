"""Sampled step spans at half the SDK's cost: the SDK's own span class, filled from a template made by the SDK.

A sampled span through ``Tracer.start_span`` costs 9-11 µs on the project's machine, most of it spent on
work whose result is the same for every call of one step: cleaning the step's attributes against the span
limits (``BoundedAttributes``, 1.8 µs for two attributes), keyword-argument plumbing through ``Span.__init__``
and ``ReadableSpan.__init__``, asking the sampler, validating ids the generator just made. A
:class:`SpanFactory` pays that once per (tracer, step): it has the SDK build one reference ``Span`` with
the step's name and attributes (never started, so no processor sees it), keeps its fields as a template,
and then makes each span as a plain copy of that template with fresh per-span parts (ids, the attribute,
event and link containers, the lock, the SDK's span metrics callback) before starting it through the SDK's
own ``Span.start``. Ending is the SDK's ``Span.end`` unchanged: processors and exporters get the same
``ReadableSpan`` as ever.

The template relies on the SDK's private field names, so a factory is only made when the reference span's
fields are exactly the ones this module fills (checked per tracer, see :func:`span_factory`); any other SDK
version or tracer class falls back to ``tracer.start_span``. ``tests/test_span_factory.py`` compares spans
from both paths field by field.

The factory never asks a sampler: :mod:`kserve_otel.spans.tracing` decides first, for the trace id it drew
with
:class:`SpanIds` (the tracer's own id generator, called as the SDK calls it: trace id, then span id), and
hands that trace id to :meth:`SpanFactory.start` or :func:`start_sampled_span` (a request span: any kind and
attributes), so the span carries the very trace id the decision was made for.
"""

from __future__ import annotations

import random
from collections import deque
from threading import Lock
from time import time_ns
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanContext, TraceFlags
from opentelemetry.trace.propagation import _SPAN_KEY

try:
    from opentelemetry.attributes import BoundedAttributes
    from opentelemetry.sdk.trace import Tracer, _Span
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
    from opentelemetry.sdk.trace.sampling import Decision
    from opentelemetry.sdk.util import BoundedList
except ImportError:  # pragma: no cover - the SDK is a dependency; without it every span takes the API path
    Tracer = None  # type: ignore[assignment,misc]

__all__ = ["SpanFactory", "SpanIds", "span_factory", "start_sampled_span", "supports"]

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
_getrandbits = random.getrandbits
_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
_SAMPLED_RANDOM = TraceFlags(TraceFlags.SAMPLED | TraceFlags.RANDOM_TRACE_ID)
_RANDOM_BIT = TraceFlags.RANDOM_TRACE_ID
_UNSAMPLED = TraceFlags(TraceFlags.DEFAULT)
_UNSAMPLED_RANDOM = TraceFlags(TraceFlags.RANDOM_TRACE_ID)
#: Attribute value types the SDK's cleaning keeps as they are (without a value length limit).
_PLAIN_TYPES = frozenset({str, bool, int, float})
#: The request-span factory of each tracer (``None``: the tracer takes the SDK path), by ``id`` (the factory
#: holds its tracer, so the id stays that tracer's).
_request_factories: dict[int, SpanFactory | None] = {}
#: ``SpanFactory.start``'s default: read the parent from the context given.
_FROM_CONTEXT: Any = object()
_UNKNOWN: Any = object()


class SpanFactory:
    """Starts sampled INTERNAL spans of one name and one set of attributes for one SDK tracer."""

    __slots__ = ("tracer", "attributes", "_template", "_attribute_template", "_attribute_items", "_max_events",
                 "_max_links", "_metrics", "_processor", "_ids", "_root_flags")

    def __init__(self, tracer: Any, name: str, attributes: dict[str, Any], reference: Any) -> None:
        self.tracer = tracer
        self.attributes = attributes  # kept alive: callers key factories by its id()
        fields = reference.__dict__
        self._template = {key: value for key, value in fields.items() if key not in _PER_SPAN}
        cleaned = reference._attributes.__dict__
        self._attribute_template = {key: value for key, value in cleaned.items() if key not in ("_dict", "_lock")}
        self._attribute_items = dict(cleaned["_dict"])
        self._max_events = reference._events._dq.maxlen
        self._max_links = reference._links._dq.maxlen
        self._metrics = tracer._tracer_metrics
        self._processor = tracer.span_processor
        ids = tracer.id_generator
        self._ids = None if type(ids) is RandomIdGenerator else ids  # noqa: E721 - its exact behaviour is copied
        self._root_flags = _SAMPLED_RANDOM if ids.is_trace_id_random() else _SAMPLED

    def start(self, parent_context: Any, parent: Any = _FROM_CONTEXT, trace_id: int = 0) -> Any:
        """A started, sampled span, child of the span in ``parent_context``: the current OpenTelemetry
        ``Context``. Processors see the start as from ``tracer.start_span(name, attributes=...)`` (called without
        a context argument, as for every step span).

        A caller that has already looked at the parent to decide sampling passes what it found: ``parent``, the
        parent's valid ``SpanContext`` or ``None`` for a root, and for a root ``trace_id``, the id the decision
        was made for (from :class:`SpanIds` of this tracer). Without them the parent is read from the context
        and a root gets a new trace id."""
        tracer = self.tracer
        if not tracer._is_enabled():
            return tracer.start_span(self._template["_name"], attributes=self.attributes)
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
        else:
            trace_id = parent.trace_id
            flags = _SAMPLED_RANDOM if parent.trace_flags & _RANDOM_BIT else _SAMPLED
            trace_state = parent.trace_state
        span_id = _random_id(64) if ids is None else ids.generate_span_id()
        span = self._span(self._attribute_items.copy())
        state = span.__dict__
        state["_events"] = _bounded_list(self._max_events)
        state["_links"] = _bounded_list(self._max_links)
        state["_lock"] = Lock()
        # SpanContext.__new__ only adds the validity check, and these ids are valid by construction.
        state["_context"] = tuple.__new__(SpanContext, (trace_id, span_id, False, flags, trace_state, True))
        state["_parent"] = parent
        state["_record_end_metrics"] = self._metrics.start_span(parent, Decision.RECORD_AND_SAMPLE)
        state["_start_time"] = time_ns()
        self._processor.on_start(span, parent_context=None)  # what Tracer.start_span passes without a context
        return span

    def _span(self, items: dict[str, Any]) -> Any:
        """A span of the template holding the attributes ``items`` (already clean), its containers fresh."""
        attributes = _new(BoundedAttributes)
        state = attributes.__dict__
        state.update(self._attribute_template)
        state["_dict"] = items
        state["_lock"] = Lock()
        span = _new(_Span)
        state = span.__dict__
        state.update(self._template)
        state["_attributes"] = attributes
        return span

    def takes(self, attributes: dict[str, Any]) -> bool:
        """Whether ``attributes`` are what the SDK's cleaning would keep as they are: at most the limit's count of
        str, bool, int or float values (no sequences), under str keys, with no value length limit."""
        template = self._attribute_template
        if template["max_value_len"] is not None or (template["maxlen"] is not None
                                                      and len(attributes) > template["maxlen"]):
            return False
        if not _PLAIN_TYPES.issuperset(map(type, attributes.values())):
            return False
        for key in attributes:
            if type(key) is not str or not key:
                return False
        return True

    def start_request(self, name: str, kind: trace.SpanKind, context: Any, parent: Any, trace_id: int,
                      attributes: dict[str, Any]) -> Any:
        """A started, sampled span ``name`` of ``kind`` with ``attributes`` (which :meth:`takes` accepted) under
        ``parent`` (the valid parent ``SpanContext`` found in ``context``, or ``None`` for a root of
        ``trace_id``): what :func:`start_sampled_span` makes, from this factory's template."""
        ids = self._ids
        if parent is None:
            flags, trace_state = self._root_flags, None
        else:
            trace_id = parent.trace_id
            flags = _SAMPLED_RANDOM if parent.trace_flags & _RANDOM_BIT else _SAMPLED
            trace_state = parent.trace_state
        span_id = _random_id(64) if ids is None else ids.generate_span_id()
        span = self._span(dict(attributes))
        state = span.__dict__
        state["_name"] = name
        state["_kind"] = kind
        state["_events"] = _bounded_list(self._max_events)
        state["_links"] = _bounded_list(self._max_links)
        state["_lock"] = Lock()
        state["_context"] = SpanContext(trace_id, span_id, False, flags, trace_state)
        state["_parent"] = parent
        state["_record_end_metrics"] = self._metrics.start_span(parent, Decision.RECORD_AND_SAMPLE)
        state["_start_time"] = time_ns()
        self._processor.on_start(span, parent_context=context)  # as Span.start passes it
        return span


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


def _bounded_list(maxlen: int | None) -> Any:
    items = _new(BoundedList)
    items.__dict__ = {"dropped": 0, "_dq": deque(maxlen=maxlen), "_lock": Lock()}
    return items


def span_factory(tracer: Any, name: str, attributes: dict[str, Any]) -> SpanFactory | None:
    """A factory for sampled spans ``name`` with ``attributes`` on ``tracer``, or ``None`` when ``tracer`` is not
    the SDK's own (or the SDK's span layout is not the one this module knows): then use ``tracer.start_span``."""
    if Tracer is None or type(tracer) is not Tracer:  # noqa: E721 - a subclass may start spans its own way
        return None
    if not callable(getattr(tracer, "_is_enabled", None)) or not hasattr(tracer, "_tracer_metrics"):
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
    if not tracer._is_enabled():
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
