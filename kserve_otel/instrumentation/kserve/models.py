"""Every ``kserve.Model`` subclass, present and future, gets its step handlers wrapped by ``instrument_step``.

KServe's ``Model.__call__`` calls ``self.preprocess``, ``self.predict`` (or ``self.explain``) and
``self.postprocess``, and awaits each only if ``inspect.iscoroutinefunction`` says so. Those handlers are
wrapped where they are defined, on each class (never on instances, which are pickled into worker processes):
``kserve.Model`` itself, every subclass that exists when :func:`patch_models` runs, and every subclass defined
later, through a ``Model.__init_subclass__`` hook. The wrappers are ``instrument_step``'s, so the KServe path
and the decorator share one hot path; a handler that calls ``super().predict(...)`` is recorded once.

KServe's own prometheus_client histograms (``kserve.metrics``) would time the same steps a second time under
the same names: while instrumented, ``kserve.model`` sees no-op stand-ins and the histograms leave
prometheus_client's global registry. :func:`unpatch_models` puts everything back, histograms and their
counts included.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ...export.exposition import GLOBAL_REGISTRY_WINS
from ...request_path.steps import STEP_ATTRIBUTE, instrument_step

_logger = logging.getLogger(__name__)

#: The handlers ``Model.__call__`` times, by the name of the ``kserve.model`` global that times each.
STEP_TIMERS = {
    "preprocess": "PRE_HIST_TIME",
    "predict": "PREDICT_HIST_TIME",
    "postprocess": "POST_HIST_TIME",
    "explain": "EXPLAIN_HIST_TIME",
}

_ORIGINAL_MARK = "__kserve_otel_original__"


class _NoTimer:
    """Stands in for a prometheus_client histogram in ``kserve.model``: ``labels(...).time()`` does nothing."""

    _context = contextlib.nullcontext()

    def labels(self, *args: Any, **kwargs: Any) -> _NoTimer:
        return self

    def time(self) -> contextlib.nullcontext[None]:
        return self._context


_NO_TIMER = _NoTimer()


class ModelPatcher:
    """Wraps the step handlers of ``kserve.Model`` and its subclasses; undoes it exactly."""

    def __init__(self) -> None:
        self._patched: list[tuple[type, str, Any]] = []  # (class, handler name, what the class had)
        self._timers: dict[str, Any] = {}
        self._had_init_subclass = False
        self._init_subclass: Any = None
        self.active = False

    def patch(self) -> None:
        import kserve.model as kserve_model
        from prometheus_client import REGISTRY

        model_cls = kserve_model.Model
        self._had_init_subclass = "__init_subclass__" in model_cls.__dict__
        self._init_subclass = model_cls.__dict__.get("__init_subclass__")
        patcher = self

        def __init_subclass__(cls: type, **kwargs: Any) -> None:  # noqa: N807 - the hook's own name
            super(model_cls, cls).__init_subclass__(**kwargs)
            if patcher.active:
                patcher.patch_class(cls)

        model_cls.__init_subclass__ = classmethod(__init_subclass__)  # type: ignore[assignment]
        self.active = True
        for cls in _subclasses(model_cls):
            self.patch_class(cls)

        for global_name in STEP_TIMERS.values():
            histogram = getattr(kserve_model, global_name)
            self._timers[global_name] = histogram
            setattr(kserve_model, global_name, _NO_TIMER)
            with contextlib.suppress(KeyError):  # not registered (another registry, or unregistered by hand)
                REGISTRY.unregister(histogram)
            GLOBAL_REGISTRY_WINS.discard(histogram._name)

    def patch_class(self, cls: type) -> None:
        """Wrap the handlers ``cls`` itself defines (inherited ones are wrapped on the class defining them)."""
        for step in STEP_TIMERS:
            handler = cls.__dict__.get(step)
            if handler is None or getattr(handler, STEP_ATTRIBUTE, None) == step:
                continue  # not defined here, or decorated by the model's author already
            try:
                wrapped = instrument_step(step)(handler)
            except TypeError:  # not a callable (a model may shadow a handler with data): leave it alone
                continue
            setattr(wrapped, _ORIGINAL_MARK, handler)
            setattr(cls, step, wrapped)
            self._patched.append((cls, step, handler))

    def unpatch(self) -> None:
        import kserve.model as kserve_model
        from prometheus_client import REGISTRY

        self.active = False
        model_cls = kserve_model.Model
        if self._had_init_subclass:
            model_cls.__init_subclass__ = self._init_subclass  # type: ignore[method-assign]
        elif "__init_subclass__" in model_cls.__dict__:
            del model_cls.__init_subclass__
        for cls, step, handler in reversed(self._patched):
            current = cls.__dict__.get(step)
            if getattr(current, _ORIGINAL_MARK, None) is handler:
                setattr(cls, step, handler)
        self._patched.clear()
        for global_name, histogram in self._timers.items():
            setattr(kserve_model, global_name, histogram)
            GLOBAL_REGISTRY_WINS.add(histogram._name)  # counting again; this package's family stands still
            try:
                REGISTRY.register(histogram)
            except ValueError:  # already registered again by someone else
                _logger.debug("kserve-otel: %s was registered already", global_name)
        self._timers.clear()

    @property
    def patched_steps(self) -> list[tuple[str, str]]:
        """(class qualname, step) of every handler wrapped so far, for the start-up summary."""
        return [(cls.__qualname__, step) for cls, step, _ in self._patched]


def _subclasses(cls: type) -> list[type]:
    """``cls`` and every subclass of it, depth first, each once."""
    seen: dict[type, None] = {cls: None}
    stack = [cls]
    while stack:
        for sub in stack.pop().__subclasses__():
            if sub not in seen:
                seen[sub] = None
                stack.append(sub)
    return list(seen)
