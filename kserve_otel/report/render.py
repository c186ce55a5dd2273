"""The report for people: a table of the steps, a table of the server, and the verdict, printed with rich.

Why rich: aligned columns that stay readable in a terminal of any width, colour where there is a terminal and
plain text where there is not (a CI log, a pipe).
"""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .analysis import Analysis
from .units import format_bytes, format_number, format_ratio, format_seconds
from .verdict import OK, PROBLEM, Verdict
from .window import Window

_MARKS = {OK: ("ok", "green"), PROBLEM: ("!!", "bold red"), "unknown": ("?", "yellow")}
_SLO_STYLE = {"holds": "green", "breached": "bold red", "not checked": "yellow", "not given": "dim"}


def render(console: Console, window: Window, analysis: Analysis, verdict: Verdict) -> None:
    where = "Prometheus " if window.source == "prometheus" else ""
    console.print(Text(f"kserve-otel report: {where}{window.target}"
                       f"{' ' + window.selector if window.selector else ''}, "
                       f"last {format_seconds(window.seconds)}", style="bold"))
    console.print(_steps_table(analysis))
    console.print(_server_table(analysis))
    _print_verdict(console, verdict)


def _steps_table(analysis: Analysis) -> Table:
    streaming = any(step.first_item_p99_seconds is not None for model in analysis.models for step in model.steps)
    table = Table(title="Steps", title_justify="left")
    for column in ("model", "step", "req/s", "p50", "p90", "p99", "mean", "time share", "errors"):
        table.add_column(column, justify="left" if column in ("model", "step") else "right")
    if streaming:
        table.add_column("first item p99", justify="right")
    for model in analysis.models:
        for step in model.steps:
            dominant = step.step == model.dominant_step
            row = [model.model, step.step, format_number(step.rate_per_second), format_seconds(step.p50_seconds),
                   format_seconds(step.p90_seconds), format_seconds(step.p99_seconds),
                   format_seconds(step.mean_seconds), format_ratio(step.time_share), _errors(step.errors, step.error_ratio)]
            if streaming:
                row.append(format_seconds(step.first_item_p99_seconds))
            table.add_row(*row, style="bold" if dominant else None)
        total = [model.model, "all steps", format_number(model.rate_per_second), "", "",
                 format_seconds(model.latency_p99_seconds), "", "", _errors(model.errors, model.error_ratio)]
        table.add_row(*total, *([""] if streaming else []), style="dim", end_section=True)
    return table


def _errors(count: float, ratio: float) -> str:
    return "0" if count <= 0 else f"{format_number(count)} ({format_ratio(ratio)})"


def _server_table(analysis: Analysis) -> Table:
    server = analysis.server
    table = Table(title="Server", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value")
    if server.http_requests is not None:
        table.add_row("inference requests (HTTP POST)",
                      f"{format_number(server.http_rate_per_second)}/s, p50 {format_seconds(server.http_p50_seconds)}, "
                      f"p90 {format_seconds(server.http_p90_seconds)}, p99 {format_seconds(server.http_p99_seconds)}")
    table.add_row("in flight (at the end)", format_number(server.in_flight))
    table.add_row("requests in the server / in a step (average)",
                  f"{format_number(server.concurrency)} / {format_number(server.in_steps)}")
    queue = ("not known" if server.queue_wait_source is None else
             f"mean {format_seconds(server.queue_wait_mean_seconds)}, p99 {format_seconds(server.queue_wait_p99_seconds)} "
             f"({server.queue_wait_source})")
    table.add_row("queue wait", queue)
    processes = f" (busiest of {server.processes})" if server.processes > 1 else ""
    table.add_row("process CPU", "-" if server.cpu_cores is None else f"{format_number(server.cpu_cores)} cores{processes}")
    table.add_row("process memory (resident)", format_bytes(server.memory_bytes))
    for gpu in server.gpus:
        share = (gpu.memory_used_bytes / gpu.memory_total_bytes
                 if gpu.memory_used_bytes is not None and gpu.memory_total_bytes else math.nan)
        table.add_row(f"GPU {gpu.index} {gpu.uuid}".rstrip(),
                      f"memory {format_bytes(gpu.memory_used_bytes)} of {format_bytes(gpu.memory_total_bytes)} "
                      f"({format_ratio(share)}), utilisation {format_ratio(gpu.utilization_ratio)}")
    return table


def _print_verdict(console: Console, verdict: Verdict) -> None:
    slo = "no SLO given" if verdict.slo_seconds is None else f"SLO {format_seconds(verdict.slo_seconds)}"
    line = Text("Verdict: ", style="bold")
    line.append(f"{slo}: {verdict.slo_status}", style=_SLO_STYLE.get(verdict.slo_status))
    console.print(line)
    for check in verdict.slo_checks:
        mark = "<=" if check.holds else ">"
        console.print(f"  {check.scope}: {check.basis} {format_seconds(check.p99_seconds)} {mark} "
                      f"{format_seconds(verdict.slo_seconds)}")
    if verdict.dominant_step is not None:
        console.print(Text(f"Dominant step: {verdict.dominant} "
                           f"({format_ratio(verdict.dominant_share)} of the time in its steps, p99 "
                           f"{format_seconds(verdict.dominant_p99_seconds)})", style="bold"))
        if verdict.slowest_traces:
            traces = ", ".join(f"{trace} ({format_seconds(seconds)})" for seconds, trace in verdict.slowest_traces)
            console.print(f"  slowest traced requests of {verdict.dominant_step}: {traces}")
    for finding in verdict.findings:
        mark, style = _MARKS.get(finding.status, ("?", "yellow"))
        line = Text("  ")
        line.append(f"[{mark}]", style=style)
        line.append(f" {finding.check}: {finding.detail}")
        console.print(line)
    console.print(Text(f"Next: {verdict.next}", style="bold"))
