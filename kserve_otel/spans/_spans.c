/* kserve_otel.spans._spans: a sampled step span's start, made current, in one C call; and the non-recording
 * span of a dropped one (dropped_current, below).
 *
 * Why: a traced request starts a span per step. In Python that start (kserve_otel.spans.span_factory's
 * SpanFactory.start, then the context copied with the span in it and set in the runtime context's ContextVar)
 * is some 140 bytecodes and a dozen attribute writes a step, on every step of every sampled request. This
 * is the same work for the common case, where the tracer's only span processor is kserve-otel's encoding
 * one (so no on_start is due), its id generator is the SDK's RandomIdGenerator, its span metrics are off and
 * the API's default runtime context is in use: start_current() returns None wherever the processors say
 * otherwise, and the Python path runs, as it does whenever the extension is not built.
 *
 * The span is an instance of the factory's TemplateSpan class with its three fields of its own, exactly as
 * SpanFactory.start makes it: _context (a SpanContext tuple: trace id, span id from random.getrandbits(64),
 * not remote, flags, trace state, valid), _parent, _start_time (time.time_ns()); the context made current is
 * Context(current) with the span under the API's span key; the result is (span, token), the handle of
 * kserve_otel.spans.tracing. tests/test_span_factory.py compares the spans of both paths.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <time.h>

#ifdef Py_GIL_DISABLED
#error "kserve_otel.spans._spans relies on the GIL; the pure-Python path is used instead"
#endif

/* Set once by bind(). */
static PyTypeObject *span_context_type, *context_type;
static PyObject *sampled_flags, *sampled_random_flags, *getrandbits, *context_var, *span_key;
static PyObject *s__fast, *s__span_processor, *s__span_processors, *s__tracer_config, *s_is_enabled, *s__context,
    *s__parent, *s__start_time, *sixty_four;

static PyObject *
spans_bind(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *sc, *ct, *sampled, *sampled_random, *bits, *var, *key;
    if (!PyArg_ParseTuple(args, "O!O!OOOO!U:bind", &PyType_Type, &sc, &PyType_Type, &ct, &sampled,
                          &sampled_random, &bits, &PyContextVar_Type, &var, &key))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)sc, &PyTuple_Type) || !PyType_IsSubtype((PyTypeObject *)ct, &PyDict_Type)) {
        PyErr_SetString(PyExc_TypeError, "bind: SpanContext must be a tuple type and Context a dict type");
        return NULL;
    }
    Py_XSETREF(span_context_type, (PyTypeObject *)Py_NewRef(sc));
    Py_XSETREF(context_type, (PyTypeObject *)Py_NewRef(ct));
    Py_XSETREF(sampled_flags, Py_NewRef(sampled));
    Py_XSETREF(sampled_random_flags, Py_NewRef(sampled_random));
    Py_XSETREF(getrandbits, Py_NewRef(bits));
    Py_XSETREF(context_var, Py_NewRef(var));
    Py_XSETREF(span_key, Py_NewRef(key));
    Py_RETURN_NONE;
}

/* 1 when obj.name is true, 0 when false, -1 on error. */
static int
attribute_true(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL)
        return -1;
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

/* Whether spans of span_class may skip the processors: its _fast tuple is still its processor's tuple. */
static int
fast_processors(PyObject *span_class)
{
    PyObject *fast = PyObject_GetAttr(span_class, s__fast);
    if (fast == NULL)
        return -1;
    int result = 0;
    if (fast != Py_None) {
        PyObject *processor = PyObject_GetAttr(span_class, s__span_processor);
        PyObject *processors = processor == NULL ? NULL : PyObject_GetAttr(processor, s__span_processors);
        result = processors == NULL ? -1 : processors == fast;
        Py_XDECREF(processor);
        Py_XDECREF(processors);
    }
    Py_DECREF(fast);
    return result;
}

static PyObject *
new_span_id(void)
{
    for (;;) { /* RandomIdGenerator: random.getrandbits(64), never the invalid id 0 */
        PyObject *id = PyObject_CallOneArg(getrandbits, sixty_four);
        if (id == NULL)
            return NULL;
        int zero = PyObject_Not(id);
        if (zero == 0)
            return id;
        Py_DECREF(id);
        if (zero < 0)
            return NULL;
    }
}

static PyObject *
new_span_context(PyObject *trace_id, PyObject *span_id, PyObject *flags, PyObject *trace_state)
{
    PyObject *context = span_context_type->tp_alloc(span_context_type, 6);
    if (context == NULL)
        return NULL;
    PyTuple_SET_ITEM(context, 0, Py_NewRef(trace_id));
    PyTuple_SET_ITEM(context, 1, Py_NewRef(span_id));
    PyTuple_SET_ITEM(context, 2, Py_NewRef(Py_False));
    PyTuple_SET_ITEM(context, 3, Py_NewRef(flags));
    PyTuple_SET_ITEM(context, 4, Py_NewRef(trace_state));
    PyTuple_SET_ITEM(context, 5, Py_NewRef(Py_True));
    return context;
}

/* Context(context) with span under the span key, made current: the token (new reference), NULL on error. */
static PyObject *
make_current(PyObject *context, PyObject *span)
{
    /* Context(context) with the span under the span key: the dict's own insertion, past Context's refusal. */
    PyObject *current = PyObject_CallOneArg((PyObject *)context_type, context);
    PyObject *token = NULL;
    if (current != NULL && PyDict_SetItem(current, span_key, span) == 0)
        token = PyContextVar_Set(context_var, current);
    Py_XDECREF(current);
    return token;
}

/* start_current(span_class, tracer, context, parent, trace_id, root_flags, root_trace_state) -> (span, token) or
 * None: see the top of this file. parent is the parent's valid SpanContext or None for a root of trace_id. */
static PyObject *
spans_start_current(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError,
                        "start_current(span_class, tracer, context, parent, trace_id, root_flags, root_trace_state)");
        return NULL;
    }
    if (span_context_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "start_current: bind() was not called");
        return NULL;
    }
    PyObject *span_class = args[0], *tracer = args[1], *context = args[2], *parent = args[3], *trace_id = args[4],
             *flags = args[5], *trace_state = args[6];
    if (!PyType_Check(span_class) || !PyDict_Check(context)) {
        PyErr_SetString(PyExc_TypeError, "start_current: span_class must be a type and context a Context");
        return NULL;
    }
    int fast = fast_processors(span_class);
    if (fast <= 0)
        return fast < 0 ? NULL : Py_NewRef(Py_None);
    PyObject *config = PyObject_GetAttr(tracer, s__tracer_config);
    if (config == NULL)
        return NULL;
    int enabled = attribute_true(config, s_is_enabled);
    Py_DECREF(config);
    if (enabled <= 0)
        return enabled < 0 ? NULL : Py_NewRef(Py_None);

    if (parent != Py_None) { /* a SpanContext: (trace_id, span_id, is_remote, trace_flags, trace_state, is_valid) */
        if (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) < 5) {
            PyErr_SetString(PyExc_TypeError, "start_current: parent must be a SpanContext or None");
            return NULL;
        }
        trace_id = PyTuple_GET_ITEM(parent, 0);
        long parent_flags = PyLong_AsLong(PyTuple_GET_ITEM(parent, 3));
        if (parent_flags == -1 && PyErr_Occurred())
            return NULL;
        flags = parent_flags & 2 ? sampled_random_flags : sampled_flags; /* TraceFlags.RANDOM_TRACE_ID */
        trace_state = PyTuple_GET_ITEM(parent, 4);
    }
    PyObject *span_id = new_span_id();
    if (span_id == NULL)
        return NULL;
    PyObject *span_context = new_span_context(trace_id, span_id, flags, trace_state);
    Py_DECREF(span_id);
    if (span_context == NULL)
        return NULL;
    PyTypeObject *type = (PyTypeObject *)span_class;
    PyObject *span = type->tp_alloc(type, 0);
    PyObject *start_time = NULL, *token = NULL, *result = NULL;
    struct timespec now;
    if (span == NULL)
        goto done;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        goto done;
    }
    start_time = PyLong_FromLongLong((long long)now.tv_sec * 1000000000LL + now.tv_nsec);
    if (start_time == NULL || PyObject_SetAttr(span, s__context, span_context) < 0 ||
        PyObject_SetAttr(span, s__parent, parent) < 0 || PyObject_SetAttr(span, s__start_time, start_time) < 0)
        goto done;
    token = make_current(context, span);
    if (token != NULL)
        result = PyTuple_Pack(2, span, token);
done:
    Py_DECREF(span_context);
    Py_XDECREF(span);
    Py_XDECREF(start_time);
    Py_XDECREF(token);
    return result;
}

/* dropped_current(span_type, context, trace_id, flags, trace_state) -> (span, token): the non-recording span
 * the SDK makes for a span its sampler dropped (span_type: the API's NonRecordingSpan, whose one field is
 * _context), with a new span id, made current in Context(context). What kserve_otel.spans.tracing._dropped
 * makes in Python, in one call: an unsampled request of a ratio sampler takes this path. */
static PyObject *
spans_dropped_current(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "dropped_current(span_type, context, trace_id, flags, trace_state)");
        return NULL;
    }
    if (span_context_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "dropped_current: bind() was not called");
        return NULL;
    }
    PyObject *span_type = args[0], *context = args[1];
    if (!PyType_Check(span_type) || !PyDict_Check(context)) {
        PyErr_SetString(PyExc_TypeError, "dropped_current: span_type must be a type and context a Context");
        return NULL;
    }
    PyObject *span_id = new_span_id();
    if (span_id == NULL)
        return NULL;
    PyObject *span_context = new_span_context(args[2], span_id, args[3], args[4]);
    Py_DECREF(span_id);
    if (span_context == NULL)
        return NULL;
    PyTypeObject *type = (PyTypeObject *)span_type;
    PyObject *span = type->tp_alloc(type, 0), *token = NULL, *result = NULL;
    if (span != NULL && PyObject_SetAttr(span, s__context, span_context) == 0 &&
        (token = make_current(context, span)) != NULL)
        result = PyTuple_Pack(2, span, token);
    Py_DECREF(span_context);
    Py_XDECREF(span);
    Py_XDECREF(token);
    return result;
}

static PyMethodDef spans_methods[] = {
    {"bind", spans_bind, METH_VARARGS,
     PyDoc_STR("bind(SpanContext, Context, sampled_flags, sampled_random_flags, getrandbits, context_var, span_key): "
               "what start_current() uses.")},
    {"start_current", (PyCFunction)(void (*)(void))spans_start_current, METH_FASTCALL,
     PyDoc_STR("start_current(span_class, tracer, context, parent, trace_id, root_flags, root_trace_state) -> "
               "(span, token) or None: a template span started and made current (None: take the Python path).")},
    {"dropped_current", (PyCFunction)(void (*)(void))spans_dropped_current, METH_FASTCALL,
     PyDoc_STR("dropped_current(span_type, context, trace_id, flags, trace_state) -> (span, token): a non-recording "
               "span with a new span id, made current.")},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef spans_module = {
    PyModuleDef_HEAD_INIT, "kserve_otel.spans._spans",
    "A sampled step span's start, made current, in C; kserve_otel.spans.tracing falls back to Python.", -1,
    spans_methods, NULL, NULL, NULL, NULL,
};

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC
PyInit__spans(void)
{
    INTERN(s__fast, "_fast");
    INTERN(s__span_processor, "_span_processor");
    INTERN(s__span_processors, "_span_processors");
    INTERN(s__tracer_config, "_tracer_config");
    INTERN(s_is_enabled, "is_enabled");
    INTERN(s__context, "_context");
    INTERN(s__parent, "_parent");
    INTERN(s__start_time, "_start_time");
    if ((sixty_four = PyLong_FromLong(64)) == NULL)
        return NULL;
    return PyModule_Create(&spans_module);
}
