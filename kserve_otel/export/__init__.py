"""Export, the third stage: what leaves the process, read from the recorded series and the ended spans.

Metrics: ``metrics_bridge`` hands the series to OpenTelemetry metric readers; ``snapshots`` and
``series_files`` add up the series of every process of a server; ``text_exposition`` and
``protobuf_exposition`` write them for Prometheus, and ``exposition`` is the endpoint that serves them;
``resource_metrics`` adds CPU, memory and GPU. Spans: ``otlp_encoding`` (C in ``_otlp.c``, with a pure-Python
twin) writes OTLP protobuf for :mod:`kserve_otel.otlp_export`.
"""
