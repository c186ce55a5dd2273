"""Configuration problems reported once per process tree, not once per Python process.

Why it exists: the start-up hook and the settings run in every Python process of an instrumented environment,
and a KServe model server with ``--workers N`` is N + 1 processes that each resolve the same settings from the
same variables and the same annotations file. A bad value or an unreadable annotations file would otherwise be
reported by each of them. The first process to report a problem notes it in the private environment variable
:data:`REPORTED_VARIABLE`; every process it starts afterwards (KServe's spawned workers, ``kserve-otel-run``'s
command) inherits the note and stays quiet about that problem. Processes that are not its descendants report it
again: they are not told.

Reports are one line each, logged at ERROR on the ``kserve_otel`` logger (with no logging configured, Python
prints such a line on stderr).
"""

from __future__ import annotations

import logging
import os
import zlib

#: The environment variable listing the problems already reported in this process tree (hashes of their keys).
REPORTED_VARIABLE = "_KSERVE_OTEL_REPORTED"

_logger = logging.getLogger("kserve_otel")


def _mark(key: str) -> str:
    return format(zlib.crc32(key.encode("utf-8", "surrogateescape")), "08x")


def already_reported(key: str) -> bool:
    """Whether this process or one of its ancestors reported the problem ``key``."""
    return _mark(key) in os.environ.get(REPORTED_VARIABLE, "").split()


def report_once(key: str, message: str) -> bool:
    """Log ``message`` (one line, ``kserve-otel: `` is prepended) unless the problem ``key`` was reported in this
    process tree already; returns whether it was logged now."""
    if already_reported(key):
        return False
    marks = os.environ.get(REPORTED_VARIABLE, "").split()
    os.environ[REPORTED_VARIABLE] = " ".join([*marks, _mark(key)])
    _logger.error("kserve-otel: %s", message)
    return True
