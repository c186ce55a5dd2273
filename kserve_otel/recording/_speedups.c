/* kserve_otel.recording._speedups: the request path's bookkeeping in C (optional;
 * kserve_otel/recording/speedups.py has the same API in pure Python and is used whenever this extension is
 * not built).
 *
 * Why C: measured with callgrind (instructions are repeatable where seconds are not: benchmarks/instructions.py),
 * a pure-Python histogram observation with its series lookup costs about 3,900 instructions, and the ASGI
 * middleware built on the pure-Python twins adds about 21,600 instructions to a bare Starlette request of about
 * 154,000, which cost a trivial app 14-16 % of its throughput. With these types it adds about 9,700, of which
 * the ASGI layer itself (the coroutine and its frame) is about 2,700.
 *
 * Atomicity: every function below runs with the GIL held and calls no Python code until its own update is
 * done, so an observation is atomic with respect to other threads without a lock of its own (the pure-Python
 * version needs one). Free-threaded builds have no GIL: the extension refuses to build there, and the
 * pure-Python version (with its locks) is used.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <math.h>
#include <time.h>

#ifdef Py_GIL_DISABLED
#error "kserve_otel.recording._speedups relies on the GIL; the pure-Python speedups is used instead"
#endif

/* Monotonic nanoseconds, the clock of time.perf_counter(). */
/* getattr(obj, name, None) without an AttributeError raised and cleared on a miss: 1 found, 0 not, -1 error */
static inline int
optional_attr(PyObject *obj, PyObject *name, PyObject **result)
{
#if PY_VERSION_HEX >= 0x030D0000
    return PyObject_GetOptionalAttr(obj, name, result);
#else
    return _PyObject_LookupAttr(obj, name, result);
#endif
}

static inline int64_t
now_ns(void)
{
#if PY_VERSION_HEX >= 0x030D0000
    PyTime_t t;
    (void)PyTime_PerfCounterRaw(&t);
    return (int64_t)t;
#else
    return (int64_t)_PyTime_GetPerfCounter();
#endif
}

/* The writable place of `size` bytes at `offset` in `buffer`, 8-byte aligned, for bind(): fills `view` (release it
 * when done with the place) and returns the place, or NULL with an exception set. */
static char *
cells_place(const char *who, PyObject *buffer, Py_ssize_t offset, Py_ssize_t size, Py_buffer *view)
{
    if (PyObject_GetBuffer(buffer, view, PyBUF_WRITABLE | PyBUF_SIMPLE) < 0)
        return NULL;
    char *at = (char *)view->buf + offset;
    if (offset < 0 || offset > view->len - size || ((uintptr_t)at % 8) != 0) {
        PyErr_Format(PyExc_ValueError, "%s.bind: %zd bytes at offset %zd do not fit, 8-byte aligned, in a buffer of"
                     " %zd bytes", who, size, offset, view->len);
        PyBuffer_Release(view);
        return NULL;
    }
    return at;
}

/* Call `mirror` (if any) with `value`: 0, or -1 with an exception set. */
static int
call_mirror(PyObject *mirror, PyObject *value)
{
    if (mirror == NULL || mirror == Py_None)
        return 0;
    Py_INCREF(mirror);
    PyObject *r = PyObject_CallOneArg(mirror, value);
    Py_DECREF(mirror);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Replace the callable in `slot` with `value` (None or NULL: none), for the mirror setters. */
static int
set_mirror(PyObject **slot, PyObject *value)
{
    if (value != NULL && value != Py_None && !PyCallable_Check(value)) {
        PyErr_SetString(PyExc_TypeError, "mirror must be a callable or None");
        return -1;
    }
    PyObject *old = *slot;
    *slot = (value == NULL || value == Py_None) ? NULL : Py_NewRef(value);
    Py_XDECREF(old);
    return 0;
}

/* ------------------------------------------------------------------------------------------------ Histogram */

/* A histogram's cells, the layout that bind() places in a shared buffer and
 * kserve_otel/export/series_files.py reads: (nbounds + 1) bucket counts as native uint64, then sum, min and
 * max as native doubles; 8-byte aligned. With exemplars, (nbounds + 1) exemplar slots follow, one per bucket,
 * of six 8-byte words: a sequence number (odd while the slot is being written, 0 while it was never written),
 * the value and the Unix time in seconds as doubles, the trace id's high and low 64 bits and the span id. A
 * reader in another process reads a slot whole when its sequence number is even and the same before and after
 * (a seqlock: this process is the one writer, under the GIL). The interval extremes stay in the object: only
 * this process's delta readers use them. */
typedef struct {
    unsigned long long seq;
    double value, time;
    unsigned long long trace_hi, trace_lo, span;
} ExemplarSlot;

/* With native, a native (exponential) histogram follows, as Prometheus defines it (see
 * kserve_otel/recording/speedups.py, NATIVE_*): a header of sequence number (odd while written), schema, zero
 * count, offset (key of counts[0]) and buckets in use, then NATIVE_MAX_BUCKETS counts. */
#define NATIVE_SCHEMA 3
#define NATIVE_MAX_BUCKETS 160
#define NATIVE_ZERO_THRESHOLD 2.938735877055719e-39 /* 2^-128, Prometheus's default */
typedef struct {
    unsigned long long seq;
    long long schema;
    unsigned long long zero;
    long long offset;
    unsigned long long used;
    unsigned long long counts[NATIVE_MAX_BUCKETS];
} NativeBlock;

typedef struct {
    PyObject_HEAD
    Py_ssize_t nbounds;
    double *bounds;
    unsigned long long *counts; /* nbounds + 1: in `own` or in `view` */
    double *totals;             /* sum, min, max: right after counts */
    double interval_min, interval_max;
    PyObject *bounds_tuple;
    PyObject *mirror; /* callable or NULL */
    ExemplarSlot *exemplars; /* nbounds + 1 slots right after totals, or NULL without exemplars */
    int with_exemplars;
    NativeBlock *native;     /* after the exemplars, or NULL without a native histogram */
    int with_native;
    void *own;        /* the cells while not bound to a buffer, else NULL */
    Py_buffer view;   /* the buffer the cells live in once bound (view.obj is NULL before) */
} HistogramObject;

#define H_SUM(h) ((h)->totals[0])
#define H_MIN(h) ((h)->totals[1])
#define H_MAX(h) ((h)->totals[2])

static inline Py_ssize_t
histogram_cells_size(Py_ssize_t nbounds, int with_exemplars, int with_native)
{
    return (nbounds + 1) * (Py_ssize_t)sizeof(unsigned long long) + 3 * (Py_ssize_t)sizeof(double)
        + (with_exemplars ? (nbounds + 1) * (Py_ssize_t)sizeof(ExemplarSlot) : 0)
        + (with_native ? (Py_ssize_t)sizeof(NativeBlock) : 0);
}

/* Point counts, totals and exemplars at cells starting at `at`. */
static inline void
histogram_point(HistogramObject *self, char *at)
{
    self->counts = (unsigned long long *)at;
    self->totals = (double *)(at + (self->nbounds + 1) * sizeof(unsigned long long));
    self->exemplars = self->with_exemplars ? (ExemplarSlot *)(self->totals + 3) : NULL;
    char *after = (char *)(self->totals + 3) + (self->with_exemplars ? (self->nbounds + 1) * sizeof(ExemplarSlot) : 0);
    self->native = self->with_native ? (NativeBlock *)after : NULL;
}

/* The lower bounds 2^(j/2^s - 1), j < 2^s, of the buckets of each positive schema s within one power of two
 * (Prometheus's nativeHistogramBounds; kserve_otel/recording/speedups.py, _NATIVE_BOUNDS): filled once at
 * import, so an observation bisects a table instead of computing exp2() at each step. */
static double native_bounds[NATIVE_SCHEMA + 1][1 << NATIVE_SCHEMA];

static void
native_bounds_fill(void)
{
    for (long long s = 1; s <= NATIVE_SCHEMA; s++) {
        long long n = 1LL << s;
        for (long long j = 0; j < n; j++)
            native_bounds[s][j] = exp2((double)j / (double)n - 1.0);
    }
}

/* Prometheus's bucket key of v > 0 at `schema` (its math.Frexp computation:
 * kserve_otel/recording/speedups.py, native_key). The schema never rises above NATIVE_SCHEMA: it only falls,
 * by schema reduction. */
static inline long long
native_key(double v, long long schema)
{
    int exp;
    double frac = frexp(v, &exp);
    if (schema > 0) {
        const double *bounds = native_bounds[schema];
        long long n = 1LL << schema, lo = 0, hi = n;
        while (lo < hi) { /* bisect_left */
            long long mid = (lo + hi) / 2;
            if (bounds[mid] < frac)
                lo = mid + 1;
            else
                hi = mid;
        }
        return lo + (long long)(exp - 1) * n;
    }
    long long key = frac == 0.5 ? exp - 1 : exp;
    long long shift = -schema;
    return (key + (1LL << shift) - 1) >> shift; /* arithmetic shift: floor, as Go's */
}

/* Count v in the native histogram: the zero bucket, or its exponential bucket, lowering the schema (merging
 * pairs of buckets) as often as the span of buckets needs. NaN is not counted there. */
static void
native_add(NativeBlock *b, double v)
{
    unsigned long long seq = b->seq;
    __atomic_store_n(&b->seq, seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    if (v <= NATIVE_ZERO_THRESHOLD) {
        b->zero += 1;
    } else if (v == v) {
        long long key = native_key(v, b->schema);
        if (b->used == 0) {
            b->offset = key;
            b->used = 1;
            b->counts[0] = 0;
        }
        long long low = key < b->offset ? key : b->offset;
        long long top = b->offset + (long long)b->used - 1;
        long long high = key > top ? key : top;
        while (high - low + 1 > NATIVE_MAX_BUCKETS) {
            /* schema - 1: key k becomes (k + 1) >> 1 */
            long long new_offset = (b->offset + 1) >> 1;
            unsigned long long merged[NATIVE_MAX_BUCKETS] = {0};
            for (unsigned long long i = 0; i < b->used; i++)
                merged[((b->offset + (long long)i + 1) >> 1) - new_offset] += b->counts[i];
            long long new_top = (top + 1) >> 1;
            b->used = (unsigned long long)(new_top - new_offset + 1);
            memcpy(b->counts, merged, b->used * sizeof(unsigned long long));
            b->offset = new_offset;
            b->schema -= 1;
            key = native_key(v, b->schema);
            top = new_top;
            low = key < b->offset ? key : b->offset;
            high = key > top ? key : top;
        }
        if (low < b->offset) { /* room below */
            long long shift = b->offset - low;
            memmove(b->counts + shift, b->counts, b->used * sizeof(unsigned long long));
            memset(b->counts, 0, (size_t)shift * sizeof(unsigned long long));
            b->used += (unsigned long long)shift;
            b->offset = low;
        }
        if (high > b->offset + (long long)b->used - 1) { /* room above */
            unsigned long long used = (unsigned long long)(high - b->offset + 1);
            memset(b->counts + b->used, 0, (used - b->used) * sizeof(unsigned long long));
            b->used = used;
        }
        b->counts[key - b->offset] += 1;
    }
    __atomic_store_n(&b->seq, seq + 2, __ATOMIC_RELEASE);
}

static PyTypeObject HistogramType;
static PyObject *sixty_four; /* the int 64, for splitting trace ids */

static int
Histogram_init(HistogramObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *bounds = NULL;
    int with_exemplars = 0, with_native = 0;
    static char *kwlist[] = {"bounds", "exemplars", "native", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|pp:Histogram", kwlist, &bounds, &with_exemplars, &with_native))
        return -1;
    if (self->counts != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Histogram is already initialised");
        return -1;
    }
    PyObject *tuple = PySequence_Tuple(bounds);
    if (tuple == NULL)
        return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(tuple);
    double *values = PyMem_Calloc(n > 0 ? n : 1, sizeof(double));
    unsigned long long *counts = PyMem_Calloc(1, histogram_cells_size(n, with_exemplars, with_native));
    if (values == NULL || counts == NULL) {
        PyMem_Free(values);
        PyMem_Free(counts);
        Py_DECREF(tuple);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        double v = PyFloat_AsDouble(PyTuple_GET_ITEM(tuple, i));
        if (v == -1.0 && PyErr_Occurred()) {
            PyMem_Free(values);
            PyMem_Free(counts);
            Py_DECREF(tuple);
            return -1;
        }
        if (i > 0 && !(values[i - 1] < v)) {
            PyErr_SetString(PyExc_ValueError, "Histogram bounds must be strictly increasing");
            PyMem_Free(values);
            PyMem_Free(counts);
            Py_DECREF(tuple);
            return -1;
        }
        values[i] = v;
    }
    /* the bounds as given back: floats, like HistogramFamily's */
    PyObject *floats = PyTuple_New(n);
    if (floats == NULL) {
        PyMem_Free(values);
        PyMem_Free(counts);
        Py_DECREF(tuple);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *f = PyFloat_FromDouble(values[i]);
        if (f == NULL) {
            Py_DECREF(floats);
            PyMem_Free(values);
            PyMem_Free(counts);
            Py_DECREF(tuple);
            return -1;
        }
        PyTuple_SET_ITEM(floats, i, f);
    }
    Py_DECREF(tuple);
    self->nbounds = n;
    self->bounds = values;
    self->own = counts;
    self->with_exemplars = with_exemplars;
    self->with_native = with_native;
    histogram_point(self, (char *)counts);
    if (self->native != NULL)
        self->native->schema = NATIVE_SCHEMA;
    H_SUM(self) = 0.0;
    H_MIN(self) = self->interval_min = INFINITY;
    H_MAX(self) = self->interval_max = -INFINITY;
    self->bounds_tuple = floats;
    return 0;
}

/* tp_traverse and tp_clear of a type from one list of its object fields, so that neither can miss one:
 * GC_FIELDS(Type, FIELDS) where FIELDS(X) is X(field) X(other) ... */
#define VISIT_FIELD(field) Py_VISIT(self->field);
#define CLEAR_FIELD(field) Py_CLEAR(self->field);
#define GC_FIELDS(Type, FIELDS)                                                                      \
    static int Type##_traverse(Type##Object *self, visitproc visit, void *arg)                       \
    {                                                                                                \
        FIELDS(VISIT_FIELD)                                                                          \
        return 0;                                                                                    \
    }                                                                                                \
    static int Type##_clear(Type##Object *self)                                                      \
    {                                                                                                \
        FIELDS(CLEAR_FIELD)                                                                          \
        return 0;                                                                                    \
    }

/* The slots every type of this module fills alike (its tp_init, where it has one, and tp_new go beside). */
#define GC_TYPE_SLOTS(Type)                                                                          \
    .tp_basicsize = sizeof(Type##Object), .tp_dealloc = (destructor)Type##_dealloc,                  \
    .tp_traverse = (traverseproc)Type##_traverse, .tp_clear = (inquiry)Type##_clear,                 \
    .tp_methods = Type##_methods

/* The `mirror` attribute of a histogram or a counter: the callable in the field at `closure`'s offset. */
static PyObject *
mirror_get(PyObject *self, void *offset)
{
    PyObject *mirror = *(PyObject **)((char *)self + (Py_ssize_t)offset);
    return Py_NewRef(mirror != NULL ? mirror : Py_None);
}

static int
mirror_set(PyObject *self, PyObject *value, void *offset)
{
    return set_mirror((PyObject **)((char *)self + (Py_ssize_t)offset), value);
}

#define MIRROR_GETSET(Type, doc) {"mirror", mirror_get, mirror_set, doc, (void *)offsetof(Type##Object, mirror)}

/* The type of a histogram or a counter: subclassable (the series classes are), made by Type##_init. */
#define CELL_TYPE(Type, doc)                                                                         \
    {                                                                                                \
        PyVarObject_HEAD_INIT(NULL, 0)                                                               \
        .tp_name = "kserve_otel.recording._speedups." #Type, .tp_doc = PyDoc_STR(doc),               \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,                   \
        .tp_new = PyType_GenericNew, .tp_init = (initproc)Type##_init, GC_TYPE_SLOTS(Type),          \
        .tp_getset = Type##_getset,                                                                  \
    }

#define MIRROR_FIELDS(X) X(mirror)
GC_FIELDS(Histogram, MIRROR_FIELDS)

/* A static type: Python subclasses' subtype_dealloc calls this and releases their heap type itself. */
static void
Histogram_dealloc(HistogramObject *self)
{
    PyObject_GC_UnTrack(self);
    Histogram_clear(self);
    Py_CLEAR(self->bounds_tuple);
    PyMem_Free(self->bounds);
    PyMem_Free(self->own);
    if (self->view.obj != NULL)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Count v: bucket i holds bounds[i-1] < v <= bounds[i] (bisect.bisect_left, NaN included); returns i. */
static inline Py_ssize_t
histogram_add(HistogramObject *self, double v)
{
    Py_ssize_t lo = 0, hi = self->nbounds;
    const double *b = self->bounds;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (b[mid] < v)
            lo = mid + 1;
        else
            hi = mid;
    }
    self->counts[lo] += 1;
    if (self->native != NULL)
        native_add(self->native, v);
    H_SUM(self) += v;
    /* the cumulative extremes are never inside the interval's: only a new interval extreme can be one */
    if (v < self->interval_min) {
        self->interval_min = v;
        if (v < H_MIN(self))
            H_MIN(self) = v;
    }
    if (v > self->interval_max) {
        self->interval_max = v;
        if (v > H_MAX(self))
            H_MAX(self) = v;
    }
    return lo;
}

static int
histogram_observe(HistogramObject *self, PyObject *value)
{
    double v = PyFloat_AsDouble(value);
    if (v == -1.0 && PyErr_Occurred())
        return -1;
    if (self->counts == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Histogram.__init__ was not called");
        return -1;
    }
    histogram_add(self, v);
    return call_mirror(self->mirror, value);
}

static PyObject *
Histogram_observe(HistogramObject *self, PyObject *value)
{
    if (histogram_observe(self, value) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* observe_exemplar(value, trace_id, span_id): observe, and keep (value, now, trace id, span id) as the exemplar
 * of the value's bucket, the latest replacing the one before (nothing more without exemplar cells). */
static PyObject *
Histogram_observe_exemplar(HistogramObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "observe_exemplar(value, trace_id, span_id) takes 3 arguments");
        return NULL;
    }
    double v = PyFloat_AsDouble(args[0]);
    if (v == -1.0 && PyErr_Occurred())
        return NULL;
    unsigned long long lo = PyLong_AsUnsignedLongLongMask(args[1]);
    if (lo == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    PyObject *shifted = PyNumber_Rshift(args[1], sixty_four);
    if (shifted == NULL)
        return NULL;
    unsigned long long hi = PyLong_AsUnsignedLongLongMask(shifted);
    Py_DECREF(shifted);
    if (hi == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long span = PyLong_AsUnsignedLongLongMask(args[2]);
    if (span == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (self->counts == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Histogram.__init__ was not called");
        return NULL;
    }
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    Py_ssize_t bucket = histogram_add(self, v);
    if (self->exemplars != NULL) {
        ExemplarSlot *slot = &self->exemplars[bucket];
        unsigned long long seq = slot->seq;
        __atomic_store_n(&slot->seq, seq + 1, __ATOMIC_RELAXED); /* odd: being written */
        __atomic_thread_fence(__ATOMIC_RELEASE);
        slot->value = v;
        slot->time = (double)now.tv_sec + (double)now.tv_nsec / 1e9;
        slot->trace_hi = hi;
        slot->trace_lo = lo;
        slot->span = span;
        __atomic_store_n(&slot->seq, seq + 2, __ATOMIC_RELEASE); /* even: whole */
    }
    if (call_mirror(self->mirror, args[0]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* native(): (schema, zero threshold, zero count, offset, counts) or None */
static PyObject *
Histogram_native(HistogramObject *self, PyObject *unused)
{
    NativeBlock *b = self->native;
    if (b == NULL)
        Py_RETURN_NONE;
    PyObject *counts = PyTuple_New((Py_ssize_t)b->used);
    if (counts == NULL)
        return NULL;
    for (unsigned long long i = 0; i < b->used; i++) {
        PyObject *c = PyLong_FromUnsignedLongLong(b->counts[i]);
        if (c == NULL) {
            Py_DECREF(counts);
            return NULL;
        }
        PyTuple_SET_ITEM(counts, (Py_ssize_t)i, c);
    }
    return Py_BuildValue("(LdKLN)", b->schema, NATIVE_ZERO_THRESHOLD, b->zero, b->offset, counts);
}

/* exemplars(): per bucket, None or (value, unix time, trace id, span id) */
static PyObject *
Histogram_exemplars(HistogramObject *self, PyObject *unused)
{
    Py_ssize_t n = self->nbounds + 1;
    PyObject *result = PyTuple_New(n);
    if (result == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item;
        ExemplarSlot *slot = self->exemplars != NULL ? &self->exemplars[i] : NULL;
        if (slot == NULL || slot->seq == 0) {
            item = Py_NewRef(Py_None);
        } else {
            PyObject *hi = PyLong_FromUnsignedLongLong(slot->trace_hi);
            PyObject *shifted = hi != NULL ? PyNumber_Lshift(hi, sixty_four) : NULL;
            PyObject *lo = PyLong_FromUnsignedLongLong(slot->trace_lo);
            PyObject *trace = shifted != NULL && lo != NULL ? PyNumber_Or(shifted, lo) : NULL;
            Py_XDECREF(hi);
            Py_XDECREF(shifted);
            Py_XDECREF(lo);
            item = trace != NULL ? Py_BuildValue("(ddNK)", slot->value, slot->time, trace, slot->span) : NULL;
        }
        if (item == NULL) {
            Py_DECREF(result);
            return NULL;
        }
        PyTuple_SET_ITEM(result, i, item);
    }
    return result;
}

static PyObject *
Histogram_snapshot(HistogramObject *self, PyObject *args, PyObject *kwds)
{
    int reset = 0;
    static char *kwlist[] = {"reset_interval", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|p:snapshot", kwlist, &reset))
        return NULL;
    if (self->counts == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Histogram.__init__ was not called");
        return NULL;
    }
    /* Copy first, allocate after: no Python code (hence no other thread) runs between the reads. */
    Py_ssize_t n = self->nbounds + 1;
    unsigned long long stack_counts[64];
    unsigned long long *copy = n <= 64 ? stack_counts : PyMem_Malloc(n * sizeof(unsigned long long));
    if (copy == NULL)
        return PyErr_NoMemory();
    memcpy(copy, self->counts, n * sizeof(unsigned long long));
    double sum = H_SUM(self), mn = H_MIN(self), mx = H_MAX(self), imn = self->interval_min, imx = self->interval_max;
    if (reset) {
        self->interval_min = INFINITY;
        self->interval_max = -INFINITY;
    }
    PyObject *counts = PyTuple_New(n);
    if (counts == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *c = PyLong_FromUnsignedLongLong(copy[i]);
        if (c == NULL) {
            Py_DECREF(counts);
            goto fail;
        }
        PyTuple_SET_ITEM(counts, i, c);
    }
    if (copy != stack_counts)
        PyMem_Free(copy);
    return Py_BuildValue("(Nddddd)", counts, sum, mn, mx, imn, imx);
fail:
    if (copy != stack_counts)
        PyMem_Free(copy);
    return NULL;
}

/* Move the cells into `buffer` at `offset` (writable, 8-byte aligned, room for cells_size bytes): with `carry`,
 * what was counted so far goes along; without, the histogram starts again from nothing there (a forked child,
 * whose parent keeps counting what it inherited). No Python code runs between the copy and the switch. */
static PyObject *
Histogram_bind(HistogramObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *buffer;
    Py_ssize_t offset;
    int carry = 1;
    static char *kwlist[] = {"buffer", "offset", "carry", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On|p:bind", kwlist, &buffer, &offset, &carry))
        return NULL;
    if (self->counts == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "Histogram.__init__ was not called");
        return NULL;
    }
    Py_buffer view;
    Py_ssize_t size = histogram_cells_size(self->nbounds, self->with_exemplars, self->with_native);
    char *at = cells_place("Histogram", buffer, offset, size, &view);
    if (at == NULL)
        return NULL;
    if (carry) {
        memmove(at, self->counts, size);
    } else {
        memset(at, 0, size);
        double *totals = (double *)(at + (self->nbounds + 1) * sizeof(unsigned long long));
        totals[1] = INFINITY;
        totals[2] = -INFINITY;
        self->interval_min = INFINITY;
        self->interval_max = -INFINITY;
    }
    histogram_point(self, at);
    if (!carry && self->native != NULL)
        self->native->schema = NATIVE_SCHEMA;
    PyMem_Free(self->own);
    self->own = NULL;
    if (self->view.obj != NULL)
        PyBuffer_Release(&self->view);
    self->view = view;
    Py_RETURN_NONE;
}

static PyObject *
Histogram_get_cells_size(HistogramObject *self, void *closure)
{
    return PyLong_FromSsize_t(histogram_cells_size(self->nbounds, self->with_exemplars, self->with_native));
}

static PyObject *
Histogram_get_count(HistogramObject *self, void *closure)
{
    unsigned long long total = 0;
    if (self->counts != NULL)
        for (Py_ssize_t i = 0; i <= self->nbounds; i++)
            total += self->counts[i];
    return PyLong_FromUnsignedLongLong(total);
}

static PyObject *
Histogram_get_bounds(HistogramObject *self, void *closure)
{
    if (self->bounds_tuple == NULL)
        return PyTuple_New(0);
    Py_INCREF(self->bounds_tuple);
    return self->bounds_tuple;
}

static PyMethodDef Histogram_methods[] = {
    {"observe", (PyCFunction)Histogram_observe, METH_O,
     "observe(value)\n--\n\nCount ``value`` (seconds) in its bucket: bucket i holds bounds[i-1] < value <= bounds[i]."},
    {"snapshot", (PyCFunction)(void (*)(void))Histogram_snapshot, METH_VARARGS | METH_KEYWORDS,
     "snapshot(reset_interval=False)\n--\n\n(bucket counts, sum, min, max, interval min, interval max), read "
     "consistently; ``reset_interval`` starts a new interval for min and max."},
    {"bind", (PyCFunction)(void (*)(void))Histogram_bind, METH_VARARGS | METH_KEYWORDS,
     "bind(buffer, offset, carry=True)\n--\n\nKeep the cells (bucket counts as uint64, then sum, min, max as "
     "doubles, then the exemplar slots if any) in the writable ``buffer`` at ``offset`` from now on, with what "
     "was counted so far unless ``carry`` is false."},
    {"observe_exemplar", (PyCFunction)(void (*)(void))Histogram_observe_exemplar, METH_FASTCALL,
     "observe_exemplar(value, trace_id, span_id)\n--\n\nObserve ``value`` and keep it, with the time and the "
     "ids, as the exemplar of its bucket (with exemplar cells)."},
    {"native", (PyCFunction)Histogram_native, METH_NOARGS,
     "native()\n--\n\n(schema, zero threshold, zero count, offset, bucket counts from key offset) of the native "
     "histogram, or None without one."},
    {"exemplars", (PyCFunction)Histogram_exemplars, METH_NOARGS,
     "exemplars()\n--\n\nPer bucket, None or (value, Unix time, trace id, span id) of its latest exemplar."},
    {NULL}
};

static PyGetSetDef Histogram_getset[] = {
    {"count", (getter)Histogram_get_count, NULL, "Observations so far.", NULL},
    {"cells_size", (getter)Histogram_get_cells_size, NULL, "Bytes that bind() needs in its buffer.", NULL},
    {"bounds", (getter)Histogram_get_bounds, NULL, "The upper bounds of the buckets (the last bucket has none).", NULL},
    MIRROR_GETSET(Histogram, "Called with every observed value too, when set (see series.set_mirror_factory)."),
    {NULL}
};

static PyTypeObject HistogramType =
    CELL_TYPE(Histogram, "Cumulative explicit-bucket histogram of one label set; observe() is the hot path.");

/* -------------------------------------------------------------------------------------------------- Counter */

/* One signed 64-bit cell: a counter (add) or the requests in flight (increment, decrement: one C call each, as
 * the HTTP recorder makes them on every request). Like a histogram's, the cell may be bound into a shared buffer;
 * its layout there is one native int64. */
typedef struct {
    PyObject_HEAD
    long long *cell; /* &own, or in view */
    long long own;
    PyObject *mirror; /* callable or NULL: sees what add() adds */
    Py_buffer view;
} CounterObject;

static int
Counter_init(CounterObject *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, ":Counter", kwlist))
        return -1;
    if (self->cell == NULL) {
        self->own = 0;
        self->cell = &self->own;
    }
    return 0;
}

GC_FIELDS(Counter, MIRROR_FIELDS)

static void
Counter_dealloc(CounterObject *self)
{
    PyObject_GC_UnTrack(self);
    Counter_clear(self);
    if (self->view.obj != NULL)
        PyBuffer_Release(&self->view);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static inline long long *
counter_cell(CounterObject *self)
{
    if (self->cell == NULL) { /* a subclass that did not call __init__: count in the object itself */
        self->own = 0;
        self->cell = &self->own;
    }
    return self->cell;
}

static PyObject *
Counter_add(CounterObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "add() takes at most one argument");
        return NULL;
    }
    PyObject *amount = nargs ? args[0] : NULL;
    long long n = 1;
    if (amount != NULL) {
        n = PyLong_AsLongLong(amount);
        if (n == -1 && PyErr_Occurred())
            return NULL;
    }
    *counter_cell(self) += n;
    if (self->mirror != NULL) {
        PyObject *value = amount != NULL ? Py_NewRef(amount) : PyLong_FromLongLong(n);
        int failed = value == NULL || call_mirror(self->mirror, value) < 0;
        Py_XDECREF(value);
        if (failed)
            return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
Counter_increment(CounterObject *self, PyObject *unused)
{
    *counter_cell(self) += 1;
    Py_RETURN_NONE;
}

static PyObject *
Counter_decrement(CounterObject *self, PyObject *unused)
{
    *counter_cell(self) -= 1;
    Py_RETURN_NONE;
}

static PyObject *
Counter_bind(CounterObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *buffer;
    Py_ssize_t offset;
    int carry = 1;
    static char *kwlist[] = {"buffer", "offset", "carry", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "On|p:bind", kwlist, &buffer, &offset, &carry))
        return NULL;
    Py_buffer view;
    char *at = cells_place("Counter", buffer, offset, (Py_ssize_t)sizeof(long long), &view);
    if (at == NULL)
        return NULL;
    long long *cell = (long long *)at;
    *cell = carry ? *counter_cell(self) : 0;
    self->cell = cell;
    if (self->view.obj != NULL)
        PyBuffer_Release(&self->view);
    self->view = view;
    Py_RETURN_NONE;
}

static PyObject *
Counter_get_value(CounterObject *self, void *closure)
{
    return PyLong_FromLongLong(*counter_cell(self));
}

static PyObject *
Counter_get_cells_size(CounterObject *self, void *closure)
{
    return PyLong_FromSsize_t(sizeof(long long));
}

static PyMethodDef Counter_methods[] = {
    {"add", (PyCFunction)(void (*)(void))Counter_add, METH_FASTCALL,
     "add(amount=1)\n--\n\nAdd ``amount`` (an int); the mirror, if any, sees it too."},
    {"increment", (PyCFunction)Counter_increment, METH_NOARGS, "increment()\n--\n\nOne more (no mirror)."},
    {"decrement", (PyCFunction)Counter_decrement, METH_NOARGS, "decrement()\n--\n\nOne less (no mirror)."},
    {"bind", (PyCFunction)(void (*)(void))Counter_bind, METH_VARARGS | METH_KEYWORDS,
     "bind(buffer, offset, carry=True)\n--\n\nKeep the cell (one int64) in the writable ``buffer`` at ``offset`` "
     "from now on, with its value so far unless ``carry`` is false."},
    {NULL}
};

static PyGetSetDef Counter_getset[] = {
    {"value", (getter)Counter_get_value, NULL, "The count.", NULL},
    {"cells_size", (getter)Counter_get_cells_size, NULL, "Bytes that bind() needs in its buffer.", NULL},
    MIRROR_GETSET(Counter, "Called with every amount add() adds, when set (see series.set_mirror_factory)."),
    {NULL}
};

static PyTypeObject CounterType =
    CELL_TYPE(Counter, "A 64-bit count of one label set: add(), increment(), decrement().");

/* ------------------------------------------------------------------------------------------ HTTP requests */

/* What the ASGI middleware keeps for one request: its method, when it started, its in-flight decrement, and
 * (as the ``send`` it hands to the app) the response status. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *recorder; /* HTTPRecorderObject */
    PyObject *send;
    PyObject *method;
    PyObject *decrement;
    PyObject *status; /* int; 500 until the app starts a response */
    PyObject *scope;  /* the request's scope, where the router leaves the route it matched */
    PyObject *span;   /* the request's recording span, or NULL: its duration becomes an exemplar of it */
    PyObject *last_send; /* NULL, or a callable sending the response's last message: last_send(send, message) */
    int64_t started_ns;
    int traced;       /* a header the trace propagators read is present */
    int finished;
} RequestObject;

typedef struct {
    PyObject_HEAD
    PyObject *metrics;        /* kserve_otel.request_path.request_spans.HTTPServerMetrics */
    PyObject *active_series;  /* its dict method -> in-flight series */
    PyObject *duration_series;/* its dict (method, route, status) -> duration series */
    PyObject *known_methods;  /* frozenset of str */
    PyObject *trace_fields;   /* callable returning the frozenset of header names (bytes) */
    PyObject *watch_dict;     /* optional: trace_fields() is cached while watch_dict[watch_key] stays the same */
    PyObject *watch_key;
    PyObject *fields_for;     /* the watched object the cache was filled for */
    PyObject *fields_cache;
} HTTPRecorderObject;

static PyTypeObject RequestType;
static PyTypeObject HTTPRecorderType;

static PyObject *str_type, *str_method, *str_headers, *str_route, *str_path, *str_status, *str_other,
    *str_response_start, *str_response_body, *str_more_body, *str_increment, *str_decrement, *str_active, *str_duration, *str_observe_traced, *str_empty, *int_500;

/* The dealloc of a type whose only resources are the object fields its tp_clear clears. */
#define GC_DEALLOC(Type)                                                                             \
    static void Type##_dealloc(Type##Object *self)                                                   \
    {                                                                                                \
        PyObject_GC_UnTrack(self);                                                                   \
        Type##_clear(self);                                                                          \
        Py_TYPE(self)->tp_free((PyObject *)self);                                                    \
    }

#define REQUEST_FIELDS(X) X(recorder) X(send) X(method) X(decrement) X(status) X(scope) X(span) X(last_send)
GC_FIELDS(Request, REQUEST_FIELDS)
GC_DEALLOC(Request)

/* The ``send`` the app gets: note the status of ``http.response.start``, then return send(message). */
static PyObject *Request_finish(RequestObject *self, PyObject *scope);

static PyObject *
Request_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    RequestObject *self = (RequestObject *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) != 0)) {
        PyErr_SetString(PyExc_TypeError, "send() takes exactly one positional argument");
        return NULL;
    }
    PyObject *message = args[0];
    if (PyDict_Check(message)) {
        PyObject *type = PyDict_GetItemWithError(message, str_type);
        if (type == NULL && PyErr_Occurred())
            return NULL;
        if (type != NULL && PyUnicode_Check(type) &&
            (type == str_response_start || PyUnicode_Compare(type, str_response_start) == 0)) {
            PyObject *status = PyDict_GetItemWithError(message, str_status);
            if (status == NULL && PyErr_Occurred())
                return NULL;
            if (status != NULL)
                Py_SETREF(self->status, Py_NewRef(status));
        } else if (!self->finished && type != NULL && PyUnicode_Check(type) &&
                   (type == str_response_body || PyUnicode_Compare(type, str_response_body) == 0)) {
            /* The response's last message: the request is counted before the client can see its end, so
             * a process killed right after still counted every request a client saw answered. */
            PyObject *more = PyDict_GetItemWithError(message, str_more_body);
            if (more == NULL && PyErr_Occurred())
                return NULL;
            int more_body = more != NULL ? PyObject_IsTrue(more) : 0;
            if (more_body < 0)
                return NULL;
            if (!more_body) {
                PyObject *scope = Py_XNewRef(self->scope); /* finish lets go of self->scope */
                PyObject *r = Request_finish(self, scope != NULL ? scope : Py_None);
                Py_XDECREF(scope);
                if (r == NULL)
                    return NULL;
                Py_DECREF(r);
                if (self->last_send != NULL) {
                    PyObject *last_send = self->last_send;
                    self->last_send = NULL; /* once */
                    PyObject *sent = PyObject_CallFunctionObjArgs(last_send, self->send, message, NULL);
                    Py_DECREF(last_send);
                    return sent;
                }
            }
        }
    }
    return PyObject_CallOneArg(self->send, message);
}

/* finish(scope): the request is over. Steps the in-flight count down and observes the duration in the series
 * of (method, route template, status); the route template is ``scope["route"].path`` (Starlette, FastAPI), ""
 * without a router. Idempotent. */
static PyObject *
Request_finish(RequestObject *self, PyObject *scope)
{
    if (self->finished)
        Py_RETURN_NONE;
    self->finished = 1;
    Py_CLEAR(self->scope); /* the caller holds the scope it passed */
    double elapsed = (double)(now_ns() - self->started_ns) / 1e9;
    HTTPRecorderObject *recorder = (HTTPRecorderObject *)self->recorder;

    PyObject *r = PyObject_CallNoArgs(self->decrement);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);

    PyObject *route = NULL; /* new reference */
    if (PyDict_Check(scope)) {
        PyObject *matched = PyDict_GetItemWithError(scope, str_route);
        if (matched == NULL && PyErr_Occurred())
            return NULL;
        if (matched != NULL && matched != Py_None) {
            if (optional_attr(matched, str_path, &route) < 0)
                return NULL;
            if (route != NULL && !PyUnicode_Check(route))
                Py_CLEAR(route);
        }
    }
    if (route == NULL)
        route = Py_NewRef(str_empty);

    PyObject *key = PyTuple_Pack(3, self->method, route, self->status);
    if (key == NULL) {
        Py_DECREF(route);
        return NULL;
    }
    PyObject *series = PyDict_GetItemWithError(recorder->duration_series, key); /* borrowed */
    Py_XINCREF(series);
    Py_DECREF(key);
    if (series == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(route);
            return NULL;
        }
        series = PyObject_CallMethodObjArgs(recorder->metrics, str_duration, self->method, route, self->status, NULL);
        if (series == NULL) {
            Py_DECREF(route);
            return NULL;
        }
    }
    Py_DECREF(route);
    PyObject *value = PyFloat_FromDouble(elapsed);
    if (value == NULL) {
        Py_DECREF(series);
        return NULL;
    }
    int failed;
    if (self->span != NULL) { /* a recorded request: metrics.observe_traced keeps the exemplar */
        PyObject *span = self->span;
        self->span = NULL;
        PyObject *res = PyObject_CallMethodObjArgs(recorder->metrics, str_observe_traced, series, value, span, NULL);
        Py_DECREF(span);
        failed = res == NULL;
        Py_XDECREF(res);
    } else if (PyObject_TypeCheck(series, &HistogramType)) {
        failed = histogram_observe((HistogramObject *)series, value) < 0;
    } else {
        PyObject *res = PyObject_CallMethod(series, "observe", "O", value);
        failed = res == NULL;
        Py_XDECREF(res);
    }
    Py_DECREF(value);
    Py_DECREF(series);
    if (failed)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
Request_get_status(RequestObject *self, void *closure)
{
    return Py_NewRef(self->status);
}

static PyObject *
Request_get_traced(RequestObject *self, void *closure)
{
    return PyBool_FromLong(self->traced);
}

static PyObject *
Request_get_method(RequestObject *self, void *closure)
{
    return Py_NewRef(self->method);
}

static PyObject *
Request_get_span(RequestObject *self, void *closure)
{
    return Py_NewRef(self->span != NULL ? self->span : Py_None);
}

static int
Request_set_span(RequestObject *self, PyObject *value, void *closure)
{
    Py_XSETREF(self->span, value == NULL || value == Py_None ? NULL : Py_NewRef(value));
    return 0;
}

static PyObject *
Request_get_last_send(RequestObject *self, void *closure)
{
    return Py_NewRef(self->last_send != NULL ? self->last_send : Py_None);
}

static int
Request_set_last_send(RequestObject *self, PyObject *value, void *closure)
{
    Py_XSETREF(self->last_send, value == NULL || value == Py_None ? NULL : Py_NewRef(value));
    return 0;
}

static PyMethodDef Request_methods[] = {
    {"finish", (PyCFunction)Request_finish, METH_O,
     "finish(scope)\n--\n\nThe request is over: one in flight less, and its duration observed by method, route "
     "template and status. Calls after the first do nothing."},
    {NULL}
};

static PyGetSetDef Request_getset[] = {
    {"status", (getter)Request_get_status, NULL, "The response status (500 until the app starts a response).", NULL},
    {"traced", (getter)Request_get_traced, NULL, "Whether a header the trace propagators read is present.", NULL},
    {"method", (getter)Request_get_method, NULL, "The request's method, or _OTHER.", NULL},
    {"span", (getter)Request_get_span, (setter)Request_set_span,
     "The request's recording span (None by default): finish() then observes the duration through "
     "metrics.observe_traced(series, seconds, span), which keeps its exemplar.", NULL},
    {"last_send", (getter)Request_get_last_send, (setter)Request_set_last_send,
     "None, or what sends the response's last message in place of send: last_send(send, message) returns the "
     "awaitable (called once).", NULL},
    {NULL}
};

static PyTypeObject RequestType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kserve_otel.recording._speedups.Request",
    .tp_doc = PyDoc_STR("One HTTP request being recorded; call it as the app's send()."),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    GC_TYPE_SLOTS(Request),
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(RequestObject, vectorcall),
    .tp_getset = Request_getset,
};

static int
HTTPRecorder_init(HTTPRecorderObject *self, PyObject *args, PyObject *kwds)
{
    PyObject *metrics, *known, *fields, *watch_dict = NULL, *watch_key = NULL;
    static char *kwlist[] = {"metrics", "known_methods", "trace_fields", "watch_dict", "watch_key", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOO|OO:HTTPRecorder", kwlist, &metrics, &known, &fields,
                                     &watch_dict, &watch_key))
        return -1;
    if (watch_dict == Py_None)
        watch_dict = NULL;
    if (watch_dict != NULL && (!PyDict_Check(watch_dict) || watch_key == NULL)) {
        PyErr_SetString(PyExc_TypeError, "watch_dict must be a dict, given with watch_key");
        return -1;
    }
    PyObject *active = PyObject_GetAttrString(metrics, "active_series");
    if (active == NULL)
        return -1;
    PyObject *durations = PyObject_GetAttrString(metrics, "duration_series");
    if (durations == NULL) {
        Py_DECREF(active);
        return -1;
    }
    if (!PyDict_Check(active) || !PyDict_Check(durations)) {
        PyErr_SetString(PyExc_TypeError, "metrics.active_series and metrics.duration_series must be dicts");
        Py_DECREF(active);
        Py_DECREF(durations);
        return -1;
    }
    PyObject *known_set = PyFrozenSet_New(known);
    if (known_set == NULL) {
        Py_DECREF(active);
        Py_DECREF(durations);
        return -1;
    }
    Py_XSETREF(self->metrics, Py_NewRef(metrics));
    Py_XSETREF(self->active_series, active);
    Py_XSETREF(self->duration_series, durations);
    Py_XSETREF(self->known_methods, known_set);
    Py_XSETREF(self->trace_fields, Py_NewRef(fields));
    Py_XSETREF(self->watch_dict, Py_XNewRef(watch_dict));
    Py_XSETREF(self->watch_key, watch_dict != NULL ? Py_NewRef(watch_key) : NULL);
    Py_CLEAR(self->fields_for);
    Py_CLEAR(self->fields_cache);
    return 0;
}

#define HTTP_RECORDER_FIELDS(X) X(metrics) X(active_series) X(duration_series) X(known_methods) X(trace_fields) \
    X(watch_dict) X(watch_key) X(fields_for) X(fields_cache)
GC_FIELDS(HTTPRecorder, HTTP_RECORDER_FIELDS)
GC_DEALLOC(HTTPRecorder)

/* Whether any header name of ``headers`` (an ASGI list of (name, value) pairs) is in ``fields``. */
static int
has_trace_header(PyObject *headers, PyObject *fields)
{
    if (headers == NULL)
        return 0;
    if (!PyAnySet_Check(fields)) {
        PyErr_SetString(PyExc_TypeError, "trace_fields() must return a frozenset of header names");
        return -1;
    }
    PyObject *seq = PySequence_Fast(headers, "scope['headers'] must be a sequence");
    if (seq == NULL)
        return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    int found = 0;
    for (Py_ssize_t i = 0; i < n && !found; i++) {
        PyObject *pair = items[i];
        PyObject *name;
        if (PyTuple_Check(pair) && PyTuple_GET_SIZE(pair) >= 1)
            name = PyTuple_GET_ITEM(pair, 0);
        else if (PyList_Check(pair) && PyList_GET_SIZE(pair) >= 1)
            name = PyList_GET_ITEM(pair, 0);
        else
            continue;
        int contains = PySet_Contains(fields, name);
        if (contains < 0) {
            PyErr_Clear(); /* an unhashable name is no trace header */
            continue;
        }
        found = contains;
    }
    Py_DECREF(seq);
    return found;
}

/* The header names the trace propagators read (new reference): cached while the watched object stays. */
static PyObject *
recorder_fields(HTTPRecorderObject *self)
{
    if (self->trace_fields == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "HTTPRecorder.__init__ was not called");
        return NULL;
    }
    PyObject *current = NULL;
    if (self->watch_dict != NULL) {
        current = PyDict_GetItemWithError(self->watch_dict, self->watch_key); /* borrowed */
        if (current == NULL && PyErr_Occurred())
            return NULL;
        if (current != NULL && current == self->fields_for && self->fields_cache != NULL)
            return Py_NewRef(self->fields_cache);
    }
    PyObject *fields = PyObject_CallNoArgs(self->trace_fields);
    if (fields != NULL && current != NULL) {
        Py_XSETREF(self->fields_for, Py_NewRef(current));
        Py_XSETREF(self->fields_cache, Py_NewRef(fields));
    }
    return fields;
}

/* start(scope, send) -> Request: one more request in flight, its clock started. */
static PyObject *
HTTPRecorder_start(HTTPRecorderObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "start() takes exactly two arguments (scope, send)");
        return NULL;
    }
    PyObject *scope = args[0], *send = args[1];
    if (self->metrics == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "HTTPRecorder.__init__ was not called");
        return NULL;
    }
    if (!PyDict_Check(scope)) {
        PyErr_SetString(PyExc_TypeError, "scope must be a dict");
        return NULL;
    }
    PyObject *method = PyDict_GetItemWithError(scope, str_method);
    if (method == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_KeyError, "method");
        return NULL;
    }
    int known = PySet_Contains(self->known_methods, method);
    if (known < 0) {
        PyErr_Clear();
        known = 0;
    }
    if (!known)
        method = str_other;
    Py_INCREF(method);

    PyObject *active = PyDict_GetItemWithError(self->active_series, method); /* borrowed */
    Py_XINCREF(active);
    if (active == NULL) {
        if (PyErr_Occurred()) {
            Py_DECREF(method);
            return NULL;
        }
        active = PyObject_CallMethodOneArg(self->metrics, str_active, method);
        if (active == NULL) {
            Py_DECREF(method);
            return NULL;
        }
    }
    PyObject *decrement = PyObject_GetAttr(active, str_decrement);
    PyObject *increment = decrement != NULL ? PyObject_GetAttr(active, str_increment) : NULL;
    Py_DECREF(active);
    if (increment == NULL) {
        Py_XDECREF(decrement);
        Py_DECREF(method);
        return NULL;
    }

    int traced = 0;
    PyObject *fields = recorder_fields(self);
    if (fields == NULL) {
        Py_DECREF(increment);
        Py_DECREF(decrement);
        Py_DECREF(method);
        return NULL;
    }
    PyObject *headers = PyDict_GetItemWithError(scope, str_headers);
    if (headers == NULL && PyErr_Occurred()) {
        traced = -1;
    } else {
        traced = has_trace_header(headers, fields);
    }
    Py_DECREF(fields);
    if (traced < 0) {
        Py_DECREF(increment);
        Py_DECREF(decrement);
        Py_DECREF(method);
        return NULL;
    }

    RequestObject *r = PyObject_GC_New(RequestObject, &RequestType);
    if (r == NULL) {
        Py_DECREF(increment);
        Py_DECREF(decrement);
        Py_DECREF(method);
        return NULL;
    }
    r->vectorcall = Request_vectorcall;
    r->recorder = Py_NewRef((PyObject *)self);
    r->send = Py_NewRef(send);
    r->method = method;
    r->decrement = decrement;
    r->status = Py_NewRef(int_500);
    r->scope = Py_NewRef(scope);
    r->span = NULL;
    r->last_send = NULL;
    r->traced = traced;
    r->finished = 0;
    PyObject_GC_Track(r);

    PyObject *res = PyObject_CallNoArgs(increment);
    Py_DECREF(increment);
    if (res == NULL) {
        r->finished = 1; /* not counted in: never counted out */
        Py_DECREF(r);
        return NULL;
    }
    Py_DECREF(res);
    r->started_ns = now_ns();
    return (PyObject *)r;
}

static PyMethodDef HTTPRecorder_methods[] = {
    {"start", (PyCFunction)(void (*)(void))HTTPRecorder_start, METH_FASTCALL,
     "start(scope, send)\n--\n\nA request begins: one more in flight, its clock started. Returns the Request to "
     "hand to the app as its send, and to finish(scope) when the request is over."},
    {NULL}
};

static PyTypeObject HTTPRecorderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kserve_otel.recording._speedups.HTTPRecorder",
    .tp_doc = PyDoc_STR("HTTPRecorder(metrics, known_methods, trace_fields): records HTTP server requests into "
                        "an HTTPServerMetrics."),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)HTTPRecorder_init,
    GC_TYPE_SLOTS(HTTPRecorder),
};

/* ------------------------------------------------------------------------------------------------- module */

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT, "kserve_otel.recording._speedups",
    "The request path's bookkeeping in C; kserve_otel.recording.speedups chooses it or its pure-Python twin.", -1, NULL,
};

#define INTERN(var, text) \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC
PyInit__speedups(void)
{
    INTERN(str_type, "type");
    INTERN(str_method, "method");
    INTERN(str_headers, "headers");
    INTERN(str_route, "route");
    INTERN(str_path, "path");
    INTERN(str_status, "status");
    INTERN(str_other, "_OTHER");
    INTERN(str_response_start, "http.response.start");
    INTERN(str_response_body, "http.response.body");
    INTERN(str_more_body, "more_body");
    INTERN(str_increment, "increment");
    INTERN(str_decrement, "decrement");
    INTERN(str_active, "active");
    INTERN(str_duration, "duration");
    INTERN(str_observe_traced, "observe_traced");
    INTERN(str_empty, "");
    if ((int_500 = PyLong_FromLong(500)) == NULL || (sixty_four = PyLong_FromLong(64)) == NULL)
        return NULL;

    native_bounds_fill();
    if (PyType_Ready(&HistogramType) < 0 || PyType_Ready(&CounterType) < 0 || PyType_Ready(&RequestType) < 0 || PyType_Ready(&HTTPRecorderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&speedups_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Histogram", (PyObject *)&HistogramType) < 0 ||
        PyModule_AddObjectRef(m, "Counter", (PyObject *)&CounterType) < 0 ||
        PyModule_AddObjectRef(m, "Request", (PyObject *)&RequestType) < 0 ||
        PyModule_AddObjectRef(m, "HTTPRecorder", (PyObject *)&HTTPRecorderType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
