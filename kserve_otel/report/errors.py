"""The one exception the report raises for a problem it can explain in a line (exit status 2).

Why: an operator or a CI job running ``kserve-otel report`` against the wrong URL must read what is wrong in
one line on stderr, not a traceback; everything that can go wrong outside the report's own code (a refused
connection, an HTML page, an endpoint without step metrics, a Prometheus error) is turned into this.
"""

from __future__ import annotations

#: Exit status of bad usage and of a report that could not be made.
EXIT_UNUSABLE = 2


class ReportError(Exception):
    """A one-line explanation of why no report can be made; the command prints it and exits 2."""

    exit_code = EXIT_UNUSABLE
