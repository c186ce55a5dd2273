"""SDK spans to OTLP protobuf bytes (an ``ExportTraceServiceRequest``), in C when the optional extension
``kserve_otel.export._otlp`` is built, else in pure Python: the same function, the same bytes.

Why: a KServe server tracing every request (``OTEL_TRACES_SAMPLER=always_on``, OTLP/HTTP export) lost a third
of its throughput, and py-spy put about 15 % of all samples in the ``BatchSpanProcessor``'s thread, in the
SDK's ``encode_spans`` (about 17 µs a span measured alone), which builds one protobuf message object per span,
attribute, value and status before serialising them, all under the GIL the event loop needs. Both versions
here write the wire format directly instead; ``benchmarks/otlp_encoding.py`` measures them against the SDK's
``encode_spans(spans).SerializePartialToString()`` (the C version at about a tenth of its cost, the
pure-Python one at about a third: see that benchmark for this machine's numbers).

What is written is what the SDK's encoder (``opentelemetry.exporter.otlp.proto.common``, 1.45) builds, field by
field, in field-number order as protobuf serialises it, so the bytes are those of
``encode_spans(spans).SerializeToString()``; ``tests/test_otlp_encoding.py`` decodes both and compares them:

* spans grouped by resource, then by instrumentation scope (``span.instrumentation_scope or None``), each
  group in the order of its first span, as the SDK's dictionaries group them (equal resources or scopes that
  are different objects share a group);
* attribute values: None as an empty ``AnyValue``; bool, str, int (int64), float, bytes; any other
  ``Sequence`` as an ``ArrayValue``, any ``Mapping`` as a ``KeyValueList`` (keys ``str()``-ed); an attribute
  whose value cannot be encoded (another type, an int outside int64, a string with lone surrogates, anywhere
  inside a sequence or mapping) is logged with its traceback and left out, the other attributes kept;
* span kind ``SpanKind`` + 1, status code ``status_code.value``, status description as message;
* ``flags``: ``SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`` (0x100), plus ``SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK``
  (0x200) when the parent (for a link, its context) is remote; never the W3C trace flags, as in the SDK;
* ``trace_state`` as ``key=value`` pairs joined by commas; a link's trace state is not written (nor by the SDK);
* the scope's ``schema_url`` on ``ScopeSpans``, the resource's on ``ResourceSpans``; no dropped-attribute
  counts for resources and scopes (the SDK writes none);
* anything else that does not fit its field (a trace id that is no 128-bit unsigned int, a negative
  timestamp, a name that is not a string) raises, as the SDK does; the exporter then reports a failure.

:data:`IMPLEMENTATION` says which version :func:`encode_spans` is; ``KSERVE_OTEL_NO_EXTENSION=1`` (read once,
at import) forces the pure-Python one (:func:`py_encode_spans`), as for :mod:`kserve_otel.recording.speedups`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from struct import Struct
from typing import Any, NamedTuple

from opentelemetry.trace import SpanKind

__all__ = ["IMPLEMENTATION", "EncodedSpan", "encode_batch", "encode_span", "encode_spans", "py_encode_batch",
           "py_encode_span", "py_encode_spans"]

_logger = logging.getLogger(__name__)

_MASK64 = (1 << 64) - 1
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
_fixed64 = Struct("<Q").pack
_fixed32 = Struct("<I").pack
_double = Struct("<d").pack
_SMALL = [bytes((i,)) for i in range(128)]

_KIND = {SpanKind.INTERNAL: b"\x30\x01", SpanKind.SERVER: b"\x30\x02", SpanKind.CLIENT: b"\x30\x03",
         SpanKind.PRODUCER: b"\x30\x04", SpanKind.CONSUMER: b"\x30\x05"}
_HAS_IS_REMOTE, _IS_REMOTE = 0x100, 0x200
_SPAN_FLAGS = {False: b"\x85\x01" + _fixed32(_HAS_IS_REMOTE), True: b"\x85\x01" + _fixed32(_HAS_IS_REMOTE | _IS_REMOTE)}
_LINK_FLAGS = {False: b"\x35" + _fixed32(_HAS_IS_REMOTE), True: b"\x35" + _fixed32(_HAS_IS_REMOTE | _IS_REMOTE)}


def _varint(value: int) -> bytes:
    """``value`` (0 <= value < 2**64) as a protobuf varint."""
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes | bytearray) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + _varint(len(payload)) + payload


def _utf8(value: Any) -> bytes:
    """A string field's bytes: str (lone surrogates raise), or bytes that are valid UTF-8, as protobuf takes."""
    if isinstance(value, str):
        return value.encode()
    if isinstance(value, bytes):
        value.decode()
        return bytes(value)
    raise TypeError(f"expected str, not {type(value).__name__}")


def _put_string(out: bytearray, tag: bytes, value: Any) -> None:
    """An optional string field: nothing for None or the empty string (proto3 defaults)."""
    if value is not None:
        data = _utf8(value)
        if data:
            out += tag
            out += _varint(len(data))
            out += data


def _unsigned(value: Any, bits: int) -> int:
    number = value.__index__()
    if not 0 <= number < 1 << bits:
        raise ValueError(f"Value out of range: {number}")
    return number


def _put_unsigned(out: bytearray, tag: bytes, value: Any, bits: int, encode: Any) -> None:
    """An optional unsigned field of ``bits`` bits written by ``encode``: nothing for None or 0."""
    if value is not None:
        number = _unsigned(value, bits)
        if number:
            out += tag
            out += encode(number)


def _put_uint32(out: bytearray, tag: bytes, value: Any) -> None:
    _put_unsigned(out, tag, value, 32, _varint)


def _put_fixed64(out: bytearray, tag: bytes, value: Any) -> None:
    _put_unsigned(out, tag, value, 64, _fixed64)


def _any_value(value: Any) -> bytes:
    """The fields of an ``AnyValue`` holding ``value`` (the SDK's ``_encode_value``, in its order of checks)."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            raise ValueError(f"Value out of range: {value}")
        return b"\x18" + _varint(value & _MASK64)
    if isinstance(value, float):
        return b"\x21" + _double(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", bytes(value))
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join([_field(b"\x0a", _any_value(item)) for item in value]))
    if isinstance(value, Mapping):
        return _field(b"\x32", b"".join([_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()]))
    raise TypeError(f"Invalid type {type(value)} of value {value}")


def _key_value(key: Any, value: Any) -> bytes:
    out = bytearray()
    _put_string(out, b"\x0a", key)
    out += _field(b"\x12", _any_value(value))
    return bytes(out)


def _put_attributes(out: bytearray, tag: bytes, attributes: Mapping[str, Any] | None) -> None:
    """One ``KeyValue`` field per attribute; one that cannot be encoded is logged and left out."""
    if not attributes:
        return
    for key, value in attributes.items():
        try:
            pair = _key_value(key, value)
        except Exception as error:  # noqa: BLE001 - the SDK's encoder skips any attribute that fails, and logs it
            _logger.exception("Failed to encode key %s: %s", key, error)
            continue
        out += tag
        out += _varint(len(pair))
        out += pair


def _is_remote(context: Any) -> bool:
    return bool(context and context.is_remote)


def _span(span: Any) -> bytearray:
    """The fields of one ``Span`` message."""
    out = bytearray()
    context = span.context
    out += b"\x0a\x10" + context.trace_id.to_bytes(16, "big")
    out += b"\x12\x08" + context.span_id.to_bytes(8, "big")
    trace_state = context.trace_state
    if trace_state is not None:
        _put_string(out, b"\x1a", ",".join([f"{key}={value}" for key, value in trace_state.items()]))
    parent = span.parent
    if parent:
        out += b"\x22\x08" + parent.span_id.to_bytes(8, "big")
    _put_string(out, b"\x2a", span.name)
    out += _KIND[span.kind]
    _put_fixed64(out, b"\x39", span.start_time)
    _put_fixed64(out, b"\x41", span.end_time)
    _put_attributes(out, b"\x4a", span.attributes)
    _put_uint32(out, b"\x50", span.dropped_attributes)
    events = span.events
    if events:
        for event in events:
            message = bytearray()
            _put_fixed64(message, b"\x09", event.timestamp)
            _put_string(message, b"\x12", event.name)
            _put_attributes(message, b"\x1a", event.attributes)
            _put_uint32(message, b"\x20", event.dropped_attributes)
            out += _field(b"\x5a", message)
    _put_uint32(out, b"\x60", span.dropped_events)
    links = span.links
    if links:
        for link in links:
            linked = link.context
            message = bytearray(b"\x0a\x10" + linked.trace_id.to_bytes(16, "big"))
            message += b"\x12\x08" + linked.span_id.to_bytes(8, "big")
            _put_attributes(message, b"\x22", link.attributes)
            _put_uint32(message, b"\x28", link.dropped_attributes)
            message += _LINK_FLAGS[_is_remote(linked)]
            out += _field(b"\x6a", message)
    _put_uint32(out, b"\x70", span.dropped_links)
    status = span.status
    if status is not None:
        message = bytearray()
        _put_string(message, b"\x12", status.description)
        code = status.status_code.value.__index__()
        if not -(1 << 31) <= code < 1 << 31:
            raise ValueError(f"Value out of range: {code}")
        if code:
            message += b"\x18" + _varint(code & _MASK64)
        out += _field(b"\x7a", message)
    out += _SPAN_FLAGS[_is_remote(parent)]
    return out


def _scope(scope: Any) -> bytes:
    """The fields of an ``InstrumentationScope`` message (none for no scope)."""
    out = bytearray()
    if scope is not None:
        _put_string(out, b"\x0a", scope.name)
        _put_string(out, b"\x12", scope.version)
        _put_attributes(out, b"\x1a", scope.attributes)
    return bytes(out)


class EncodedSpan(NamedTuple):
    """One span already encoded (``encode_span``), with what groups it in a request: what a span processor
    can queue instead of the span itself (one small object in place of a span's twenty or so, which the
    garbage collector would otherwise promote and scan while they wait for their batch)."""

    resource: Any
    scope: Any  # the span's instrumentation_scope, or None
    data: bytes


def py_encode_span(span: Any) -> bytes:
    """The fields of one ``Span`` message of ``span`` (an SDK ``ReadableSpan``), in pure Python."""
    return bytes(_span(span))


def py_encode_batch(items: Iterable[EncodedSpan]) -> bytes:
    """The serialised ``ExportTraceServiceRequest`` of spans encoded one by one: the bytes that
    :func:`encode_spans` gives for the spans themselves, in the same order."""
    groups: dict[Any, dict[Any, list[bytes]]] = {}
    # Identity first, then the dictionaries: a batch's spans mostly share their resource and scope objects,
    # and a Resource's hash serialises its attributes to JSON. Same groups as the SDK's: a dict finds a key
    # that is the same object before it compares.
    last_resource = last_scope = last_spans = last_scopes = None
    for resource, scope, encoded in items:
        if resource is not last_resource or last_scopes is None:
            last_scopes = groups.get(resource)
            if last_scopes is None:
                last_scopes = groups[resource] = {}
            last_resource, last_scope, last_spans = resource, None, None
        if scope is not last_scope or last_spans is None:
            last_spans = last_scopes.get(scope)
            if last_spans is None:
                last_spans = last_scopes[scope] = []
            last_scope = scope
        last_spans.append(encoded)
    out = bytearray()
    for resource, scopes in groups.items():
        resource_message = bytearray()
        _put_attributes(resource_message, b"\x0a", resource.attributes)
        message = bytearray(_field(b"\x0a", resource_message))
        for scope, encoded_spans in scopes.items():
            scope_message = bytearray(_field(b"\x0a", _scope(scope)))
            for encoded in encoded_spans:
                scope_message += b"\x12"
                scope_message += _varint(len(encoded))
                scope_message += encoded
            if scope:
                _put_string(scope_message, b"\x1a", scope.schema_url)
            message += _field(b"\x12", scope_message)
        _put_string(message, b"\x1a", resource.schema_url)
        out += _field(b"\x0a", message)
    return bytes(out)


def py_encode_spans(spans: Iterable[Any]) -> bytes:
    """The serialised ``ExportTraceServiceRequest`` of ``spans`` (SDK ``ReadableSpan`` objects), in pure Python."""
    return py_encode_batch([(span.resource, span.instrumentation_scope or None, _span(span)) for span in spans])


try:
    if os.environ.get("KSERVE_OTEL_NO_EXTENSION"):
        raise ImportError("KSERVE_OTEL_NO_EXTENSION is set")
    from ._otlp import encode_batch, encode_span, encode_spans  # type: ignore[import-not-found]
    from ._otlp import end_span as c_end_span  # type: ignore[import-not-found]

    #: Which implementation :func:`encode_spans` is: ``"c"`` (the extension) or ``"python"``.
    IMPLEMENTATION = "c"
except ImportError:
    encode_batch, encode_span, encode_spans = py_encode_batch, py_encode_span, py_encode_spans
    c_end_span = None
    IMPLEMENTATION = "python"
