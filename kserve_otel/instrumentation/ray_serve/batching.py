"""``@serve.batch`` methods: per-batch execution time and size, and each request's wait in the batch queue.

``serve.batch`` turns a method taking a list into one taking a single request: each call enqueues its
argument and waits, and a background task calls the original method with a batch of them. The per-request
method is a step like any other (its duration includes the wait). Besides, the batch handler that Serve calls
(``handle_batch_func`` of the decorator's lazy queue, reached through the decorator's own
``set_max_batch_size`` attribute) is wrapped to record, with labels ``model_name`` and ``step``:

* ``request_batch_execution_seconds``: one observation per batch;
* ``request_batch_size``: the number of requests in it;
* ``request_batch_wait_seconds``: for each request, the time from its call to the start of its batch
  (matched by the identity of the enqueued argument, which Serve hands over unchanged).

Batch handlers that are async generators are left as they are (their per-request step is still timed).
"""

from __future__ import annotations

import functools
import inspect
from collections import defaultdict, deque
from collections.abc import Callable
from time import perf_counter
from typing import Any

from ...names import BATCH_WAIT_INSTRUMENT, LABEL_MODEL_NAME, LABEL_STEP, UNIT_SECONDS
from ...recording.series import REGISTRY

BATCH_SIZE_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0)
_LABELS = (LABEL_MODEL_NAME, LABEL_STEP)


def lazy_queue_of(method: Any) -> Any:
    """The lazy batch queue behind a ``@serve.batch`` method, or ``None`` if ``method`` is not one."""
    owner = getattr(getattr(method, "set_max_batch_size", None), "__self__", None)
    return owner if owner is not None and hasattr(owner, "handle_batch_func") else None


def instrument_batch(method: Callable[..., Any], model: str, step: str) -> Callable[..., Any]:
    """Wrap ``method`` (a ``@serve.batch`` method) so that its batches are measured; returns the per-request
    method to install, which remembers when each request was enqueued. ``model`` is the model name of objects
    without a ``name``."""
    queue = lazy_queue_of(method)
    handler = getattr(queue, "handle_batch_func", None)
    if queue is None or not inspect.iscoroutinefunction(handler):
        return method
    execution_family = REGISTRY.histogram("request_batch_execution", "Execution time of a batch", UNIT_SECONDS,
                                          _LABELS)
    size_family = REGISTRY.histogram("request_batch_size", "Requests in a batch", "{request}", _LABELS,
                                     bounds=BATCH_SIZE_BUCKETS)
    wait_family = REGISTRY.histogram(BATCH_WAIT_INSTRUMENT, "Time a request waits in the batch queue",
                                     UNIT_SECONDS, _LABELS)
    enqueued: defaultdict[int, deque[float]] = defaultdict(deque)

    @functools.wraps(handler)
    async def timed_batch(*args: Any, **kwargs: Any) -> Any:
        started = perf_counter()
        name = getattr(args[0], "name", None) if args else None  # the deployment object's, as for steps
        labels = (name if isinstance(name, str) and name else model, step)
        batch = next((arg for arg in args if isinstance(arg, list)), [])
        size_family.series(*labels).observe(float(len(batch)))
        wait = wait_family.series(*labels)
        for item in batch:
            times = enqueued.get(id(item))
            if times:
                wait.observe(started - times.popleft())
                if not times:
                    del enqueued[id(item)]
        try:
            return await handler(*args, **kwargs)
        finally:
            execution_family.series(*labels).observe(perf_counter() - started)

    queue.handle_batch_func = timed_batch

    @functools.wraps(method)
    async def enqueue(*args: Any, **kwargs: Any) -> Any:
        item = next(iter(kwargs.values()), None) if len(args) < 2 else args[1]
        enqueued[id(item)].append(perf_counter())
        return await method(*args, **kwargs)

    return keep_serve_method_check(enqueue, method)


def keep_serve_method_check(wrapper: Callable[..., Any], batch_method: Callable[..., Any]) -> Callable[..., Any]:
    """Let ``wrapper`` stand in for the ``@serve.batch`` method ``batch_method``. Serve recognises a method
    call (and leaves ``self`` out of the batched arguments) by finding, on ``self``, a method whose
    ``__wrapped__`` is the function it decorated: point ``wrapper.__wrapped__`` there too."""
    wrapper.__wrapped__ = getattr(batch_method, "__wrapped__", batch_method)  # type: ignore[attr-defined]
    for attribute in ("set_max_batch_size", "set_batch_wait_timeout_s", "_get_max_batch_size",
                      "_get_batch_wait_timeout_s"):
        if hasattr(batch_method, attribute):
            setattr(wrapper, attribute, getattr(batch_method, attribute))
    return wrapper
