"""In the driver: make every deployment of a Ray Serve application start its replicas instrumented.

The replicas are separate processes that the driver's patches never reach (see :mod:`.replica`). What does
reach them is each deployment's ``runtime_env``: every deployment of the application (the graph of ``.bind()``
calls, walked through the bound arguments) gets ``KSERVE_OTEL_ENABLED=true`` and the driver's explicit settings
as ``KSERVE_OTEL_*`` variables in its ``ray_actor_options.runtime_env.env_vars``, merged with the user's own.
The replica's Python then instruments itself at start-up.
"""

from __future__ import annotations

from typing import Any


def _is_application(value: Any) -> bool:
    return type(value).__name__ == "Application" and hasattr(value, "_bound_deployment")


def with_environment(app: Any, env_vars: dict[str, str], _seen: dict[int, Any] | None = None) -> Any:
    """A copy of ``app`` whose deployments (and those bound into them) carry ``env_vars``."""
    seen = {} if _seen is None else _seen
    if id(app) in seen:
        return seen[id(app)]
    deployment = app._bound_deployment
    config = deployment._replica_config

    def convert(value: Any) -> Any:
        if _is_application(value):
            return with_environment(value, env_vars, seen)
        if isinstance(value, (list, tuple)):
            return type(value)(convert(item) for item in value)
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items()}
        return value

    options = dict(deployment.ray_actor_options or {})
    runtime_env = dict(options.get("runtime_env") or {})
    runtime_env["env_vars"] = {**env_vars, **(runtime_env.get("env_vars") or {})}
    options["runtime_env"] = runtime_env
    instrumented = type(app)(deployment.options(
        ray_actor_options=options,
        _init_args=tuple(convert(arg) for arg in config.init_args),
        _init_kwargs={key: convert(value) for key, value in config.init_kwargs.items()},
    ))
    seen[id(app)] = instrumented
    return instrumented


def deployments_of(app: Any) -> list[Any]:
    """Every deployment of the application, the ingress first."""
    found: list[Any] = []

    def walk(value: Any) -> None:
        if _is_application(value):
            if all(value._bound_deployment is not d for d in found):
                found.append(value._bound_deployment)
                config = value._bound_deployment._replica_config
                for item in (*config.init_args, *config.init_kwargs.values()):
                    walk(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)

    walk(app)
    return found
