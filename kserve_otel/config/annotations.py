"""Reads pod annotations from the Kubernetes downward-API file, safely enough to run at every Python start.

Inside a pod, a container sees its annotations only through a downward-API volume: a file of lines
``key="value"`` (values quoted as Go's ``strconv.Quote`` does), conventionally ``/etc/podinfo/annotations``.

The start-up hook reads this file in every Python process of the environment, so whatever sits at that path
must not hang, flood or break Python's start: only a regular file is read (a FIFO, a device such as
``/dev/zero``, a directory are refused without being read; it is checked with ``stat`` before it is opened, so
no device is ever opened, and with ``fstat`` after, against a swap in between), it is opened non-blocking, and
at most :data:`MAX_ANNOTATIONS_BYTES` are read (Kubernetes caps a pod's annotations at 256 KiB). Symbolic links
are followed: the downward API itself publishes the file through links (``annotations -> ..data/annotations``).
A file that cannot be used counts as no annotations, and its problem is reported once per process tree
(:mod:`kserve_otel.config.problems`).
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

from .problems import report_once

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


#: The largest annotations file read, in bytes (1 MiB); a larger one is refused whole.
MAX_ANNOTATIONS_BYTES = 1 << 20

#: ``report(key, message)``: what a caller does with a problem found (default: :func:`report_once`).
Reporter = Callable[[str, str], object]

_KINDS = (
    (stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a file")


def _read_text(path: str) -> tuple[str | None, str | None]:
    """``(text, None)``, ``(None, None)`` when there is no file, or ``(None, problem)``."""
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):  # refuse devices before opening them: opening one may act (a watchdog)
            return None, f"{_kind(mode)}, not a regular file"
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOCTTY", 0))
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError as exc:
        return None, f"cannot open it: {exc.strerror or exc}"
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # replaced between the stat and the open
            return None, f"{_kind(info.st_mode)}, not a regular file"
        if info.st_size > MAX_ANNOTATIONS_BYTES:
            return None, f"{info.st_size} bytes, more than the {MAX_ANNOTATIONS_BYTES} read"
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_ANNOTATIONS_BYTES:
            chunk = os.read(fd, MAX_ANNOTATIONS_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > MAX_ANNOTATIONS_BYTES:  # it grew after the fstat
            return None, f"more than the {MAX_ANNOTATIONS_BYTES} bytes read"
    except OSError as exc:
        return None, f"cannot read it: {exc.strerror or exc}"
    finally:
        os.close(fd)
    try:
        return b"".join(chunks).decode("utf-8"), None
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 text (byte {exc.start})"


def read_annotations(path: str | Path, report: Reporter = report_once) -> dict[str, str]:
    """Annotations in the file at ``path``; an empty dict if there is none (the usual case outside Kubernetes).

    A file that exists but cannot be used (not a regular file, larger than :data:`MAX_ANNOTATIONS_BYTES`,
    unreadable, not UTF-8) counts as empty: annotations never stop a model server. Its problem is handed to
    ``report(key, message)``, by default reported once per process tree.
    """
    path = os.fspath(path)
    text, problem = _read_text(path)
    if problem is not None:
        report(f"annotations file {path}: {problem}",
               f"cannot read pod annotations from {path} ({problem}); ignoring them")
    return parse_annotations(text) if text is not None else {}
