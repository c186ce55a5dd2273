"""``@instrument_step``: time a model step, record it as an OpenTelemetry histogram, and run it in a span.

One wrapper per kind of callable, chosen once at decoration time, so that the wrapper keeps the callable's
nature (KServe awaits a handler only if ``inspect.iscoroutinefunction`` says so) and its signature
(``functools.wraps`` sets ``__wrapped__``). The wrappers are plain closures rather than ``wrapt`` proxies:
they cost a fraction of a wrapt pass-through, and unlike wrapt proxies they survive cloudpickle into Ray
Serve replicas and KServe worker processes.

Every call, whatever the kind:

* observes its duration in seconds in the step's histogram ``request_<step>`` (Prometheus:
  ``request_<step>_seconds{model_name=...}``, KServe's buckets);
* runs inside a span named ``"<step> <model>"``, a child of the current span;
* on an exception (cancellation included) records the duration, marks the span with the exception and
  error status, adds one to ``request_step_errors_total{model_name, step, error_type}``, and re-raises the
  very same exception;
* for generators and async generators (and for steps that *return* one, as KServe's streaming predict
  does) times until the last item, or until the consumer closes or abandons the iterator, and records the
  time to the first item in ``request_time_to_first_item_seconds{model_name, step}``.

Observations made before :func:`kserve_otel.configure` are kept and appear in the first export after it.

Memory is bounded by the series cap, not by the model names a server sees: the per-model details of a step
(:class:`_ModelInfo`) are cached only for names that have a series of their own. Once a step's family holds
:data:`kserve_otel.recording.series.CARDINALITY_LIMIT` series, a new name is counted in the family's overflow
series and nothing is kept for it: its details are rebuilt at each call (a few microseconds, only past the
cap). Its span still carries the real model name: spans are not metrics, and a trace is where one looks for
one model.
"""

from __future__ import annotations

import functools
import inspect
import sys
import types
from collections.abc import AsyncGenerator, Callable, Generator
from contextvars import ContextVar
from time import perf_counter
from typing import Any, TypeVar, overload

from ..names import (
    ATTR_MODEL_NAME,
    ATTR_STEP,
    ERRORS_INSTRUMENT,
    FIRST_ITEM_INSTRUMENT,
    LABEL_ERROR_TYPE,
    LABEL_MODEL_NAME,
    LABEL_STEP,
    UNIT_SECONDS,
    step_instrument_name,
    validate_step_name,
)
from ..recording.series import REGISTRY, HistogramSeries
from ..recording import exemplars
from ..spans.tracing import SpanHandle, end_step_span, resume, start_step_span, suspend

F = TypeVar("F", bound=Callable[..., Any])

#: Attribute set on every wrapper: the step it records. Integrations use it to avoid instrumenting twice.
STEP_ATTRIBUTE = "__kserve_otel_step__"


#: The attribute of a family's overflow series, where label sets past the series cap are counted.
_OVERFLOW_ATTRIBUTE = "otel.metric.overflow"


class _ModelInfo:
    """What a step needs per model at call time, computed once per (step, model) and shared by every
    callable recording that step for that model (see :data:`_active`), unless the model is past the series cap
    (``kept`` is false: then it is built for one call and dropped)."""

    __slots__ = ("key", "name", "series", "span_name", "span_attributes", "kept")

    def __init__(self, step: str, model: str) -> None:
        self.key = (step, model)
        self.name = model
        self.series: HistogramSeries = REGISTRY.histogram(
            step_instrument_name(step), f"Duration of the {step} step", UNIT_SECONDS, (LABEL_MODEL_NAME,),
            exemplars=True, native=True,
        ).series(model)
        self.span_name = f"{step} {model}"
        self.span_attributes = {ATTR_MODEL_NAME: model, ATTR_STEP: step}
        #: Whether the model has a series of its own; past the cap it shares the overflow series.
        self.kept = not self.series.attributes.get(_OVERFLOW_ATTRIBUTE, False)


#: Details of every (step, model) that has a series of its own: at most the series cap per step.
_infos: dict[tuple[str, str], _ModelInfo] = {}

#: The step being recorded in this context. A step that calls another callable recording the same step of
#: the same model (``super().predict(...)`` in a subclass, both instrumented) is recorded once, by the
#: outermost call: the inner one sees its own ``_ModelInfo`` here and passes straight through.
_active: ContextVar[_ModelInfo | None] = ContextVar("kserve_otel_active_step", default=None)


def _info_for(step: str, model: str) -> _ModelInfo:
    info = _infos.get((step, model))
    if info is None:
        info = _ModelInfo(step, model)
        if info.kept:  # past the series cap nothing is kept per name
            info = _infos.setdefault((step, model), info)
    return info


class StepRecorder:
    """The telemetry of one step of one callable: resolves the model name and records what a call did.

    Integrations that time steps themselves (rather than through the decorator) use the same object, so that
    every way in ends in this one hot path.
    """

    __slots__ = ("step", "model_name", "is_method", "default_model", "fallback_model", "_models", "enter", "leave")

    def __init__(
        self, step: str, model_name: str | None = None, func: Callable[..., Any] | None = None,
        fallback_model: str | None = None,
    ) -> None:
        self.step = validate_step_name(step)
        if model_name is not None and (not isinstance(model_name, str) or not model_name):
            raise ValueError(f"model_name must be a non-empty string, not {model_name!r}")
        self.model_name = model_name
        qualname = getattr(func, "__qualname__", "") or ""
        # A function defined in a class body has a dotted qualname (``Iris.predict``); its first argument is self.
        self.is_method = "." in qualname.rsplit("<locals>.", 1)[-1]
        self.default_model = getattr(func, "__name__", None) or step
        #: Used before the class name for methods of objects without a ``name`` (a Ray Serve deployment's name).
        self.fallback_model = fallback_model
        self._models: dict[str, _ModelInfo] = {}
        #: ``enter(info)`` marks ``info``'s step as the one being recorded in this context and returns the token
        #: for ``leave(token)``. The wrappers reach the context variable through these rather than as a global:
        #: they are closures that cloudpickle copies by value into Ray Serve replicas, and a ContextVar cannot be
        #: pickled (the recorder can: see ``__reduce__``). The variable's own methods, not Python functions
        #: calling them: two calls fewer on every step.
        self.enter: Callable[[_ModelInfo], Any] = _active.set
        self.leave: Callable[[Any], None] = _active.reset

    def __reduce__(self) -> tuple[Any, ...]:
        # Wrappers are pickled with the classes they decorate (cloudpickle into Ray Serve replicas): carry the
        # configuration only; the per-model cache holds series and locks, which belong to this process.
        return _rebuild_recorder, (self.step, self.model_name, self.is_method, self.default_model, self.fallback_model)

    def model_of(self, args: tuple[Any, ...]) -> str:
        """The model name of a call: explicit, else ``self.name``, else the class name, else the function name."""
        if self.model_name is not None:
            return self.model_name
        if self.is_method and args:
            owner = args[0]
            name = getattr(owner, "name", None)
            if isinstance(name, str) and name:
                return name
            if self.fallback_model is not None:
                return self.fallback_model
            return owner.__name__ if isinstance(owner, type) else type(owner).__name__
        return self.default_model

    def info(self, model: str) -> _ModelInfo:
        """Per-model series and span details, created on the first call for ``model`` (and at every call for a
        model past the series cap, for which nothing is kept)."""
        info = self._models.get(model)
        if info is None:
            info = _info_for(self.step, model)
            if info.kept:
                self._models[model] = info
        return info

    def count_error(self, model: str, error: BaseException) -> None:
        """Add one to the error counter of this step and ``model`` for ``error``'s type."""
        REGISTRY.counter(
            ERRORS_INSTRUMENT, "Steps that raised, by model, step and exception type", "", (
                LABEL_MODEL_NAME, LABEL_STEP, LABEL_ERROR_TYPE,
            )
        ).series(model, self.step, type(error).__qualname__).add()

    def first_item(self, model: str, seconds: float) -> None:
        """Record a streaming step's time to its first item."""
        REGISTRY.histogram(
            FIRST_ITEM_INSTRUMENT, "Time from the start of a streaming step to its first item", UNIT_SECONDS,
            (LABEL_MODEL_NAME, LABEL_STEP),
        ).series(model, self.step).observe(seconds)

    def finish(self, info: _ModelInfo, started: float, handle: SpanHandle | None, error: BaseException | None) -> None:
        """Record a finished call that started at ``started`` (``perf_counter``), ending its span."""
        elapsed = perf_counter() - started
        if handle is not None:
            exemplars.observe_in_span(info.series, elapsed, handle[0])
            end_step_span(handle, error)
        elif exemplars.unsampled_too:
            exemplars.observe_in_current_span(info.series, elapsed)
        else:
            info.series.observe(elapsed)
        if error is not None:
            self.count_error(info.name, error)

    def begin(self, args: tuple[Any, ...]) -> tuple[_ModelInfo, SpanHandle | None] | None:
        """Resolve the model of a call and start its span; ``None`` when the same step of the same model is
        already being recorded in this context (the call is then not recorded again)."""
        model = self.model_of(args)
        info = self._models.get(model) or self.info(model)
        active = _active.get()
        if active is not None and (active is info or active.key == info.key):  # equal keys: past the cap
            return None
        return info, start_step_span(info.span_name, info.span_attributes)


def _rebuild_recorder(
    step: str, model_name: str | None, is_method: bool, default_model: str, fallback_model: str | None
) -> StepRecorder:
    recorder = StepRecorder(step, model_name, fallback_model=fallback_model)
    recorder.is_method, recorder.default_model = is_method, default_model
    if "ray.serve" in sys.modules:  # unpickled with a deployment's class into a Ray Serve replica, most likely
        from ..instrumentation.ray_serve.adoption import adopt_unpickled_steps

        adopt_unpickled_steps()
    return recorder


# --------------------------------------------------------------------------------------------- iterators


def _timed_generator(
    recorder: StepRecorder, info: _ModelInfo, handle: SpanHandle | None, started: float, gen: Generator[Any, Any, Any]
) -> Generator[Any, Any, Any]:
    """Drive ``gen`` for its consumer; the step's span (handed over suspended) is current only while ``gen`` runs."""
    error: BaseException | None = None
    if handle is not None:
        handle = resume(handle)
    first = True
    to_send: Any = None
    to_throw: BaseException | None = None
    try:
        while True:
            try:
                item = gen.send(to_send) if to_throw is None else gen.throw(to_throw)
            except StopIteration as stop:
                return stop.value
            if first:
                first = False
                recorder.first_item(info.name, perf_counter() - started)
            if handle is not None:
                suspend(handle)
            try:
                to_send, to_throw = (yield item), None
            except BaseException as exc:  # noqa: BLE001 - handed to the inner generator, as `yield from` does
                to_send, to_throw = None, exc
            if handle is not None:
                handle = resume(handle)
            if isinstance(to_throw, GeneratorExit):  # the consumer closed or abandoned us
                gen.close()
                return None
    except BaseException as exc:
        error = exc
        raise
    finally:
        recorder.finish(info, started, handle, error)


async def _timed_async_generator(
    recorder: StepRecorder, info: _ModelInfo, handle: SpanHandle | None, started: float,
    agen: AsyncGenerator[Any, Any],
) -> AsyncGenerator[Any, Any]:
    """Drive ``agen`` for its consumer; the step's span (handed over suspended) is current only while ``agen`` runs."""
    error: BaseException | None = None
    if handle is not None:
        handle = resume(handle)
    first = True
    to_send: Any = None
    to_throw: BaseException | None = None
    try:
        while True:
            try:
                if to_throw is None:
                    item = await agen.asend(to_send)
                else:
                    item = await agen.athrow(to_throw)
            except StopAsyncIteration:
                return
            if first:
                first = False
                recorder.first_item(info.name, perf_counter() - started)
            if handle is not None:
                suspend(handle)
            try:
                to_send, to_throw = (yield item), None
            except BaseException as exc:  # noqa: BLE001 - handed to the inner generator
                to_send, to_throw = None, exc
            if handle is not None:
                handle = resume(handle)
            if isinstance(to_throw, GeneratorExit):
                await agen.aclose()
                return
    except BaseException as exc:
        error = exc
        raise
    finally:
        recorder.finish(info, started, handle, error)


def _hand_over(
    recorder: StepRecorder, info: _ModelInfo, handle: SpanHandle | None, started: float, result: Any
) -> Any:
    """A step returned ``result``; if it is a generator the step goes on until it is exhausted."""
    if isinstance(result, types.AsyncGeneratorType):
        if handle is not None:
            suspend(handle)
        return _timed_async_generator(recorder, info, handle, started, result)
    if isinstance(result, types.GeneratorType):
        if handle is not None:
            suspend(handle)
        return _timed_generator(recorder, info, handle, started, result)
    recorder.finish(info, started, handle, None)
    return result


# --------------------------------------------------------------------------------------------- wrappers


def _wrap(func: Callable[..., Any], recorder: StepRecorder) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(func):

        async def async_gen_wrapper(*args: Any, **kwargs: Any) -> AsyncGenerator[Any, Any]:
            begun = recorder.begin(args)
            if begun is None:
                async for item in func(*args, **kwargs):  # already recorded by an outer call
                    yield item
                return
            info, handle = begun
            started = perf_counter()
            try:
                agen = func(*args, **kwargs)
            except BaseException as exc:
                recorder.finish(info, started, handle, exc)
                raise
            if handle is not None:
                suspend(handle)
            timed = _timed_async_generator(recorder, info, handle, started, agen)
            # An async generator has no `yield from`: forward items, sent values and thrown exceptions by hand.
            to_send: Any = None
            to_throw: BaseException | None = None
            try:
                while True:
                    try:
                        if to_throw is None:
                            item = await timed.asend(to_send)
                        else:
                            item = await timed.athrow(to_throw)
                    except StopAsyncIteration:
                        return
                    try:
                        to_send, to_throw = (yield item), None
                    except GeneratorExit:
                        raise
                    except BaseException as exc:  # noqa: BLE001 - handed to the step, as `yield from` does
                        to_send, to_throw = None, exc
            finally:
                await timed.aclose()

        wrapper: Callable[..., Any] = async_gen_wrapper
    elif inspect.isgeneratorfunction(func):

        def gen_wrapper(*args: Any, **kwargs: Any) -> Generator[Any, Any, Any]:
            begun = recorder.begin(args)
            if begun is None:
                return (yield from func(*args, **kwargs))  # already recorded by an outer call
            info, handle = begun
            started = perf_counter()
            try:
                gen = func(*args, **kwargs)
            except BaseException as exc:
                recorder.finish(info, started, handle, exc)
                raise
            if handle is not None:
                suspend(handle)
            return (yield from _timed_generator(recorder, info, handle, started, gen))

        wrapper = gen_wrapper
    elif inspect.iscoroutinefunction(func):

        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            begun = recorder.begin(args)
            if begun is None:
                return await func(*args, **kwargs)  # already recorded by an outer call
            info, handle = begun
            token = recorder.enter(info)
            started = perf_counter()
            try:
                result = await func(*args, **kwargs)
            except BaseException as exc:
                recorder.leave(token)
                recorder.finish(info, started, handle, exc)
                raise
            recorder.leave(token)
            return _hand_over(recorder, info, handle, started, result)

        wrapper = async_wrapper
    else:

        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            begun = recorder.begin(args)
            if begun is None:
                return func(*args, **kwargs)  # already recorded by an outer call
            info, handle = begun
            token = recorder.enter(info)
            started = perf_counter()
            try:
                result = func(*args, **kwargs)
            except BaseException as exc:
                recorder.leave(token)
                recorder.finish(info, started, handle, exc)
                raise
            recorder.leave(token)
            if type(result) in _ITERATOR_TYPES:
                return _hand_over(recorder, info, handle, started, result)
            elapsed = perf_counter() - started
            if handle is not None:
                exemplars.observe_in_span(info.series, elapsed, handle[0])
                end_step_span(handle)
            elif exemplars.unsampled_too:
                exemplars.observe_in_current_span(info.series, elapsed)
            else:
                info.series.observe(elapsed)
            return result

        wrapper = sync_wrapper

    functools.update_wrapper(wrapper, func)
    setattr(wrapper, STEP_ATTRIBUTE, recorder.step)
    return wrapper


_ITERATOR_TYPES = (types.GeneratorType, types.AsyncGeneratorType)


@overload
def instrument_step(step: str, *, model_name: str | None = None) -> Callable[[F], F]: ...
@overload
def instrument_step(step: str, func: F, *, model_name: str | None = None) -> F: ...


def wrap_step(func: Callable[..., Any], step: str, *, fallback_model: str | None = None) -> Callable[..., Any]:
    """Integrations' form of ``instrument_step(step)(func)``: ``fallback_model`` names the model of methods whose
    object has no ``name``, before the class name (a Ray Serve deployment's name)."""
    if getattr(func, STEP_ATTRIBUTE, None) == step:
        return func
    return _wrap(func, StepRecorder(step, None, func, fallback_model))


def instrument_step(step: str, func: Any = None, *, model_name: str | None = None) -> Any:
    """Instrument a model step: ``@instrument_step("predict")`` on a function or method.

    Args:
        step: the step's name, such as ``preprocess``, ``predict``, ``postprocess``, ``explain``, or one of
            your own (``tokenize``); lowercase letters, digits and underscores. It names the histogram
            ``request_<step>_seconds``. Checked here, so a bad name fails at import time.
        func: the callable to wrap, for the call form ``instrument_step("predict", model.predict)``.
        model_name: the ``model_name`` label. Default: ``self.name`` for methods of objects that have a
            ``name`` (KServe models do), else the class name for methods, else the function name.

    Sync functions, coroutine functions, generators and async generators all work, as do ``staticmethod`` and
    ``classmethod`` objects; the wrapper keeps the callable's kind, signature and ``__wrapped__``.
    """
    validate_step_name(step)
    if model_name is not None and (not isinstance(model_name, str) or not model_name):
        raise ValueError(f"instrument_step: model_name must be a non-empty string, not {model_name!r}")

    def decorate(target: Any) -> Any:
        if isinstance(target, (staticmethod, classmethod)):
            return type(target)(decorate(target.__func__))
        if not callable(target):
            raise TypeError(f"instrument_step({step!r}) can only wrap a callable, not {type(target).__name__}")
        if getattr(target, STEP_ATTRIBUTE, None) == step:
            return target  # already instrumented for this step: never count a call twice
        return _wrap(target, StepRecorder(step, model_name, target))

    return decorate if func is None else decorate(func)
