"""Memory after a million instrumented calls: the hot path must not grow with the number of calls.

Why: a step observation lands in a fixed-size bucket counter (``kserve_otel/recording/series.py``), so the
memory the package holds is fixed by the number of (model, step) pairs. A leak of even a few bytes per call (a
cached span, a list of durations, an ever-growing dict) would take a model server down after days of traffic;
a million calls make a few bytes per call visible.

How, for each mode (metrics only, no tracer provider; and sampled spans through an SDK ``TracerProvider`` with a
``BatchSpanProcessor`` whose exporter drops them):

1. ``tracemalloc`` starts; the first call for a new model creates its series: the traced memory it adds is
   "one series" (measured after the step's metric family exists, so it is the per-model cost).
2. 100,000 warm-up calls, then 1,000,000 calls in ten chunks; after each, the span queue is flushed, ``gc.collect()``
   runs, and traced memory is read. "Before" is the reading after the warm-up. The series' count must equal the
   calls made.
3. Beforehand, the same calls on another model without ``tracemalloc``, reading RSS (``tracemalloc``'s own tables grow with
   the peak number of live blocks, a full span queue for instance, and would sit in RSS).

PASS: traced growth over the million calls is at most the size of one series, and RSS, as the median of the
readings over the second half of the calls, grows by at most 1 MiB (single readings move by a megabyte either
way as the allocator takes and gives back arenas; a leak would move the median). RSS is read from
``/proc/self/statm``.
"""

from __future__ import annotations

import gc
import os
import statistics
import tracemalloc
import uuid
from array import array
from dataclasses import dataclass
from typing import Any

from kserve_otel import instrument_step

from .harness import Section, Table, Target, module_main
from .step_overhead import STEP, Rig, series_count

RSS_LIMIT_MIB = 1.0
CHECKPOINTS = 10


def _target(x: Any) -> Any:
    return x


def rss_bytes() -> int:
    with open("/proc/self/statm", "rb") as statm:  # binary: no codec import inside a measurement
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@dataclass
class Growth:
    mode: str
    calls: int
    series_bytes: int
    traced_before: int
    traced_after: int
    rss_before: int
    #: RSS after each tenth of the calls.
    rss_checkpoints: list[int]
    #: Observations of the series of each pass (RSS, traced), each to equal 1 + warm-up + calls.
    observations: tuple[int, int]
    top: list[str]

    @property
    def traced_growth(self) -> int:
        return self.traced_after - self.traced_before

    @property
    def rss_after(self) -> int:
        """RSS over the second half of the calls: the median of its checkpoints. The allocator takes memory
        back and forth (glibc arenas of the span export thread, pymalloc arenas), so one reading may spike by
        a megabyte that the next gives back; a leak keeps growing and moves the median with it."""
        return int(statistics.median(self.rss_checkpoints[len(self.rss_checkpoints) // 2:]))

    @property
    def rss_growth(self) -> int:
        return self.rss_after - self.rss_before


def _chunks(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _loop(step: Any, n: int) -> None:
    for _ in range(n):
        step(1)


def _readings(rig: Rig, step: Any, sizes: list[int]) -> tuple[array[int], array[int]]:
    """Make ``sizes[i]`` calls for each i; after each chunk flush the span queue, collect garbage, and read the
    traced memory (0 when ``tracemalloc`` is off) and RSS. The arrays exist before the first reading, and the
    same code takes every reading, so what reading adds cancels out."""
    traced, rss = array("q", [0] * len(sizes)), array("q", [0] * len(sizes))
    for i in range(len(sizes)):
        _loop(step, sizes[i])
        rig.spans_exported()
        gc.collect()
        traced[i], rss[i] = tracemalloc.get_traced_memory()[0], rss_bytes()
    return traced, rss


def measure_growth(rig: Rig, mode: str, calls: int, warmup: int = 10_000) -> Growth:
    """Memory before and after ``calls`` calls of a step in tracing ``mode`` (``none`` or ``sampled``).

    Two passes, each on a model of its own: RSS without ``tracemalloc`` (whose own tables grow with the peak
    number of live blocks, such as a full span queue, and sit in RSS), then traced memory with it.
    """
    prefix = f"memory-{uuid.uuid4().hex[:8]}"
    rig.use(mode)
    instrument_step(STEP, _target, model_name=f"{prefix}-family")(1)  # the family exists before we measure
    sizes = [warmup, *_chunks(calls, CHECKPOINTS)]  # the warm-up gives reading 0, "before"
    rss_step = instrument_step(STEP, _target, model_name=f"{prefix}-{mode}-rss")
    rss_step(1)
    _, rss = _readings(rig, rss_step, sizes)
    model = f"{prefix}-{mode}-traced"
    step = instrument_step(STEP, _target, model_name=model)
    tracemalloc.start()
    try:
        gc.collect()
        start = tracemalloc.get_traced_memory()[0]
        step(1)
        rig.spans_exported()
        gc.collect()
        series_bytes = tracemalloc.get_traced_memory()[0] - start
        snapshot_before = tracemalloc.take_snapshot()  # held, unchanged, through every reading
        traced, _ = _readings(rig, step, sizes)
        not_tracemalloc = [tracemalloc.Filter(False, tracemalloc.__file__)]
        diffs = tracemalloc.take_snapshot().filter_traces(not_tracemalloc).compare_to(
            snapshot_before.filter_traces(not_tracemalloc), "lineno")
    finally:
        tracemalloc.stop()
    top = [str(diff) for diff in diffs[:5] if diff.size_diff > 0]
    observations = (series_count(f"{prefix}-{mode}-rss"), series_count(model))
    return Growth(mode, calls, series_bytes, traced[0], traced[-1], rss[0], list(rss[1:]), observations, top)


def _kib(n: int) -> str:
    return f"{n / 1024:+,.1f} KiB" if n else "0 KiB"


def run(quick: bool) -> Section:
    # A long warm-up: the allocator's arenas settle only after the span queue has filled and drained many times.
    calls, warmup = (20_000, 5_000) if quick else (1_000_000, 100_000)
    rig = Rig()
    try:
        results = [measure_growth(rig, mode, calls, warmup) for mode in ("none", "sampled")]
    finally:
        rig.close()
    section = Section(f"Memory after {calls:,} instrumented calls", __doc__.split("\n\n", 1)[1].strip() if __doc__ else "")
    labels = {"none": "metrics only (no tracer provider)", "sampled": "sampled spans (BatchSpanProcessor, dropping exporter)"}
    rows = []
    for g in results:
        expected = 1 + warmup + calls
        rows.append([
            labels[g.mode], f"{g.series_bytes:,} B", f"{g.traced_before / 1024:,.1f} KiB",
            f"{g.traced_after / 1024:,.1f} KiB", _kib(g.traced_growth), f"{g.rss_before / 2**20:,.1f} MiB",
            f"{g.rss_after / 2**20:,.1f} MiB", f"{max(g.rss_checkpoints) / 2**20:,.1f} MiB", _kib(g.rss_growth),
            " and ".join(f"{n:,}" for n in g.observations) + f" / {expected:,}"
            + ("" if g.observations == (expected, expected) else " MISMATCH"),
        ])
        traced = Target(
            f"memory, {labels[g.mode]}: traced growth / one series' size", g.traced_growth / max(g.series_bytes, 1),
            1.0, f"{g.traced_growth:+,} B over {calls:,} calls; one series = {g.series_bytes:,} B",
        )
        section.targets.append(traced)
        section.targets.append(Target(
            f"memory, {labels[g.mode]}: RSS growth in MiB", g.rss_growth / 2**20, RSS_LIMIT_MIB,
            f"{g.rss_growth:+,} B over {calls:,} calls",
        ))
        section.notes.append(
            f"{labels[g.mode]}: RSS after each tenth of the calls, against before: "
            + ", ".join(f"{(r - g.rss_before) / 1024:+,.0f}" for r in g.rss_checkpoints) + " KiB."
        )
        if g.top and traced.status == "MISS":
            section.notes.append(f"{labels[g.mode]}: largest traced growth by line: " + "; ".join(g.top))
    section.tables.append(Table(
        f"memory before and after {calls:,} calls (after {warmup:,} warm-up calls)",
        ["mode", "one series (traced)", "traced before", "traced after", "traced growth", "RSS before",
         "RSS after (median, 2nd half)", "RSS max", "RSS growth", "observations (each pass) / calls"], rows,
    ))
    return section


if __name__ == "__main__":
    module_main(run)
