"""The numbers of the report, per model and step and for the server, computed from a :class:`~.window.Window`.

Why apart from the verdict: these are facts (a rate, a p99, a share of time, requests in flight), the same
for anyone reading the report; the verdict that follows is a judgement with thresholds. Keeping them apart
lets ``--json`` give every number and lets the judgement change without touching how numbers are made.

Two numbers are derived rather than read, both by Little's law (the average number of requests in a place is
the time they spent there divided by the window): *concurrency*, the requests in the server on average (the
HTTP durations' sum over the window), and *in steps*, the step calls running on average (the steps'
durations' sum over the window). Their difference is the requests that were in the server but in no step:
waiting for the event loop, a worker, or a thread.

Shares of time and *in steps* assume a model's steps run one after the other, as KServe's preprocess, predict
and postprocess do. A step that runs inside another (a custom ``tokenize`` called by preprocess; KServe's
postprocess of a streaming predict, which spans the stream) is counted in both, so shares then add up to more
than the time spent and *in steps* is overstated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .window import QUANTILES, Gpu, Histogram, Stopped, Window


@dataclass
class StepStats:
    step: str
    calls: float
    rate_per_second: float
    p50_seconds: float
    p90_seconds: float
    p99_seconds: float
    mean_seconds: float
    #: This step's part of the time the model's requests spent in steps.
    time_share: float
    errors: float
    error_ratio: float
    error_types: dict[str, float] = field(default_factory=dict)
    #: Streaming steps: p99 of the time to the first item.
    first_item_p99_seconds: float | None = None


@dataclass
class ModelStats:
    model: str
    #: The calls of the model's most-called step (every request runs it once).
    requests: float
    rate_per_second: float
    errors: float
    error_ratio: float
    #: The sum of the steps' p99s: an upper-bound estimate of the model's end-to-end p99.
    latency_p99_seconds: float
    #: Seconds of step time per second of window: step calls running on average.
    busy: float
    dominant_step: str | None
    steps: list[StepStats]
    #: step -> the Ray Serve deployments whose replicas ran it (Ray's series only).
    step_deployments: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class ServerStats:
    #: Inference (POST) requests as the HTTP server measured them (None: no http_server_* metrics).
    http_requests: float | None
    http_rate_per_second: float | None
    http_p50_seconds: float | None
    http_p90_seconds: float | None
    http_p99_seconds: float | None
    in_flight: float | None
    #: Requests in the server on average (Little's law on the HTTP durations).
    concurrency: float | None
    #: Step calls running on average (Little's law on the step durations).
    in_steps: float
    #: Requests in the server but in no step, on average: ``concurrency - in_steps``.
    waiting: float | None
    queue_wait_source: str | None
    queue_wait_mean_seconds: float | None
    queue_wait_p99_seconds: float | None
    cpu_cores: float | None
    memory_bytes: float | None
    processes: int
    process_source: str | None
    gpus: list[Gpu]
    #: Targets and Ray Serve replicas that reported during the window and no longer do (None: not known).
    stopped_reporting: list[Stopped] | None = None


@dataclass
class Analysis:
    seconds: float
    models: list[ModelStats]
    server: ServerStats
    #: (model, step) -> exemplars of the window: (seconds, trace id) of observations with a trace.
    exemplars: dict[tuple[str, str], list[tuple[float, str]]] = field(default_factory=dict)

    @property
    def requests(self) -> float:
        return sum(model.requests for model in self.models)


def analyse(window: Window) -> Analysis:
    models = [_model(window, model) for model in window.models()]
    return Analysis(window.seconds, models, _server(window, models), dict(window.exemplars))


def _model(window: Window, model: str) -> ModelStats:
    names = window.steps_of(model)
    total_time = sum(window.steps[(model, step)].sum for step in names)
    steps = [_step(window, model, step, total_time) for step in names]
    requests = max((step.calls for step in steps), default=0.0)
    errors = sum(step.errors for step in steps)
    ran = [step for step in steps if step.calls > 0]
    return ModelStats(
        model=model, requests=requests, rate_per_second=requests / window.seconds, errors=errors,
        error_ratio=_ratio(errors, requests),
        latency_p99_seconds=sum(step.p99_seconds for step in ran) if ran else math.nan,
        busy=total_time / window.seconds,
        dominant_step=max(ran, key=lambda step: step.time_share).step if ran and total_time > 0 else None,
        steps=steps,
        step_deployments={step: list(window.deployments[(model, step)]) for step in names
                          if (model, step) in window.deployments},
    )


def _step(window: Window, model: str, step: str, model_time: float) -> StepStats:
    histogram = window.steps[(model, step)]
    p50, p90, p99 = (histogram.quantile(q) for q in QUANTILES)
    error_types = window.errors.get((model, step), {})
    errors = sum(error_types.values())
    first_item = window.first_item.get((model, step))
    return StepStats(
        step=step, calls=histogram.count, rate_per_second=histogram.count / window.seconds,
        p50_seconds=p50, p90_seconds=p90, p99_seconds=p99, mean_seconds=histogram.mean,
        time_share=_ratio(histogram.sum, model_time), errors=errors, error_ratio=_ratio(errors, histogram.count),
        error_types=dict(sorted(error_types.items())),
        first_item_p99_seconds=first_item.quantile(0.99) if first_item is not None and first_item.count else None,
    )


def _server(window: Window, models: list[ModelStats]) -> ServerStats:
    http = window.http
    in_steps = sum(model.busy for model in models)
    concurrency = http.sum / window.seconds if http is not None else None
    queue = window.queue_wait
    return ServerStats(
        http_requests=http.count if http else None,
        http_rate_per_second=http.count / window.seconds if http else None,
        http_p50_seconds=_quantile(http, 0.5), http_p90_seconds=_quantile(http, 0.9),
        http_p99_seconds=_quantile(http, 0.99),
        in_flight=window.in_flight, concurrency=concurrency, in_steps=in_steps,
        waiting=max(0.0, concurrency - in_steps) if concurrency is not None else None,
        queue_wait_source=window.queue_source,
        queue_wait_mean_seconds=queue.mean if queue is not None and queue.count else None,
        queue_wait_p99_seconds=_quantile(queue, 0.99),
        cpu_cores=window.cpu_cores, memory_bytes=window.memory_bytes, processes=window.processes,
        process_source=window.process_source, gpus=list(window.gpus),
        stopped_reporting=list(window.stopped) if window.stopped is not None else None,
    )


def _quantile(histogram: Histogram | None, q: float) -> float | None:
    return histogram.quantile(q) if histogram is not None and histogram.count > 0 else None


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole > 0 else math.nan
