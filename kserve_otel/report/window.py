"""What a model server did during a window of time, as its metrics count it: the input of the analysis.

Why a model of its own: the numbers come from two places (the difference of two scrapes of one endpoint, or
PromQL over a Prometheus server) and must be analysed, judged and printed the same way. Both sources fill a
:class:`Window`; everything after that does not know where the numbers came from.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .metric_names import GPU_GAUGES, GPU_INDEX, GPU_UUID, step_order
from .quantile import bucket_quantile

QUANTILES = (0.5, 0.9, 0.99)


@dataclass
class Histogram:
    """The observations of one histogram during the window: how many, their sum, and either the cumulative
    bucket counts (quantiles estimated here) or quantiles a Prometheus server computed."""

    count: float
    sum: float
    buckets: tuple[tuple[float, float], ...] = ()
    quantiles: dict[float, float] = field(default_factory=dict)

    def quantile(self, q: float) -> float:
        """The ``q``-quantile as ``histogram_quantile`` gives it (NaN without observations)."""
        if q in self.quantiles:
            return self.quantiles[q]
        return bucket_quantile(q, self.buckets) if self.buckets else math.nan

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count > 0 else math.nan


@dataclass
class Gpu:
    """One GPU device as the last sample saw it."""

    index: str
    uuid: str
    memory_used_bytes: float | None = None
    memory_total_bytes: float | None = None
    utilization_ratio: float | None = None


@dataclass
class Stopped:
    """A scrape target or a Ray Serve replica that reported during the window and no longer does."""

    kind: str  # "target" or "replica"
    #: The target's instance (host:port) or the replica's id.
    name: str
    #: target: "down" or "no longer scraped"; replica (in the window's last quarter): "unhealthy" or "no longer
    #: reported".
    state: str
    #: The Ray node it ran on (Ray's NodeAddress label), when its series say.
    node: str | None = None
    job: str | None = None
    deployment: str | None = None
    application: str | None = None


@dataclass
class Window:
    """Everything the report knows about ``seconds`` of a model server's (or a fleet's) life."""

    source: str  # "scrape" (two scrapes of an endpoint) or "prometheus"
    target: str  # the endpoint or the Prometheus server
    seconds: float
    end_time: float  # wall clock, seconds since the epoch
    #: (model, step) -> that step's durations.
    steps: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    #: (model, step) -> error type -> calls that raised it.
    errors: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    #: (model, step) -> time to the first item of streaming steps.
    first_item: dict[tuple[str, str], Histogram] = field(default_factory=dict)
    #: Inference (POST) requests as the HTTP server measured them, when it exports http_server_* metrics.
    http: Histogram | None = None
    #: Inference requests in flight at the end of the window.
    in_flight: float | None = None
    queue_wait: Histogram | None = None
    queue_source: str | None = None
    #: CPU cores the busiest process used on average, and its resident memory (the largest).
    cpu_cores: float | None = None
    memory_bytes: float | None = None
    processes: int = 0
    process_source: str | None = None
    gpus: list[Gpu] = field(default_factory=list)
    selector: str = ""
    #: "" or "ray_": the spelling of kserve-otel's families in the source (see metric_names).
    prefix: str = ""
    #: (model, step) -> the Ray Serve deployments whose replicas ran it during the window (Ray's series only).
    deployments: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    #: What reported during the window and no longer does (None: not known, as from two scrapes of one endpoint).
    stopped: list[Stopped] | None = None
    #: (model, step) -> the exemplars of its histogram observed during the window: (seconds, trace id).
    exemplars: dict[tuple[str, str], list[tuple[float, str]]] = field(default_factory=dict)

    def models(self) -> list[str]:
        return sorted({model for model, _ in self.steps})

    def steps_of(self, model: str) -> list[str]:
        return sorted((step for m, step in self.steps if m == model), key=step_order)


def gpus_from(read: Callable[[str], Iterable[tuple[dict[str, str], float]]]) -> list[Gpu]:
    """The GPUs in the GPU gauges that ``read(name)`` returns as (labels, value) pairs, one per device (and
    per ``instance``, when the samples come from Prometheus)."""
    devices: dict[tuple[str, str, str], Gpu] = {}
    for name, attribute in GPU_GAUGES:
        for labels, value in read(name):
            key = (labels.get("instance", ""), labels.get(GPU_INDEX, ""), labels.get(GPU_UUID, ""))
            setattr(devices.setdefault(key, Gpu(key[1], key[2])), attribute, value)
    return [devices[key] for key in sorted(devices)]
