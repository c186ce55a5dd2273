"""A :class:`~.window.Window` from a Prometheus server, through PromQL over its HTTP API.

Why: in a cluster the numbers already are in Prometheus, over every replica of a model, for as far back as it
keeps them; and operators trust what its own ``histogram_quantile`` says. So in this mode the quantiles are
Prometheus' own answers to the dashboards' query, ``histogram_quantile(q, sum by (le, model_name)
(rate(request_<step>_seconds_bucket[<window>])))``, and counts are ``increase()`` over the same window, all
evaluated at one instant. ``selector`` (label matchers such as ``namespace="prod",job="kserve"``) narrows
every query to one service.

A Prometheus with native histograms on (``--enable-feature=native-histograms``) stores kserve-otel's step and
HTTP durations as native histograms only, under the family's own name, with no ``_bucket``, ``_count`` or
``_sum`` series. Every query here is therefore ``classic or native``: ``histogram_quantile(q, sum by (le, ...)
(rate(F_bucket[w]))) or histogram_quantile(q, sum by (...) (rate(F[w])))``, and ``histogram_count`` /
``histogram_sum`` of ``increase(F[w])`` beside ``increase(F_count[w])`` / ``increase(F_sum[w])``; whichever
has data answers, as in the shipped dashboard and rules.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
from typing import Any

from ..names import LABEL_ERROR_TYPE, LABEL_MODEL_NAME, LABEL_STEP
from . import metric_names
from .errors import ReportError
from .fetch import HTTPStatusError, get
from .reporting import stopped_reporting
from .units import promql_duration
from .window import QUANTILES, Histogram, Window, gpus_from

Vector = list[tuple[dict[str, str], float]]
#: Step families' series have no ``step`` label (batch and first-item histograms have one).
NO_STEP = f'{LABEL_STEP}=""'


class PrometheusAPI:
    """Instant queries against one Prometheus server, all at the same evaluation time."""

    def __init__(self, url: str, at: float | None = None) -> None:
        self.url = url.rstrip("/")
        self.at = time.time() if at is None else at

    def query(self, expr: str) -> Vector:
        """The instant vector ``expr`` evaluates to: (labels, value) pairs."""
        data = self._api("query", {"query": expr, "time": f"{self.at:.3f}"})
        if data.get("resultType") != "vector":
            raise ReportError(f"Prometheus answered a {data.get('resultType')} to {expr}, not a vector")
        return [(item["metric"], float(item["value"][1])) for item in data["result"]]

    def exemplars(self, expr: str, seconds: float) -> list[tuple[dict[str, str], float, str]]:
        """The exemplars of the series ``expr`` selects, of the last ``seconds``: (series labels, value, trace
        id); none when the server keeps no exemplars (Prometheus without ``--enable-feature=exemplar-storage``)."""
        params = {"query": expr, "start": f"{self.at - seconds:.3f}", "end": f"{self.at:.3f}"}
        try:
            data = self._api("query_exemplars", params)
        except ReportError:
            return []
        return [(series.get("seriesLabels", {}), float(exemplar["value"]), exemplar["labels"]["trace_id"])
                for series in data or () for exemplar in series.get("exemplars", ())
                if "trace_id" in exemplar.get("labels", {})]

    def metric_names(self, match: str, seconds: float) -> list[str]:
        """Names of the series matching ``match`` that have samples in the last ``seconds``."""
        params = {"match[]": match, "start": f"{self.at - seconds:.3f}", "end": f"{self.at:.3f}"}
        return list(self._api("label/__name__/values", params))

    def _api(self, path: str, params: dict[str, str]) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            body = get(url, "application/json", shown=f"Prometheus at {self.url}").body
        except HTTPStatusError as error:
            body = error.body  # Prometheus answers a refused query with 400 or 422 and an error document
            if _answer(body) is None:
                raise ReportError(f"{self.url} is not a Prometheus server (its /api/v1/{path} answered HTTP "
                                  f"{error.status})") from None
        answer = _answer(body)
        if answer is None:
            raise ReportError(f"{self.url} is not a Prometheus server (its /api/v1/{path} did not answer JSON)")
        if answer.get("status") != "success":
            what = params.get("query") or params.get("match[]")
            raise ReportError(f"Prometheus at {self.url} refused {what}: {answer.get('error', 'unknown error')}")
        return answer["data"]


def _answer(body: str) -> dict[str, Any] | None:
    """The Prometheus API document in ``body``, or None when it is not one."""
    try:
        answer = json.loads(body)
    except json.JSONDecodeError:
        return None
    return answer if isinstance(answer, dict) and "status" in answer else None


def prometheus_window(url: str, seconds: float, selector: str = "", at: float | None = None) -> Window:
    """What the series matching ``selector`` in Prometheus at ``url`` say about the last ``seconds``."""
    return PrometheusWindow(PrometheusAPI(url, at), seconds, selector).build()


class PrometheusWindow:
    """Builds one window: every query shares the evaluation time, the range and the selector."""

    def __init__(self, api: PrometheusAPI, seconds: float, selector: str = "") -> None:
        self.api = api
        self.seconds = seconds
        self.range = promql_duration(seconds)
        self.selector = _check_selector(selector)

    def select(self, name: str, *matchers: str) -> str:
        """``name{matchers, selector}``."""
        inside = ",".join(m for m in (*matchers, self.selector) if m)
        return f"{name}{{{inside}}}"

    def build(self) -> Window:
        names = self._step_bucket_names()
        prefix = metric_names.chosen_prefix(names)
        window = Window("prometheus", self.api.url, self.seconds, self.api.at, selector=self.selector, prefix=prefix)
        for step in sorted({metric_names.step_of(name) for name in names if metric_names.prefix_of(name) == prefix}):
            family = f"{prefix}request_{step}_seconds"
            for (model,), histogram in self.histograms(family, (LABEL_MODEL_NAME,), QUANTILES, NO_STEP).items():
                window.steps[(model, str(step))] = histogram
            self._deployments(window, family, str(step))
            exemplars = self.api.exemplars(self.select(family + "_bucket"), self.seconds) \
                + self.api.exemplars(self.select(family), self.seconds)
            for labels, value, trace_id in exemplars:
                key = (labels.get(LABEL_MODEL_NAME, ""), str(step))
                if key in window.steps:
                    window.exemplars.setdefault(key, []).append((value, trace_id))
        if not window.steps:
            raise ReportError(self._no_steps())
        errors = self.api.query(f"sum by ({LABEL_MODEL_NAME}, {LABEL_STEP}, {LABEL_ERROR_TYPE}) "
                                f"(increase({self.select(prefix + metric_names.ERRORS_METRIC)}[{self.range}]))")
        for labels, value in errors:
            key = (labels.get(LABEL_MODEL_NAME, ""), labels.get(LABEL_STEP, ""))
            window.errors.setdefault(key, {})[labels.get(LABEL_ERROR_TYPE, "")] = value
        window.first_item = self.histograms(  # type: ignore[assignment]
            prefix + metric_names.FIRST_ITEM_METRIC, (LABEL_MODEL_NAME, LABEL_STEP), (0.99,))
        post = f'http_request_method="{metric_names.INFERENCE_METHOD}"'
        window.http = self.histograms(metric_names.HTTP_DURATION_METRIC, (), QUANTILES, post).get(())
        in_flight = self.api.query(f"sum({self.select(metric_names.IN_FLIGHT_METRIC, post)})")
        window.in_flight = in_flight[0][1] if in_flight else None
        for name, to_seconds in metric_names.queue_metrics(prefix):
            queue = self.histograms(name, (), (0.99,), scale=to_seconds).get(())
            if queue is not None:
                window.queue_wait, window.queue_source = queue, name
                break
        self._process(window)
        window.gpus = gpus_from(lambda name: self.api.query(self.select(name)))
        window.stopped = stopped_reporting(self.api.query, self.select, self.range, promql_duration(self.seconds / 4))
        return window

    def _deployments(self, window: Window, family: str, step: str) -> None:
        """The Ray Serve deployments whose replicas ran ``step`` during the window, per model."""
        deployment = metric_names.DEPLOYMENT_LABEL
        increases = self._increase(family, "count", NO_STEP, f'{deployment}!=""')
        ran = self.api.query(f"count by ({LABEL_MODEL_NAME}, {deployment}) (({increases}) > 0)")
        for labels, _ in ran:
            window.deployments.setdefault((labels.get(LABEL_MODEL_NAME, ""), step), []).append(labels[deployment])
        for names in window.deployments.values():
            names.sort()

    def histograms(self, family: str, by: tuple[str, ...], quantiles: tuple[float, ...], *matchers: str,
                   scale: float = 1.0) -> dict[tuple[str, ...], Histogram]:
        """``family``'s observations over the window summed by the ``by`` labels, with Prometheus' quantiles."""
        group = ", ".join(by)
        counts = self.api.query(f"sum by ({group}) ({self._increase(family, 'count', *matchers)})")
        if not counts:
            return {}
        sums = _by(self.api.query(f"sum by ({group}) ({self._increase(family, 'sum', *matchers)})"), by)
        result = {}
        for labels, count in counts:
            key = tuple(labels.get(label, "") for label in by)
            result[key] = Histogram(count=count, sum=sums.get(key, 0.0) * scale)
        buckets, native = self.select(family + "_bucket", *matchers), self.select(family, *matchers)
        for q in quantiles:
            expr = (f"histogram_quantile({q}, sum by (le{', ' if by else ''}{group}) (rate({buckets}[{self.range}])))"
                    f" or histogram_quantile({q}, sum by ({group}) (rate({native}[{self.range}])))")
            for key, value in _by(self.api.query(expr), by).items():
                if key in result:
                    result[key].quantiles[q] = value * scale
        for histogram in result.values():  # no observations: histogram_quantile has no answer (NaN)
            for q in quantiles:
                histogram.quantiles.setdefault(q, math.nan)
        return result

    def _increase(self, family: str, part: str, *matchers: str) -> str:
        """The increase of ``family``'s ``_count`` or ``_sum`` (``part``) over the window, each series alike
        whether Prometheus stores it classic or native."""
        classic = f"increase({self.select(f'{family}_{part}', *matchers)}[{self.range}])"
        return f"{classic} or histogram_{part}(increase({self.select(family, *matchers)}[{self.range}]))"

    def _step_bucket_names(self) -> set[str]:
        """The step families' bucket series names (``[ray_]request_<step>_seconds_bucket``), native histograms
        named as their bucket series would be."""
        names = f"{metric_names.STEP_BUCKET_PROMQL}|{metric_names.STEP_NATIVE_PROMQL}"
        match = self.select("", f'__name__=~"{names}"', f'{LABEL_MODEL_NAME}!=""', NO_STEP)
        found = {name if name.endswith("_bucket") else f"{name}_bucket"
                 for name in self.api.metric_names(match, self.seconds)}
        return {name for name in found if metric_names.step_of(name)}

    def _no_steps(self) -> str:
        where = f" matching {{{self.selector}}}" if self.selector else ""
        return (f"Prometheus at {self.api.url} has no step metrics (request_<step>_seconds_bucket with a "
                f"model_name label){where} in the last {self.range}: is it scraping an instrumented model server?")

    def _process(self, window: Window) -> None:
        for name in metric_names.CPU_METRICS:
            # Per process (a series without its "type"/"mode" breakdown), then the busiest one.
            per_process = f"sum without (type, mode) (rate({self.select(name)}[{self.range}]))"
            cores = self.api.query(per_process)
            if cores:
                window.cpu_cores = max(value for _, value in cores)
                window.processes, window.process_source = len(cores), name
                break
        for name in metric_names.MEMORY_METRICS:
            memory = self.api.query(self.select(name))
            if memory:
                window.memory_bytes = max(value for _, value in memory)
                window.processes = max(window.processes, len(memory))
                window.process_source = window.process_source or name
                break


def _by(vector: Vector, by: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    return {tuple(labels.get(label, "") for label in by): value for labels, value in vector}


_MATCHER = re.compile(r'\s*[a-zA-Z_][a-zA-Z0-9_]*\s*(=~|!~|!=|=)\s*"(?:[^"\\]|\\.)*"\s*')


def _check_selector(selector: str) -> str:
    """``selector`` as label matchers without braces (``job="kserve",namespace=~"prod.*"``); refused with a
    one-line reason otherwise."""
    text = selector.strip().removeprefix("{").removesuffix("}").strip()
    if not text:
        return ""
    parts = _split_matchers(text)
    if parts is None or not all(_MATCHER.fullmatch(part) for part in parts):
        raise ReportError(f"--selector {selector!r} is not a list of label matchers "
                          f'(write it as job="kserve",namespace="prod")')
    return ",".join(part.strip() for part in parts)


def _split_matchers(text: str) -> list[str] | None:
    parts, current, quoted, escaped = [], "", False, False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            parts.append(current)
            current = ""
            continue
        current += char
    if quoted:
        return None
    parts.append(current)
    return [part for part in parts if part.strip()]
