"""Process and GPU metrics (``kserve_otel.export.resource_metrics``) through real SDK meter providers and
readers.

Process metrics are read from this very process through OpenTelemetry's system-metrics instrumentation; GPU
metrics through the fake NVML of ``tests/fake_nvml`` (two devices with fixed numbers), since the test
machines have no GPU. The real nvidia-ml-py is checked to fail quietly here.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from pathlib import Path

import psutil
import pytest
from conftest import run_python
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.process_collector import ProcessCollector

from kserve_otel.export.resource_metrics import PROCESS_METRICS, enable_resource_metrics

FAKE_NVML = Path(__file__).parent / "fake_nvml" / "pynvml.py"
GIB = 2**30
#: What the fake NVML reports: uuid, memory total, memory used, utilisation.
FAKE_DEVICES = {
    "0": ("GPU-00000000-fake-4000-8000-000000000000", 16 * GIB, 4 * GIB, 0.37),
    "1": ("GPU-11111111-fake-4000-8000-111111111111", 80 * GIB, 60 * GIB, 0.62),
}
PROCESS_INSTRUMENTS = {"process.cpu.time", "process.cpu.utilization", "process.memory.usage",
                       "process.memory.virtual"}
GPU_INSTRUMENTS = {"gpu.memory.used", "gpu.memory.total", "gpu.utilization.ratio"}


@pytest.fixture
def fake_nvml(monkeypatch):
    """``import pynvml`` gives the fake for the test's duration (then whatever it gave before)."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    return module


@pytest.fixture
def no_nvml(monkeypatch):
    """``import pynvml`` fails, as without nvidia-ml-py."""
    monkeypatch.setitem(sys.modules, "pynvml", None)


@pytest.fixture
def provider():
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    provider.reader = reader
    yield provider
    provider.shutdown()


def _points(reader: InMemoryMetricReader) -> dict[str, list]:
    """Data points by instrument name, from one collection."""
    data = reader.get_metrics_data()
    points: dict[str, list] = {}
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


def test_process_metrics_are_this_process_numbers(provider, no_nvml):
    undo = enable_resource_metrics(provider)
    try:
        points = _points(provider.reader)
        assert set(points) == PROCESS_INSTRUMENTS == set(PROCESS_METRICS)
        cpu = {point.attributes["type"]: point.value for point in points["process.cpu.time"]}
        own = psutil.Process().cpu_times()
        assert set(cpu) == {"user", "system"}
        assert 0 < cpu["user"] <= own.user + 0.01 and cpu["system"] <= own.system + 0.01
        (memory,) = points["process.memory.usage"]
        rss = psutil.Process().memory_info().rss
        assert abs(memory.value - rss) < 0.1 * rss
    finally:
        undo()


def test_prometheus_names_do_not_collide_with_prometheus_clients_process_metrics(fake_nvml):
    registry = CollectorRegistry(auto_describe=True)
    provider = MeterProvider(metric_readers=[PrometheusMetricReader(registry=registry, scope_info_enabled=False)])
    undo = enable_resource_metrics(provider)
    try:
        ours = {family.name for family in registry.collect()} - {"target_info"}
        client = CollectorRegistry()
        ProcessCollector(registry=client)
        theirs = {family.name for family in client.collect()}
        assert theirs and not ours & theirs
        samples = {(sample.name, sample.labels.get("gpu_index")): sample
                   for family in text_string_to_metric_families(generate_latest(registry).decode())
                   for sample in family.samples}
        assert {name for name, _ in samples} == {
            "target_info", "process_cpu_time_seconds_total", "process_cpu_utilization", "process_memory_usage_bytes",
            "process_memory_virtual_bytes", "gpu_memory_used_bytes",
            "gpu_memory_total_bytes", "gpu_utilization_ratio"}
        uuid, total, used, utilization = FAKE_DEVICES["1"]
        assert samples[("gpu_memory_used_bytes", "1")].labels == {"gpu_index": "1", "gpu_uuid": uuid}
        assert samples[("gpu_memory_used_bytes", "1")].value == used
        assert samples[("gpu_memory_total_bytes", "1")].value == total
        assert samples[("gpu_utilization_ratio", "1")].value == utilization
    finally:
        undo()
        provider.shutdown()


def test_gpu_metrics_from_the_fake_nvml_are_its_fixed_numbers(provider, fake_nvml):
    undo = enable_resource_metrics(provider)
    try:
        points = _points(provider.reader)
        assert GPU_INSTRUMENTS <= set(points)
        seen = {}
        for name in GPU_INSTRUMENTS:
            for point in points[name]:
                index, uuid = point.attributes["gpu_index"], point.attributes["gpu_uuid"]
                assert FAKE_DEVICES[index][0] == uuid
                seen[(name, index)] = point.value
        for index, (_, total, used, utilization) in FAKE_DEVICES.items():
            assert seen[("gpu.memory.total", index)] == total
            assert seen[("gpu.memory.used", index)] == used
            assert seen[("gpu.utilization.ratio", index)] == pytest.approx(utilization)
        assert len(seen) == 6
    finally:
        undo()
    assert fake_nvml.calls == {"nvmlInit": 1, "nvmlShutdown": 1}


def test_undo_stops_reporting_and_enabling_again_reports_without_new_instruments(provider, fake_nvml, caplog):
    undo = enable_resource_metrics(provider)
    assert enable_resource_metrics(provider)() is None  # a second enable while on: nothing to undo
    assert GPU_INSTRUMENTS | PROCESS_INSTRUMENTS <= set(_points(provider.reader))
    undo()
    assert not set(_points(provider.reader)) & (GPU_INSTRUMENTS | PROCESS_INSTRUMENTS)
    with caplog.at_level(logging.WARNING):
        undo = enable_resource_metrics(provider)
        points = _points(provider.reader)
    undo()
    assert GPU_INSTRUMENTS | PROCESS_INSTRUMENTS <= set(points)
    assert len(points["gpu.memory.used"]) == 2 and len(points["process.memory.usage"]) == 1
    assert not caplog.records, [record.getMessage() for record in caplog.records]
    assert fake_nvml.calls == {"nvmlInit": 2, "nvmlShutdown": 2}


def test_failing_nvml_gives_no_gpu_instruments_and_no_error(provider, fake_nvml, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_NVML_FAIL", "1")
    with caplog.at_level(logging.INFO):
        undo = enable_resource_metrics(provider)
        points = _points(provider.reader)
        undo()
    assert not set(points) & GPU_INSTRUMENTS
    assert set(points) == PROCESS_INSTRUMENTS
    assert not caplog.records
    assert fake_nvml.calls == {"nvmlInit": 1, "nvmlShutdown": 0}


def test_without_nvidia_ml_py_there_are_no_gpu_instruments(provider, no_nvml):
    undo = enable_resource_metrics(provider)
    undo()
    assert not set(_points(provider.reader)) & GPU_INSTRUMENTS


def test_the_real_nvidia_ml_py_reports_gpus_where_there_are_some_and_fails_quietly_elsewhere(provider, caplog):
    import pynvml  # nvidia-ml-py, installed with the gpu extra (dev installs it)
    assert not str(getattr(pynvml, "__file__", "")).startswith(str(FAKE_NVML.parent))
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        has_gpu = False
    else:
        has_gpu = pynvml.nvmlDeviceGetCount() > 0
        pynvml.nvmlShutdown()
    with caplog.at_level(logging.INFO):
        undo = enable_resource_metrics(provider)
        points = _points(provider.reader)
        undo()
    if has_gpu:  # a machine with a GPU (and its driver): real numbers, no error
        assert GPU_INSTRUMENTS <= set(points)
        assert all(point.value >= 0 for name in GPU_INSTRUMENTS for point in points[name])
    else:  # no driver or no GPU, as on the test machines: process metrics only, nothing logged
        assert set(points) == PROCESS_INSTRUMENTS and not caplog.records


def test_an_applications_own_system_metrics_are_left_alone():
    """With the application's SystemMetricsInstrumentor (opentelemetry-instrument loads it) already on the
    provider, its configuration stays, nothing is created twice and no warning is logged; kserve-otel's undo
    does not uninstrument it."""
    result = run_python("""
        import logging, sys
        logging.basicConfig(level=logging.WARNING)
        sys.modules["pynvml"] = None
        from opentelemetry.instrumentation.system_metrics import SystemMetricsInstrumentor
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from kserve_otel.export.resource_metrics import enable_resource_metrics

        reader = InMemoryMetricReader()
        provider = MeterProvider(metric_readers=[reader])
        application = SystemMetricsInstrumentor(config={"process.memory.usage": None, "system.memory.usage": ["used"]})
        application.instrument(meter_provider=provider)
        undo = enable_resource_metrics(provider)
        undo()
        assert SystemMetricsInstrumentor() is application and application.is_instrumented_by_opentelemetry
        names = sorted(m.name for r in reader.get_metrics_data().resource_metrics
                       for s in r.scope_metrics for m in s.metrics)
        print(names)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['process.memory.usage', 'system.memory.usage']"
    assert result.stderr == ""


def test_a_forked_child_reports_its_own_process():
    result = run_python("""
        import os, sys
        sys.modules["pynvml"] = None
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from kserve_otel.export.resource_metrics import enable_resource_metrics

        reader = InMemoryMetricReader()
        enable_resource_metrics(MeterProvider(metric_readers=[reader]))
        reader.get_metrics_data()
        ballast = None
        pid = os.fork()
        if pid == 0:
            ballast = bytearray(200 * 2**20)  # the child grows by 200 MiB; the parent does not
            for page in range(0, len(ballast), 4096):
                ballast[page] = 1
            data = reader.get_metrics_data()
            (point,) = [p for r in data.resource_metrics for s in r.scope_metrics for m in s.metrics
                        if m.name == "process.memory.usage" for p in m.data.data_points]
            import psutil
            os._exit(0 if abs(point.value - psutil.Process().memory_info().rss) < 20 * 2**20 else 1)
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
