"""configure(): providers it respects or installs, exporters, resource, idempotence, bad settings.

OpenTelemetry's global providers can be set once per process, so behaviour that depends on them runs in a
fresh interpreter (``run_python``).
"""

from __future__ import annotations

import json
import logging

import pytest
from conftest import histogram_count, run_python, scrape
from otlp_receiver import OTLPReceiver

import kserve_otel
from kserve_otel import SettingsError, instrument_step

QUIET = {"KSERVE_OTEL_ANNOTATIONS_FILE": "/nonexistent"}


def test_configure_is_idempotent(telemetry, caplog):
    with caplog.at_level(logging.WARNING):
        assert kserve_otel.configure() is telemetry
        assert kserve_otel.configure(metrics_port=1234) is telemetry
    assert "configure() was called before" in caplog.text
    assert kserve_otel.get_telemetry() is telemetry


def test_bad_setting_raises_at_configure(monkeypatch):
    kserve_otel.shutdown()
    monkeypatch.setenv("KSERVE_OTEL_METRICS_PORT", "70000")
    with pytest.raises(SettingsError, match="KSERVE_OTEL_METRICS_PORT"):
        kserve_otel.configure(annotations_file="/nonexistent")
    assert kserve_otel.get_telemetry() is None


def test_steps_before_configure_appear_in_the_first_scrape(spans, model):
    kserve_otel.shutdown()
    instrument_step("predict", model_name=model)(lambda: None)()
    telemetry = kserve_otel.configure(metrics_host="127.0.0.1", metrics_port=0, annotations_file="/nonexistent")
    try:
        assert histogram_count(scrape(telemetry.metrics_url), "request_predict_seconds", model_name=model) == 1
    finally:
        kserve_otel.shutdown()


def test_shutdown_frees_the_port_and_reconfigure_works(spans, model):
    kserve_otel.shutdown()
    first = kserve_otel.configure(metrics_host="127.0.0.1", metrics_port=0, annotations_file="/nonexistent")
    port = first.metrics_server.port
    kserve_otel.shutdown()
    second = kserve_otel.configure(metrics_host="127.0.0.1", metrics_port=port, annotations_file="/nonexistent")
    try:
        assert second is not first and second.metrics_server.port == port
        instrument_step("predict", model_name=model)(lambda: None)()
        assert histogram_count(scrape(second.metrics_url), "request_predict_seconds", model_name=model) == 1
    finally:
        kserve_otel.shutdown()


def test_installs_global_providers_when_none_exist():
    result = run_python(
        """
        import json, sys
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.trace import TracerProvider
        import kserve_otel
        from kserve_otel import instrument_step
        t = kserve_otel.configure(metrics_host="127.0.0.1", metrics_port=0)
        with trace.get_tracer("app").start_as_current_span("request"):
            instrument_step("predict", model_name="iris")(lambda: None)()
        t.force_flush()
        sys.stderr.write(json.dumps({
            "meter": isinstance(metrics.get_meter_provider(), MeterProvider),
            "tracer": isinstance(trace.get_tracer_provider(), TracerProvider),
            "sampler": trace.get_tracer_provider().sampler.get_description(),
            "owns": [t.owns_meter_provider, t.owns_tracer_provider],
        }) + "\\n")
        """,
        env={**QUIET, "OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
             "OTEL_TRACES_SAMPLER_ARG": "1", "OTEL_SERVICE_NAME": "iris-svc"},
    )
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stderr.strip().splitlines()[-1])
    assert state == {"meter": True, "tracer": True, "owns": [True, True],
                     "sampler": state["sampler"]}
    assert state["sampler"].startswith("ParentBased{root:TraceIdRatioBased{1.0}")
    assert '"name": "predict iris"' in result.stdout  # the console exporter printed the step span
    assert '"service.name": "iris-svc"' in result.stdout


def test_respects_providers_the_application_installed():
    result = run_python(
        """
        import json, sys, urllib.request
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        app_reader = InMemoryMetricReader()
        app_meters = MeterProvider(metric_readers=[app_reader])
        metrics.set_meter_provider(app_meters)
        app_spans = InMemorySpanExporter()
        app_tracer = TracerProvider()
        app_tracer.add_span_processor(SimpleSpanProcessor(app_spans))
        trace.set_tracer_provider(app_tracer)
        metrics.get_meter("app").create_counter("app_requests").add(1)

        import kserve_otel
        from kserve_otel import instrument_step
        t = kserve_otel.configure(metrics_host="127.0.0.1", metrics_port=0, traces_exporter="console")
        instrument_step("predict", model_name="iris")(lambda: None)()
        metrics.get_meter("app").create_counter("app_requests").add(1)  # readers added later see later data
        t.force_flush()
        text = urllib.request.urlopen(t.metrics_url).read().decode()
        sys.stderr.write(json.dumps({
            "same_meter": metrics.get_meter_provider() is app_meters and t.meter_provider is app_meters,
            "same_tracer": trace.get_tracer_provider() is app_tracer,
            "app_spans": [s.name for s in app_spans.get_finished_spans()],
            "app_metrics_on_endpoint": "app_requests_total" in text,
            "steps_on_endpoint": "request_predict_seconds_count" in text,
            "owns": [t.owns_meter_provider, t.owns_tracer_provider],
        }) + "\\n")
        """,
        env=QUIET,
    )
    assert result.returncode == 0, result.stderr
    state = json.loads(result.stderr.strip().splitlines()[-1])
    assert state == {
        "same_meter": True, "same_tracer": True, "app_spans": ["predict iris"],
        "app_metrics_on_endpoint": True, "steps_on_endpoint": True, "owns": [False, False],
    }
    assert '"name": "predict iris"' in result.stdout  # kserve-otel's console exporter was added, not swapped in


def test_otlp_push_of_metrics_and_traces():
    with OTLPReceiver() as receiver:
        result = run_python(
            """
            import kserve_otel
            from kserve_otel import instrument_step
            from opentelemetry import trace
            t = kserve_otel.configure()
            assert t.metrics_server is None and t.prometheus_registry is None
            with trace.get_tracer("app").start_as_current_span("request"):
                for _ in range(3):
                    instrument_step("predict", model_name="iris")(lambda: None)()
            t.force_flush()
            kserve_otel.shutdown()
            """,
            env={**QUIET, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "KSERVE_OTEL_METRICS_EXPORTER": "otlp",
                 "OTEL_TRACES_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "60000"},
        )
        assert result.returncode == 0, result.stderr
        points = [p for p in receiver.histogram_points("request_predict")
                  if {a.key: a.value.string_value for a in p.attributes} == {"model_name": "iris"}]
        assert points and points[-1].count == 3
        assert list(points[-1].explicit_bounds)[:3] == [0.005, 0.01, 0.025]
        names = [s.name for s in receiver.spans()]
        assert names.count("predict iris") == 3 and "request" in names


def test_missing_otlp_package_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_otlp(name, *args, **kwargs):
        if name.startswith("opentelemetry.exporter.otlp"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    kserve_otel.shutdown()
    monkeypatch.setattr(builtins, "__import__", no_otlp)
    with pytest.raises(SettingsError, match=r"pip install 'kserve-otel\[otlp\]'"):
        kserve_otel.configure(metrics_exporters="otlp", annotations_file="/nonexistent")
    kserve_otel.shutdown()


def test_a_failing_exporter_never_breaks_a_step():
    """OTLP to a port nobody listens on: every step still returns its value, and the model's own exception
    still reaches the caller unchanged; the exporters' failures stay in the log."""
    from conftest import free_port

    result = run_python(
        """
        import kserve_otel
        from kserve_otel import instrument_step
        t = kserve_otel.configure()

        @instrument_step("predict", model_name="iris")
        def predict(x):
            if x < 0:
                raise ValueError("negative")
            return x * 2

        assert [predict(x) for x in range(200)] == [x * 2 for x in range(200)]
        try:
            predict(-1)
        except ValueError as error:
            assert str(error) == "negative"
        else:
            raise AssertionError("the model's exception was swallowed")
        t.force_flush(timeout_millis=2000)
        assert predict(21) == 42
        kserve_otel.shutdown()
        print("served")
        """,
        env={**QUIET, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}",
             "KSERVE_OTEL_METRICS_EXPORTER": "otlp", "OTEL_TRACES_EXPORTER": "otlp",
             "OTEL_EXPORTER_OTLP_TIMEOUT": "1", "OTEL_METRIC_EXPORT_INTERVAL": "200"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "served"


def test_spans_dropped_by_a_full_queue_are_counted_on_the_endpoint_and_no_step_waits():
    """A collector that accepts and never answers: the export hangs, the queue (10 spans) fills, and the
    spans past it are dropped and counted under the SDK's own name, ``otel.sdk.processor.span.processed``
    with ``error.type="queue_full"``; the steps go on meanwhile, far within the exporter's 30 s timeout."""
    import socket

    from conftest import free_port

    with socket.socket() as stalled:
        stalled.bind(("127.0.0.1", 0))
        stalled.listen(16)
        port = free_port()
        result = run_python(
            f"""
            import time, urllib.request
            import kserve_otel
            from kserve_otel import instrument_step
            t = kserve_otel.configure()
            step = instrument_step("predict", model_name="iris")(lambda: None)
            started = time.monotonic()
            for _ in range(500):
                step()
            print("steps", time.monotonic() - started)
            text = urllib.request.urlopen("http://127.0.0.1:{port}/metrics").read().decode()
            print("\\n".join(line for line in text.splitlines() if line.startswith("otel_sdk_processor_span")))
            import os, sys
            sys.stdout.flush()
            os._exit(0)  # not the exit's flush, which would wait the exporter's 30 s
            """,
            env={**QUIET, "OTEL_TRACES_EXPORTER": "otlp",
                 "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{stalled.getsockname()[1]}",
                 "OTEL_EXPORTER_OTLP_TIMEOUT": "30", "OTEL_BSP_MAX_QUEUE_SIZE": "10",
                 "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "5", "OTEL_BSP_SCHEDULE_DELAY": "10",
                 "KSERVE_OTEL_METRICS_PORT": str(port), "KSERVE_OTEL_METRICS_HOST": "127.0.0.1"},
            timeout=120,
        )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert float(lines[0].split()[1]) < 30, "a step waited for the exporter"
    dropped = [line for line in lines if "error_type=\"queue_full\"" in line and "processed" in line]
    assert dropped, result.stdout
    assert float(dropped[0].rsplit(" ", 1)[1]) >= 500 - 10 - 5 * 2, "every span past the queue is counted"
    assert any(line.startswith("otel_sdk_processor_span_queue_capacity") and line.endswith(" 10.0")
               for line in lines), result.stdout
