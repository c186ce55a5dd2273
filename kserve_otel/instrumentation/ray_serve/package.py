"""The Ray versions this instrumentation supports (``instrumentation_dependencies()``)."""

_instruments = ("ray >= 2.55, < 3",)
