"""What every benchmark module shares: how to time on a noisy machine, and how a measure reports its results.

Timing. On this project's two noisy cores one sample can be twice as slow as the next, so:

* a sample times many calls in one loop (``perf_counter_ns``), sized by calibration to last ``target_ns``;
* the garbage collector is collected before and disabled during each sample;
* the cases of one measure are sampled in rounds, interleaved, the order rotating every round, so that a slow
  spell of the machine hurts every case alike instead of one;
* results are medians over the rounds, and claims are ratios to a baseline timed in the same rounds.

Reporting. Each measure runs in a process of its own (``python -m benchmarks.<module> --out FILE``) and writes a
:class:`Section` as JSON: tables of what was measured and :class:`Target` rows judged PASS or MISS.
:mod:`benchmarks.run` gathers the sections into ``results.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import metadata
from time import perf_counter_ns
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --------------------------------------------------------------------------------------------- timing


@dataclass
class Case:
    """One measured thing. ``loop(n)`` makes ``n`` calls and is what is timed; ``prepare()`` runs untimed before
    every sample (to install the tracer provider the case needs, for instance); ``count()``, where given, says
    how many observations the case's instrument holds, so the checks can compare it with the calls made."""

    name: str
    loop: Callable[[int], object]
    prepare: Callable[[], object] | None = None
    count: Callable[[], int] | None = None


def sample_ns(case: Case, n: int) -> float:
    """Nanoseconds per call of one sample of ``n`` calls, with the garbage collector off."""
    if case.prepare is not None:
        case.prepare()
    gc.collect()
    gc.disable()
    try:
        start = perf_counter_ns()
        case.loop(n)
        elapsed = perf_counter_ns() - start
    finally:
        gc.enable()
    return elapsed / n


def calibrate(case: Case, target_ns: float) -> int:
    """How many calls make one sample last about ``target_ns``.

    Grows ``n`` tenfold until a sample lasts a tenth of the target, then sizes from one more sample of the
    estimated size: the first calls of a case are slow (caches, lazily created series) and would skew it.
    """
    n = 1
    while max(sample_ns(case, n), 1.0) * n < target_ns / 10 and n < 1 << 26:
        n *= 10
    per_call = max(sample_ns(case, n), 1.0)
    n = max(1, round(target_ns / per_call))
    return max(1, round(target_ns / max(sample_ns(case, n), 1.0)))


@dataclass
class Timings:
    """Per-call nanoseconds of each case, one value per round, and the calls per sample."""

    samples: dict[str, list[float]]
    calls_per_sample: dict[str, int]

    def median(self, name: str) -> float:
        return statistics.median(self.samples[name])

    def quartiles(self, name: str) -> tuple[float, float]:
        values = self.samples[name]
        if len(values) < 2:
            return values[0], values[0]
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return q1, q3


def measure(cases: list[Case], rounds: int, target_ns: float) -> Timings:
    """Time every case ``rounds`` times, interleaved, the order rotating each round."""
    sizes = {case.name: calibrate(case, target_ns) for case in cases}
    samples: dict[str, list[float]] = {case.name: [] for case in cases}
    for r in range(rounds):
        k = r % len(cases)
        for case in cases[k:] + cases[:k]:
            samples[case.name].append(sample_ns(case, sizes[case.name]))
    return Timings(samples, sizes)


# --------------------------------------------------------------------------------------------- results


@dataclass
class Target:
    """A claim: ``value`` (a ratio) must be at most ``limit`` (at least, with ``at_least``). ``value`` is None
    when it could not be measured."""

    name: str
    value: float | None
    limit: float
    how: str
    at_least: bool = False

    @property
    def status(self) -> str:
        if self.value is None:
            return "n/a"
        passed = self.value >= self.limit if self.at_least else self.value <= self.limit
        return "PASS" if passed else "MISS"

    @property
    def bound(self) -> str:
        return f"{'≥' if self.at_least else '≤'} {self.limit:g}"


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    """What one measure reports: why and how (``method``), its tables, its targets and notes."""

    title: str
    method: str
    tables: list[Table] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Section:
        raw = json.loads(text)
        return cls(
            title=raw["title"], method=raw["method"],
            tables=[Table(**t) for t in raw["tables"]], targets=[Target(**t) for t in raw["targets"]],
            notes=raw["notes"], seconds=raw["seconds"],
        )


def fmt_time(ns: float) -> str:
    """A duration with a unit that keeps three significant digits or so."""
    if abs(ns) < 1_000:
        return f"{ns:.0f} ns"
    if abs(ns) < 1_000_000:
        return f"{ns / 1_000:.2f} µs"
    if abs(ns) < 1_000_000_000:
        return f"{ns / 1_000_000:.2f} ms"
    return f"{ns / 1_000_000_000:.2f} s"


def fmt_spread(timings: Timings, name: str) -> str:
    low, high = timings.quartiles(name)
    return f"{fmt_time(low)} – {fmt_time(high)}"


def ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def module_main(run: Callable[[bool], Section], argv: list[str] | None = None) -> None:
    """Entry point of a measure's process: ``python -m benchmarks.X [--quick] [--out FILE]``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a fast sanity run")
    parser.add_argument("--out", help="write the section as JSON here (default: print it)")
    args = parser.parse_args(argv)
    start = perf_counter_ns()
    section = run(args.quick)
    section.seconds = (perf_counter_ns() - start) / 1e9
    if args.out:
        with open(args.out, "w", encoding="utf-8") as out:
            out.write(section.to_json())
    else:
        print(section.to_json())


# --------------------------------------------------------------------------------------------- machine


def stop(proc: subprocess.Popen, timeout: float) -> None:  # type: ignore[type-arg]
    """Terminate ``proc``, and kill it if it has not exited within ``timeout`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _first_line_of(path: str, key: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: other work on the machine makes every number noisier."""
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


PACKAGES = (
    "kserve-otel", "opentelemetry-api", "opentelemetry-sdk", "opentelemetry-exporter-prometheus",
    "prometheus_client", "kserve", "starlette", "uvicorn", "httpx",
)


def machine_facts() -> dict[str, Any]:
    """The machine, interpreter and package versions the numbers were measured with."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    try:
        commit = subprocess.run(
            ["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10,
        ).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    return {
        "cores": os.cpu_count(),
        "cpu": _first_line_of("/proc/cpuinfo", "model name"),
        "memory": _first_line_of("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "load": load_average(),
        "python": f"{platform.python_implementation()} {sys.version.split()[0]}",
        "packages": versions,
        "speedups": _speedups_implementation(),
        "commit": commit,
    }


def _speedups_implementation() -> str:
    """Which kserve_otel.recording.speedups the measures' processes use: the C extension or the pure-Python
    twin."""
    try:
        from kserve_otel.recording import speedups
    except ImportError:
        return "not importable"
    return "C extension" if speedups.IMPLEMENTATION == "c" else "pure Python"
