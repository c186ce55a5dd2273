"""The report as one JSON document (``--json``): every number, where it came from, and the verdict.

Why: CI jobs and scripts gate on the report; they need the numbers in seconds, ratios and bytes, with names
that say their unit, and ``null`` where a number is unknown (JSON has no NaN).
"""

from __future__ import annotations

import dataclasses
import json
import math
from datetime import datetime, timezone
from typing import Any

from .analysis import Analysis
from .verdict import Verdict
from .window import Window

#: Bumped when a field changes meaning or goes away (new fields do not bump it).
SCHEMA_VERSION = 1


def document(window: Window, analysis: Analysis, verdict: Verdict) -> dict[str, Any]:
    return _clean({
        "schema_version": SCHEMA_VERSION,
        "source": {
            "mode": window.source, "target": window.target, "selector": window.selector or None,
            "metric_prefix": window.prefix,
            "window_seconds": window.seconds,
            "end_time": datetime.fromtimestamp(window.end_time, timezone.utc).isoformat(timespec="seconds"),
        },
        "models": [dataclasses.asdict(model) for model in analysis.models],
        "server": dataclasses.asdict(analysis.server),
        "verdict": dataclasses.asdict(verdict),
    })


def to_json(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, allow_nan=False)


def _clean(value: Any) -> Any:
    """NaN and infinities become null, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value
