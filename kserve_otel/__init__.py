"""kserve-otel: OpenTelemetry histograms, spans and a Prometheus endpoint for every step of every model.

Public API (everything else is private and may change):

* :func:`instrument_step` — ``@instrument_step("predict")`` on a model's step.
* :func:`configure` / :func:`shutdown` — set up (and tear down) metric readers, span export and the endpoint.
* :class:`Settings`, :class:`SettingsError` — the configuration and its errors.
* :class:`Telemetry`, :func:`get_telemetry` — what :func:`configure` set up.

The names are imported on first use, so that ``import kserve_otel.config.settings`` (what auto-instrumentation
does at every interpreter start-up when it may be on) does not import the OpenTelemetry SDK.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:
    from .config.settings import Settings, SettingsError
    from .request_path.steps import instrument_step
    from .telemetry import Telemetry, configure, get_telemetry, shutdown

_LAZY = {
    "Settings": "config.settings", "SettingsError": "config.settings",
    "instrument_step": "request_path.steps",
    "Telemetry": "telemetry", "configure": "telemetry", "get_telemetry": "telemetry", "shutdown": "telemetry",
}

__all__ = [
    "Settings",
    "SettingsError",
    "Telemetry",
    "__version__",
    "configure",
    "get_telemetry",
    "instrument_step",
    "shutdown",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kserve_otel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
