"""Zero-code auto-instrumentation with a bad setting (issue 13, item 4): an unmodified KServe program
(``tests/kserve_e2e/serve.py --bare``) with ``KSERVE_OTEL_ENABLED=true`` and one bad variable. Before, one
line said so and kserve-otel was off altogether, step metrics included. Now only what the bad variable
configures is off, the one line names the setting, the value and what is accepted, and a server with
``--workers 2`` says it once, not once per process."""

from __future__ import annotations

import httpx
import pytest
from conftest import KServeProcess, families, histogram_count, scrape, serving, wait_until

pytestmark = pytest.mark.e2e

V1_BODY = {"instances": [[6.8, 2.8, 4.8, 1.4]]}
#: Spans on the console: ``ConsoleSpanExporter`` prints each span as indented JSON.
SPAN_LINE = '"name": "predict iris"'
#: Exported within 0.2 s rather than the batch processor's 5 s.
FAST_EXPORT = {"OTEL_BSP_SCHEDULE_DELAY": "200"}


@pytest.fixture(scope="module")
def servers():
    on = {"KSERVE_OTEL_ENABLED": "true", **FAST_EXPORT}
    started = {
        "sampler": KServeProcess("iris", bare=True, args=["--workers", "2"], env={
            **on, "OTEL_TRACES_SAMPLER": "garbage", "KSERVE_OTEL_TRACES_EXPORTER": "console"}),
        "exporter": KServeProcess("iris", bare=True, env={**on, "OTEL_TRACES_EXPORTER": "zipkin"}),
        "port": KServeProcess("iris", bare=True, env={
            **on, "KSERVE_OTEL_METRICS_PORT": "abc", "KSERVE_OTEL_TRACES_EXPORTER": "console"}),
    }
    yield from serving(started)


def _send(server: KServeProcess, count: int) -> None:
    for _ in range(count):
        with httpx.Client(base_url=server.url, timeout=30) as client:  # a new connection: any worker
            client.post("/v1/models/iris:predict", json=V1_BODY).raise_for_status()


def _assert_step_metrics_served(server: KServeProcess, requests: int) -> None:
    before = histogram_count(scrape(f"{server.url}/metrics"), "request_predict_seconds", model_name="iris")
    _send(server, requests)
    for _ in range(4):  # with two workers a scrape lands on either: each must show the total
        text = scrape(f"{server.url}/metrics")
        assert histogram_count(text, "request_predict_seconds", model_name="iris") - before == requests
        assert "target_info" in families(text)  # kserve-otel's endpoint, not KServe's own prometheus_client


def _lines(server: KServeProcess, text: str) -> list[str]:
    return [line for line in server.log().splitlines() if text in line]


def test_a_bad_sampler_turns_off_span_export_only_and_says_so_once(servers):
    server = servers["sampler"]
    _assert_step_metrics_served(server, 12)
    lines = _lines(server, "setting traces_sampler")
    assert len(lines) == 1, lines  # the parent said it; its two workers, resolving the same variables, did not
    assert lines[0].startswith("kserve-otel: setting traces_sampler: 'garbage' from environment variable "
                               "OTEL_TRACES_SAMPLER is not valid; accepted: always_on, always_off, traceidratio")
    assert lines[0].endswith("kserve-otel exports no spans (metrics are not affected)")
    assert _lines(server, "kserve-otel: metrics:")[0].endswith("traces: not exported by kserve-otel")
    # The "port" server exports its spans to the console: once they show, this one's would have too.
    _send(servers["port"], 1)
    wait_until(lambda: _lines(servers["port"], SPAN_LINE), "the spans of a server whose tracing is fine")
    assert _lines(server, SPAN_LINE) == []


def test_an_unknown_exporter_keeps_the_metrics(servers):
    server = servers["exporter"]
    _assert_step_metrics_served(server, 5)
    lines = _lines(server, "setting traces_exporter")
    assert len(lines) == 1, lines
    assert "'zipkin' from environment variable OTEL_TRACES_EXPORTER is not valid" in lines[0]
    assert "accepted: a comma-separated list of otlp, console, none" in lines[0]


def test_a_bad_metrics_port_serves_on_the_model_servers_own_port_and_tracing_works(servers):
    server = servers["port"]
    _assert_step_metrics_served(server, 5)  # server.url is the model server's own HTTP port
    lines = _lines(server, "setting metrics_port")
    assert len(lines) == 1, lines
    assert "'abc' from environment variable KSERVE_OTEL_METRICS_PORT is not valid" in lines[0]
    assert "accepted: a whole number from 0 to 65535" in lines[0]
    assert lines[0].endswith("using the default: the model server's own HTTP port under KServe, 8080 elsewhere")
    wait_until(lambda: _lines(server, SPAN_LINE), "the step spans of the bad-port server on the console")
