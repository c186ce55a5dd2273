"""The metric names and labels the report reads, and the rules both sources apply to them.

Why in one place: the two sources of numbers (two scrapes, or PromQL) must agree on which families are steps
(any ``request_<step>_seconds`` histogram whose series have a ``model_name`` label and no ``step`` label),
which requests are inference requests (POSTs), and where CPU, memory, GPU and queue wait come from
(prometheus_client's process collector on KServe endpoints, else OpenTelemetry's system metrics; the GPU
gauges of :mod:`kserve_otel.export.resource_metrics`; kserve-otel's or Ray Serve's batch wait).

kserve-otel's own families carry a prefix where Ray exports them: a Ray Serve replica forwards them into Ray's
metrics, which each node's endpoint serves as ``ray_request_predict_seconds`` and so on. A source uses the
unprefixed families when it has step families of that spelling, else the ``ray_`` ones.
"""

from __future__ import annotations

import re

from ..names import (
    ACTIVE_REQUESTS_METRIC, BATCH_WAIT_METRIC, ERRORS_METRIC, FIRST_ITEM_METRIC, KSERVE_STEPS, LABEL_MODEL_NAME,
    REQUEST_DURATION_METRIC,
)

#: ``[ray_]request_<step>_seconds_bucket``: a step's histogram when its series have a ``model_name`` label.
STEP_BUCKET = re.compile(r"^(ray_)?request_([a-z][a-z0-9_]*)_seconds_bucket$")
#: The same, as a PromQL regular expression of ``__name__``.
STEP_BUCKET_PROMQL = "(ray_)?request_[a-z][a-z0-9_]*_seconds_bucket"
#: What a Prometheus with native histograms stores a step's native histogram under: the family's own name.
STEP_NATIVE_PROMQL = "(ray_)?request_[a-z][a-z0-9_]*_seconds"
#: Their ``_count`` series.
STEP_COUNT_PROMQL = "(ray_)?request_[a-z][a-z0-9_]*_seconds_count"
#: The label Ray Serve puts on a replica's series: the deployment it belongs to.
DEPLOYMENT_LABEL = "deployment"
#: ``request_<name>_seconds`` families that are not steps (they have a ``step`` label as well).
NOT_STEPS = frozenset({"time_to_first_item", "batch_wait", "batch_execution"})
RAY_PREFIX = "ray_"

#: kserve-otel's families besides the steps, without the prefix (their names live in kserve_otel.names).
HTTP_DURATION_METRIC = REQUEST_DURATION_METRIC
IN_FLIGHT_METRIC = ACTIVE_REQUESTS_METRIC
#: Inference requests are the POSTs (KServe's v1 and v2 inference routes); probes and scrapes are GETs.
INFERENCE_METHOD = "POST"
#: Ray Serve's own histogram of the time requests wait for a batch, in milliseconds.
RAY_SERVE_BATCH_WAIT_METRIC = "ray_serve_batch_wait_time_ms"
#: CPU seconds counters: prometheus_client's (KServe endpoints), then OpenTelemetry's system metrics.
CPU_METRICS = ("process_cpu_seconds_total", "process_cpu_time_seconds_total")
#: Resident memory gauges, in the same order.
MEMORY_METRICS = ("process_resident_memory_bytes", "process_memory_usage_bytes")
#: The GPU gauges of kserve_otel.export.resource_metrics, with the attribute of :class:`~.window.Gpu` each
#: fills.
GPU_GAUGES = (("gpu_memory_used_bytes", "memory_used_bytes"), ("gpu_memory_total_bytes", "memory_total_bytes"),
              ("gpu_utilization_ratio", "utilization_ratio"))
GPU_INDEX, GPU_UUID = "gpu_index", "gpu_uuid"


def step_of(sample_name: str) -> str | None:
    """The step whose bucket series ``sample_name`` is, if it is one (the labels are checked by the caller)."""
    match = STEP_BUCKET.match(sample_name)
    return match[2] if match and match[2] not in NOT_STEPS else None


def prefix_of(sample_name: str) -> str:
    """``ray_`` for the step families Ray exports, else nothing."""
    match = STEP_BUCKET.match(sample_name)
    return (match[1] or "") if match else ""


def chosen_prefix(step_bucket_names: set[str]) -> str:
    """The spelling a source is read in: unprefixed when it has such step families, else Ray's."""
    return "" if any(not prefix_of(name) for name in step_bucket_names) or not step_bucket_names else RAY_PREFIX


def queue_metrics(prefix: str) -> tuple[tuple[str, float], ...]:
    """Histograms of the time requests wait before their step runs, with the factor to seconds; the report
    uses the first one found."""
    return ((prefix + BATCH_WAIT_METRIC, 1.0), (RAY_SERVE_BATCH_WAIT_METRIC, 1e-3))


def step_order(step: str) -> tuple[int, str]:
    """KServe's pipeline order first (preprocess, predict, postprocess, explain), other steps by name."""
    return (KSERVE_STEPS.index(step), "") if step in KSERVE_STEPS else (len(KSERVE_STEPS), step)


def model_of(labels: dict[str, str]) -> str | None:
    return labels.get(LABEL_MODEL_NAME) or None
