"""Settings: precedence, sources, pod annotations and the errors a user sees for bad values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kserve_otel import Settings, SettingsError
from kserve_otel.config.annotations import parse_annotations, read_annotations
from kserve_otel.names import KSERVE_BUCKETS
from kserve_otel.config.problems import REPORTED_VARIABLE
from kserve_otel.config.settings import SETTINGS_TABLE, settings_markdown


@pytest.fixture(autouse=True)
def _fresh_reports(monkeypatch):
    """Each test starts as a new process tree: no problem reported yet, and none leaks into other tests."""
    monkeypatch.delenv(REPORTED_VARIABLE, raising=False)


@pytest.fixture
def annotations(tmp_path: Path) -> Path:
    path = tmp_path / "annotations"
    path.write_text(
        'kubernetes.io/config.seen="2026-11-24T10:00:00Z"\n'
        'prometheus.kserve.io/port="9091"\n'
        'prometheus.kserve.io/path="/custom-metrics"\n'
        'serving.kserve.io/enable-prometheus-scraping="true"\n'
    )
    return path


def load(env: dict[str, str] | None = None, **arguments) -> Settings:
    arguments.setdefault("annotations_file", None)
    return Settings.load(environ={"KSERVE_OTEL_ANNOTATIONS_FILE": "/nonexistent", **(env or {})}, **arguments)


def test_defaults_follow_kserve():
    s = load()
    assert (s.metrics_host, s.metrics_port, s.metrics_path) == ("0.0.0.0", 8080, "/metrics")
    assert s.buckets == KSERVE_BUCKETS
    assert s.metrics_exporters == ("prometheus",)
    assert s.traces_exporter == ()
    assert s.enabled is False
    assert s.source_of("metrics_port") == "default"


def test_precedence_argument_over_env_over_otel_env_over_annotation_over_default(annotations: Path):
    env = {"KSERVE_OTEL_ANNOTATIONS_FILE": str(annotations)}
    assert Settings.load(environ=env).metrics_port == 9091
    assert Settings.load(environ=env).source_of("metrics_port").startswith("pod annotation prometheus.kserve.io/port")

    env["OTEL_EXPORTER_PROMETHEUS_PORT"] = "9092"
    assert Settings.load(environ=env).metrics_port == 9092

    env["KSERVE_OTEL_METRICS_PORT"] = "9093"
    s = Settings.load(environ=env)
    assert (s.metrics_port, s.source_of("metrics_port")) == (9093, "environment variable KSERVE_OTEL_METRICS_PORT")

    s = Settings.load(environ=env, metrics_port=9094)
    assert (s.metrics_port, s.source_of("metrics_port")) == (9094, "argument metrics_port")


def test_annotations_give_port_path_and_enablement(annotations: Path):
    s = Settings.load(environ={}, annotations_file=str(annotations))
    assert (s.metrics_port, s.metrics_path, s.enabled) == (9091, "/custom-metrics", True)


def test_argument_none_counts_as_not_given():
    assert load({"KSERVE_OTEL_METRICS_PORT": "9000"}, metrics_port=None).metrics_port == 9000


@pytest.mark.parametrize(
    ("variable", "value", "setting", "accepted"),
    [
        ("KSERVE_OTEL_METRICS_PORT", "abc", "metrics_port", "a whole number from 0 to 65535"),
        ("KSERVE_OTEL_METRICS_PORT", "70000", "metrics_port", "a whole number from 0 to 65535"),
        ("OTEL_EXPORTER_PROMETHEUS_PORT", "-1", "metrics_port", "a whole number from 0 to 65535"),
        ("KSERVE_OTEL_METRICS_PATH", "metrics", "metrics_path", "a URL path starting with '/'"),
        ("KSERVE_OTEL_TRACES_EXPORTER", "jaeger", "traces_exporter", "otlp, console, none"),
        ("OTEL_TRACES_EXPORTER", "zipkin", "traces_exporter", "otlp, console, none"),
        ("KSERVE_OTEL_METRICS_EXPORTER", "prometheus,statsd", "metrics_exporters", "prometheus, otlp, console, none"),
        ("KSERVE_OTEL_ENABLED", "maybe", "enabled", "true or false"),
        ("OTEL_TRACES_SAMPLER", "sometimes", "traces_sampler", "parentbased_always_on"),
        ("OTEL_TRACES_SAMPLER_ARG", "2", "traces_sampler_arg", "a number from 0 to 1"),
        ("KSERVE_OTEL_BUCKETS", "1,0.5", "buckets", "increasing positive numbers"),
        ("KSERVE_OTEL_METRICS_HOST", "my host", "metrics_host", "a host name or IP address"),
    ],
)
def test_bad_environment_value_names_setting_source_and_accepted_values(variable, value, setting, accepted):
    with pytest.raises(SettingsError) as info:
        load({variable: value})
    message = str(info.value)
    assert f"setting {setting}" in message
    assert repr(value) in message
    assert f"environment variable {variable}" in message
    assert accepted in message


def test_bad_argument_names_the_argument():
    with pytest.raises(SettingsError, match=r"setting metrics_port: 'abc' from argument metrics_port is not valid"):
        load(metrics_port="abc")


def test_unknown_argument_is_a_type_error():
    with pytest.raises(TypeError, match="unknown setting"):
        load(metric_port=1)


def test_bad_annotation_is_logged_and_ignored(tmp_path: Path, caplog):
    path = tmp_path / "annotations"
    path.write_text('prometheus.kserve.io/port="http"\nprometheus.kserve.io/path="/m"\n')
    with caplog.at_level(logging.ERROR):
        s = Settings.load(environ={}, annotations_file=str(path))
    assert s.metrics_port == 8080  # the default: a bad annotation never stops the server
    assert s.metrics_path == "/m"
    assert "prometheus.kserve.io/port" in caplog.text and "'http'" in caplog.text
    assert "a whole number from 0 to 65535" in caplog.text


def test_typed_arguments_are_accepted():
    s = load(metrics_port=0, metrics_exporters=["prometheus", "console"], buckets=[0.1, 1], traces_exporter="none")
    assert s.metrics_port == 0
    assert s.metrics_exporters == ("prometheus", "console")
    assert s.buckets == (0.1, 1.0)
    assert s.traces_exporter == ()


def test_every_setting_has_a_kserve_otel_variable_and_a_field():
    names = {spec.name for spec in SETTINGS_TABLE}
    assert names == set(Settings().as_dict())
    assert all(spec.env.startswith("KSERVE_OTEL_") for spec in SETTINGS_TABLE)
    for required in ("KSERVE_OTEL_ENABLED", "KSERVE_OTEL_METRICS_HOST", "KSERVE_OTEL_METRICS_PORT",
                     "KSERVE_OTEL_METRICS_PATH", "KSERVE_OTEL_ANNOTATIONS_FILE"):
        assert required in {spec.env for spec in SETTINGS_TABLE}


def test_the_readme_settings_table_is_the_one_generated_from_the_table():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert settings_markdown() in readme, "README.md: paste the output of python -m kserve_otel.config.settings"
    for spec in SETTINGS_TABLE:
        assert f"`{spec.env}`" in settings_markdown()


def test_every_default_is_the_tables():
    defaults = Settings()
    for spec in SETTINGS_TABLE:
        assert getattr(defaults, spec.name) == spec.default, spec.name


# ----------------------------------------------------------------------------------------- annotations file


def test_annotation_file_format_with_go_quoting():
    text = 'a="plain"\nb="with \\"quotes\\" and \\\\ backslash"\n\nc="caf\\u00e9"\nnot a line\nd=unquoted\n'
    assert parse_annotations(text) == {
        "a": "plain", "b": 'with "quotes" and \\ backslash', "c": "café", "d": "unquoted",
    }


def test_missing_annotation_file_is_empty(tmp_path: Path):
    assert read_annotations(tmp_path / "absent") == {}


def test_unreadable_annotation_file_is_logged_and_empty(tmp_path: Path, caplog):
    with caplog.at_level(logging.ERROR):
        assert read_annotations(tmp_path) == {}  # a directory: exists, cannot be read as a file
    assert "cannot read pod annotations" in caplog.text


# ----------------------------------------------------------------------------------------- the zero-code path


def forgiving(env: dict[str, str]) -> Settings:
    return Settings.load_forgiving(environ={"KSERVE_OTEL_ANNOTATIONS_FILE": "/nonexistent", **env})


@pytest.mark.parametrize(("variable", "value"), [
    ("OTEL_TRACES_SAMPLER", "garbage"),
    ("KSERVE_OTEL_TRACES_SAMPLER", "sometimes"),
    ("OTEL_TRACES_SAMPLER_ARG", "2"),
    ("OTEL_TRACES_EXPORTER", "zipkin"),
])
def test_zero_code_bad_tracing_setting_turns_off_span_export_only(variable, value, caplog):
    env = {variable: value, "KSERVE_OTEL_METRICS_PORT": "9100"}
    if variable != "OTEL_TRACES_EXPORTER":  # (the KSERVE_OTEL_ variable would win over that one)
        env["KSERVE_OTEL_TRACES_EXPORTER"] = "console"
    with caplog.at_level(logging.ERROR):
        s = forgiving(env)
    assert s.traces_exporter == ()  # kserve-otel exports no spans
    assert (s.metrics_exporters, s.metrics_port) == (("prometheus",), 9100)  # the metrics are untouched
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("kserve-otel: setting ")
    assert f"{value!r} from environment variable {variable} is not valid; accepted: " in line
    assert line.endswith("kserve-otel exports no spans (metrics are not affected)")
    with pytest.raises(SettingsError):  # code that resolves settings itself still gets the error
        load(env)


def test_zero_code_bad_metrics_port_falls_back_to_the_next_source_or_the_default(annotations: Path, caplog):
    with caplog.at_level(logging.ERROR):
        s = forgiving({"KSERVE_OTEL_METRICS_PORT": "abc", "KSERVE_OTEL_TRACES_EXPORTER": "console"})
    assert (s.metrics_port, s.source_of("metrics_port")) == (8080, "default")  # KServe: the app's own port
    assert s.traces_exporter == ("console",)  # tracing is untouched
    [line] = [r.getMessage() for r in caplog.records]
    assert line == ("kserve-otel: setting metrics_port: 'abc' from environment variable KSERVE_OTEL_METRICS_PORT "
                    "is not valid; accepted: a whole number from 0 to 65535 (0 picks a free port); using the "
                    "default: the model server's own HTTP port under KServe, 8080 elsewhere")
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        s = Settings.load_forgiving(environ={"KSERVE_OTEL_ANNOTATIONS_FILE": str(annotations),
                                             "OTEL_EXPORTER_PROMETHEUS_PORT": "70000"})
    assert s.metrics_port == 9091  # the pod annotation, which the scraper reads too
    assert caplog.records[0].getMessage().endswith(
        f"using 9091 from pod annotation prometheus.kserve.io/port in {annotations}")


def test_zero_code_other_bad_values_use_the_default(caplog):
    with caplog.at_level(logging.ERROR):
        s = forgiving({"OTEL_METRICS_EXPORTER": "statsd", "KSERVE_OTEL_METRICS_PATH": "metrics",
                       "KSERVE_OTEL_BUCKETS": "1,0.5"})
    assert (s.metrics_exporters, s.metrics_path, s.buckets) == (("prometheus",), "/metrics", KSERVE_BUCKETS)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3
    assert any("setting metrics_path: 'metrics'" in line and line.endswith("using the default /metrics")
               for line in lines), lines


def test_zero_code_problems_are_reported_once_per_process_tree(caplog, monkeypatch):
    """KServe's worker processes resolve the same variables again: they inherit the note and stay quiet."""
    import os

    with caplog.at_level(logging.ERROR):
        forgiving({"OTEL_TRACES_SAMPLER": "garbage"})
        forgiving({"OTEL_TRACES_SAMPLER": "garbage"})
        assert len(caplog.records) == 1
        noted = os.environ[REPORTED_VARIABLE]  # what a spawned worker inherits
        monkeypatch.setenv(REPORTED_VARIABLE, "")  # another process tree
        forgiving({"OTEL_TRACES_SAMPLER": "garbage"})
        assert len(caplog.records) == 2
        monkeypatch.setenv(REPORTED_VARIABLE, noted)  # a worker of the first
        forgiving({"OTEL_TRACES_SAMPLER": "garbage", "KSERVE_OTEL_METRICS_PORT": "abc"})
        assert len(caplog.records) == 3  # only the new problem
        assert "metrics_port" in caplog.records[-1].getMessage()


def test_explicit_configure_still_raises_for_a_bad_variable(monkeypatch):
    import kserve_otel

    kserve_otel.shutdown()
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "garbage")
    monkeypatch.setenv("KSERVE_OTEL_ANNOTATIONS_FILE", "/nonexistent")
    with pytest.raises(SettingsError, match="setting traces_sampler: 'garbage' from environment variable"):
        kserve_otel.configure(metrics_port=0, metrics_host="127.0.0.1")
    assert kserve_otel.get_telemetry() is None
