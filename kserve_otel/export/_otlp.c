/* kserve_otel.export._otlp: SDK spans to OTLP protobuf bytes in C (optional;
 * kserve_otel/export/otlp_encoding.py has the same function in pure Python and is used whenever this
 * extension is not built).
 *
 * Why C: a KServe server tracing every request (always_on sampler, OTLP/HTTP export) lost a third of its
 * throughput, and py-spy put about 15 % of all samples in the BatchSpanProcessor's thread, in the SDK's
 * encode_spans (about 17 us a span measured alone: one protobuf message object per span, attribute, value and
 * status, then their serialisation), holding the GIL the event loop needs. This writes the wire format straight
 * from the spans' public properties into one buffer; benchmarks/otlp_encoding.py measures it at about a tenth
 * of the SDK's cost (most of what is left is the spans' own Python properties).
 *
 * What it writes is what the SDK's encoder builds (opentelemetry.exporter.otlp.proto.common 1.45), in field-
 * number order as protobuf serialises it, so the bytes are those of encode_spans(spans).SerializeToString():
 * kserve_otel/export/otlp_encoding.py's docstring lists the rules, tests/test_otlp_encoding.py checks both
 * versions.
 *
 * Nested messages are written in place: a field's tag, room for the length varint it will probably need, the
 * message, then the length, moving the message when its varint turned out shorter or longer than the room.
 *
 * Free-threaded builds: the function reads Python objects that other threads may change; under the GIL that is
 * safe, without one it is not. The extension refuses to build there, and the pure-Python version is used.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#ifdef Py_GIL_DISABLED
#error "kserve_otel.export._otlp relies on the GIL; the pure-Python otlp_encoding is used instead"
#endif

#define HAS_IS_REMOTE 0x100 /* SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK */
#define IS_REMOTE 0x200 /* SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK */

/* ------------------------------------------------------------------------------------------------- names */

static PyObject *s_name, *s_context, *s_trace_id, *s_span_id, *s_trace_state, *s_items, *s_parent, *s_is_remote,
    *s_kind, *s_start_time, *s_end_time, *s_attributes, *s_dropped_attributes, *s_events, *s_timestamp,
    *s_dropped_events, *s_links, *s_dropped_links, *s_status, *s_description, *s_status_code, *s_value,
    *s_resource, *s_instrumentation_scope, *s_version, *s_schema_url, *s_exception, *s_exc_info, *s_empty,
    *s_log_format, *s__attributes, *s__events, *s__links, *s__dict, *s__dq, *s_dropped;

/* Looked up at the first call: SpanKind's members (kind i is wire value i + 1), StatusCode's (value i), the
 * Sequence and Mapping ABCs, and the logger of kserve_otel.export.otlp_encoding. */
static PyObject *span_kinds[5], *status_codes[3], *abc_sequence, *abc_mapping, *logger;

/* The SDK classes whose private fields are read directly, past their properties (which copy: a
 * ReadableSpan's attributes are a MappingProxyType over a BoundedAttributes, iterated in Python, its events and
 * links a tuple made under a lock). Exact types only; NULL where the SDK has none of that name, and then every
 * span takes the property path. Reading the fields gives the same items in the same order. */
static PyTypeObject *readable_span_type, *bounded_attributes_type, *bounded_list_type, *span_context_type,
    *status_type, *trace_state_type;
static PyObject *s__context, *s__parent, *s__name, *s__kind, *s__start_time, *s__end_time, *s__status,
    *s__status_code, *s__description;

static PyTypeObject *
type_from(const char *module_name, const char *name)
{
    PyObject *module = PyImport_ImportModule(module_name);
    PyObject *found = module == NULL ? NULL : PyObject_GetAttrString(module, name);
    Py_XDECREF(module);
    if (found == NULL || !PyType_Check(found)) {
        PyErr_Clear();
        Py_XDECREF(found);
        return NULL;
    }
    return (PyTypeObject *)found; /* kept for the life of the process */
}

static int
lookup_constants(void)
{
    if (logger != NULL)
        return 0;
    static const char *kinds[5] = {"INTERNAL", "SERVER", "CLIENT", "PRODUCER", "CONSUMER"};
    static const char *codes[3] = {"UNSET", "OK", "ERROR"};
    PyObject *trace = NULL, *kind = NULL, *code = NULL, *abc = NULL, *logging = NULL;
    PyObject *kinds_found[5] = {0}, *codes_found[3] = {0}, *sequence = NULL, *mapping = NULL, *found = NULL;
    int ok = 0;
    if ((trace = PyImport_ImportModule("opentelemetry.trace")) == NULL ||
        (kind = PyObject_GetAttrString(trace, "SpanKind")) == NULL ||
        (code = PyObject_GetAttrString(trace, "StatusCode")) == NULL ||
        (abc = PyImport_ImportModule("collections.abc")) == NULL ||
        (sequence = PyObject_GetAttrString(abc, "Sequence")) == NULL ||
        (mapping = PyObject_GetAttrString(abc, "Mapping")) == NULL ||
        (logging = PyImport_ImportModule("logging")) == NULL ||
        (found = PyObject_CallMethod(logging, "getLogger", "s", "kserve_otel.export.otlp_encoding")) == NULL)
        goto done;
    for (int i = 0; i < 5; i++)
        if ((kinds_found[i] = PyObject_GetAttrString(kind, kinds[i])) == NULL)
            goto done;
    for (int i = 0; i < 3; i++)
        if ((codes_found[i] = PyObject_GetAttrString(code, codes[i])) == NULL)
            goto done;
    ok = 1;
done:
    Py_XDECREF(trace);
    Py_XDECREF(kind);
    Py_XDECREF(code);
    Py_XDECREF(abc);
    Py_XDECREF(logging);
    if (!ok) {
        for (int i = 0; i < 5; i++)
            Py_XDECREF(kinds_found[i]);
        for (int i = 0; i < 3; i++)
            Py_XDECREF(codes_found[i]);
        Py_XDECREF(sequence);
        Py_XDECREF(mapping);
        Py_XDECREF(found);
        return -1;
    }
    readable_span_type = type_from("opentelemetry.sdk.trace", "ReadableSpan");
    bounded_attributes_type = type_from("opentelemetry.attributes", "BoundedAttributes");
    bounded_list_type = type_from("opentelemetry.sdk.util", "BoundedList");
    span_context_type = type_from("opentelemetry.trace", "SpanContext");
    status_type = type_from("opentelemetry.trace.status", "Status");
    trace_state_type = type_from("opentelemetry.trace.span", "TraceState");
    memcpy(span_kinds, kinds_found, sizeof(span_kinds));
    memcpy(status_codes, codes_found, sizeof(status_codes));
    abc_sequence = sequence;
    abc_mapping = mapping;
    logger = found;
    return 0;
}

/* ------------------------------------------------------------------------------------------------ buffer */

typedef struct {
    unsigned char *data;
    Py_ssize_t len, cap;
} Buf;

static int
grow(Buf *b, Py_ssize_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    unsigned char *data = PyMem_Realloc(b->data, (size_t)cap);
    if (data == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->data = data;
    b->cap = cap;
    return 0;
}

static inline int
varint_size(uint64_t v)
{
    int n = 1;
    while (v >= 0x80) {
        v >>= 7;
        n++;
    }
    return n;
}

static inline unsigned char *
write_varint(unsigned char *at, uint64_t v)
{
    while (v >= 0x80) {
        *at++ = (unsigned char)(v | 0x80);
        v >>= 7;
    }
    *at++ = (unsigned char)v;
    return at;
}

static inline int
put_varint(Buf *b, uint64_t v)
{
    if (grow(b, 10) < 0)
        return -1;
    b->len = write_varint(b->data + b->len, v) - b->data;
    return 0;
}

/* A tag, for fields below 16 (one byte). */
static inline int
put_byte(Buf *b, unsigned char byte)
{
    if (grow(b, 1) < 0)
        return -1;
    b->data[b->len++] = byte;
    return 0;
}

static inline int
put_raw(Buf *b, const void *data, Py_ssize_t size)
{
    if (grow(b, size) < 0)
        return -1;
    if (size)
        memcpy(b->data + b->len, data, (size_t)size);
    b->len += size;
    return 0;
}

static inline int
put_fixed64(Buf *b, unsigned char tag, uint64_t v)
{
    if (grow(b, 9) < 0)
        return -1;
    unsigned char *at = b->data + b->len;
    *at++ = tag;
    for (int i = 0; i < 8; i++)
        *at++ = (unsigned char)(v >> (8 * i));
    b->len += 9;
    return 0;
}

static inline int
put_fixed32(Buf *b, const unsigned char *tag, int tag_size, uint32_t v)
{
    if (grow(b, tag_size + 4) < 0)
        return -1;
    unsigned char *at = b->data + b->len;
    memcpy(at, tag, (size_t)tag_size);
    at += tag_size;
    for (int i = 0; i < 4; i++)
        *at++ = (unsigned char)(v >> (8 * i));
    b->len += tag_size + 4;
    return 0;
}

/* Start a length-delimited field: its tag and `room` bytes for the length. Returns where the message starts
 * (for close_field), or -1 with an exception set. */
static inline Py_ssize_t
open_field(Buf *b, unsigned char tag, int room)
{
    if (grow(b, 1 + room) < 0)
        return -1;
    b->data[b->len] = tag;
    b->len += 1 + room;
    return b->len;
}

/* End the field opened at `start` with `room` bytes: write the length, moving the message if its varint needs
 * other than `room` bytes. */
static int
close_field(Buf *b, Py_ssize_t start, int room)
{
    Py_ssize_t size = b->len - start;
    int need = varint_size((uint64_t)size);
    if (need != room) {
        if (need > room && grow(b, need - room) < 0)
            return -1;
        memmove(b->data + start - room + need, b->data + start, (size_t)size);
        b->len += need - room;
    }
    write_varint(b->data + start - room, (uint64_t)size);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ values */

/* The UTF-8 of a string field's value: a str (lone surrogates raise), or bytes holding valid UTF-8, as protobuf
 * accepts. The pointer lives as long as `obj`. */
static int
utf8_of(PyObject *obj, const char **data, Py_ssize_t *size)
{
    if (PyUnicode_Check(obj)) {
        *data = PyUnicode_AsUTF8AndSize(obj, size);
        return *data == NULL ? -1 : 0;
    }
    if (PyBytes_Check(obj)) {
        PyObject *check = PyUnicode_DecodeUTF8(PyBytes_AS_STRING(obj), PyBytes_GET_SIZE(obj), "strict");
        if (check == NULL)
            return -1;
        Py_DECREF(check);
        *data = PyBytes_AS_STRING(obj);
        *size = PyBytes_GET_SIZE(obj);
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "expected str, not %.200s", Py_TYPE(obj)->tp_name);
    return -1;
}

/* An optional string field: nothing for NULL, None or "" (the proto3 default). */
static int
put_string(Buf *b, unsigned char tag, PyObject *obj)
{
    if (obj == NULL || obj == Py_None)
        return 0;
    const char *data;
    Py_ssize_t size;
    if (utf8_of(obj, &data, &size) < 0)
        return -1;
    if (size == 0)
        return 0;
    if (grow(b, 11 + size) < 0)
        return -1;
    unsigned char *at = b->data + b->len;
    *at++ = tag;
    at = write_varint(at, (uint64_t)size);
    memcpy(at, data, (size_t)size);
    b->len = at + size - b->data;
    return 0;
}

/* obj.<field> from the instance dict of an object of an exact SDK type (no lookup through its type): a new
 * reference, or NULL with an exception, or NULL without one when the dict has no such key. */
static PyObject *
own_field(PyObject *obj, PyObject *field)
{
    PyObject *dict = PyObject_GenericGetDict(obj, NULL);
    if (dict == NULL)
        return NULL;
    PyObject *value = PyDict_GetItemWithError(dict, field);
    Py_XINCREF(value);
    Py_DECREF(dict);
    return value;
}

/* Subclasses of ReadableSpan that override none of the properties put_span reads (the SDK's Span and _Span,
 * kserve_otel's template spans) are read as a ReadableSpan is, through the private fields the properties return
 * or copy; a field of such a span may be an instance attribute or (a template span's) a class attribute, so it
 * is read by getattr of its private name. Decided once per type: 2 for ReadableSpan itself, 1 for such a
 * subclass, 0 for any other type (read through its properties). */
static PyObject *span_layouts; /* dict: type -> 0 or 1, at most MAX_SPAN_LAYOUTS entries */
#define MAX_SPAN_LAYOUTS 4096

static int
span_layout(PyTypeObject *type)
{
    static PyTypeObject *last_type; /* strong: its address is not reused while it is kept here */
    static int last_layout;
    if (readable_span_type == NULL)
        return 0;
    if (type == readable_span_type)
        return 2;
    if (type == last_type)
        return last_layout;
    if (!PyType_IsSubtype(type, readable_span_type))
        return 0;
    if (span_layouts == NULL && (span_layouts = PyDict_New()) == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *known = PyDict_GetItemWithError(span_layouts, (PyObject *)type);
    if (known != NULL) {
        Py_INCREF(type);
        Py_XSETREF(last_type, type);
        return last_layout = known == Py_True;
    }
    PyErr_Clear();
    PyObject *names[] = {s_context, s_parent, s_name, s_kind, s_start_time, s_end_time, s_status, s_attributes,
                         s_events, s_links, s_dropped_attributes, s_dropped_events, s_dropped_links};
    int plain = 1;
    for (size_t i = 0; plain && i < sizeof(names) / sizeof(names[0]); i++) {
        /* A property read from a class is the property object itself. */
        PyObject *ours = PyObject_GetAttr((PyObject *)type, names[i]);
        PyObject *sdk = PyObject_GetAttr((PyObject *)readable_span_type, names[i]);
        plain = ours != NULL && ours == sdk;
        Py_XDECREF(ours);
        Py_XDECREF(sdk);
    }
    PyErr_Clear();
    if (PyDict_GET_SIZE(span_layouts) < MAX_SPAN_LAYOUTS &&
        PyDict_SetItem(span_layouts, (PyObject *)type, plain ? Py_True : Py_False) < 0)
        PyErr_Clear();
    return plain;
}

/* A span's private field ``field`` for a span of layout 2 (from its instance dict: a new reference, or NULL
 * with an exception, or NULL without one when it has none) or 1 (getattr). */
static PyObject *
private_field(PyObject *span, int layout, PyObject *field)
{
    return layout == 2 ? own_field(span, field) : PyObject_GetAttr(span, field);
}

/* ReadableSpan.dropped_attributes / dropped_events / dropped_links from the fields: the container's ``dropped``
 * where it is a BoundedAttributes (a BoundedList), else 0. */
static PyObject *
dropped_of(PyObject *span, int layout, PyObject *field, PyTypeObject *container_type)
{
    PyObject *container = private_field(span, layout, field);
    if (container == NULL)
        return PyErr_Occurred() ? NULL : PyLong_FromLong(0);
    PyObject *dropped = container_type != NULL && PyObject_TypeCheck(container, container_type)
                            ? PyObject_GetAttr(container, s_dropped) : PyLong_FromLong(0);
    Py_DECREF(container);
    return dropped;
}

/* getattr(obj, name), past the property where the SDK's property only returns a field: a ReadableSpan's
 * context, parent, name, kind, start_time, end_time, status and dropped counts (``self._<name>``, see
 * span_layout), a SpanContext's trace_id, span_id, is_remote and trace_state (``self[i]``: it is a tuple). */
static PyObject *
get_field(PyObject *obj, PyObject *name)
{
    PyTypeObject *type = Py_TYPE(obj);
    int layout;
    if (type == span_context_type && span_context_type != NULL && PyTuple_GET_SIZE(obj) == 6) {
        int index = name == s_trace_id ? 0 : name == s_span_id ? 1 : name == s_is_remote ? 2 :
                    name == s_trace_state ? 4 : -1;
        if (index >= 0) {
            PyObject *value = PyTuple_GET_ITEM(obj, index);
            Py_INCREF(value);
            return value;
        }
    } else if (type == status_type && status_type != NULL) { /* a Status: its two fields, past the properties */
        PyObject *field = name == s_status_code ? s__status_code : name == s_description ? s__description : NULL;
        if (field != NULL) {
            PyObject *value = own_field(obj, field);
            if (value != NULL || PyErr_Occurred())
                return value;
        }
    } else if ((layout = span_layout(type)) != 0) {
        PyObject *field = name == s_context ? s__context : name == s_parent ? s__parent : name == s_name ? s__name :
                          name == s_kind ? s__kind : name == s_start_time ? s__start_time :
                          name == s_end_time ? s__end_time : name == s_status ? s__status : NULL;
        if (field != NULL) {
            PyObject *value = private_field(obj, layout, field);
            if (value != NULL || PyErr_Occurred())
                return value;
        } else if (name == s_dropped_attributes) {
            return dropped_of(obj, layout, s__attributes, bounded_attributes_type);
        } else if (name == s_dropped_events) {
            return dropped_of(obj, layout, s__events, bounded_list_type);
        } else if (name == s_dropped_links) {
            return dropped_of(obj, layout, s__links, bounded_list_type);
        }
    }
    return PyObject_GetAttr(obj, name);
}

/* An unsigned integer field's value: an int (or anything with __index__) of at most `max`. */
static int
unsigned_of(PyObject *obj, uint64_t max, uint64_t *out)
{
    PyObject *number = PyNumber_Index(obj);
    if (number == NULL)
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLong(number);
    if ((v == (unsigned long long)-1 && PyErr_Occurred()) || v > max) {
        if (PyErr_Occurred()) {
            if (!PyErr_ExceptionMatches(PyExc_OverflowError)) {
                Py_DECREF(number);
                return -1;
            }
            PyErr_Clear();
        }
        PyErr_Format(PyExc_ValueError, "Value out of range: %S", number);
        Py_DECREF(number);
        return -1;
    }
    Py_DECREF(number);
    *out = v;
    return 0;
}

/* getattr(obj, name) as an optional unsigned field: nothing for None or 0. */
static int
put_unsigned_attr(Buf *b, PyObject *obj, PyObject *name, unsigned char tag, int fixed64)
{
    PyObject *value = get_field(obj, name);
    if (value == NULL)
        return -1;
    int rc = 0;
    uint64_t v;
    if (value != Py_None) {
        if (unsigned_of(value, fixed64 ? UINT64_MAX : UINT32_MAX, &v) < 0)
            rc = -1;
        else if (v != 0)
            rc = fixed64 ? put_fixed64(b, tag, v) : (put_byte(b, tag) < 0 ? -1 : put_varint(b, v));
    }
    Py_DECREF(value);
    return rc;
}

/* getattr(obj, name) as an optional string field. */
static int
put_string_attr(Buf *b, PyObject *obj, PyObject *name, unsigned char tag)
{
    PyObject *value = get_field(obj, name);
    if (value == NULL)
        return -1;
    int rc = put_string(b, tag, value);
    Py_DECREF(value);
    return rc;
}

/* An int as `size` big-endian unsigned bytes (int.to_bytes(size, "big")): OverflowError if it does not fit. */
static int
put_id(Buf *b, PyObject *value, unsigned char tag, int size)
{
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "an id must be an int, not %.200s", Py_TYPE(value)->tp_name);
        return -1;
    }
    if (grow(b, 2 + size) < 0)
        return -1;
    unsigned char *at = b->data + b->len;
    at[0] = tag;
    at[1] = (unsigned char)size;
#if PY_VERSION_HEX >= 0x030D0000
    Py_ssize_t need = PyLong_AsNativeBytes(value, at + 2, size, Py_ASNATIVEBYTES_BIG_ENDIAN |
                                           Py_ASNATIVEBYTES_UNSIGNED_BUFFER | Py_ASNATIVEBYTES_REJECT_NEGATIVE);
    if (need < 0)
        return -1;
    if (need > size) {
        PyErr_SetString(PyExc_OverflowError, "int too big to convert");
        return -1;
    }
#else
    if (_PyLong_AsByteArray((PyLongObject *)value, at + 2, (size_t)size, 0, 0) < 0)
        return -1;
#endif
    b->len += 2 + size;
    return 0;
}

/* getattr(obj, name) as an id field (trace or span id). */
static int
put_id_attr(Buf *b, PyObject *obj, PyObject *name, unsigned char tag, int size)
{
    PyObject *value = get_field(obj, name);
    if (value == NULL)
        return -1;
    int rc = put_id(b, value, tag, size);
    Py_DECREF(value);
    return rc;
}

static int put_key_value(Buf *b, PyObject *key, PyObject *value);

/* The fields of an AnyValue holding `value`: the SDK's _encode_value, in its order of checks. A oneof member is
 * written even when it is its type's default. */
static int
put_any_value(Buf *b, PyObject *value)
{
    if (value == Py_None)
        return 0;
    if (PyBool_Check(value)) {
        if (grow(b, 2) < 0)
            return -1;
        b->data[b->len++] = 0x10;
        b->data[b->len++] = value == Py_True;
        return 0;
    }
    if (PyUnicode_Check(value)) {
        Py_ssize_t size;
        const char *data = PyUnicode_AsUTF8AndSize(value, &size);
        if (data == NULL || put_byte(b, 0x0a) < 0 || put_varint(b, (uint64_t)size) < 0)
            return -1;
        return put_raw(b, data, size);
    }
    if (PyLong_Check(value)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(value, &overflow);
        if (v == -1 && PyErr_Occurred())
            return -1;
        if (overflow) {
            PyErr_Format(PyExc_ValueError, "Value out of range: %S", value);
            return -1;
        }
        if (put_byte(b, 0x18) < 0)
            return -1;
        return put_varint(b, (uint64_t)v);
    }
    if (PyFloat_Check(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        uint64_t bits;
        memcpy(&bits, &d, sizeof bits);
        return put_fixed64(b, 0x21, bits);
    }
    if (PyBytes_Check(value)) {
        if (put_byte(b, 0x3a) < 0 || put_varint(b, (uint64_t)PyBytes_GET_SIZE(value)) < 0)
            return -1;
        return put_raw(b, PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
    }
    int is_sequence = PyList_CheckExact(value) || PyTuple_CheckExact(value);
    if (!is_sequence && !PyDict_CheckExact(value) && (is_sequence = PyObject_IsInstance(value, abc_sequence)) < 0)
        return -1;
    int is_mapping = 0;
    if (!is_sequence && !(is_mapping = PyDict_CheckExact(value)) &&
        (is_mapping = PyObject_IsInstance(value, abc_mapping)) < 0)
        return -1;
    if (!is_sequence && !is_mapping) {
        PyErr_Format(PyExc_TypeError, "Invalid type %R of value %S", (PyObject *)Py_TYPE(value), value);
        return -1;
    }
    if (Py_EnterRecursiveCall(" while encoding an OTLP attribute value"))
        return -1;
    int rc = -1;
    PyObject *iterator = NULL, *item = NULL;
    Py_ssize_t start = open_field(b, is_sequence ? 0x2a : 0x32, 1);
    if (start < 0)
        goto done;
    if (is_sequence) {
        if ((iterator = PyObject_GetIter(value)) == NULL)
            goto done;
        while ((item = PyIter_Next(iterator)) != NULL) {
            Py_ssize_t at = open_field(b, 0x0a, 1);
            if (at < 0 || put_any_value(b, item) < 0 || close_field(b, at, 1) < 0)
                goto done;
            Py_CLEAR(item);
        }
    } else {
        PyObject *items = PyObject_CallMethodNoArgs(value, s_items);
        if (items == NULL)
            goto done;
        iterator = PyObject_GetIter(items);
        Py_DECREF(items);
        if (iterator == NULL)
            goto done;
        while ((item = PyIter_Next(iterator)) != NULL) {
            PyObject *k, *v;
            if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
                PyErr_SetString(PyExc_ValueError, "items() must give (key, value) pairs");
                goto done;
            }
            k = PyObject_Str(PyTuple_GET_ITEM(item, 0));
            v = PyTuple_GET_ITEM(item, 1);
            if (k == NULL)
                goto done;
            Py_ssize_t at = open_field(b, 0x0a, 1);
            int failed = at < 0 || put_key_value(b, k, v) < 0 || close_field(b, at, 1) < 0;
            Py_DECREF(k);
            if (failed)
                goto done;
            Py_CLEAR(item);
        }
    }
    if (PyErr_Occurred())
        goto done;
    rc = close_field(b, start, 1);
done:
    Py_XDECREF(item);
    Py_XDECREF(iterator);
    Py_LeaveRecursiveCall();
    return rc;
}

/* The fields of a KeyValue. */
static int
put_key_value(Buf *b, PyObject *key, PyObject *value)
{
    if (put_string(b, 0x0a, key) < 0)
        return -1;
    Py_ssize_t at = open_field(b, 0x12, 1);
    if (at < 0 || put_any_value(b, value) < 0)
        return -1;
    return close_field(b, at, 1);
}

/* The SDK's `_logger.exception("Failed to encode key %s: %s", key, error)`, for the error that is set. */
static int
log_skipped(PyObject *key)
{
    PyObject *type, *error, *traceback;
    PyErr_Fetch(&type, &error, &traceback);
    PyErr_NormalizeException(&type, &error, &traceback);
    if (error == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(traceback);
        return 0;
    }
    if (traceback != NULL)
        PyException_SetTraceback(error, traceback);
    PyObject *args = PyTuple_Pack(3, s_log_format, key, error);
    PyObject *kwargs = args ? PyDict_New() : NULL;
    PyObject *method = kwargs ? PyObject_GetAttr(logger, s_exception) : NULL;
    PyObject *result = NULL;
    if (method != NULL && PyDict_SetItem(kwargs, s_exc_info, error) == 0)
        result = PyObject_Call(method, args, kwargs);
    Py_XDECREF(method);
    Py_XDECREF(kwargs);
    Py_XDECREF(args);
    Py_XDECREF(type);
    Py_XDECREF(error);
    Py_XDECREF(traceback);
    if (result == NULL)
        return -1;
    Py_DECREF(result);
    return 0;
}

/* One attribute as a KeyValue field (`tag`); one that cannot be encoded is logged and left out, as the SDK's
 * _encode_attributes does (any Exception). */
static int
put_attribute(Buf *b, unsigned char tag, PyObject *key, PyObject *value)
{
    Py_ssize_t before = b->len;
    Py_ssize_t at = open_field(b, tag, 1);
    if (at >= 0 && put_key_value(b, key, value) == 0 && close_field(b, at, 1) == 0)
        return 0;
    b->len = before;
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1;
    return log_skipped(key);
}

/* One KeyValue field (`tag`) per attribute of the mapping `attributes` (None: none). The SDK tests `not
 * attributes` first; no mapping without items is true, so that (a Python __len__ call for the spans'
 * MappingProxyType) is left out. */
static int
put_attributes(Buf *b, unsigned char tag, PyObject *attributes)
{
    if (attributes == Py_None)
        return 0;
    int rc = 0;
    if (bounded_attributes_type != NULL && Py_TYPE(attributes) == bounded_attributes_type) {
        PyObject *inner = PyObject_GetAttr(attributes, s__dict);
        if (inner == NULL)
            return -1;
        if (PyDict_CheckExact(inner))
            rc = put_attributes(b, tag, inner); /* what its Mapping methods read, key by key */
        else
            rc = 1;
        Py_DECREF(inner);
        if (rc <= 0)
            return rc;
        rc = 0;
    }
    if (PyDict_CheckExact(attributes)) {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (rc == 0 && PyDict_Next(attributes, &pos, &key, &value)) {
            Py_INCREF(key);
            Py_INCREF(value);
            rc = put_attribute(b, tag, key, value);
            Py_DECREF(key);
            Py_DECREF(value);
        }
        return rc;
    }
    PyObject *items = PyObject_CallMethodNoArgs(attributes, s_items);
    if (items == NULL)
        return -1;
    PyObject *iterator = PyObject_GetIter(items);
    Py_DECREF(items);
    if (iterator == NULL)
        return -1;
    PyObject *item;
    while (rc == 0 && (item = PyIter_Next(iterator)) != NULL) {
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_ValueError, "attributes.items() must give (key, value) pairs");
            rc = -1;
        } else
            rc = put_attribute(b, tag, PyTuple_GET_ITEM(item, 0), PyTuple_GET_ITEM(item, 1));
        Py_DECREF(item);
    }
    Py_DECREF(iterator);
    if (rc == 0 && PyErr_Occurred())
        rc = -1;
    return rc;
}

static int
put_attributes_attr(Buf *b, PyObject *obj, unsigned char tag)
{
    PyObject *attributes = PyObject_GetAttr(obj, s_attributes);
    if (attributes == NULL)
        return -1;
    int rc = put_attributes(b, tag, attributes);
    Py_DECREF(attributes);
    return rc;
}

/* The flags of a span (its parent's context) or link (its context): the SDK's _span_flags. -1 on error. */
static int64_t
flags_of(PyObject *context)
{
    int truth = PyObject_IsTrue(context);
    if (truth <= 0)
        return truth < 0 ? -1 : HAS_IS_REMOTE;
    PyObject *remote = get_field(context, s_is_remote);
    if (remote == NULL)
        return -1;
    truth = PyObject_IsTrue(remote);
    Py_DECREF(remote);
    return truth < 0 ? -1 : (truth ? HAS_IS_REMOTE | IS_REMOTE : HAS_IS_REMOTE);
}

/* ------------------------------------------------------------------------------------------------- spans */

/* trace_state as ",".join(f"{k}={v}" for k, v in trace_state.items()): field 3, nothing when empty. */
static int
put_trace_state(Buf *b, PyObject *trace_state)
{
    if (trace_state == Py_None)
        return 0;
    if (trace_state_type != NULL && Py_TYPE(trace_state) == trace_state_type) { /* the commonest: empty */
        PyObject *entries = own_field(trace_state, s__dict);
        if (entries == NULL && PyErr_Occurred())
            return -1;
        int empty = entries != NULL && PyDict_Check(entries) && PyDict_GET_SIZE(entries) == 0;
        Py_XDECREF(entries);
        if (empty)
            return 0;
    }
    PyObject *items = PyObject_CallMethodNoArgs(trace_state, s_items);
    if (items == NULL)
        return -1;
    PyObject *iterator = PyObject_GetIter(items);
    Py_DECREF(items);
    if (iterator == NULL)
        return -1;
    Py_ssize_t before = b->len;
    Py_ssize_t start = open_field(b, 0x1a, 1);
    PyObject *item = NULL;
    int rc = start < 0 ? -1 : 0;
    while (rc == 0 && (item = PyIter_Next(iterator)) != NULL) {
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_ValueError, "trace_state.items() must give (key, value) pairs");
            rc = -1;
        }
        for (int i = 0; rc == 0 && i < 2; i++) {
            PyObject *text = PyObject_Format(PyTuple_GET_ITEM(item, i), s_empty);
            const char *data;
            Py_ssize_t size;
            if (text == NULL || utf8_of(text, &data, &size) < 0 ||
                (b->len > start && i == 0 && put_byte(b, ',') < 0) || put_raw(b, data, size) < 0 ||
                (i == 0 && put_byte(b, '=') < 0))
                rc = -1;
            Py_XDECREF(text);
        }
        Py_CLEAR(item);
    }
    Py_DECREF(iterator);
    if (rc == 0 && PyErr_Occurred())
        rc = -1;
    if (rc < 0)
        return -1;
    if (b->len == start) {
        b->len = before;
        return 0;
    }
    return close_field(b, start, 1);
}

static int
span_kind_value(PyObject *kind)
{
    for (int i = 0; i < 5; i++)
        if (kind == span_kinds[i])
            return i + 1;
    PyErr_SetObject(PyExc_KeyError, kind);
    return -1;
}

/* Status: message (field 2), code (field 3, status_code.value). */
static int
put_status(Buf *b, PyObject *status)
{
    Py_ssize_t start = open_field(b, 0x7a, 1);
    if (start < 0 || put_string_attr(b, status, s_description, 0x12) < 0)
        return -1;
    PyObject *code = get_field(status, s_status_code);
    if (code == NULL)
        return -1;
    long value = -1;
    for (int i = 0; i < 3; i++)
        if (code == status_codes[i])
            value = i;
    if (value < 0) {
        PyObject *number = PyObject_GetAttr(code, s_value);
        PyObject *index = number ? PyNumber_Index(number) : NULL;
        Py_XDECREF(number);
        if (index == NULL) {
            Py_DECREF(code);
            return -1;
        }
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
        if (overflow || v < INT32_MIN || v > INT32_MAX) {
            PyErr_Format(PyExc_ValueError, "Value out of range: %S", index);
            Py_DECREF(index);
            Py_DECREF(code);
            return -1;
        }
        Py_DECREF(index);
        value = (long)v;
    }
    Py_DECREF(code);
    if (value != 0 && (put_byte(b, 0x18) < 0 || put_varint(b, (uint64_t)(int64_t)value) < 0))
        return -1;
    return close_field(b, start, 1);
}

static int
put_events(Buf *b, PyObject *events)
{
    int truth = PyObject_IsTrue(events);
    if (truth <= 0)
        return truth;
    PyObject *fast = PySequence_Fast(events, "span.events must be iterable");
    if (fast == NULL)
        return -1;
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PySequence_Fast_GET_SIZE(fast); i++) {
        PyObject *event = PySequence_Fast_GET_ITEM(fast, i);
        Py_ssize_t at = open_field(b, 0x5a, 1);
        if (at < 0 || put_unsigned_attr(b, event, s_timestamp, 0x09, 1) < 0 ||
            put_string_attr(b, event, s_name, 0x12) < 0 || put_attributes_attr(b, event, 0x1a) < 0 ||
            put_unsigned_attr(b, event, s_dropped_attributes, 0x20, 0) < 0 || close_field(b, at, 1) < 0)
            rc = -1;
    }
    Py_DECREF(fast);
    return rc;
}

static int
put_links(Buf *b, PyObject *links)
{
    static const unsigned char flags_tag[1] = {0x35};
    int truth = PyObject_IsTrue(links);
    if (truth <= 0)
        return truth;
    PyObject *fast = PySequence_Fast(links, "span.links must be iterable");
    if (fast == NULL)
        return -1;
    int rc = 0;
    for (Py_ssize_t i = 0; rc == 0 && i < PySequence_Fast_GET_SIZE(fast); i++) {
        PyObject *link = PySequence_Fast_GET_ITEM(fast, i);
        PyObject *context = PyObject_GetAttr(link, s_context);
        if (context == NULL) {
            rc = -1;
            break;
        }
        int64_t flags;
        Py_ssize_t at = open_field(b, 0x6a, 1);
        if (at < 0 || put_id_attr(b, context, s_trace_id, 0x0a, 16) < 0 ||
            put_id_attr(b, context, s_span_id, 0x12, 8) < 0 || put_attributes_attr(b, link, 0x22) < 0 ||
            put_unsigned_attr(b, link, s_dropped_attributes, 0x28, 0) < 0 || (flags = flags_of(context)) < 0 ||
            put_fixed32(b, flags_tag, 1, (uint32_t)flags) < 0 || close_field(b, at, 1) < 0)
            rc = -1;
        Py_DECREF(context);
    }
    Py_DECREF(fast);
    return rc;
}

/* A ReadableSpan's field ``name`` (``_attributes``, ``_events``, ``_links``) where its property would copy it:
 * a new reference to what to encode, or NULL with an exception. For any other span type, the property. */
static PyObject *
span_field(PyObject *span, PyObject *field, PyObject *property)
{
    int layout = span_layout(Py_TYPE(span));
    if (layout == 0)
        return PyObject_GetAttr(span, property);
    PyObject *value = private_field(span, layout, field);
    if (value == NULL && (PyErr_Occurred() || (value = PyObject_GetAttr(span, field)) == NULL))
        return NULL;
    if (field == s__attributes) {
        if (value == Py_None) { /* the property: MappingProxyType(self._attributes or {}) */
            Py_DECREF(value);
            return PyDict_New();
        }
        return value; /* a BoundedAttributes (read through its dict by put_attributes) or a mapping */
    }
    if (bounded_list_type != NULL && Py_TYPE(value) == bounded_list_type) { /* tuple(self._events) */
        PyObject *items = PyObject_GetAttr(value, s__dq);
        Py_DECREF(value);
        return items;
    }
    return value;
}

/* The fields of one Span message, in field-number order (flags, field 16, last). */
static int
put_span(Buf *b, PyObject *span)
{
    static const unsigned char flags_tag[2] = {0x85, 0x01};
    PyObject *context = NULL, *value = NULL, *parent = NULL;
    int rc = -1;
    int64_t flags;
    if ((context = get_field(span, s_context)) == NULL ||
        put_id_attr(b, context, s_trace_id, 0x0a, 16) < 0 || put_id_attr(b, context, s_span_id, 0x12, 8) < 0 ||
        (value = get_field(context, s_trace_state)) == NULL || put_trace_state(b, value) < 0)
        goto done;
    Py_CLEAR(value);
    if ((parent = get_field(span, s_parent)) == NULL)
        goto done;
    int has_parent = PyObject_IsTrue(parent);
    if (has_parent < 0 || (has_parent && put_id_attr(b, parent, s_span_id, 0x22, 8) < 0) ||
        put_string_attr(b, span, s_name, 0x2a) < 0 || (value = get_field(span, s_kind)) == NULL)
        goto done;
    int kind = span_kind_value(value);
    Py_CLEAR(value);
    if (kind < 0 || put_byte(b, 0x30) < 0 || put_byte(b, (unsigned char)kind) < 0 ||
        put_unsigned_attr(b, span, s_start_time, 0x39, 1) < 0 || put_unsigned_attr(b, span, s_end_time, 0x41, 1) < 0 ||
        (value = span_field(span, s__attributes, s_attributes)) == NULL || put_attributes(b, 0x4a, value) < 0)
        goto done;
    Py_CLEAR(value);
    if (put_unsigned_attr(b, span, s_dropped_attributes, 0x50, 0) < 0 ||
        (value = span_field(span, s__events, s_events)) == NULL || put_events(b, value) < 0)
        goto done;
    Py_CLEAR(value);
    if (put_unsigned_attr(b, span, s_dropped_events, 0x60, 0) < 0 ||
        (value = span_field(span, s__links, s_links)) == NULL || put_links(b, value) < 0)
        goto done;
    Py_CLEAR(value);
    if (put_unsigned_attr(b, span, s_dropped_links, 0x70, 0) < 0 || (value = get_field(span, s_status)) == NULL ||
        (value != Py_None && put_status(b, value) < 0) || (flags = flags_of(parent)) < 0 ||
        put_fixed32(b, flags_tag, 2, (uint32_t)flags) < 0)
        goto done;
    rc = 0;
done:
    Py_XDECREF(context);
    Py_XDECREF(value);
    Py_XDECREF(parent);
    return rc;
}

/* ---------------------------------------------------------------------------------------------- grouping */

/* Spans grouped as the SDK's dictionaries group them: by resource, then by scope (instrumentation_scope or
 * None), each group in the order of its first span. Groups are chained lists of indices: resources' scopes
 * through scope_next, scopes' spans through span_next. */
typedef struct {
    PyObject *resource; /* strong */
    PyObject *scopes;   /* dict: scope -> index in the scope table, strong */
    Py_ssize_t first, last;
} ResourceGroup;

typedef struct {
    PyObject *scope; /* strong; Py_None for no scope */
    Py_ssize_t first, last, next;
} ScopeGroup;

typedef struct {
    ResourceGroup *resources;
    ScopeGroup *scopes;
    Py_ssize_t *span_next;
    Py_ssize_t nresources, nscopes;
} Groups;

static void
groups_free(Groups *g)
{
    for (Py_ssize_t i = 0; i < g->nresources; i++) {
        Py_XDECREF(g->resources[i].resource);
        Py_XDECREF(g->resources[i].scopes);
    }
    for (Py_ssize_t i = 0; i < g->nscopes; i++)
        Py_XDECREF(g->scopes[i].scope);
    PyMem_Free(g->resources);
    PyMem_Free(g->scopes);
    PyMem_Free(g->span_next);
}

/* The index of `key` in `dict` (key -> int), adding it as `next` if new: returns the index, or -1 on error;
 * *added says whether it was new. */
static Py_ssize_t
index_of(PyObject *dict, PyObject *key, Py_ssize_t next, int *added)
{
    PyObject *found = PyDict_GetItemWithError(dict, key);
    if (found != NULL) {
        *added = 0;
        return PyLong_AsSsize_t(found);
    }
    if (PyErr_Occurred())
        return -1;
    PyObject *index = PyLong_FromSsize_t(next);
    if (index == NULL || PyDict_SetItem(dict, key, index) < 0) {
        Py_XDECREF(index);
        return -1;
    }
    Py_DECREF(index);
    *added = 1;
    return next;
}

/* The resource and scope (None where falsy) of a span, or of an EncodedSpan (resource, scope, data) when
 * `encoded`: new references. */
static int
resource_and_scope(PyObject *item, int encoded, PyObject **resource, PyObject **scope)
{
    if (encoded) {
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 3 || !PyBytes_Check(PyTuple_GET_ITEM(item, 2))) {
            PyErr_SetString(PyExc_TypeError, "encode_batch: items must be EncodedSpan(resource, scope, bytes)");
            return -1;
        }
        *resource = Py_NewRef(PyTuple_GET_ITEM(item, 0));
        *scope = Py_NewRef(PyTuple_GET_ITEM(item, 1));
    } else if ((*resource = PyObject_GetAttr(item, s_resource)) == NULL ||
               (*scope = PyObject_GetAttr(item, s_instrumentation_scope)) == NULL) {
        return -1;
    }
    int truth = PyObject_IsTrue(*scope);
    if (truth < 0)
        return -1;
    if (!truth)
        Py_SETREF(*scope, Py_NewRef(Py_None));
    return 0;
}

static int
group_spans(PyObject *fast, Groups *g, int encoded)
{
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    size_t count = n > 0 ? (size_t)n : 1;
    g->resources = PyMem_Calloc(count, sizeof(ResourceGroup));
    g->scopes = PyMem_Calloc(count, sizeof(ScopeGroup));
    g->span_next = PyMem_Calloc(count, sizeof(Py_ssize_t));
    if (g->resources == NULL || g->scopes == NULL || g->span_next == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    PyObject *by_resource = PyDict_New();
    if (by_resource == NULL)
        return -1;
    /* Identity first: a batch's spans mostly share their resource and scope objects, and a Resource's hash
     * serialises its attributes to JSON. A dict finds a key that is the same object before comparing, so the
     * groups are the same. The last objects are held, so that their identity stays meaningful. */
    PyObject *last_resource = NULL, *last_scope = NULL, *resource = NULL, *scope = NULL;
    Py_ssize_t r = -1, s = -1;
    int rc = -1, added;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (resource_and_scope(PySequence_Fast_GET_ITEM(fast, i), encoded, &resource, &scope) < 0)
            goto done;
        if (resource != last_resource) {
            if ((r = index_of(by_resource, resource, g->nresources, &added)) < 0)
                goto done;
            if (added) {
                ResourceGroup *group = &g->resources[g->nresources++];
                group->resource = Py_NewRef(resource);
                group->first = group->last = -1;
                if ((group->scopes = PyDict_New()) == NULL)
                    goto done;
            }
            Py_XSETREF(last_resource, Py_NewRef(resource));
            Py_CLEAR(last_scope);
        }
        if (scope != last_scope) {
            ResourceGroup *group = &g->resources[r];
            if ((s = index_of(group->scopes, scope, g->nscopes, &added)) < 0)
                goto done;
            if (added) {
                ScopeGroup *sg = &g->scopes[g->nscopes++];
                sg->scope = Py_NewRef(scope);
                sg->first = sg->last = sg->next = -1;
                if (group->last < 0)
                    group->first = s;
                else
                    g->scopes[group->last].next = s;
                group->last = s;
            }
            Py_XSETREF(last_scope, Py_NewRef(scope));
        }
        ScopeGroup *sg = &g->scopes[s];
        g->span_next[i] = -1;
        if (sg->last < 0)
            sg->first = i;
        else
            g->span_next[sg->last] = i;
        sg->last = i;
        Py_CLEAR(resource);
        Py_CLEAR(scope);
    }
    rc = 0;
done:
    Py_XDECREF(resource);
    Py_XDECREF(scope);
    Py_XDECREF(last_resource);
    Py_XDECREF(last_scope);
    Py_DECREF(by_resource);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ module */

static int
encode_into(Buf *b, PyObject *fast, Groups *g, int encoded)
{
    for (Py_ssize_t r = 0; r < g->nresources; r++) {
        PyObject *resource = g->resources[r].resource;
        Py_ssize_t rs = open_field(b, 0x0a, 3), at;
        if (rs < 0 || (at = open_field(b, 0x0a, 2)) < 0 || put_attributes_attr(b, resource, 0x0a) < 0 ||
            close_field(b, at, 2) < 0)
            return -1;
        for (Py_ssize_t s = g->resources[r].first; s >= 0; s = g->scopes[s].next) {
            PyObject *scope = g->scopes[s].scope;
            Py_ssize_t ss = open_field(b, 0x12, 3);
            if (ss < 0 || (at = open_field(b, 0x0a, 1)) < 0)
                return -1;
            if (scope != Py_None && (put_string_attr(b, scope, s_name, 0x0a) < 0 ||
                                     put_string_attr(b, scope, s_version, 0x12) < 0 ||
                                     put_attributes_attr(b, scope, 0x1a) < 0))
                return -1;
            if (close_field(b, at, 1) < 0)
                return -1;
            for (Py_ssize_t i = g->scopes[s].first; i >= 0; i = g->span_next[i]) {
                PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
                if (encoded) { /* an EncodedSpan: its span's bytes, checked by resource_and_scope */
                    PyObject *data = PyTuple_GET_ITEM(item, 2);
                    Py_ssize_t size = PyBytes_GET_SIZE(data);
                    if (grow(b, 11 + size) < 0)
                        return -1;
                    unsigned char *to = b->data + b->len;
                    *to++ = 0x12;
                    to = write_varint(to, (uint64_t)size);
                    memcpy(to, PyBytes_AS_STRING(data), (size_t)size);
                    b->len = to + size - b->data;
                } else if ((at = open_field(b, 0x12, 2)) < 0 || put_span(b, item) < 0 || close_field(b, at, 2) < 0) {
                    return -1;
                }
            }
            if ((scope != Py_None && put_string_attr(b, scope, s_schema_url, 0x1a) < 0) || close_field(b, ss, 3) < 0)
                return -1;
        }
        if (put_string_attr(b, resource, s_schema_url, 0x1a) < 0 || close_field(b, rs, 3) < 0)
            return -1;
    }
    return 0;
}

/* The fields of one Span message of `span`, as bytes. */
static PyObject *
span_bytes(PyObject *span)
{
    Buf b = {0};
    PyObject *result = NULL;
    if (grow(&b, 320) == 0 && put_span(&b, span) == 0)
        result = PyBytes_FromStringAndSize((const char *)b.data, b.len);
    PyMem_Free(b.data);
    return result;
}

static PyObject *
encode_request(PyObject *spans, int encoded)
{
    if (lookup_constants() < 0)
        return NULL;
    PyObject *fast = PySequence_Fast(spans, "spans must be iterable");
    if (fast == NULL)
        return NULL;
    /* Hold the spans: Python code run while encoding (a property, a logging handler) may change the list. */
    if (PyList_Check(fast)) {
        Py_SETREF(fast, PyList_AsTuple(fast));
        if (fast == NULL)
            return NULL;
    }
    Groups groups = {0};
    Buf b = {0};
    PyObject *result = NULL;
    if (group_spans(fast, &groups, encoded) == 0 && grow(&b, 320 * PySequence_Fast_GET_SIZE(fast) + 64) == 0 &&
        encode_into(&b, fast, &groups, encoded) == 0)
        result = PyBytes_FromStringAndSize((const char *)b.data, b.len);
    groups_free(&groups);
    PyMem_Free(b.data);
    Py_DECREF(fast);
    return result;
}

static PyObject *
otlp_encode_spans(PyObject *Py_UNUSED(module), PyObject *spans)
{
    return encode_request(spans, 0);
}

static PyObject *
otlp_encode_batch(PyObject *Py_UNUSED(module), PyObject *items)
{
    return encode_request(items, 1);
}

static PyObject *
otlp_encode_span(PyObject *Py_UNUSED(module), PyObject *span)
{
    if (lookup_constants() < 0)
        return NULL;
    return span_bytes(span);
}

/* ------------------------------------------------------------------------------------------- span end */

static PyObject *s__lock, *s_acquire, *s_release, *s__immutable, *s__record_end_metrics, *s__resource,
    *s__instrumentation_scope;

/* time.time_ns(): the clock the SDK's Span.end reads. */
static PyObject *
now_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLongLong((long long)ts.tv_sec * 1000000000LL + ts.tv_nsec);
}

/* Under the span's lock: set _end_time (end_time, else now) unless already set, and make its attributes
 * immutable, as the SDK's Span.end does. 1: ended here, 0: it had ended already, -1: error. */
static int
mark_ended(PyObject *span, PyObject *end_time)
{
    PyObject *lock = PyObject_GetAttr(span, s__lock);
    if (lock == NULL)
        return -1;
    PyObject *r = PyObject_CallMethodNoArgs(lock, s_acquire);
    if (r == NULL) {
        Py_DECREF(lock);
        return -1;
    }
    Py_DECREF(r);
    int result = -1;
    PyObject *ended = PyObject_GetAttr(span, s__end_time);
    if (ended != NULL) {
        if (ended != Py_None) {
            result = 0;
        } else {
            PyObject *at = end_time != Py_None ? Py_NewRef(end_time) : now_ns();
            PyObject *attributes = NULL;
            if (at != NULL && PyObject_SetAttr(span, s__end_time, at) == 0 &&
                (attributes = PyObject_GetAttr(span, s__attributes)) != NULL &&
                PyObject_SetAttr(attributes, s__immutable, Py_True) == 0)
                result = 1;
            Py_XDECREF(at);
            Py_XDECREF(attributes);
        }
        Py_DECREF(ended);
    }
    /* Release even when something above failed, keeping that error. */
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    r = PyObject_CallMethodNoArgs(lock, s_release);
    Py_DECREF(lock);
    if (r == NULL) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return -1;
    }
    Py_DECREF(r);
    PyErr_Restore(type, value, traceback);
    return result;
}

/* end_span(encoded_type, emit, failed, span, end_time) -> bool: see kserve_otel.otlp_export.py_end_span, the
 * same steps in Python. */
static PyObject *
otlp_end_span(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "end_span(encoded_type, emit, failed, span, end_time)");
        return NULL;
    }
    PyObject *encoded_type = args[0], *emit = args[1], *failed = args[2], *span = args[3], *end_time = args[4];
    if (!PyType_Check(encoded_type) || !PyType_IsSubtype((PyTypeObject *)encoded_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "end_span: encoded_type must be a tuple type");
        return NULL;
    }
    if (lookup_constants() < 0)
        return NULL;
    int ended = mark_ended(span, end_time);
    if (ended <= 0)
        return ended < 0 ? NULL : Py_NewRef(Py_False);
    PyObject *metrics = PyObject_GetAttr(span, s__record_end_metrics);
    if (metrics == NULL)
        return NULL;
    if (metrics != Py_None) {
        int truth = PyObject_IsTrue(metrics);
        PyObject *r = truth > 0 ? PyObject_CallNoArgs(metrics) : NULL;
        Py_DECREF(metrics);
        if (truth < 0 || (truth > 0 && r == NULL))
            return NULL;
        Py_XDECREF(r);
    } else {
        Py_DECREF(metrics);
    }
    PyObject *bytes = span_bytes(span), *resource = NULL, *scope = NULL, *item = NULL;
    if (bytes != NULL && (resource = PyObject_GetAttr(span, s__resource)) != NULL &&
        (scope = PyObject_GetAttr(span, s__instrumentation_scope)) != NULL) {
        int truth = PyObject_IsTrue(scope);
        /* EncodedSpan(resource, scope or None, bytes), made as tuple.__new__ makes it */
        if (truth >= 0 && (item = ((PyTypeObject *)encoded_type)->tp_alloc((PyTypeObject *)encoded_type, 3)) != NULL) {
            PyTuple_SET_ITEM(item, 0, Py_NewRef(resource));
            PyTuple_SET_ITEM(item, 1, Py_NewRef(truth ? scope : Py_None));
            PyTuple_SET_ITEM(item, 2, Py_NewRef(bytes));
            /* It holds only the long-lived resource and scope and its bytes, so it can be in no cycle: the
             * garbage collector need not see it. Spans wait in the export queue for up to a batch (512) or the
             * schedule delay, long enough to survive young collections; untracked, the thousands queued
             * under full tracing are never traversed again (they had set off full collections). */
            PyObject_GC_UnTrack(item);
        }
    }
    Py_XDECREF(bytes);
    Py_XDECREF(resource);
    Py_XDECREF(scope);
    PyObject *r;
    if (item == NULL) {
        /* The span cannot be encoded: dropped and counted by failed(span, error), never raised. */
        if (!PyErr_ExceptionMatches(PyExc_Exception))
            return NULL;
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyErr_NormalizeException(&type, &value, &traceback);
        r = PyObject_CallFunctionObjArgs(failed, span, value, NULL);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
    } else {
        r = PyObject_CallOneArg(emit, item);
        Py_DECREF(item);
    }
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    return Py_NewRef(Py_True);
}

static PyMethodDef otlp_methods[] = {
    {"end_span", (PyCFunction)(void (*)(void))otlp_end_span, METH_FASTCALL,
     PyDoc_STR("end_span(encoded_type, emit, failed, span, end_time) -> bool: end a span that no processor but an "
               "encoding one sees, encode it and emit it; see kserve_otel.otlp_export.py_end_span.")},
    {"encode_span", otlp_encode_span, METH_O,
     PyDoc_STR("encode_span(span) -> bytes: the fields of one OTLP Span message of an SDK ReadableSpan, as "
               "encode_spans writes them inside its ScopeSpans.")},
    {"encode_batch", otlp_encode_batch, METH_O,
     PyDoc_STR("encode_batch(items) -> bytes: the serialised OTLP ExportTraceServiceRequest of EncodedSpan items "
               "(resource, scope, the bytes of encode_span), grouped as encode_spans groups spans.")},
    {"encode_spans", otlp_encode_spans, METH_O,
     PyDoc_STR("encode_spans(spans) -> bytes: the serialised OTLP ExportTraceServiceRequest of SDK ReadableSpans, "
               "the bytes of the SDK's encode_spans(spans).SerializeToString().")},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef otlp_module = {
    PyModuleDef_HEAD_INIT, "kserve_otel.export._otlp",
    "SDK spans to OTLP protobuf bytes in C; kserve_otel.export.otlp_encoding chooses it or its pure-Python twin.", -1,
    otlp_methods, NULL, NULL, NULL, NULL,
};

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC
PyInit__otlp(void)
{
    INTERN(s_name, "name");
    INTERN(s_context, "context");
    INTERN(s_trace_id, "trace_id");
    INTERN(s_span_id, "span_id");
    INTERN(s_trace_state, "trace_state");
    INTERN(s_items, "items");
    INTERN(s_parent, "parent");
    INTERN(s_is_remote, "is_remote");
    INTERN(s_kind, "kind");
    INTERN(s_start_time, "start_time");
    INTERN(s_end_time, "end_time");
    INTERN(s_attributes, "attributes");
    INTERN(s_dropped_attributes, "dropped_attributes");
    INTERN(s_events, "events");
    INTERN(s_timestamp, "timestamp");
    INTERN(s_dropped_events, "dropped_events");
    INTERN(s_links, "links");
    INTERN(s_dropped_links, "dropped_links");
    INTERN(s_status, "status");
    INTERN(s_description, "description");
    INTERN(s_status_code, "status_code");
    INTERN(s_value, "value");
    INTERN(s_resource, "resource");
    INTERN(s_instrumentation_scope, "instrumentation_scope");
    INTERN(s_version, "version");
    INTERN(s_schema_url, "schema_url");
    INTERN(s_exception, "exception");
    INTERN(s_exc_info, "exc_info");
    INTERN(s_empty, "");
    INTERN(s_log_format, "Failed to encode key %s: %s");
    INTERN(s__attributes, "_attributes");
    INTERN(s__events, "_events");
    INTERN(s__links, "_links");
    INTERN(s__dict, "_dict");
    INTERN(s__dq, "_dq");
    INTERN(s_dropped, "dropped");
    INTERN(s__context, "_context");
    INTERN(s__parent, "_parent");
    INTERN(s__name, "_name");
    INTERN(s__kind, "_kind");
    INTERN(s__start_time, "_start_time");
    INTERN(s__end_time, "_end_time");
    INTERN(s__status, "_status");
    INTERN(s__status_code, "_status_code");
    INTERN(s__description, "_description");
    INTERN(s__lock, "_lock");
    INTERN(s_acquire, "acquire");
    INTERN(s_release, "release");
    INTERN(s__immutable, "_immutable");
    INTERN(s__record_end_metrics, "_record_end_metrics");
    INTERN(s__resource, "_resource");
    INTERN(s__instrumentation_scope, "_instrumentation_scope");
    return PyModule_Create(&otlp_module);
}
