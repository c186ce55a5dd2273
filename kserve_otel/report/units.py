"""Reading and writing the report's quantities: durations (``200ms``, ``1m30s``), byte sizes (``2Gi``), and the
short human forms the tables print.

Why its own module: the command line takes durations the way Prometheus writes them (an operator copies
``--slo 200ms`` from an alert), PromQL needs a window it accepts, and the tables want compact numbers; all of
that is the same few conversions.
"""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(us|µs|ms|s|m|h|d)")
_BYTE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_BYTES = re.compile(r"(\d+(?:\.\d*)?)\s*([kmgt]i?)?b?", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds in ``text``: ``250ms``, ``10s``, ``1m30s``, ``1.5s``, or a bare number of seconds.

    Raises ValueError with what is accepted.
    """
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(number + unit for number, unit in parts) != value:
            raise ValueError(f"{text!r} is not a duration (write it as 200ms, 10s, 1m30s or 0.2)") from None
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{text!r} is not a positive duration")
    return seconds


def parse_bytes(text: str) -> float:
    """Bytes in ``text``: ``2Gi``, ``512Mi``, ``1.5G``, ``1000000`` (Kubernetes' suffixes). Raises ValueError."""
    match = _BYTES.fullmatch(text.strip())
    if not match or float(match[1]) <= 0:
        raise ValueError(f"{text!r} is not a size in bytes (write it as 2Gi, 512Mi or 1000000)")
    return float(match[1]) * _BYTE_UNITS[(match[2] or "").lower()]


def promql_duration(seconds: float) -> str:
    """A range PromQL accepts for ``seconds`` (whole milliseconds: ``[1500ms]``)."""
    return f"{max(1, round(seconds * 1000))}ms"


def format_seconds(seconds: float | None) -> str:
    """``0.0123`` -> ``12.3 ms``; unknown -> ``-``."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.3g} s"


def format_bytes(value: float | None) -> str:
    """``3.2e9`` -> ``2.98 GiB``; unknown -> ``-``."""
    if value is None or not math.isfinite(value):
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def format_ratio(value: float | None) -> str:
    """``0.1234`` -> ``12.3%``; unknown -> ``-``."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value * 100:.3g}%"


def format_number(value: float | None) -> str:
    """A rate or count in three significant digits; unknown -> ``-``."""
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:.3g}"
