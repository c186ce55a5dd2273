"""One scrape of a metrics endpoint: its samples by name, or a one-line reason it is not a Prometheus endpoint.

Why: the report works on samples (``request_predict_seconds_bucket{model_name="iris",le="0.1"} 42``), and
the most common mistake is pointing it at something else (the model server's root, a dashboard): an HTML or
JSON answer, or text prometheus_client's parser refuses, is named as such instead of failing later.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from .errors import ReportError
from .fetch import get

#: Asked for: the Prometheus text format (every Prometheus client serves it).
ACCEPT = "text/plain;version=0.0.4;q=1,*/*;q=0.1"
#: Asked for when looking for exemplars: OpenMetrics, the format that carries them.
ACCEPT_OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"

_NOT_METRICS = ("text/html", "application/json", "application/xml", "image/")

Labels = dict[str, str]
#: An exemplar of a bucket series: the series' labels, the observed value, its Unix time and trace id.
Exemplar = tuple[Labels, float, float, str]


@dataclass
class Scrape:
    """The samples of one scrape, with when it was answered (wall clock and monotonic seconds)."""

    url: str
    wall_time: float
    monotonic: float
    samples: dict[str, list[tuple[Labels, float]]] = field(default_factory=dict)

    def series(self, name: str) -> list[tuple[Labels, float]]:
        """Every sample called ``name`` (``request_predict_seconds_bucket``, ``process_cpu_seconds_total``)."""
        return self.samples.get(name, [])

    def names(self) -> set[str]:
        return set(self.samples)


def scrape(url: str) -> Scrape:
    """GET ``url`` and parse it. Raises :class:`ReportError` when it cannot be reached or is not metrics."""
    response = get(url, ACCEPT)
    content_type = response.content_type.split(";")[0].strip().lower()
    if content_type.startswith(_NOT_METRICS):
        raise ReportError(f"{url} answered {content_type}, not Prometheus metrics "
                          f"(is this the metrics path? KServe serves /metrics)")
    result = Scrape(url, time.time(), time.monotonic())
    try:
        for family in _parse(response.body, openmetrics=content_type == "application/openmetrics-text"):
            for sample in family.samples:
                result.samples.setdefault(sample.name, []).append((dict(sample.labels), float(sample.value)))
    except ValueError as error:
        first_line = next((line for line in response.body.splitlines() if line.strip()), "")[:60]
        raise ReportError(f"{url} is not in the Prometheus text format ({_one_line(error)}; it begins "
                          f"{first_line!r}): is this the metrics path? KServe serves /metrics") from None
    return result


def exemplars(url: str, names: set[str]) -> dict[str, list[Exemplar]]:
    """The exemplars of the samples called one of ``names`` on ``url``, by sample name, from one OpenMetrics
    scrape: what a best-effort look finds (an endpoint without OpenMetrics or exemplars gives none)."""
    try:
        response = get(url, ACCEPT_OPENMETRICS)
        if response.content_type.split(";")[0].strip().lower() != "application/openmetrics-text":
            return {}
        found: dict[str, list[Exemplar]] = {}
        for family in _parse(response.body, openmetrics=True):
            for sample in family.samples:
                exemplar = sample.exemplar
                if sample.name in names and exemplar is not None and "trace_id" in exemplar.labels:
                    when = float(exemplar.timestamp) if exemplar.timestamp is not None else math.nan
                    found.setdefault(sample.name, []).append(
                        (dict(sample.labels), float(exemplar.value), when, exemplar.labels["trace_id"]))
        return found
    except (ReportError, ValueError):
        return {}


def _parse(body: str, openmetrics: bool):  # type: ignore[no-untyped-def]
    if openmetrics:
        from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse
    else:
        from prometheus_client.parser import text_string_to_metric_families as parse
    return list(parse(body))


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text[:80] + ("..." if len(text) > 80 else "")
