"""Quantiles from classic histogram buckets, computed the way Prometheus' ``histogram_quantile`` does.

Why a copy of Prometheus' algorithm rather than any estimator: the report must say the same p99 as the
dashboards and alerts that operators already run (``histogram_quantile(0.99, sum by (le, model_name)
(rate(request_predict_seconds_bucket[1m])))``), so it follows ``bucketQuantile`` of Prometheus'
``promql/quantile.go`` step by step: sort by upper bound, merge equal bounds, ignore relative differences of
at most 1e-12 between neighbouring buckets (floating-point noise) and remove real decreases (the monotonicity
fix), then interpolate linearly inside the bucket holding the rank, with 0 as the lower bound of the lowest
bucket unless its upper bound is 0 or less, and the second-highest bound when the rank falls in ``+Inf``.

Prometheus before 2.48 has no floating-point-noise step; on bucket counts that differ by more than 1e-12
relative (all real data) every version gives the same result.
"""

from __future__ import annotations

import bisect
import math
import sys
from collections.abc import Iterable

#: Relative difference between neighbouring cumulative bucket counts that Prometheus treats as noise.
SMALL_DELTA_TOLERANCE = 1e-12
_MIN_NORMAL = sys.float_info.min  # Go's math.Float64frombits(0x0010000000000000)


def bucket_quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float:
    """The ``q``-quantile of cumulative ``buckets`` (``(upper bound, count)`` pairs, any order).

    Special cases as in Prometheus: ``q`` NaN gives NaN, ``q < 0`` gives -Inf, ``q > 1`` gives +Inf; no
    ``+Inf`` bucket, fewer than two buckets or no observations give NaN.
    """
    if math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = sorted(((float(bound), float(count)) for bound, count in buckets), key=lambda b: b[0])
    if not ordered or not math.isinf(ordered[-1][0]) or ordered[-1][0] < 0:
        return math.nan
    bounds, counts = _coalesce(ordered)
    _ensure_monotonic(counts)
    if len(bounds) < 2:
        return math.nan
    observations = counts[-1]
    if observations == 0:
        return math.nan
    rank = q * observations
    # The first bucket (not counting +Inf) whose count reaches the rank; len-1 when none does.
    index = bisect.bisect_left(counts, rank, 0, len(counts) - 1)
    if index == len(bounds) - 1:
        return bounds[-2]
    if index == 0 and bounds[0] <= 0:
        return bounds[0]
    start, end, count = 0.0, bounds[index], counts[index]
    if index > 0:
        start = bounds[index - 1]
        count -= counts[index - 1]
        rank -= counts[index - 1]
    return start + (end - start) * _divide(rank, count)


def _divide(a: float, b: float) -> float:
    """``a / b`` as Go computes it: 0/0 is NaN (rank 0 in an empty lowest bucket), x/0 is infinite."""
    if b == 0:
        return math.nan if a == 0 or math.isnan(a) else math.copysign(math.inf, a)
    return a / b


def _coalesce(ordered: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """Merge buckets of equal upper bound (adding their counts), as Prometheus does."""
    bounds: list[float] = []
    counts: list[float] = []
    for bound, count in ordered:
        if bounds and bounds[-1] == bound:
            counts[-1] += count
        else:
            bounds.append(bound)
            counts.append(count)
    return bounds, counts


def _ensure_monotonic(counts: list[float]) -> None:
    """Prometheus' ``ensureMonotonicAndIgnoreSmallDeltas``, in place: a count within the tolerance of the last
    accepted one, or below it, is replaced by it."""
    previous = counts[0]
    for i in range(1, len(counts)):
        current = counts[i]
        if current == previous:
            continue
        if _almost_equal(previous, current, SMALL_DELTA_TOLERANCE) or current < previous:
            counts[i] = previous
            continue
        previous = current


def _almost_equal(a: float, b: float, epsilon: float) -> bool:
    """Prometheus' ``util/almost.Equal``."""
    if math.isnan(a) and math.isnan(b):
        return True
    if a == b:
        return True
    abs_sum = abs(a) + abs(b)
    diff = abs(a - b)
    if a == 0 or b == 0 or abs_sum < _MIN_NORMAL:
        return diff < epsilon * _MIN_NORMAL
    return diff / min(abs_sum, sys.float_info.max) < epsilon
