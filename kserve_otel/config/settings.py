"""The one source of truth for configuration: every setting, where it may come from, and how it is checked.

Precedence, highest first: an explicit argument > a ``KSERVE_OTEL_*`` environment variable > the standard
``OTEL_*`` variable > a pod annotation (downward-API file) > the default. A bad argument or environment value
raises :class:`SettingsError` naming the setting, where the value came from and what is accepted. A bad pod
annotation is logged and ignored instead: annotations are written by the platform, and they must never stop a
model server from serving.

Zero-code auto-instrumentation has no code of the user's to raise into, so it resolves with
:meth:`Settings.load_forgiving`: a bad variable is reported in one line and ignored, and only what it configures
is off (a bad tracing setting: kserve-otel's span export; any other: that setting falls back to the next source).
Problems are reported once per process tree (:mod:`kserve_otel.config.problems`), not once per worker process.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from .annotations import (
    ANNOTATION_ENABLE_SCRAPING,
    ANNOTATION_PROMETHEUS_PATH,
    ANNOTATION_PROMETHEUS_PORT,
    DEFAULT_ANNOTATIONS_FILE,
    Reporter,
    read_annotations,
)
from ..recording.exemplars import EXEMPLAR_FILTERS
from ..names import KSERVE_BUCKETS, STEP_NAME_PATTERN
from .problems import report_once

METRICS_EXPORTERS = ("prometheus", "otlp", "console", "none")
TRACES_EXPORTERS = ("otlp", "console", "none")
LATENCY_LOG_MODES = ("trace_id", "kserve", "off")
RAY_METRICS_MODES = ("ray", "otlp", "none")
SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


#: The settings that configure span export: a bad value of any of them turns kserve-otel's span export off on
#: the zero-code path (:meth:`Settings.load_forgiving`), and leaves the metrics alone.
TRACING_SETTINGS = ("traces_exporter", "traces_sampler", "traces_sampler_arg")


class SettingsError(ValueError):
    """A setting has a value that is not accepted. The message names the setting, the source and the choices."""


# --------------------------------------------------------------------------------------------- parsers
# Each parser takes a value (a string from the environment or a file, or a typed explicit argument) and
# returns the typed value, or raises ValueError with the list of accepted values as its message.

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError("true or false (also 1/0, yes/no, on/off)")


def _parse_port(value: Any) -> int:
    accepted = "a whole number from 0 to 65535 (0 picks a free port)"
    if isinstance(value, bool):
        raise ValueError(accepted)
    try:
        port = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        raise ValueError(accepted) from None
    if not 0 <= port <= 65535:
        raise ValueError(accepted)
    return port


def _parse_path(value: Any) -> str:
    path = str(value).strip()
    if not path.startswith("/") or any(c.isspace() or c in "?#" for c in path):
        raise ValueError("a URL path starting with '/', without spaces, '?' or '#' (for example /metrics)")
    return path


def _parse_host(value: Any) -> str:
    host = str(value).strip()
    if not host or any(c.isspace() or c == "/" for c in host):
        raise ValueError("a host name or IP address to bind, such as 0.0.0.0, 127.0.0.1 or ::")
    return host


def _choice_list(choices: tuple[str, ...]) -> Callable[[Any], tuple[str, ...]]:
    def parse(value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else list(value)
        names = tuple(dict.fromkeys(str(item).strip().lower() for item in items if str(item).strip()))
        if not names or any(name not in choices for name in names) or ("none" in names and len(names) > 1):
            raise ValueError(f"a comma-separated list of {', '.join(choices)} ('none' alone turns it off)")
        return () if names == ("none",) else names

    return parse


def _parse_ratio(value: Any) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    accepted = "a number from 0 to 1 (the fraction of traces sampled)"
    try:
        ratio = float(value)
    except (TypeError, ValueError):
        raise ValueError(accepted) from None
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(accepted)
    return ratio


def _parse_buckets(value: Any) -> tuple[float, ...]:
    accepted = "a comma-separated list of increasing positive numbers of seconds, such as 0.01,0.1,1,10"
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        bounds = tuple(float(item) for item in items if str(item).strip())
    except (TypeError, ValueError):
        raise ValueError(accepted) from None
    if not bounds or bounds[0] <= 0 or any(b <= a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(accepted)
    return bounds


def _choice(setting_choices: tuple[str, ...]) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        choice = str(value).strip().lower()
        if choice not in setting_choices:
            raise ValueError(", ".join(setting_choices))
        return choice

    return parse


def _parse_step_map(value: Any) -> tuple[tuple[str, str], ...]:
    accepted = ("a comma-separated list of method=step pairs, such as __call__=predict,tokenize=preprocess "
                "(methods are Python names; steps are lowercase letters, digits and underscores)")
    items = value.split(",") if isinstance(value, str) else [f"{k}={v}" for k, v in dict(value).items()]
    pairs = []
    for item in items:
        method, sep, step = str(item).partition("=")
        method, step = method.strip(), step.strip()
        if not item.strip():
            continue
        if not sep or not method.isidentifier() or not STEP_NAME_PATTERN.match(step):
            raise ValueError(accepted)
        pairs.append((method, step))
    if not pairs:
        raise ValueError(accepted)
    return tuple(pairs)


def _parse_name(value: Any) -> str | None:
    if value is None:
        return None
    name = str(value).strip()
    if not name:
        raise ValueError("a non-empty name")
    return name


def _parse_file(value: Any) -> str:
    path = os.fspath(value).strip() if not isinstance(value, str) else value.strip()
    if not path:
        raise ValueError("a file path")
    return path


# --------------------------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class SettingSpec:
    """One row of the settings table: a setting's name, its one default, every place its value may come from,
    and its documentation (Markdown, as the README's settings table shows it, which is generated from this
    table: :func:`settings_markdown`; the CLI's ``--help`` shows it too)."""

    name: str
    env: str
    default: Any
    parse: Callable[[Any], Any]
    doc: str
    otel_env: str | None = None
    annotation: str | None = None
    #: The accepted values, for a setting that takes names from a fixed list.
    choices: tuple[str, ...] | None = None
    #: How the default reads in the documentation, where its value alone would not say it.
    shown_default: str | None = None


SETTINGS_TABLE: tuple[SettingSpec, ...] = (
    SettingSpec(
        "enabled", "KSERVE_OTEL_ENABLED", False, _parse_bool,
        "Turn on auto-instrumentation at import time (an explicit `configure()` always configures).",
        annotation=ANNOTATION_ENABLE_SCRAPING,
    ),
    SettingSpec(
        "metrics_host", "KSERVE_OTEL_METRICS_HOST", "0.0.0.0", _parse_host,
        "Address the endpoint binds when it runs on a port of its own.",
        otel_env="OTEL_EXPORTER_PROMETHEUS_HOST",
    ),
    SettingSpec(
        "metrics_port", "KSERVE_OTEL_METRICS_PORT", 8080, _parse_port,
        "Port of the endpoint (0 picks a free one).",
        otel_env="OTEL_EXPORTER_PROMETHEUS_PORT", annotation=ANNOTATION_PROMETHEUS_PORT,
    ),
    SettingSpec(
        "metrics_path", "KSERVE_OTEL_METRICS_PATH", "/metrics", _parse_path,
        "Exact path of the endpoint; other paths answer 404.",
        annotation=ANNOTATION_PROMETHEUS_PATH,
    ),
    SettingSpec(
        "metrics_exporters", "KSERVE_OTEL_METRICS_EXPORTER", ("prometheus",), _choice_list(METRICS_EXPORTERS),
        "Where metrics go: `prometheus` (the endpoint), `otlp` (push), `console`; comma-separated, or `none`.",
        otel_env="OTEL_METRICS_EXPORTER", choices=METRICS_EXPORTERS,
    ),
    SettingSpec(
        "traces_exporter", "KSERVE_OTEL_TRACES_EXPORTER", (), _choice_list(TRACES_EXPORTERS),
        "Where spans go: `otlp`, `console`, or `none`.",
        otel_env="OTEL_TRACES_EXPORTER", choices=TRACES_EXPORTERS,
    ),
    SettingSpec(
        "traces_sampler", "KSERVE_OTEL_TRACES_SAMPLER", "parentbased_always_on", _choice(SAMPLERS),
        "Sampler of a TracerProvider that kserve-otel installs.",
        otel_env="OTEL_TRACES_SAMPLER", choices=SAMPLERS,
    ),
    SettingSpec(
        "traces_sampler_arg", "KSERVE_OTEL_TRACES_SAMPLER_ARG", None, _parse_ratio,
        "Ratio for the `traceidratio` samplers.",
        otel_env="OTEL_TRACES_SAMPLER_ARG", shown_default="`1.0`",
    ),
    SettingSpec(
        "exemplar_filter", "KSERVE_OTEL_EXEMPLAR_FILTER", "trace_based", _choice(EXEMPLAR_FILTERS),
        "Which step observations become their bucket's exemplar (with the trace and span ids): `trace_based` "
        "(made in a sampled span), `always_on` (in any valid span context), `always_off`.",
        otel_env="OTEL_METRICS_EXEMPLAR_FILTER", choices=EXEMPLAR_FILTERS,
    ),
    SettingSpec(
        "service_name", "KSERVE_OTEL_SERVICE_NAME", None, _parse_name,
        "`service.name` of the resource (`OTEL_RESOURCE_ATTRIBUTES` is honoured as well).",
        otel_env="OTEL_SERVICE_NAME", shown_default="",
    ),
    SettingSpec(
        "buckets", "KSERVE_OTEL_BUCKETS", KSERVE_BUCKETS, _parse_buckets,
        "Bucket boundaries in seconds of the step histograms.",
        shown_default="KServe's",
    ),
    SettingSpec(
        "latency_log", "KSERVE_OTEL_LATENCY_LOG", "trace_id", _choice(LATENCY_LOG_MODES),
        "KServe's per-request latency log line: `trace_id` (the line with `, trace_id: <hex>` added while a trace "
        "is current), `kserve` (unchanged), `off` (no line).",
        choices=LATENCY_LOG_MODES,
    ),
    SettingSpec(
        "ray_metrics", "KSERVE_OTEL_RAY_METRICS", "ray", _choice(RAY_METRICS_MODES),
        "Ray Serve replicas: `ray` (step metrics in Ray's own metrics, on each node's Ray metrics endpoint), "
        "`otlp` (pushed to `OTEL_EXPORTER_OTLP_ENDPOINT`), or `none`.",
        choices=RAY_METRICS_MODES,
    ),
    SettingSpec(
        "ray_steps", "KSERVE_OTEL_RAY_STEPS", (("__call__", "predict"),), _parse_step_map,
        "Ray Serve deployments: which methods are which steps (`method=step`, comma-separated); `kserve.Model` "
        "deployments use their handlers.",
    ),
    SettingSpec(
        "annotations_file", "KSERVE_OTEL_ANNOTATIONS_FILE", DEFAULT_ANNOTATIONS_FILE, _parse_file,
        "Downward-API file holding the pod's annotations (lines `key=\"value\"`).",
    ),
)

_SPECS = {spec.name: spec for spec in SETTINGS_TABLE}


# --------------------------------------------------------------------------------------------- Settings


@dataclass(frozen=True)
class Settings:
    """Resolved configuration. Build it with :meth:`Settings.load`; ``sources`` says where each value came from.
    Every field's default is its row's in :data:`SETTINGS_TABLE`."""

    enabled: bool = _SPECS["enabled"].default
    metrics_host: str = _SPECS["metrics_host"].default
    metrics_port: int = _SPECS["metrics_port"].default
    metrics_path: str = _SPECS["metrics_path"].default
    metrics_exporters: tuple[str, ...] = _SPECS["metrics_exporters"].default
    traces_exporter: tuple[str, ...] = _SPECS["traces_exporter"].default
    traces_sampler: str = _SPECS["traces_sampler"].default
    traces_sampler_arg: float | None = _SPECS["traces_sampler_arg"].default
    exemplar_filter: str = _SPECS["exemplar_filter"].default
    service_name: str | None = _SPECS["service_name"].default
    buckets: tuple[float, ...] = _SPECS["buckets"].default
    latency_log: str = _SPECS["latency_log"].default
    ray_metrics: str = _SPECS["ray_metrics"].default
    ray_steps: tuple[tuple[str, str], ...] = _SPECS["ray_steps"].default
    annotations_file: str = _SPECS["annotations_file"].default
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, **arguments: Any) -> Settings:
        """Resolve every setting from ``arguments``, ``environ`` (default ``os.environ``) and pod annotations.

        Arguments that are ``None`` count as not given. Unknown argument names raise :class:`TypeError`.
        """
        unknown = sorted(set(arguments) - set(_SPECS))
        if unknown:
            raise TypeError(
                f"unknown setting(s) {', '.join(unknown)}; the settings are {', '.join(_SPECS)}"
            )
        given = {name: value for name, value in arguments.items() if value is not None}
        return cls._load(environ, given, None)

    @classmethod
    def load_forgiving(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Resolve every setting from ``environ`` and pod annotations for the zero-code path, where no code of the
        user's could catch a :class:`SettingsError`: a bad value never raises.

        Each bad value is reported in one line (the setting, the value, where it came from, what is accepted and
        what happens instead), once per process tree, and only what it configures is off:

        * a bad ``traces_exporter``, ``traces_sampler`` or ``traces_sampler_arg``: kserve-otel exports no spans
          (``traces_exporter`` is none); metrics and the endpoint are unaffected;
        * any other setting: the bad value is ignored as if it were not set, so the next source applies (the
          standard ``OTEL_*`` variable, the pod annotation, else the default). For ``metrics_port`` the default
          means, under KServe, the model server's own HTTP port.
        """
        bad: list[_BadValue] = []
        settings = cls._load(environ, {}, bad)
        if any(b.spec.name in TRACING_SETTINGS for b in bad):
            sources = dict(settings.sources)
            sources["traces_exporter"] = "turned off by a bad tracing setting"
            settings = replace(settings, traces_exporter=(), sources=sources)
        for b in bad:
            report_once(f"setting {b.spec.name}: {b.raw!r} from {b.source}", b.message(settings))
        return settings

    @classmethod
    def _load(cls, environ: Mapping[str, str] | None, given: Mapping[str, Any], bad: list[_BadValue] | None) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        # The annotations file is itself a setting; it has no annotation source, so resolve it first.
        annotations_path = _resolve(_SPECS["annotations_file"], given, env, {}, "", values, sources, bad=bad)
        annotations = read_annotations(annotations_path)
        for spec in SETTINGS_TABLE:
            if spec.name != "annotations_file":
                _resolve(spec, given, env, annotations, annotations_path, values, sources, bad=bad)
        return cls(**values, sources=sources)

    @staticmethod
    def field_names() -> tuple[str, ...]:
        """The names of every setting (the keyword arguments :meth:`load` and ``configure()`` accept)."""
        return tuple(spec.name for spec in SETTINGS_TABLE)

    def source_of(self, name: str) -> str:
        """Where the value of setting ``name`` came from, in words (``"default"``, ``"KSERVE_OTEL_METRICS_PORT"``...)."""
        return self.sources.get(name, "default")

    def explicit_environ(self) -> dict[str, str]:
        """The settings given as explicit arguments, as ``KSERVE_OTEL_*`` variables: how a process hands its
        configuration to processes it does not start itself (Ray Serve replicas)."""
        environ = {}
        for spec in SETTINGS_TABLE:
            if self.source_of(spec.name).startswith("argument"):
                value = getattr(self, spec.name)
                if value is not None:
                    environ[spec.env] = _format(value)
        return environ

    def as_dict(self) -> dict[str, Any]:
        """The resolved values, by setting name."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sources"}


def _format(value: Any) -> str:
    """A setting's value as its variable would spell it (what its parser reads back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join("=".join(item) if isinstance(item, tuple) else _format(item) for item in value) or "none"
    return str(value)


@dataclass(frozen=True)
class _BadValue:
    """A value :meth:`Settings.load_forgiving` ignored: which, from where, and what its setting accepts."""

    spec: SettingSpec
    raw: Any
    source: str
    accepted: str

    def message(self, settings: Settings) -> str:
        """One line: the setting, the value, its source, what is accepted, and what happens instead."""
        head = f"setting {self.spec.name}: {self.raw!r} from {self.source} is not valid; accepted: {self.accepted}"
        if self.spec.name in TRACING_SETTINGS:
            return f"{head}; kserve-otel exports no spans (metrics are not affected)"
        value, source = getattr(settings, self.spec.name), settings.source_of(self.spec.name)
        if self.spec.name == "metrics_port" and source == "default":
            used = f"the default: the model server's own HTTP port under KServe, {_format(value)} elsewhere"
        elif source == "default":
            used = f"the default {_format(value)}"
        else:
            used = f"{_format(value)} from {source}"
        return f"{head}; using {used}"


def _resolve(
    spec: SettingSpec,
    given: Mapping[str, Any],
    env: Mapping[str, str],
    annotations: Mapping[str, str],
    annotations_path: str,
    values: dict[str, Any],
    sources: dict[str, str],
    bad: list[_BadValue] | None = None,
    report: Reporter = report_once,
) -> Any:
    """Resolve ``spec`` into ``values``/``sources``. A bad argument or variable raises :class:`SettingsError`,
    unless ``bad`` is a list: then it is noted there and the next source is tried. A bad annotation is reported
    (``report``) and skipped."""
    candidates: list[tuple[str, Any]] = []
    if spec.name in given:
        candidates.append((f"argument {spec.name}", given[spec.name]))
    if spec.env in env:
        candidates.append((f"environment variable {spec.env}", env[spec.env]))
    if spec.otel_env and spec.otel_env in env:
        candidates.append((f"environment variable {spec.otel_env}", env[spec.otel_env]))
    for source, raw in candidates:
        try:
            value = spec.parse(raw)
        except ValueError as exc:
            if bad is None:
                raise SettingsError(
                    f"setting {spec.name}: {raw!r} from {source} is not valid; accepted: {exc}"
                ) from None
            bad.append(_BadValue(spec, raw, source, str(exc)))
            continue
        values[spec.name], sources[spec.name] = value, source
        return value
    if spec.annotation and spec.annotation in annotations:
        raw = annotations[spec.annotation]
        source = f"pod annotation {spec.annotation} in {annotations_path}"
        try:
            value = spec.parse(raw)
        except ValueError as exc:
            report(
                f"setting {spec.name}: {raw!r} from {source}",
                f"setting {spec.name}: {raw!r} from {source} is not valid (accepted: {exc}); "
                f"using the default {_format(spec.default)}",
            )
        else:
            values[spec.name], sources[spec.name] = value, source
            return value
    values[spec.name], sources[spec.name] = spec.default, "default"
    return spec.default


def resolve_setting(name: str, environ: Mapping[str, str] | None = None, report: Reporter = report_once) -> Any:
    """The value of one setting from the environment and pod annotations (no arguments), without reading or
    checking the others: what auto-instrumentation needs at interpreter start-up to decide whether it is on.
    The annotations file is read only when no variable sets ``name``; its problems go to ``report(key, message)``.

    Raises :class:`SettingsError` for a bad variable, as :meth:`Settings.load` does.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    annotations_path = _resolve(_SPECS["annotations_file"], {}, env, {}, "", values, sources)
    spec = _SPECS[name]
    set_by_variable = spec.env in env or (spec.otel_env is not None and spec.otel_env in env)
    annotations = read_annotations(annotations_path, report) if spec.annotation and not set_by_variable else {}
    return _resolve(spec, {}, env, annotations, annotations_path, values, sources, report=report)


def shown_default(spec: SettingSpec) -> str:
    """A setting's default as the documentation shows it (Markdown)."""
    if spec.shown_default is not None:
        return spec.shown_default
    default = spec.default
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, tuple):
        default = ",".join("=".join(v) if isinstance(v, tuple) else str(v) for v in default) or "none"
    return f"`{default}`"


def settings_table_rows() -> Iterable[tuple[str, str, str, str, str, str]]:
    """(setting, KSERVE_OTEL_* variable, OTEL_* variable, annotation, default, meaning) for each setting, in
    Markdown as the README's settings table shows them."""
    for spec in SETTINGS_TABLE:
        code = [f"`{value}`" if value else "" for value in (spec.env, spec.otel_env, spec.annotation)]
        yield (spec.name, *code, shown_default(spec), spec.doc)  # type: ignore[misc]


def settings_markdown() -> str:
    """The README's settings table, generated from :data:`SETTINGS_TABLE` (``python -m
    kserve_otel.config.settings`` prints it; ``tests/test_settings.py`` checks the README holds exactly
    this)."""
    lines = ["| setting | variable | standard variable | pod annotation | default | meaning |",
             "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in settings_table_rows()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
