"""The KServe versions this instrumentation supports (``instrumentation_dependencies()``)."""

_instruments = ("kserve >= 0.21, < 0.22",)
