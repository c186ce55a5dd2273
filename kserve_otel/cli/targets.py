"""What ``kserve-otel-run MODULE:ATTR`` names: load it, and tell which kind of servable it is.

Accepted kinds: a ``kserve.Model`` instance or class, a list of those, a Ray Serve ``Application`` (what
``.bind()`` returns) or ``Deployment``, an ASGI app (FastAPI, Starlette, any ``async (scope, receive, send)``
callable), or a zero-argument factory returning one of these. Anything else is a :class:`TargetError`, whose
message is the one line the command prints.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any

ACCEPTED = ("a kserve.Model instance or class, a list of them, a Ray Serve Application or Deployment, an ASGI app, "
            "or a zero-argument factory returning one of these")


class TargetError(Exception):
    """The target cannot be served; the message says what was found and what is accepted."""


@dataclass
class Target:
    """A loaded target: its kind (``kserve``, ``ray``, ``asgi``) and the object(s) to serve."""

    spec: str
    kind: str
    value: Any
    models: list[Any] = field(default_factory=list)


def load(spec: str, model_name: str | None = None) -> Target:
    """Import ``MODULE:ATTR`` (MODULE: a dotted module name or a ``.py`` file) and classify what ATTR holds."""
    module_part, sep, attr = spec.partition(":")
    if not sep or not module_part or not attr:
        raise TargetError(f"{spec!r} is not MODULE:ATTR; MODULE is a module name or a .py file, ATTR names {ACCEPTED}")
    module = _import(module_part)
    value: Any = module
    for name in attr.split("."):
        if not hasattr(value, name):
            public = sorted(n for n in vars(module) if not n.startswith("_"))[:12]
            raise TargetError(f"{module_part} has no attribute {attr!r} (it has: {', '.join(public) or 'nothing public'});"
                              f" ATTR names {ACCEPTED}")
        value = getattr(value, name)
    return classify(spec, value, model_name)


def _import(module_part: str) -> Any:
    is_file = module_part.endswith(".py") or os.sep in module_part
    if os.getcwd() not in sys.path:  # as uvicorn does: the current directory's modules are importable
        sys.path.insert(0, os.getcwd())
    try:
        if is_file:
            path = os.path.abspath(module_part)
            if not os.path.isfile(path):
                raise TargetError(f"no file {module_part!r}; MODULE is a module name or a .py file")
            sys.path.insert(0, os.path.dirname(path))
            name = os.path.splitext(os.path.basename(path))[0]
            module_spec = importlib.util.spec_from_file_location(name, path)
            assert module_spec is not None and module_spec.loader is not None
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
            return module
        return importlib.import_module(module_part)
    except TargetError:
        raise
    except ModuleNotFoundError as exc:
        raise TargetError(f"cannot import {module_part!r}: {exc}; MODULE is a module importable from the current "
                          f"directory, or a .py file") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing: say so in one line
        raise TargetError(f"importing {module_part!r} failed: {type(exc).__name__}: {exc}") from None


def classify(spec: str, value: Any, model_name: str | None = None, *, called: bool = False) -> Target:
    """The :class:`Target` for ``value``; a zero-argument factory is called once and its result classified."""
    models = _kserve_models(value, model_name)
    if models is not None:
        return Target(spec, "kserve", value, models)
    if _is_ray(value):
        return Target(spec, "ray", value)
    if _is_asgi(value):
        return Target(spec, "asgi", value)
    if not called and callable(value) and _takes_no_arguments(value):
        try:
            produced = value()
        except Exception as exc:  # noqa: BLE001 - the factory failed: one line, no traceback
            raise TargetError(f"{spec} (a factory) raised {type(exc).__name__}: {exc}") from None
        return classify(spec, produced, model_name, called=True)
    found = f"a factory returning {_describe(value)}" if called else _describe(value)
    raise TargetError(f"{spec} is {found}; accepted: {ACCEPTED}")


def _describe(value: Any) -> str:
    if inspect.ismodule(value):
        return f"the module {value.__name__}"
    if isinstance(value, type):
        return f"the class {value.__module__}.{value.__qualname__}"
    return f"a {type(value).__module__}.{type(value).__qualname__}" if type(value).__module__ != "builtins" \
        else f"a {type(value).__name__} ({value!r:.40})"


def _kserve_model_class() -> Any:
    if "kserve" not in sys.modules:  # a target that holds a kserve model has imported kserve already
        return None
    return getattr(sys.modules["kserve"], "Model", None)


def _kserve_models(value: Any, model_name: str | None) -> list[Any] | None:
    model_cls = _kserve_model_class()
    if model_cls is None:
        return None
    items = list(value) if isinstance(value, (list, tuple)) and value else [value]
    if not all(isinstance(item, model_cls) or (isinstance(item, type) and issubclass(item, model_cls)) for item in items):
        return None
    if model_name is not None and len(items) > 1:
        raise TargetError("--model-name names one model, but the target holds several")
    return [_instantiate(item, model_name) if isinstance(item, type) else item for item in items]


def _instantiate(cls: type, model_name: str | None) -> Any:
    name = model_name or cls.__name__.lower()
    try:
        parameters = inspect.signature(cls).parameters
        return cls(name) if parameters else cls()
    except Exception as exc:  # noqa: BLE001
        raise TargetError(f"creating the model {cls.__qualname__}({name!r}) raised {type(exc).__name__}: {exc}") from None


def _is_ray(value: Any) -> bool:
    cls = type(value)
    return cls.__module__.startswith("ray.serve") and cls.__name__ in ("Application", "Deployment")


def _is_asgi(value: Any) -> bool:
    if isinstance(value, type):
        return False
    call = value if inspect.isfunction(value) or inspect.ismethod(value) else getattr(value, "__call__", None)
    if call is None or not inspect.iscoroutinefunction(call):
        return False
    try:
        parameters = [p for p in inspect.signature(call).parameters.values()
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(parameters) == 3


def _takes_no_arguments(value: Any) -> bool:
    try:
        signature = inspect.signature(value)
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
               for p in signature.parameters.values())
