"""Settings: precedence, sources, pod annotations and the errors a user sees for bad values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from kserve_otel import Settings, SettingsError
from kserve_otel.annotations import parse_annotations, read_annotations
from kserve_otel.names import KSERVE_BUCKETS
from kserve_otel.settings import SETTINGS_TABLE


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


def test_readme_documents_every_setting():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for spec in SETTINGS_TABLE:
        assert spec.env in readme, spec.env
        if spec.annotation:
            assert spec.annotation in readme


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
