"""Cost of one scrape of the Prometheus endpoint, against prometheus_client's own exposition of the same series.

Why: KServe's metrics go straight from prometheus_client histograms to text; kserve-otel's endpoint collects the
OpenTelemetry SDK's metrics through a bridged ``PrometheusMetricReader`` and writes the step series from their
snapshot (:mod:`kserve_otel.export.text_exposition`). A scrape every few seconds on a busy model server must
not cost more than what KServe's own ``/metrics`` costs today, and must stay cheap with many series.

What is timed, with 50 models x 4 steps (``preprocess``, ``predict``, ``postprocess``, ``explain``) = 200
histogram series, each with a few observations:

* in process: ``kserve_otel.export.exposition.render(registry, None, None)`` on
  ``configure(...).prometheus_registry``, against ``prometheus_client.generate_latest`` of a fresh
  ``CollectorRegistry`` holding the same 200 series in prometheus_client ``Histogram``s with KServe's buckets
  (KServe's own layout); then again with 500 models x 4 steps = 2,000 series on both sides (the cardinality
  limit of one family is 2,000);
* over HTTP on loopback: a GET of the running endpoint, against prometheus_client's ``start_http_server`` on
  the baseline registry; a new connection per scrape, as plain text, and again with ``Accept-Encoding: gzip``
  as Prometheus sends it.

prometheus_client also exposes a ``_created`` sample per series, and kserve-otel a ``target_info`` family: the
bodies are not byte-for-byte the same size, which the table shows.
"""

from __future__ import annotations

import cProfile
import http.client
import os
import pstats
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from prometheus_client import (
    CollectorRegistry,
    Histogram,
    disable_created_metrics,
    enable_created_metrics,
    generate_latest,
    start_http_server,
)

import kserve_otel
from kserve_otel.export.exposition import render
from kserve_otel.names import KSERVE_BUCKETS, KSERVE_STEPS, step_metric_name

from .harness import Case, Section, Table, Target, fmt_spread, fmt_time, measure, module_main, ratio

MODELS = 50
OBSERVATIONS = 5
LIMIT = 1.5
MANY_MODELS = 500  # x 4 steps = 2,000 series
MANY_LIMIT = 0.5


#: The Accept headers of Prometheus 2.42 with ``--enable-feature=exemplar-storage`` and with
#: ``--enable-feature=native-histograms``.
OPENMETRICS_ACCEPT = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"\
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
PROTOBUF_ACCEPT = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.7,"\
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.1"
ENCODINGS = (("ours", "plain text"), ("ours-openmetrics", "OpenMetrics"), ("ours-protobuf", "protobuf"))


def _target(x: Any) -> Any:
    return x


@dataclass
class Endpoints:
    """kserve-otel's endpoint and the prometheus_client baseline, holding the same series."""

    telemetry: kserve_otel.Telemetry
    baseline: CollectorRegistry
    histograms: dict[str, Histogram]  # the baseline's, by step

    @property
    def registry(self) -> Any:
        return self.telemetry.prometheus_registry

    def render_ours(self) -> bytes:
        return render(self.registry, None, None)[1]

    def render_ours_openmetrics(self) -> bytes:
        """What a Prometheus with exemplar storage asks for (OpenMetrics, with the exemplars)."""
        return render(self.registry, OPENMETRICS_ACCEPT, None)[1]

    def render_ours_protobuf(self) -> bytes:
        """What a Prometheus with native histograms asks for (delimited protobuf, classic and native buckets)."""
        return render(self.registry, PROTOBUF_ACCEPT, None)[1]

    def render_baseline(self) -> bytes:
        return generate_latest(self.baseline)

    def render_through_reader(self) -> bytes:
        """The same body the way ``render`` wrote it before :mod:`kserve_otel.export.text_exposition`: every
        series through the bridge's OpenTelemetry data, the reader's families and prometheus_client's
        encoder."""
        return generate_latest(self.registry)

    def render_baseline_without_created(self) -> bytes:
        """The baseline without its ``_created`` samples (``PROMETHEUS_DISABLE_CREATED_SERIES``), like for like."""
        disable_created_metrics()
        try:
            return generate_latest(self.baseline)
        finally:
            enable_created_metrics()


def build(models: int = MODELS, observations: int = OBSERVATIONS, prefix: str = "scrape") -> Endpoints:
    """configure() the endpoint (free loopback port) and fill both sides with ``models`` x 4 step series.

    Every series gets ``observations`` calls: through ``@instrument_step`` for kserve-otel, through
    ``labels(model_name=...).time()`` for prometheus_client.
    """
    telemetry = kserve_otel.configure(
        metrics_host="127.0.0.1", metrics_port=0, metrics_path="/metrics", annotations_file="/nonexistent",
        metrics_exporters="prometheus", traces_exporter="none",
    )
    baseline = CollectorRegistry()
    histograms = {
        step: Histogram(step_metric_name(step), f"Duration of the {step} step", ["model_name"],
                        registry=baseline, buckets=KSERVE_BUCKETS)
        for step in KSERVE_STEPS
    }
    endpoints = Endpoints(telemetry, baseline, histograms)
    add_models(endpoints, 0, models, observations, prefix)
    return endpoints


def add_models(endpoints: Endpoints, first: int, last: int, observations: int = OBSERVATIONS,
               prefix: str = "scrape") -> None:
    """Models ``first`` to ``last - 1``, 4 step series each, on both sides (series are never removed)."""
    for i in range(first, last):
        model = f"{prefix}-{i:03d}"
        for step in KSERVE_STEPS:
            instrumented = kserve_otel.instrument_step(step, _target, model_name=model)
            child = endpoints.histograms[step].labels(model_name=model)
            for _ in range(observations):
                instrumented(None)
                with child.time():
                    _target(None)


def http_getter(url: str, gzip: bool) -> Any:
    parts = urlsplit(url)
    headers = {"Accept-Encoding": "gzip"} if gzip else {}

    def get() -> int:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        try:
            conn.request("GET", parts.path or "/", headers=headers)
            response = conn.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {url} answered {response.status}")
            return len(body)
        finally:
            conn.close()

    return get


def _repeat(call: Any) -> Any:
    def loop(n: int) -> None:
        for _ in range(n):
            call()

    return loop


def _profile(endpoints: Endpoints, scrapes: int = 20) -> Table:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(scrapes):
        endpoints.render_ours()
    profiler.disable()
    stats = pstats.Stats(profiler)
    rows = []
    entries = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)  # type: ignore[attr-defined]
    for (path, line, func), (_, calls, tottime, cumtime, _) in entries[:15]:
        where = func if path == "~" else f"{os.path.basename(os.path.dirname(path))}/{os.path.basename(path)}:{line} {func}"
        rows.append([f"`{where}`", f"{calls / scrapes:,.0f}", fmt_time(tottime * 1e9 / scrapes),
                     fmt_time(cumtime * 1e9 / scrapes)])
    return Table(
        f"cProfile of kserve-otel's render, per scrape (top 15 by own time, {scrapes} scrapes; profiling inflates)",
        ["function", "calls", "own time", "cumulative"], rows,
    )


def run(quick: bool) -> Section:
    rounds, target_ns = (3, 20e6) if quick else (31, 100e6)
    endpoints = build()
    server, thread = start_http_server(0, addr="127.0.0.1", registry=endpoints.baseline)
    baseline_url = f"http://127.0.0.1:{server.server_address[1]}/metrics"
    ours_url = endpoints.telemetry.metrics_url
    try:
        if ours_url is None:
            raise RuntimeError("kserve-otel's endpoint did not start")
        render_timings = measure([
            Case("ours", _repeat(endpoints.render_ours)), Case("prometheus_client", _repeat(endpoints.render_baseline)),
            Case("ours-openmetrics", _repeat(endpoints.render_ours_openmetrics)),
            Case("ours-protobuf", _repeat(endpoints.render_ours_protobuf)),
            Case("prometheus_client-no-created", _repeat(endpoints.render_baseline_without_created)),
        ], rounds, target_ns)
        http_timings = measure([
            Case("ours", _repeat(http_getter(ours_url, False))),
            Case("prometheus_client", _repeat(http_getter(baseline_url, False))),
            Case("ours-gzip", _repeat(http_getter(ours_url, True))),
            Case("prometheus_client-gzip", _repeat(http_getter(baseline_url, True))),
        ], rounds, target_ns)
        sizes = {
            "ours": len(endpoints.render_ours()), "prometheus_client": len(endpoints.render_baseline()),
            "ours-openmetrics": len(endpoints.render_ours_openmetrics()),
            "ours-protobuf": len(endpoints.render_ours_protobuf()),
            "prometheus_client-no-created": len(endpoints.render_baseline_without_created()),
            "ours-gzip": http_getter(ours_url, True)(), "prometheus_client-gzip": http_getter(baseline_url, True)(),
        }
        section = Section(
            f"Scrape cost: {MODELS} models x {len(KSERVE_STEPS)} steps = {MODELS * len(KSERVE_STEPS)} histogram series",
            __doc__.split("\n\n", 1)[1].strip() if __doc__ else "",
        )
        comparisons = (  # (what, timings, ours, theirs, judged against the target)
            ("in-process render", render_timings, "ours", "prometheus_client", True),
            ("in-process render, OpenMetrics (exemplars)", render_timings, "ours-openmetrics", "prometheus_client",
             True),
            ("in-process render, protobuf (native histograms)", render_timings, "ours-protobuf", "prometheus_client",
             True),
            ("in-process render, baseline without `_created`", render_timings, "ours",
             "prometheus_client-no-created", False),
            ("HTTP GET, plain text", http_timings, "ours", "prometheus_client", True),
            ("HTTP GET, gzip", http_timings, "ours-gzip", "prometheus_client-gzip", True),
        )
        rows = []
        for what, timings, ours, theirs, judged in comparisons:
            value = ratio(timings.median(ours), timings.median(theirs))
            rows.append([
                what, fmt_time(timings.median(ours)), fmt_spread(timings, ours), fmt_time(timings.median(theirs)),
                fmt_spread(timings, theirs), "—" if value is None else f"{value:.2f}",
                f"{sizes[ours]:,} / {sizes[theirs]:,}",
            ])
            if judged:
                section.targets.append(Target(
                    f"scrape, {what}: kserve-otel / prometheus_client", value, LIMIT,
                    f"{fmt_time(timings.median(ours))} / {fmt_time(timings.median(theirs))}",
                ))
        section.tables.append(Table(
            f"time per scrape (median of {rounds} samples)",
            ["what", "kserve-otel", "p25 – p75", "prometheus_client", "p25 – p75", "ratio", "body bytes (ours / theirs)"],
            rows,
        ))
        section.notes.append(
            "The untimed row compares with prometheus_client's body without `_created` samples (like for like); "
            "the targets compare with what KServe serves by default."
        )
        # Then 2,000 series: the models up to MANY_MODELS join the same endpoint and baseline.
        add_models(endpoints, MODELS, MANY_MODELS)
        many = measure([
            Case("ours", _repeat(endpoints.render_ours)), Case("prometheus_client", _repeat(endpoints.render_baseline)),
            Case("through-reader", _repeat(endpoints.render_through_reader)),
            Case("ours-openmetrics", _repeat(endpoints.render_ours_openmetrics)),
            Case("ours-protobuf", _repeat(endpoints.render_ours_protobuf)),
        ], rounds, target_ns)
        series = MANY_MODELS * len(KSERVE_STEPS)
        rows = []
        bodies = {"ours": endpoints.render_ours, "through-reader": endpoints.render_through_reader,
                  "ours-openmetrics": endpoints.render_ours_openmetrics, "ours-protobuf": endpoints.render_ours_protobuf}
        for what, ours in (("kserve-otel's render, plain text", "ours"),
                           ("every series through the OpenTelemetry reader (the render before)", "through-reader"),
                           ("kserve-otel's render, OpenMetrics (exemplars)", "ours-openmetrics"),
                           ("kserve-otel's render, protobuf (native histograms)", "ours-protobuf")):
            r = ratio(many.median(ours), many.median("prometheus_client"))
            body = bodies[ours]()
            rows.append([what, fmt_time(many.median(ours)), fmt_spread(many, ours),
                         fmt_time(many.median("prometheus_client")), fmt_spread(many, "prometheus_client"),
                         "—" if r is None else f"{r:.2f}", f"{len(body):,} / {len(endpoints.render_baseline()):,}"])
        section.tables.append(Table(
            f"in-process render of {series:,} histogram series (median of {rounds} samples)",
            ["what", "kserve-otel", "p25 – p75", "prometheus_client", "p25 – p75", "ratio", "body bytes (ours / theirs)"],
            rows,
        ))
        section.notes.append(
            f"With {series:,} series the second row (not judged) is the same body written the way the "
            "render did before it wrote the step series from their snapshot: the gain is the difference of the rows."
        )
        for ours, encoding in ENCODINGS:
            section.targets.append(Target(
                f"scrape, {series:,} series, in-process render, {encoding}: kserve-otel / prometheus_client's text",
                ratio(many.median(ours), many.median("prometheus_client")), MANY_LIMIT,
                f"{fmt_time(many.median(ours))} / {fmt_time(many.median('prometheus_client'))}",
            ))
        if any(target.status == "MISS" for target in section.targets):
            section.tables.append(_profile(endpoints))
        return section
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        kserve_otel.shutdown()


if __name__ == "__main__":
    module_main(run)
