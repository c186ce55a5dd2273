"""Recording, the first stage: where an observation lands on the request path, in well under a microsecond.

``series`` holds the fixed-size counters and histograms (classic buckets and native ones) that a step or a
request updates; ``speedups`` is their bookkeeping and the HTTP request recorder, in C (``_speedups.c``) with
a pure-Python twin; ``exemplars`` decides which observations keep their trace and span ids.

Nothing here imports OpenTelemetry's SDK, nor any later stage.
"""
