"""kserve-otel: OpenTelemetry histograms, spans and a Prometheus endpoint for every step of every model.

Public API (everything else is private and may change):

* :func:`instrument_step` — ``@instrument_step("predict")`` on a model's step.
* :func:`configure` / :func:`shutdown` — set up (and tear down) metric readers, span export and the endpoint.
* :class:`Settings`, :class:`SettingsError` — the configuration and its errors.
* :class:`Telemetry` — what :func:`configure` set up.
"""

from __future__ import annotations

from ._version import __version__
from .settings import Settings, SettingsError
from .steps import instrument_step
from .telemetry import Telemetry, configure, get_telemetry, shutdown

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
