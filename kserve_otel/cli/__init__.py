"""The command-line tools: ``kserve-otel-run`` (serve anything instrumented) and ``kserve-otel`` (``report``)."""
