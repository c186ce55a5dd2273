"""Reading the Grafana dashboard of ``integrations/`` as Grafana does: its panels, their PromQL, its variables."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

DASHBOARD = Path(__file__).resolve().parent.parent / "integrations" / "grafana" / "kserve-otel-dashboard.json"
VARIABLE = re.compile(r"\$(?:\{(\w+)[^}]*\}|(\w+))")


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(board: dict) -> list[dict]:
    """Every panel, those inside (collapsed) rows too."""
    panels = []
    for panel in board["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_queries(board: dict) -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target of every panel."""
    return [(panel["title"], target["refId"], target["expr"])
            for panel in all_panels(board) for target in panel.get("targets", [])]


def referenced_variables(text: str) -> set[str]:
    return {braced or bare for braced, bare in VARIABLE.findall(text)}


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """The expression as Grafana sends it, with ``values`` in place of the variables (others stay)."""
    return VARIABLE.sub(lambda match: values.get(match[1] or match[2], match[0]), expr)
