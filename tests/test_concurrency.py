"""Exact counts under concurrency: every call is counted once, in the series and on the endpoint."""

from __future__ import annotations

import asyncio
import threading

from conftest import families, scrape

from kserve_otel import instrument_step


def _count(text: str, metric: str, model: str) -> float:
    for sample in families(text)[metric].samples:
        if sample.name == f"{metric}_count" and sample.labels["model_name"] == model:
            return sample.value
    raise AssertionError(f"no {metric}_count for {model}")


def test_16_threads_x_10000_calls_are_counted_exactly(telemetry, model):
    @instrument_step("predict", model_name=model)
    def predict(x):
        return x

    @instrument_step("preprocess", model_name=model)
    def preprocess(x):
        if x % 1000 == 999:
            raise ValueError(x)
        return x

    start = threading.Barrier(16)

    def worker():
        start.wait()
        for i in range(10_000):
            predict(i)
            try:
                preprocess(i)
            except ValueError:
                pass

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    text = scrape(telemetry.metrics_url)
    assert _count(text, "request_predict_seconds", model) == 160_000
    assert _count(text, "request_preprocess_seconds", model) == 160_000
    errors = [s for s in families(text)["request_step_errors"].samples
              if s.labels["model_name"] == model and s.name.endswith("_total")]
    assert [(s.labels["step"], s.labels["error_type"], s.value) for s in errors] == [("preprocess", "ValueError", 160.0)]
    # the buckets add up too: +Inf holds every observation
    inf = [s.value for s in families(text)["request_predict_seconds"].samples
           if s.name.endswith("_bucket") and s.labels["le"] == "+Inf" and s.labels["model_name"] == model]
    assert inf == [160_000]


async def test_1000_concurrent_asyncio_tasks_are_counted_exactly(telemetry, model):
    @instrument_step("predict", model_name=model)
    async def predict(x):
        await asyncio.sleep(0.001)
        return x

    @instrument_step("postprocess", model_name=model)
    async def stream(x):
        await asyncio.sleep(0)
        yield x
        await asyncio.sleep(0)
        yield x

    async def request(i):
        await predict(i)
        return [item async for item in stream(i)]

    results = await asyncio.gather(*(request(i) for i in range(1000)))
    assert len(results) == 1000
    text = scrape(telemetry.metrics_url)
    assert _count(text, "request_predict_seconds", model) == 1000
    assert _count(text, "request_postprocess_seconds", model) == 1000


def test_in_flight_steps_from_16_threads_balance_and_never_read_negative():
    """The in-flight gauge's lock-free increment/decrement, read concurrently, as a scrape would."""
    from kserve_otel.recording.series import SeriesRegistry

    series = SeriesRegistry().up_down_counter("in.flight", "", "{request}", ("method",)).series("GET")
    start = threading.Barrier(17)
    done = threading.Event()
    readings: list[int] = []

    def worker():
        start.wait()
        for _ in range(20_000):
            series.increment()
            series.decrement()

    def reader():
        start.wait()
        while not done.is_set():
            readings.append(series.value)

    threads = [threading.Thread(target=worker) for _ in range(16)]
    watcher = threading.Thread(target=reader)
    for t in [*threads, watcher]:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    series.add(3)
    assert series.value == 3  # 320,000 steps each way, plus add()
    assert readings and min(readings) >= 0 and max(readings) <= 16
