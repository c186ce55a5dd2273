"""Process CPU and memory, and GPU memory and utilisation, as OpenTelemetry metrics beside the step metrics.

Why: KServe's debugging procedure asks, after latency and concurrency, whether the server is near its CPU,
memory or GPU limits. These metrics answer it on the same endpoint (and in the same OTLP stream) as the steps,
so ``kserve-otel report`` and dashboards read everything from one place.

* **Process**: OpenTelemetry's own ``SystemMetricsInstrumentor`` restricted to :data:`PROCESS_METRICS`. On the
  Prometheus endpoint they are ``process_cpu_time_seconds_total{type}``, ``process_cpu_utilization``,
  ``process_memory_usage_bytes`` and ``process_memory_virtual_bytes``: no name that
  prometheus_client's process collector (``process_cpu_seconds_total``, ``process_resident_memory_bytes``,
  ``process_virtual_memory_bytes``, served on KServe's endpoint too) uses.
* **GPU**, when ``pynvml`` (nvidia-ml-py) is installed and ``nvmlInit()`` succeeds: per device
  ``gpu_memory_used_bytes``, ``gpu_memory_total_bytes`` and ``gpu_utilization_ratio`` (0-1), labelled
  ``gpu_index`` and ``gpu_uuid``, read from NVML at each collection. Without NVML (no driver, no GPU, no
  package) there are no GPU instruments and nothing is logged above debug.

OpenTelemetry cannot remove an instrument from a meter provider, so the undo function closes a gate: the
callbacks observe nothing afterwards (the series disappear) and NVML is shut down; enabling again on the same
provider reopens the gate instead of creating the instruments twice. The instrumentor used here is not the
process-wide ``SystemMetricsInstrumentor`` singleton, so an application's own system-metrics instrumentation
is neither reconfigured nor uninstrumented by this module; when the application has already instrumented it,
the process metrics are left to the application (its instruments have the same names).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.metrics import CallbackOptions, Observation

from .._version import __version__

_logger = logging.getLogger(__name__)

#: The SystemMetricsInstrumentor configuration: process metrics only (no system-wide or runtime metrics).
PROCESS_METRICS: dict[str, list[str] | None] = {
    "process.cpu.time": ["user", "system"],
    "process.cpu.utilization": None,
    "process.memory.usage": None,
    "process.memory.virtual": None,
}

#: Instrument scope of the GPU instruments.
GPU_SCOPE = "kserve_otel.resource_metrics"  # a scope name on the wire: stable
LABEL_GPU_INDEX, LABEL_GPU_UUID = "gpu_index", "gpu_uuid"


@dataclass
class _Installation:
    """What was created on one meter provider, and whether it reports."""

    open: bool = False
    instrumentor: Any = None
    gpu_instruments: bool = False
    #: (the pynvml module, [(device handle, attributes)]) while NVML is initialised. Callbacks read it without
    #: the lock: a collection holding the SDK's locks must never wait for a set-up that wants them too.
    gpus: tuple[Any, list[tuple[Any, dict[str, str]]]] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


_installations: weakref.WeakKeyDictionary[Any, _Installation] = weakref.WeakKeyDictionary()
_installations_lock = threading.Lock()


def enable_resource_metrics(meter_provider: Any) -> Callable[[], None]:
    """Report process CPU and memory, and GPU memory and utilisation where NVML works, through
    ``meter_provider``; returns the function that stops it. Never raises: what cannot be set up is skipped."""
    with _installations_lock:
        installation = _installations.get(meter_provider)
        if installation is None:
            installation = _installations[meter_provider] = _Installation()
    with installation.lock:
        if installation.open:
            return lambda: None  # already reporting; the first caller's undo stops it
        installation.open = True
        if installation.instrumentor is None:
            installation.instrumentor = _instrument_process(meter_provider, installation)
        _start_gpus(meter_provider, installation)

    def undo() -> None:
        with installation.lock:
            installation.open = False
            _stop_gpus(installation)

    return undo


# ------------------------------------------------------------------------------------------------- process


def _instrument_process(meter_provider: Any, installation: _Installation) -> Any:
    try:
        from opentelemetry.instrumentation.system_metrics import SystemMetricsInstrumentor
    except ImportError:
        _logger.debug("kserve-otel: opentelemetry-instrumentation-system-metrics is not installed: no process metrics")
        return None
    shared = SystemMetricsInstrumentor._instance  # the application's (or opentelemetry-instrument's), if any
    if shared is not None and shared.is_instrumented_by_opentelemetry:
        _logger.debug("kserve-otel: system metrics are already instrumented by the application: using those")
        return None

    class ProcessMetrics(SystemMetricsInstrumentor):  # type: ignore[misc, valid-type]
        """SystemMetricsInstrumentor without the singleton: one per meter provider, the application's untouched."""

        _instance = None

        def __new__(cls, *args: Any, **kwargs: Any) -> Any:
            return object.__new__(cls)

    try:
        instrumentor = ProcessMetrics(config=PROCESS_METRICS)
        instrumentor.instrument(meter_provider=_GatedMeterProvider(meter_provider, installation, instrumentor),
                                skip_dep_check=True)
    except Exception:  # noqa: BLE001 - resource metrics must never stop a model server
        _logger.warning("kserve-otel: process metrics could not be set up", exc_info=True)
        return None
    return instrumentor


class _GatedMeterProvider:
    """Hands the instrumentor a meter whose callbacks observe nothing while the installation is closed, and
    follow a fork (the instrumentor reads the process it was created in)."""

    def __init__(self, provider: Any, installation: _Installation, instrumentor: Any) -> None:
        self._provider, self._installation, self._instrumentor = provider, installation, instrumentor

    def get_meter(self, *args: Any, **kwargs: Any) -> Any:
        return _GatedMeter(self._provider.get_meter(*args, **kwargs), self._gate)

    def _gate(self, callback: Callable[[CallbackOptions], Iterable[Observation]]) -> Callable[..., Iterable[Observation]]:
        def gated(options: CallbackOptions) -> Iterable[Observation]:
            if not self._installation.open:
                return []
            process = self._instrumentor._proc
            if process.pid != os.getpid():  # forked after set-up: report the child, not the parent
                import psutil

                self._instrumentor._proc = psutil.Process(os.getpid())
            return list(callback(options))

        return gated


class _GatedMeter:
    def __init__(self, meter: Any, gate: Callable[[Any], Any]) -> None:
        self._meter, self._gate = meter, gate

    def _observable(self, create: Callable[..., Any], name: str, callbacks: Sequence[Any] | None = None,
                    *args: Any, **kwargs: Any) -> Any:
        return create(name, [self._gate(callback) for callback in callbacks or ()], *args, **kwargs)

    def create_observable_counter(self, *args: Any, **kwargs: Any) -> Any:
        return self._observable(self._meter.create_observable_counter, *args, **kwargs)

    def create_observable_gauge(self, *args: Any, **kwargs: Any) -> Any:
        return self._observable(self._meter.create_observable_gauge, *args, **kwargs)

    def create_observable_up_down_counter(self, *args: Any, **kwargs: Any) -> Any:
        return self._observable(self._meter.create_observable_up_down_counter, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._meter, name)


# ----------------------------------------------------------------------------------------------------- GPU


def _start_gpus(meter_provider: Any, installation: _Installation) -> None:
    try:
        import pynvml
    except ImportError:
        _logger.debug("kserve-otel: nvidia-ml-py is not installed: no GPU metrics")
        return
    try:
        pynvml.nvmlInit()
    except Exception as error:  # noqa: BLE001 - NVMLError_LibraryNotFound, _DriverNotLoaded, ...: no GPU here
        _logger.debug("kserve-otel: NVML is not available (%s): no GPU metrics", error)
        return
    try:
        devices = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else str(uuid)
            devices.append((handle, {LABEL_GPU_INDEX: str(index), LABEL_GPU_UUID: uuid}))
    except Exception:  # noqa: BLE001
        _logger.warning("kserve-otel: NVML could not list the GPUs: no GPU metrics", exc_info=True)
        _shutdown_nvml(pynvml)
        return
    installation.gpus = (pynvml, devices)
    if devices and not installation.gpu_instruments:
        _create_gpu_instruments(meter_provider, installation)
        installation.gpu_instruments = True


def _create_gpu_instruments(meter_provider: Any, installation: _Installation) -> None:
    meter = meter_provider.get_meter(GPU_SCOPE, __version__)

    def observe(read: Callable[[Any, Any], float | None]) -> Callable[[CallbackOptions], Iterable[Observation]]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            gpus = installation.gpus
            if not installation.open or gpus is None:
                return []
            nvml, devices = gpus
            observations = []
            for handle, attributes in devices:
                try:
                    value = read(nvml, handle)
                except Exception:  # noqa: BLE001 - one device may not support a query (MIG, vGPU)
                    continue
                if value is not None:
                    observations.append(Observation(value, attributes))
            return observations

        return callback

    meter.create_observable_gauge(
        "gpu.memory.used", [observe(lambda nvml, h: float(nvml.nvmlDeviceGetMemoryInfo(h).used))], unit="By",
        description="GPU memory in use (NVML), per device")
    meter.create_observable_gauge(
        "gpu.memory.total", [observe(lambda nvml, h: float(nvml.nvmlDeviceGetMemoryInfo(h).total))], unit="By",
        description="GPU memory installed (NVML), per device")
    # The name carries "ratio" itself: this exporter adds no suffix for unit "1", later ones add "_ratio" once.
    meter.create_observable_gauge(
        "gpu.utilization.ratio", [observe(lambda nvml, h: nvml.nvmlDeviceGetUtilizationRates(h).gpu / 100.0)],
        unit="1", description="Fraction of the last sample period in which a kernel ran on the GPU (NVML)")


def _stop_gpus(installation: _Installation) -> None:
    gpus, installation.gpus = installation.gpus, None
    if gpus is not None:
        _shutdown_nvml(gpus[0])


def _shutdown_nvml(pynvml: Any) -> None:
    try:
        pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001
        _logger.debug("kserve-otel: nvmlShutdown failed", exc_info=True)
