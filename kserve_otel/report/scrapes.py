"""A :class:`~.window.Window` from two scrapes of one metrics endpoint: the increase of every counter between
them, as Prometheus' ``increase()`` would see it without extrapolation.

Why: with no Prometheus at hand (a pod, a laptop, a CI job), the endpoint itself holds cumulative counters; the
difference of two scrapes ``interval`` apart is exactly what happened in between. A counter that went down
was reset (the server restarted): its new value is the increase, as Prometheus counts it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Hashable

from ..names import LABEL_ERROR_TYPE, LABEL_MODEL_NAME, LABEL_STEP
from . import metric_names
from .errors import ReportError
from .exposition import Labels, Scrape, exemplars, scrape
from .window import Histogram, Window, gpus_from

Key = Hashable
Grouping = Callable[[Labels], "Key | None"]


def scrape_window(url: str, seconds: float, sleep: Callable[[float], None] = time.sleep) -> Window:
    """Scrape ``url``, wait ``seconds``, scrape again, and return what happened in between."""
    first = scrape(url)
    if not _step_names(first) and not _is_kserve_otel(first):  # kserve-otel's step series appear with traffic
        raise ReportError(_no_steps(url))
    sleep(max(0.0, seconds - (time.monotonic() - first.monotonic)))
    window = window_from_scrapes(first, scrape(url))
    _exemplars(window, url, first.wall_time)
    return window


def _exemplars(window: Window, url: str, since: float) -> None:
    """The step exemplars observed since ``since`` (the first scrape), from one more, OpenMetrics, scrape."""
    names = {f"{window.prefix}request_{step}_seconds_bucket": step for _, step in window.steps}
    for name, found in exemplars(url, set(names)).items():
        for labels, value, when, trace_id in found:
            model = labels.get(LABEL_MODEL_NAME)
            if model and (model, names[name]) in window.steps and not when < since:
                window.exemplars.setdefault((model, names[name]), []).append((value, trace_id))


def window_from_scrapes(first: Scrape, second: Scrape) -> Window:
    """What happened between ``first`` and ``second`` (two scrapes of the same endpoint)."""
    seconds = max(second.monotonic - first.monotonic, 1e-9)
    step_names = _step_names(first) | _step_names(second)
    prefix = metric_names.chosen_prefix(step_names)
    window = Window("scrape", second.url, seconds, second.wall_time, prefix=prefix)
    for name in sorted(name for name in step_names if metric_names.prefix_of(name) == prefix):
        step = str(metric_names.step_of(name))
        family = name.removesuffix("_bucket")
        for model, histogram in _histograms(first, second, family, _by_model).items():
            window.steps[(str(model), step)] = histogram
        for (model, deployment), count in sorted(_increases(first, second, f"{family}_count",  # type: ignore[misc]
                                                            _by_model_and_deployment).items()):
            if count > 0:
                window.deployments.setdefault((model, step), []).append(deployment)
    if not window.steps:
        raise ReportError(_no_steps(second.url))
    errors = _increases(first, second, prefix + metric_names.ERRORS_METRIC, _by_error)
    for (model, step, error_type), count in errors.items():  # type: ignore[misc]
        window.errors.setdefault((model, step), {})[error_type] = count
    window.first_item = _histograms(  # type: ignore[assignment]
        first, second, prefix + metric_names.FIRST_ITEM_METRIC, _by_model_and_step)
    window.http = _histograms(first, second, metric_names.HTTP_DURATION_METRIC, _inference).get(())
    in_flight = [value for labels, value in second.series(metric_names.IN_FLIGHT_METRIC) if _inference(labels) == ()]
    window.in_flight = sum(in_flight) if in_flight else None
    for name, to_seconds in metric_names.queue_metrics(prefix):
        queue = _histograms(first, second, name, lambda labels: (), to_seconds).get(())
        if queue is not None:
            window.queue_wait, window.queue_source = queue, name
            break
    _process(window, first, second)
    window.gpus = gpus_from(second.series)
    return window


def _no_steps(url: str) -> str:
    return (f"{url} has no step metrics (request_<step>_seconds histograms with a model_name label): is the "
            f"model server instrumented by kserve-otel, and has it served a request?")


def _is_kserve_otel(scrape: Scrape) -> bool:
    """Whether the endpoint is kserve-otel's (its resource says so), which shows steps once they have run."""
    return any(labels.get("telemetry_distro_name") == "kserve-otel" for labels, _ in scrape.series("target_info"))


def _step_names(scrape: Scrape) -> set[str]:
    """The step families' bucket sample names in ``scrape``."""
    return {name for name in scrape.names() if metric_names.step_of(name)
            and any(_by_model(labels) for labels, _ in scrape.series(name))}


def _by_model(labels: Labels) -> Key | None:
    return metric_names.model_of(labels) if LABEL_STEP not in labels else None


def _by_model_and_deployment(labels: Labels) -> Key | None:
    """A Ray Serve replica's step series: (model, deployment)."""
    model, deployment = _by_model(labels), labels.get(metric_names.DEPLOYMENT_LABEL)
    return (model, deployment) if model and deployment else None


def _by_model_and_step(labels: Labels) -> Key | None:
    model, step = metric_names.model_of(labels), labels.get(LABEL_STEP)
    return (model, step) if model and step else None


def _by_error(labels: Labels) -> Key | None:
    model, step = metric_names.model_of(labels), labels.get(LABEL_STEP)
    return (model, step, labels.get(LABEL_ERROR_TYPE, "")) if model and step else None


def _inference(labels: Labels) -> Key | None:
    return () if labels.get("http_request_method") == metric_names.INFERENCE_METHOD else None


def _increases(first: Scrape, second: Scrape, name: str, group: Grouping, scale: float = 1.0) -> dict[Key, float]:
    """The increase of every series ``name`` between the scrapes, summed by ``group(labels)`` (``None``: left
    out). A series that went down was reset: its new value is its increase."""
    before = {_identity(labels): value for labels, value in first.series(name)}
    totals: dict[Key, float] = defaultdict(float)
    for labels, value in second.series(name):
        key = group(labels)
        if key is None:
            continue
        previous = before.get(_identity(labels), 0.0)
        totals[key] += (value - previous if value >= previous else value) * scale
    return dict(totals)


def _histograms(first: Scrape, second: Scrape, family: str, group: Grouping, scale: float = 1.0) -> dict[Key, Histogram]:
    """The histograms of ``family`` over the window, summed by ``group`` (bounds and sums times ``scale``)."""
    def by_bucket(labels: Labels) -> Key | None:
        key = group({k: v for k, v in labels.items() if k != "le"})
        return None if key is None or "le" not in labels else (key, float(labels["le"]) * scale)

    buckets: dict[Key, list[tuple[float, float]]] = defaultdict(list)
    for (key, bound), count in _increases(first, second, f"{family}_bucket", by_bucket).items():  # type: ignore[misc]
        buckets[key].append((bound, count))
    counts = _increases(first, second, f"{family}_count", group)
    sums = _increases(first, second, f"{family}_sum", group, scale)
    return {key: Histogram(count=counts.get(key, 0.0), sum=sums.get(key, 0.0), buckets=tuple(sorted(bounds)))
            for key, bounds in buckets.items()}


def _identity(labels: Labels) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


def _process(window: Window, first: Scrape, second: Scrape) -> None:
    """CPU cores used (the increase of CPU seconds over the window) and resident memory at its end."""
    for name in metric_names.CPU_METRICS:
        if second.series(name):
            cpu = _increases(first, second, name, lambda labels: ())
            window.cpu_cores = cpu.get((), 0.0) / window.seconds
            window.process_source, window.processes = name, 1
            break
    for name in metric_names.MEMORY_METRICS:
        values = [value for _, value in second.series(name)]
        if values:
            window.memory_bytes = max(values)
            window.process_source = window.process_source or name
            window.processes = 1
            break
