"""``kserve-otel report``: gather a window, analyse it, judge it, print it, and say so in the exit status.

Why one function: the console script (``kserve_otel.cli.main``) only parses arguments; tests and other tools
call :func:`run` with the same options and get the exit status the command would have (0: the SLO holds or
none was given, 1: the SLO is breached, 2: no report could be made, explained in one line on stderr).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import TextIO

from rich.console import Console

from .analysis import analyse
from .document import document, to_json
from .errors import ReportError
from .fetch import normalize_url
from .prometheus import prometheus_window
from .render import render
from .scrapes import scrape_window
from .verdict import Limits, judge
from .window import Window

#: Seconds between the two scrapes of an endpoint, and the range of the rate() windows in Prometheus.
DEFAULT_INTERVAL = 10.0
DEFAULT_PROMETHEUS_WINDOW = 300.0
#: The metrics path KServe's annotations default to, used when the URL has none.
DEFAULT_METRICS_PATH = "/metrics"


@dataclass
class Options:
    url: str | None = None
    prometheus: str | None = None
    slo_seconds: float | None = None
    interval_seconds: float | None = None
    selector: str = ""
    json: bool = False
    limits: Limits | None = None


def run(options: Options, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Make the report; returns the exit status."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    try:
        window = gather(options)
    except ReportError as error:
        print(f"kserve-otel report: {error}", file=stderr)
        return error.exit_code
    analysis = analyse(window)
    verdict = judge(analysis, options.slo_seconds, options.limits)
    if options.json:
        print(to_json(document(window, analysis, verdict)), file=stdout)
    else:
        render(Console(file=stdout, markup=False, highlight=False, width=_width(stdout)), window, analysis, verdict)
    if verdict.slo_status == "not checked":
        print("kserve-otel report: no request reached a step during the window, so the SLO could not be checked",
              file=stderr)
    return verdict.exit_code


def gather(options: Options) -> Window:
    """The window the options ask for: two scrapes of ``url``, or PromQL over ``prometheus``."""
    if (options.url is None) == (options.prometheus is None):
        raise ReportError("give the metrics URL of a model server, or --prometheus URL, and not both")
    if options.prometheus is not None:
        seconds = options.interval_seconds or DEFAULT_PROMETHEUS_WINDOW
        return prometheus_window(normalize_url(options.prometheus), seconds, options.selector)
    if options.selector:
        raise ReportError("--selector applies to --prometheus only")
    return scrape_window(normalize_url(options.url or "", DEFAULT_METRICS_PATH),
                         options.interval_seconds or DEFAULT_INTERVAL)


def _width(stream: TextIO) -> int | None:
    """The terminal's width, or a wide page when the output is a file or a pipe (CI logs)."""
    return None if getattr(stream, "isatty", lambda: False)() else 160
