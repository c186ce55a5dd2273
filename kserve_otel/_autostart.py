"""Zero-code auto-instrumentation: run at interpreter start-up by the ``kserve_otel_autostart.pth`` file that
installing kserve-otel puts in site-packages.

How the check stays free when it is off: the ``.pth`` line itself only asks whether the variable
``KSERVE_OTEL_ENABLED`` exists or the pod-annotations file (``KSERVE_OTEL_ANNOTATIONS_FILE``, default
``/etc/podinfo/annotations``) exists: a dictionary lookup and one ``stat``, well under the noise of starting
Python. Only then is this module imported. It resolves the ``enabled`` setting alone (``KSERVE_OTEL_ENABLED``
> the annotation ``serving.kserve.io/enable-prometheus-scraping`` > false) and, when it is on, registers
import hooks: the moment the program imports ``kserve`` or ``ray.serve``, that framework is instrumented (KServe's
worker processes and Ray Serve's replicas start Python afresh, so they go through the same check). Nothing here ever stops the program: a failure is one line
on stderr. Settings other than ``enabled`` are resolved when the framework is imported, forgivingly
(:meth:`kserve_otel.config.settings.Settings.load_forgiving`: a bad value is one line, and only what it
configures is off).

Problems are reported by the process that acts on them, once per process tree
(:mod:`kserve_otel.config.problems`): a bad ``KSERVE_OTEL_ENABLED`` at once (the variable says
auto-instrumentation is wanted); an annotations file that cannot be used (a FIFO, a device, a directory, more
than 1 MiB, not UTF-8) or a bad enabling annotation only when the program imports ``kserve`` or ``ray.serve``,
so that the other Python processes of the environment (pip, probes, scripts) start as if there were no file.
The file is read only when the variable is not set, and never blocks (see
:mod:`kserve_otel.config.annotations`).
"""

from __future__ import annotations

import sys

#: Import hooks: module name -> function instrumenting it (``module:function`` in this package).
HOOKS = {
    "kserve": "kserve_otel.instrumentation.kserve:instrument_on_import",
    "ray.serve": "kserve_otel.instrumentation.ray_serve:instrument_on_import",
}


def _report(message: str) -> None:
    print(f"kserve-otel: {message}", file=sys.stderr, flush=True)


def _hook(target: str):  # type: ignore[no-untyped-def]
    module_name, _, function = target.partition(":")

    def on_import(module: object) -> None:
        try:
            import importlib

            getattr(importlib.import_module(module_name), function)(module)
        except Exception as exc:  # noqa: BLE001 - auto-instrumentation must never stop the program
            _report(f"auto-instrumentation of {getattr(module, '__name__', module)} failed: {exc!r}")

    return on_import


def _report_on_import(problems: list[tuple[str, str]]):  # type: ignore[no-untyped-def]
    def on_import(module: object) -> None:
        from .config.problems import report_once

        for key, message in problems:
            report_once(key, f"{message}; auto-instrumentation by pod annotation is off")

    return on_import


def start() -> bool:
    """Register the import hooks if auto-instrumentation is on; returns whether it is."""
    from .config.problems import report_once
    from .config.settings import SettingsError, resolve_setting

    problems: list[tuple[str, str]] = []  # found in the annotations file: told only to a model server
    try:
        enabled = resolve_setting("enabled", report=lambda key, message: problems.append((key, message)))
    except SettingsError as exc:
        report_once(str(exc), f"auto-instrumentation is off: {exc}")
        return False
    if not enabled and not problems:
        return False
    from wrapt import register_post_import_hook

    for module, target in HOOKS.items():
        register_post_import_hook(_hook(target) if enabled else _report_on_import(problems), module)
    return enabled


try:
    start()
except Exception as exc:  # noqa: BLE001 - this runs inside site.py: report, never raise
    _report(f"auto-instrumentation failed to start: {exc!r}")
