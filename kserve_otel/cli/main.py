"""The ``kserve-otel`` console script: subcommands over a model server's telemetry (``report``).

Why a parser of its own, apart from :mod:`kserve_otel.report`: the report is a library call with typed
options; this module only turns a command line into those options, and turns every usage mistake into one
line on stderr with exit status 2 (no usage dump, no traceback), as a CI job wants.

    kserve-otel report URL [--slo 200ms] [--interval 10s] [--json]
    kserve-otel report --prometheus URL [--selector 'namespace="prod"'] [--interval 5m] [--slo 200ms] [--json]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from ..report.command import DEFAULT_INTERVAL, DEFAULT_PROMETHEUS_WINDOW, Options, run
from ..report.errors import EXIT_UNUSABLE
from ..report.units import parse_bytes, parse_duration
from ..report.verdict import Limits


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_UNUSABLE, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _typed(parse: Callable[[str], float]) -> Callable[[str], float]:
    def convert(text: str) -> float:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = parse.__name__.removeprefix("parse_")  # argparse names the type in its message
    return convert


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError(f"{text!r} is not a positive number")
    return value


def parser() -> argparse.ArgumentParser:
    top = _Parser(prog="kserve-otel", description="Tools over the telemetry of kserve-otel model servers.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    report = commands.add_parser(
        "report", help="where a slow model spends its time, and whether it meets its SLO",
        description="Scrape a model server's metrics endpoint twice, an interval apart (or query a Prometheus "
                    "server), and print per model and step: request rate, p50/p90/p99 (estimated from the "
                    "histogram buckets as Prometheus' histogram_quantile does), error ratio; for the server: "
                    "requests in flight, queue wait where known, process CPU and memory, GPU memory and "
                    "utilisation; then which step dominates, whether the SLO holds, and what to check next. "
                    "Exit status: 0 the SLO holds (or none was given), 1 the SLO is breached, 2 no report "
                    "could be made (the reason in one line on stderr).")
    report.add_argument("url", nargs="?", metavar="URL",
                        help="the model server's metrics endpoint (a URL without a path gets /metrics)")
    report.add_argument("--prometheus", metavar="URL", help="query this Prometheus server instead of scraping")
    report.add_argument("--selector", default="", metavar="MATCHERS",
                        help='with --prometheus: label matchers narrowing every query, e.g. namespace="prod"')
    report.add_argument("--slo", type=_typed(parse_duration), metavar="DURATION",
                        help="end-to-end p99 latency objective, e.g. 200ms; exit status 1 when it is breached")
    report.add_argument("--interval", type=_typed(parse_duration), metavar="DURATION",
                        help=f"time the numbers cover: between the two scrapes (default {DEFAULT_INTERVAL:g}s), "
                             f"or the rate() range with --prometheus (default {DEFAULT_PROMETHEUS_WINDOW / 60:g}m)")
    report.add_argument("--cpu-limit", type=_typed(_positive), default=1.0, metavar="CORES",
                        help="CPU cores one server process may use (default 1: Python runs about one core of "
                             "Python code per process)")
    report.add_argument("--memory-limit", type=_typed(parse_bytes), metavar="BYTES",
                        help="memory limit of one server process, e.g. 2Gi, to judge its resident memory")
    report.add_argument("--json", action="store_true", help="print one JSON document with every number")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    top = parser()
    try:
        arguments = top.parse_args(argv)
    except SystemExit as exit:  # --help (0) or a usage error, already printed (2)
        return exit.code if isinstance(exit.code, int) else EXIT_UNUSABLE
    if arguments.command != "report":
        top.print_help(sys.stderr)
        return EXIT_UNUSABLE
    options = Options(
        url=arguments.url, prometheus=arguments.prometheus, slo_seconds=arguments.slo,
        interval_seconds=arguments.interval, selector=arguments.selector, json=arguments.json,
        limits=Limits(cpu_cores_per_process=arguments.cpu_limit, memory_bytes=arguments.memory_limit),
    )
    try:
        return run(options)
    except KeyboardInterrupt:
        print("kserve-otel report: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
