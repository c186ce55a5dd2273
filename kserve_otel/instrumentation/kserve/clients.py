"""Outgoing calls from a transformer to its predictor (or explainer) carry the trace context.

KServe forwards only ``x-request-id``, ``x-b3-traceid`` and ``authorization`` to ``predictor_host``; a W3C
``traceparent`` is dropped, so transformer and predictor spans end up in two traces. The clients KServe uses
for that call (``InferenceRESTClient.infer``/``explain``, ``InferenceGRPCClient.infer``) are wrapped so that the
current context (the transformer's predict span) is written into the outgoing headers or gRPC metadata.
"""

from __future__ import annotations

import inspect
from typing import Any

from opentelemetry.instrumentation.utils import unwrap
from wrapt import wrap_function_wrapper

from ...spans import propagation

#: (class in ``kserve.inference_client``, method) pairs whose ``headers`` argument gets the trace context.
TARGETS = (
    ("InferenceRESTClient", "infer"),
    ("InferenceRESTClient", "explain"),
    ("InferenceGRPCClient", "infer"),
)


def _headers_index(func: Any) -> int | None:
    """Position of ``headers`` among the positional arguments (after ``self``) of the method ``func``."""
    params = [p for p in inspect.signature(func).parameters.values() if p.name != "self"]
    for index, param in enumerate(params):
        if param.name == "headers":
            return index
    return None


def _with_context(headers: Any) -> Any:
    """``headers`` plus the current trace context, in the same shape (a mapping, or a sequence of pairs)."""
    if headers is None or isinstance(headers, dict) or hasattr(headers, "keys"):
        return propagation.inject(dict(headers or {}))
    extra = propagation.inject({})
    pairs = list(headers)
    names = {str(k).lower() for k, _ in pairs}
    return tuple(pairs) + tuple((k, v) for k, v in extra.items() if k not in names)


def _inject_wrapper(index: int | None) -> Any:
    def wrapper(wrapped: Any, instance: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if index is not None and len(args) > index:
            args = (*args[:index], _with_context(args[index]), *args[index + 1:])
        else:
            kwargs["headers"] = _with_context(kwargs.get("headers"))
        return wrapped(*args, **kwargs)

    return wrapper


def patch_clients() -> None:
    import kserve.inference_client as clients

    for cls, method in TARGETS:
        index = _headers_index(getattr(getattr(clients, cls), method))
        wrap_function_wrapper(clients, f"{cls}.{method}", _inject_wrapper(index))


def unpatch_clients() -> None:
    import kserve.inference_client as clients

    for cls, method in TARGETS:
        unwrap(getattr(clients, cls), method)
