"""The judgement: does the SLO hold, which step dominates, and what to check next.

Why: this is the debugging procedure of KServe's observability page ("Debugging performance"), in its order:

1. compare the latency percentiles with the SLO;
2. check concurrency: are requests queueing because the server is over capacity?
3. check CPU, memory and GPU: is the server near its limits? (more resources or replicas);
4. check queue wait metrics: are requests stuck in a queue? (more replicas);
5. look at each step's latency: the dominating step is the one to change;
6. if everything is within the SLO, look at the client side and the network.

The SLO is checked on two measures when they exist, and the report names each: per model, the sum of its
steps' p99s (an upper-bound estimate of its end-to-end p99, exact when the slow requests are slow in every
step); for the server, the p99 of ``http_server_request_duration_seconds`` over inference (POST) requests,
measured end to end inside the server. The SLO is breached when any of them is above it.

Over a cluster (``--prometheus``) one more finding, ``reporting``, names the scrape targets (Ray nodes) and
Ray Serve replicas that reported during the window and no longer do: the numbers then cover fewer processes.
On Ray Serve the dominant step is named with the deployments whose replicas ran it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .analysis import Analysis, ModelStats
from .errors import EXIT_UNUSABLE
from .metric_names import HTTP_DURATION_METRIC
from .reporting import describe
from .units import format_bytes, format_number, format_ratio, format_seconds
from .window import Stopped

EXIT_OK, EXIT_BREACHED = 0, 1

OK, PROBLEM, UNKNOWN = "ok", "problem", "unknown"


@dataclass
class Limits:
    """What counts as "near the limit"; the command line sets them."""

    #: CPU cores one process may use (Python runs one core's worth of Python code per process).
    cpu_cores_per_process: float = 1.0
    #: Memory limit of one process (the container's), if known.
    memory_bytes: float | None = None
    #: Fraction of a limit that counts as near it.
    near: float = 0.9
    #: Requests waiting outside the steps, on average, that make the server overloaded.
    waiting_requests: float = 1.0
    #: Queue wait p99 as a fraction of the end-to-end p99 that makes the queue the problem.
    queue_share: float = 0.25


@dataclass
class SloCheck:
    scope: str
    basis: str
    p99_seconds: float
    holds: bool


@dataclass
class Finding:
    check: str
    status: str  # ok, problem or unknown
    detail: str


@dataclass
class Verdict:
    slo_seconds: float | None
    #: holds, breached, not given, or not checked (an SLO was given but no request was seen).
    slo_status: str
    slo_checks: list[SloCheck]
    #: The model the verdict is about (the worst one over the SLO, else the one with the most step time), the
    #: step with the largest share of its time, that share and that step's p99.
    model: str | None
    dominant_step: str | None
    dominant_share: float | None
    dominant_p99_seconds: float | None
    findings: list[Finding] = field(default_factory=list)
    next: str = ""
    exit_code: int = EXIT_OK
    #: The Ray Serve deployments whose replicas ran the dominant step (empty elsewhere).
    deployments: list[str] = field(default_factory=list)
    #: The dominant step's slowest observations that carry a trace (its histogram's exemplars), slowest first:
    #: (seconds, trace id), at most :data:`SLOWEST_TRACES`.
    slowest_traces: list[tuple[float, str]] = field(default_factory=list)

    @property
    def dominant(self) -> str:
        """``predict of iris``, or ``predict of iris (deployment Scorer)`` on Ray Serve."""
        where = ""
        if self.deployments:
            where = f" (deployment{'s' if len(self.deployments) > 1 else ''} {', '.join(self.deployments)})"
        return f"{self.dominant_step} of {self.model}{where}"


#: How many of the dominant step's slowest traced requests the verdict names.
SLOWEST_TRACES = 3


def slowest_traces(exemplars: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """The slowest exemplars, one per trace, slowest first."""
    slowest: dict[str, float] = {}
    for seconds, trace_id in exemplars:
        slowest[trace_id] = max(seconds, slowest.get(trace_id, seconds))
    return sorted(((seconds, trace) for trace, seconds in slowest.items()), reverse=True)[:SLOWEST_TRACES]


def judge(analysis: Analysis, slo_seconds: float | None, limits: Limits | None = None) -> Verdict:
    limits = limits or Limits()
    checks = _slo_checks(analysis, slo_seconds)
    if slo_seconds is None:
        status = "not given"
    elif not checks:
        status = "not checked"
    else:
        status = "holds" if all(check.holds for check in checks) else "breached"
    focus = _focus(analysis, checks)
    dominant = next((s for s in focus.steps if s.step == focus.dominant_step), None) if focus else None
    verdict = Verdict(
        slo_seconds=slo_seconds, slo_status=status, slo_checks=checks,
        model=focus.model if focus else None, dominant_step=dominant.step if dominant else None,
        dominant_share=dominant.time_share if dominant else None,
        dominant_p99_seconds=dominant.p99_seconds if dominant else None,
        exit_code={"breached": EXIT_BREACHED, "not checked": EXIT_UNUSABLE}.get(status, EXIT_OK),
        deployments=list(focus.step_deployments.get(dominant.step, [])) if focus and dominant else [],
    )
    if verdict.model is not None and verdict.dominant_step is not None:
        verdict.slowest_traces = slowest_traces(analysis.exemplars.get((verdict.model, verdict.dominant_step), []))
    reference_p99 = max((check.p99_seconds for check in checks), default=None)
    verdict.findings = [
        _concurrency(analysis, limits), _cpu(analysis, limits), _memory(analysis, limits), _gpu(analysis, limits),
        _queue(analysis, limits, reference_p99), _steps(verdict), _errors(analysis),
    ]
    if analysis.server.stopped_reporting is not None:
        verdict.findings.append(_reporting(analysis.server.stopped_reporting))
    verdict.next = _next(analysis, verdict)
    return verdict


def _slo_checks(analysis: Analysis, slo: float | None) -> list[SloCheck]:
    if slo is None:
        return []
    checks = [SloCheck(f"model {model.model}", "sum of step p99s (upper-bound estimate)",
                       model.latency_p99_seconds, model.latency_p99_seconds <= slo)
              for model in analysis.models if model.requests > 0 and math.isfinite(model.latency_p99_seconds)]
    p99 = analysis.server.http_p99_seconds
    if p99 is not None and math.isfinite(p99):
        checks.append(SloCheck("server", f"{HTTP_DURATION_METRIC} p99 (POST requests)", p99,
                               p99 <= slo))
    return checks


def _focus(analysis: Analysis, checks: list[SloCheck]) -> ModelStats | None:
    """The worst model over the SLO, else the model whose requests spent the most time in steps."""
    by_scope = {f"model {model.model}": model for model in analysis.models}
    breaching = [(check.p99_seconds, by_scope[check.scope]) for check in checks
                 if not check.holds and check.scope in by_scope]
    if breaching:
        return max(breaching, key=lambda item: item[0])[1]
    busy = [model for model in analysis.models if model.busy > 0]
    return max(busy, key=lambda model: model.busy) if busy else None


def _concurrency(analysis: Analysis, limits: Limits) -> Finding:
    server = analysis.server
    if server.concurrency is None or server.waiting is None:
        return Finding("concurrency", UNKNOWN, "no http_server_request_duration_seconds on the endpoint: the "
                       "requests in the server are not known")
    numbers = (f"{format_number(server.concurrency)} requests in the server on average, "
               f"{format_number(server.in_steps)} of them in a step"
               + (f", {format_number(server.in_flight)} in flight at the end" if server.in_flight is not None else ""))
    if server.waiting >= limits.waiting_requests:
        return Finding("concurrency", PROBLEM, f"{numbers}: {format_number(server.waiting)} waited outside the "
                       f"steps on average, so the server is over capacity (add replicas, workers or resources)")
    return Finding("concurrency", OK, f"{numbers}: requests do not queue in front of the model")


def _cpu(analysis: Analysis, limits: Limits) -> Finding:
    cores = analysis.server.cpu_cores
    if cores is None:
        return Finding("cpu", UNKNOWN, "no process CPU metrics on the endpoint")
    used = f"the busiest process used {format_number(cores)} CPU cores of {format_number(limits.cpu_cores_per_process)}"
    return _against_limit("cpu", used, cores, limits.cpu_cores_per_process, limits,
                          "it is CPU-bound (add CPU, replicas or workers)")


def _memory(analysis: Analysis, limits: Limits) -> Finding:
    resident = analysis.server.memory_bytes
    if resident is None:
        return Finding("memory", UNKNOWN, "no process memory metrics on the endpoint")
    if limits.memory_bytes is None:
        return Finding("memory", OK, f"{format_bytes(resident)} resident in the largest process "
                       f"(give --memory-limit to compare it with the container's limit)")
    used = f"{format_bytes(resident)} resident of {format_bytes(limits.memory_bytes)}"
    return _against_limit("memory", used, resident, limits.memory_bytes, limits, "near the limit (add memory or replicas)")


def _against_limit(check: str, used: str, value: float, limit: float, limits: Limits, advice: str) -> Finding:
    if value >= limits.near * limit:
        return Finding(check, PROBLEM, f"{used}: {advice}")
    return Finding(check, OK, used)


def _gpu(analysis: Analysis, limits: Limits) -> Finding:
    gpus = analysis.server.gpus
    if not gpus:
        return Finding("gpu", UNKNOWN, "no GPU metrics (gpu_* from nvidia-ml-py): no GPU, or not reported")
    full = []
    for gpu in gpus:
        memory = (gpu.memory_used_bytes / gpu.memory_total_bytes
                  if gpu.memory_used_bytes is not None and gpu.memory_total_bytes else None)
        if (memory is not None and memory >= limits.near) or (gpu.utilization_ratio or 0) >= limits.near:
            full.append(f"GPU {gpu.index}: memory {format_ratio(memory)}, utilisation {format_ratio(gpu.utilization_ratio)}")
    if full:
        return Finding("gpu", PROBLEM, "; ".join(full) + ": at capacity (add GPUs or replicas)")
    return Finding("gpu", OK, f"{len(gpus)} GPU(s), none near its memory or utilisation limit")


def _queue(analysis: Analysis, limits: Limits, reference_p99: float | None) -> Finding:
    server = analysis.server
    if server.queue_wait_source is None or server.queue_wait_p99_seconds is None:
        return Finding("queue", UNKNOWN, "queue wait not known (no request_batch_wait_seconds or "
                       "ray_serve_batch_wait_time_ms on the endpoint)")
    p99 = server.queue_wait_p99_seconds
    if reference_p99 is None:
        reference_p99 = max((model.latency_p99_seconds for model in analysis.models
                             if math.isfinite(model.latency_p99_seconds)), default=math.nan)
    waited = f"queue wait ({server.queue_wait_source}) p99 {format_seconds(p99)}"
    if math.isfinite(reference_p99) and reference_p99 > 0 and p99 >= limits.queue_share * reference_p99:
        return Finding("queue", PROBLEM, f"{waited}, {format_ratio(p99 / reference_p99)} of the p99 latency: "
                       f"requests wait in the queue (add replicas)")
    return Finding("queue", OK, waited)


def _steps(verdict: Verdict) -> Finding:
    if verdict.dominant_step is None:
        return Finding("steps", UNKNOWN, "no step ran during the window")
    status = PROBLEM if verdict.slo_status == "breached" else OK
    return Finding("steps", status, f"{verdict.dominant} takes "
                   f"{format_ratio(verdict.dominant_share)} of the time in its steps (p99 "
                   f"{format_seconds(verdict.dominant_p99_seconds)})")


def _reporting(stopped: list[Stopped]) -> Finding:
    if stopped:
        return Finding("reporting", PROBLEM, "stopped reporting during the window: "
                       + "; ".join(describe(item) for item in stopped)
                       + " (the numbers cover only what still reports)")
    return Finding("reporting", OK, "every target and Ray Serve replica that reported during the window still does")


def _errors(analysis: Analysis) -> Finding:
    failing = [f"{step.step} of {model.model}: {format_ratio(step.error_ratio)} ({', '.join(step.error_types)})"
               for model in analysis.models for step in model.steps if step.errors > 0]
    if failing:
        return Finding("errors", PROBLEM, "calls that raised: " + "; ".join(failing))
    return Finding("errors", OK, "no step raised")


def _next(analysis: Analysis, verdict: Verdict) -> str:
    if analysis.requests <= 0:
        return "no request reached a step during the window: send traffic, or report over a longer --interval"
    if verdict.slo_status == "holds":
        worst = max(verdict.slo_checks, key=lambda check: check.p99_seconds)
        return (f"within the SLO ({format_seconds(worst.p99_seconds)} <= {format_seconds(verdict.slo_seconds)}): "
                f"if clients still see slow responses, check client-side and network latency (gateway, "
                f"Knative queue-proxy, DNS, TLS)")
    advice = {
        "concurrency": "the server is overloaded: add replicas or workers",
        "cpu": "CPU is the limit: add CPU, replicas or workers",
        "memory": "memory is near the limit: add memory or replicas",
        "gpu": "the GPUs are at capacity: add GPUs or replicas",
        "queue": "requests wait in the queue: add replicas",
    }
    for finding in verdict.findings:
        if finding.status == PROBLEM and finding.check in advice:
            return f"{advice[finding.check]} ({finding.detail})"
    if verdict.dominant_step is None:
        return "no time was measured in any step: check that the steps are instrumented"
    return (f"optimise {verdict.dominant}: it takes {format_ratio(verdict.dominant_share)} "
            f"of the time in the steps (p99 {format_seconds(verdict.dominant_p99_seconds)})")
