"""``kserve-otel-run``: serve a model or app instrumented, or run any command with auto-instrumentation on.

    kserve-otel-run [options] MODULE:ATTR        # MODULE: a module name or a .py file
    kserve-otel-run [options] -- python server.py --its-own-flags

Every option has an environment variable (named in ``--help``); an option given on the command line wins
over its variable, which wins over pod annotations and defaults. Bad input (an unimportable module, a missing
attribute, an object of no known kind, a bad setting) prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

EXIT_USAGE = 2

#: Settings the command takes as options; each option is named after its variable (``KSERVE_OTEL_METRICS_PORT``:
#: ``--metrics-port``) and documented by its row of :data:`kserve_otel.config.settings.SETTINGS_TABLE`.
SETTINGS_AS_OPTIONS = ("metrics_port", "metrics_path", "metrics_exporters", "traces_exporter", "traces_sampler",
                       "traces_sampler_arg", "service_name")
#: What the command adds to a setting's documentation.
_NOTES = {"metrics_port": "Unset, the endpoint is on the HTTP port (or the annotated port)."}


def _setting_options() -> list[tuple[str, str, str, str]]:
    """(option, setting name, KSERVE_OTEL_* variable, help) of each setting the command takes."""
    from ..config.settings import SETTINGS_TABLE, shown_default

    specs = {spec.name: spec for spec in SETTINGS_TABLE}
    options = []
    for name in SETTINGS_AS_OPTIONS:
        spec = specs[name]
        option = "--" + spec.env.removeprefix("KSERVE_OTEL_").lower().replace("_", "-")
        text = spec.doc + (f" One of: {', '.join(spec.choices)}." if spec.choices else "")
        text += f" {_NOTES[name]}" if name in _NOTES else f" Default {shown_default(spec) or 'none'}."
        options.append((option, name, spec.env, text.replace("`", "")))
    return options


SETTING_OPTIONS = _setting_options()

#: Options of the command itself: (option, KSERVE_OTEL_RUN_* variable, default, type, help).
SERVE_OPTIONS = (
    ("--host", "KSERVE_OTEL_RUN_HOST", "0.0.0.0", str, "address to serve on"),
    ("--http-port", "KSERVE_OTEL_RUN_HTTP_PORT", 8080, int, "HTTP port (KServe REST, Ray Serve's proxy, the ASGI app)"),
    ("--grpc-port", "KSERVE_OTEL_RUN_GRPC_PORT", 8081, int, "gRPC port of a KServe model server"),
    ("--workers", "KSERVE_OTEL_RUN_WORKERS", 1, int, "worker processes of a KServe model server"),
    ("--model-name", "KSERVE_OTEL_RUN_MODEL_NAME", None, str, "name of a KServe model given as a class"),
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kserve-otel-run",
        description="Serve MODULE:ATTR with OpenTelemetry metrics, traces and a Prometheus endpoint for every "
                    "step of every model: a kserve.Model instance or class (or a list), a Ray Serve Application "
                    "or Deployment, an ASGI app, or a zero-argument factory of one. With -- COMMAND, run any "
                    "command with auto-instrumentation on (KSERVE_OTEL_ENABLED=true).",
        epilog="Each option's environment variable is in brackets; the option wins over it.",
    )
    parser.add_argument("target", nargs="?", metavar="MODULE:ATTR", help="what to serve (MODULE: a module or a .py file)")
    for option, variable, default, kind, text in SERVE_OPTIONS:
        parser.add_argument(option, type=kind, default=None, help=f"{text} [{variable}; default {default}]")
    for option, _, variable, text in SETTING_OPTIONS:
        parser.add_argument(option, default=None, help=f"{text} [{variable}]".replace("%", "%%"))
    return parser


def _fail(message: str) -> int:
    print(f"kserve-otel-run: {message}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def _serve_options(arguments: argparse.Namespace, environ: dict[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for option, variable, default, kind, _ in SERVE_OPTIONS:
        name = option.lstrip("-").replace("-", "_")
        given = getattr(arguments, name)
        if given is None and variable in environ:
            try:
                given = kind(environ[variable])
            except ValueError:
                raise ValueError(f"{variable}={environ[variable]!r} is not a valid {kind.__name__}") from None
        values[name] = default if given is None else given
    return values


def _setting_arguments(arguments: argparse.Namespace) -> dict[str, Any]:
    return {setting: getattr(arguments, option.lstrip("-").replace("-", "_"))
            for option, setting, _, _ in SETTING_OPTIONS
            if getattr(arguments, option.lstrip("-").replace("-", "_")) is not None}


def _run_command(command: Sequence[str], arguments: argparse.Namespace) -> int:
    """Replace this process with ``command``, auto-instrumentation on and the options as variables."""
    env = dict(os.environ, KSERVE_OTEL_ENABLED="true")
    for option, _, variable, _ in SETTING_OPTIONS:
        value = getattr(arguments, option.lstrip("-").replace("-", "_"))
        if value is not None:
            env[variable] = str(value)
    try:
        os.execvpe(command[0], list(command), env)
    except OSError as exc:
        return _fail(f"cannot run {command[0]!r}: {exc.strerror}")
    return 0  # not reached: exec replaced the process


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, command = argv[:split], argv[split + 1:]
    arguments = _parser().parse_args(argv)
    if command:
        if arguments.target:
            return _fail("give either MODULE:ATTR or -- COMMAND, not both")
        return _run_command(command, arguments)
    if not arguments.target:
        return _fail("nothing to run: give MODULE:ATTR, or -- COMMAND (see --help)")

    from ..config.settings import Settings, SettingsError
    from .serve import ServeOptions, serve
    from .targets import TargetError, load

    try:
        serve_values = _serve_options(arguments, dict(os.environ))
        settings = Settings.load(**_setting_arguments(arguments))
        sys.argv = [arguments.target]  # KServe parses the command line when imported: give it none of ours
        target = load(arguments.target, serve_values["model_name"])
        options = ServeOptions(host=serve_values["host"], http_port=serve_values["http_port"],
                               grpc_port=serve_values["grpc_port"], workers=serve_values["workers"],
                               settings=settings)
    except (TargetError, SettingsError, ValueError) as exc:
        return _fail(str(exc))
    try:
        return serve(target, options)
    except (TargetError, SettingsError) as exc:
        return _fail(str(exc))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
