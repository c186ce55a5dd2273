"""Reads pod annotations from the Kubernetes downward-API file.

Inside a pod, a container sees its annotations only through a downward-API volume: a file of lines
``key="value"`` (values quoted as Go's ``strconv.Quote`` does), conventionally ``/etc/podinfo/annotations``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

_logger = logging.getLogger(__name__)

#: Where KServe's conventions and this package's manifests mount the downward-API annotations file.
DEFAULT_ANNOTATIONS_FILE = "/etc/podinfo/annotations"

ANNOTATION_PROMETHEUS_PORT = "prometheus.kserve.io/port"
ANNOTATION_PROMETHEUS_PATH = "prometheus.kserve.io/path"
ANNOTATION_ENABLE_SCRAPING = "serving.kserve.io/enable-prometheus-scraping"


def parse_annotations(text: str) -> dict[str, str]:
    """Parse the downward-API format: one ``key="value"`` a line; blank lines and lines without ``=`` are skipped."""
    annotations: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or "=" not in line:
            continue
        key, _, raw = line.partition("=")
        annotations[key.strip()] = _unquote(raw.strip())
    return annotations


def _unquote(raw: str) -> str:
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            # Go's strconv.Quote and JSON agree on the escapes Kubernetes emits (\" \\ \n \t \uXXXX).
            value = json.loads(raw)
            if isinstance(value, str):
                return value
        except ValueError:
            pass
        return raw[1:-1]
    return raw


def read_annotations(path: str | Path) -> dict[str, str]:
    """Annotations in the file at ``path``; an empty dict if there is none (the usual case outside Kubernetes).

    A file that exists but cannot be read is logged and treated as empty: annotations never stop a model server.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as exc:
        _logger.error("kserve-otel: cannot read pod annotations from %s (%s); ignoring them", path, exc)
        return {}
    return parse_annotations(text)
