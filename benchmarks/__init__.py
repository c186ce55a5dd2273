"""Benchmarks of kserve-otel against the baselines its users would otherwise pay for.

Run everything with one command from the repository root::

    .venv/bin/python -m benchmarks.run            # full run (a few minutes), writes benchmarks/results.md
    .venv/bin/python -m benchmarks.run --quick    # fast sanity run of every code path

This machine has two noisy cores, so absolute times lie: every measure is a median of repeated samples, and
every claim is a ratio to a baseline measured in the same run. Each measure runs in a process of its own
(:mod:`benchmarks.run` starts them), because kserve-otel's series registry and OpenTelemetry's providers are
process-global: one measure's series or providers must not leak into another's numbers.

Modules:

* :mod:`benchmarks.step_overhead` - cost of ``@instrument_step`` per call, against KServe's prometheus_client
  histogram and a naive OpenTelemetry step.
* :mod:`benchmarks.scrape` - cost of one scrape of 200 series, against prometheus_client's own exposition.
* :mod:`benchmarks.memory` - memory before and after a million instrumented calls.
* :mod:`benchmarks.throughput` - whole requests per second through real servers (uvicorn, KServe).
* :mod:`benchmarks.checks` - correctness of what the benchmarks measure (observations == calls), for tests.
"""
