"""Trace context in request headers: read it from incoming requests, write it into outgoing ones.

Incoming, the global propagator (W3C ``traceparent`` and ``baggage`` unless ``OTEL_PROPAGATORS`` says
otherwise) is asked first; when it finds no trace and the request carries Istio's B3 headers (``x-b3-*`` or
``b3``), those are read with opentelemetry-propagator-b3 (the ``kserve`` extra installs it). A request without
any of these headers costs a few dictionary lookups: the propagator is only called when one of its fields is
there. Outgoing, the global propagator writes its headers, plus B3 headers when the request came in with B3,
so an Istio mesh keeps following the trace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import propagate, trace
from opentelemetry.context import Context

_B3_FIELDS = frozenset({"x-b3-traceid", "b3"})  # either means "this request carries B3"
_B3_ALL_FIELDS = _B3_FIELDS | {"x-b3-spanid", "x-b3-sampled", "x-b3-flags", "x-b3-parentspanid"}
_B3_CONTEXT_KEY = context_api.create_key("kserve_otel.b3")

#: Where ``opentelemetry.propagate`` keeps the global propagator (``set_global_textmap`` rebinds it).
_GLOBAL_TEXTMAP_NAME = "_HTTP_TEXT_FORMAT"

_fields_cache: tuple[object, frozenset[str], frozenset[bytes]] = (None, frozenset(), frozenset())
_b3_propagator: Any = None


def _fields() -> tuple[frozenset[str], frozenset[bytes]]:
    """Header names the global propagator reads (and B3's), as str and as bytes; cached per propagator."""
    global _fields_cache
    propagator = propagate.get_global_textmap()
    cached, names, raw = _fields_cache
    if cached is not propagator:
        names = frozenset(name.lower() for name in propagator.fields) | _B3_ALL_FIELDS
        raw = frozenset(name.encode("latin-1") for name in names)
        _fields_cache = (propagator, names, raw)
    return names, raw


def _b3() -> Any:
    global _b3_propagator
    if _b3_propagator is None:
        try:
            from opentelemetry.propagators.b3 import B3MultiFormat
        except ImportError:  # the b3 extra is not installed: B3 headers are not read
            _b3_propagator = False
        else:
            _b3_propagator = B3MultiFormat()
    return _b3_propagator or None


def header_names() -> frozenset[bytes]:
    """The header names (lower-case bytes, as in an ASGI scope) that may carry a trace context."""
    cached = _fields_cache  # _fields() inlined for the cached case: every HTTP request asks
    if cached[0] is propagate.get_global_textmap():
        return cached[2]
    return _fields()[1]


def header_names_watch() -> dict[str, Any]:
    """What lets a caller keep :func:`header_names`' answer until the global propagator changes: the API
    module's namespace and the name it keeps the propagator under, as ``watch_dict``/``watch_key`` of
    :class:`kserve_otel.recording.speedups.HTTPRecorder`; empty when that name is not found (then it asks
    every time)."""
    namespace = vars(propagate)
    if namespace.get(_GLOBAL_TEXTMAP_NAME) is propagate.get_global_textmap():
        return {"watch_dict": namespace, "watch_key": _GLOBAL_TEXTMAP_NAME}
    return {}


def extract(carrier: Mapping[str, str]) -> Context | None:
    """The trace context in ``carrier`` (header names in lower case), or ``None`` when it holds none."""
    names, _ = _fields()
    if not any(name in carrier for name in names):
        return None
    ctx = propagate.extract(carrier)
    if not trace.get_current_span(ctx).get_span_context().is_valid and any(f in carrier for f in _B3_FIELDS):
        b3 = _b3()
        if b3 is not None:
            ctx = b3.extract(carrier, context=ctx)
            if trace.get_current_span(ctx).get_span_context().is_valid:
                ctx = context_api.set_value(_B3_CONTEXT_KEY, True, ctx)
    return ctx


def extract_asgi(raw_headers: Iterable[tuple[bytes, bytes]]) -> Context | None:
    """:func:`extract` for an ASGI scope's ``headers`` list."""
    _, raw_names = _fields()
    carrier = None
    for key, value in raw_headers:
        if key in raw_names:
            if carrier is None:
                carrier = {}
            carrier[key.decode("latin-1")] = value.decode("latin-1")
    return extract(carrier) if carrier else None


def inject(headers: MutableMapping[str, str]) -> MutableMapping[str, str]:
    """Write the current trace context into ``headers`` (and B3 headers if the request came with B3)."""
    propagate.inject(headers)
    if context_api.get_value(_B3_CONTEXT_KEY):
        b3 = _b3()
        if b3 is not None:
            b3.inject(headers)
    return headers
