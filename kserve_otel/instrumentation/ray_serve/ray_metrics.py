"""Step metrics of a Ray Serve replica, forwarded into Ray's own metrics.

Several replicas on one node cannot each serve a Prometheus port, and Ray already runs one metrics endpoint
per node that Prometheus (or KubeRay's PodMonitor) scrapes. So in a replica every step observation is mirrored,
as it happens, into a ``ray.serve.metrics`` histogram or counter of the same name (about 1.5 µs each, measured
here): Ray adds the ``deployment``, ``replica`` and ``application`` tags and exports it as ``ray_<name>`` on the
node's endpoint (``ray_request_predict_seconds_bucket{model_name, deployment, replica, application, le}``,
``ray_request_step_errors_total{...}``), after Ray's own export delay of up to ~10 s.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from ...recording.series import (
    CounterFamily, HistogramFamily, UpDownCounterFamily, Family, set_mirror_factory,
)

_lock = threading.Lock()
_metrics: dict[str, Any] = {}  # family name -> the Ray metric it is mirrored into


def ray_metric_name(family: Family) -> str:
    """The Ray metric name of ``family`` (Ray prefixes ``ray_`` when exporting): Prometheus' own spelling."""
    name = family.name.replace(".", "_")
    return f"{name}_seconds" if family.unit == "s" and not name.endswith("_seconds") else name


def _tag_key(attribute: str) -> str:
    return attribute.replace(".", "_")


def _ray_metric(family: Family) -> Any:
    metric = _metrics.get(family.name)
    if metric is None:
        from ray.serve import metrics as serve_metrics

        with _lock:
            metric = _metrics.get(family.name)
            if metric is None:
                tag_keys = tuple(_tag_key(label) for label in family.label_names)
                if isinstance(family, HistogramFamily):
                    metric = serve_metrics.Histogram(
                        ray_metric_name(family), description=family.description, boundaries=list(family.bounds),
                        tag_keys=tag_keys,
                    )
                else:
                    metric = serve_metrics.Counter(ray_metric_name(family), description=family.description,
                                                   tag_keys=tag_keys)
                _metrics[family.name] = metric
    return metric


def mirror_into_ray(family: Family, attributes: dict[str, object]) -> Callable[[float], object] | None:
    """The mirror factory of a replica: each series of a histogram or counter family into a Ray metric."""
    if isinstance(family, UpDownCounterFamily) or not isinstance(family, (HistogramFamily, CounterFamily)):
        return None
    if "otel.metric.overflow" in attributes:
        return None
    metric = _ray_metric(family)
    tags = {_tag_key(key): str(value) for key, value in attributes.items()}
    if isinstance(family, HistogramFamily):
        return lambda value: metric.observe(value, tags)
    return lambda amount: metric.inc(amount, tags)


def forward_to_ray() -> None:
    """From now on, every step series of this process is mirrored into Ray's metrics."""
    set_mirror_factory(mirror_into_ray)


def stop_forwarding() -> None:
    set_mirror_factory(None)
