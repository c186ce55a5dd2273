"""Correctness of what the benchmarks time: every call they make is recorded, once, where they say it is.

Why: a benchmark that times a path which silently records nothing (a step whose series is never updated, a
span that is dropped, a server answering 500) reports a flattering number. These checks run each benchmark's
own code for a small number of calls and assert that observations equal calls, with no timing at all;
``tests/test_benchmarks.py`` calls them. Each is meant for a fresh interpreter, since the benchmarks install
OpenTelemetry providers and call ``kserve_otel.configure()``, which are process-global.
"""

from __future__ import annotations

import asyncio
import shutil
import uuid

from prometheus_client.parser import text_string_to_metric_families

import kserve_otel
from kserve_otel.names import KSERVE_STEPS, step_metric_name

from . import scrape
from .memory import measure_growth
from .step_overhead import SAMPLED_CASES, Rig, build_cases
from .servers import PREDICT_PATH
from .throughput import python_load, running_server, wrk_load


def verify_step_benchmark(calls: int = 1000) -> None:
    """Run every per-step case (sync and async) ``calls`` times; each instrument must count exactly ``calls``,
    and exactly the sampled cases' calls must reach the span exporter."""
    rig = Rig()
    event_loop = asyncio.new_event_loop()
    try:
        exported_before = rig.spans_exported()
        sampled = 0
        for case in build_cases(rig) + build_cases(rig, event_loop):
            before = case.count() if case.count else 0
            if case.prepare:
                case.prepare()
            case.loop(calls)
            if case.count:
                recorded = case.count() - before
                assert recorded == calls, f"{case.name}: {recorded} observations for {calls} calls"
            if case.name in SAMPLED_CASES:
                sampled += calls
        exported = rig.spans_exported() - exported_before
        assert exported == sampled, f"{exported} spans exported for {sampled} sampled calls"
    finally:
        event_loop.close()
        rig.close()


def _counts(text: str, prefix: str) -> dict[tuple[str, str], float]:
    """``_count`` of every step histogram series whose model starts with ``prefix``, by (metric, model)."""
    counts = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            model = sample.labels.get("model_name", "")
            if sample.name.endswith("_seconds_count") and model.startswith(prefix):
                counts[(sample.name, model)] = sample.value
    return counts


def verify_scrape_benchmark(models: int = 5, observations: int = 3) -> None:
    """Both sides of the scrape benchmark expose ``models`` x 4 series holding ``observations`` each, in process
    and over HTTP."""
    prefix = f"check-{uuid.uuid4().hex[:8]}"
    endpoints = scrape.build(models, observations, prefix=prefix)
    try:
        url = endpoints.telemetry.metrics_url
        assert url is not None, "kserve-otel's endpoint did not start"
        expected = {
            (f"{step_metric_name(step)}_count", f"{prefix}-{i:03d}"): float(observations)
            for i in range(models) for step in KSERVE_STEPS
        }
        over_http = scrape.http_getter(url, gzip=False)
        assert over_http() > 0
        for name, body in (("kserve-otel", endpoints.render_ours()), ("prometheus_client", endpoints.render_baseline())):
            counts = _counts(body.decode(), prefix)
            assert counts == expected, f"{name}: {counts} != {expected}"
    finally:
        kserve_otel.shutdown()


def verify_memory_benchmark(calls: int = 2000) -> None:
    """The memory benchmark's steps count every call, with and without sampled spans."""
    rig = Rig()
    try:
        for mode in ("none", "sampled"):
            growth = measure_growth(rig, mode, calls, warmup=100)
            expected = 1 + 100 + calls  # first call, warm-up, calls; in each of the two passes
            assert growth.observations == (expected, expected), f"{mode}: {growth.observations} for {expected}"
    finally:
        rig.close()


def verify_throughput_benchmark(requests: int = 200, concurrency: int = 4) -> None:
    """The bare Starlette server answers every request of the Python load generator with 200, and wrk (when
    installed) reports requests and no errors."""
    with running_server("starlette") as base_url:
        url = base_url + PREDICT_PATH
        result = python_load(url, concurrency, requests=requests)
        assert (result.requests, result.errors) == (requests, 0), result
        if shutil.which("wrk"):
            result = wrk_load(url, concurrency, 1)
            assert result.requests > 0 and result.errors == 0, result
