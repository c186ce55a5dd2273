"""``kserve-otel report``: the "debugging performance" procedure of KServe's observability page, automated.

The procedure, done by hand on dashboards, is: compare the latency percentiles with the SLO; check
concurrency and whether requests queue; check CPU, memory and GPU; then look at each step's latency to find
the bottleneck. The report gathers the same numbers from a model server's metrics endpoint (two scrapes an
interval apart) or from Prometheus, and says which step dominates, whether the SLO holds and what to check
next, as a table or as JSON, with an exit status a CI job can gate on.

Modules, in the order the data flows: :mod:`.fetch` and :mod:`.exposition` (getting metrics),
:mod:`.scrapes` and :mod:`.prometheus` (a :class:`~.window.Window` from either source; :mod:`.reporting`,
what stopped reporting, from Prometheus), :mod:`.quantile`
(Prometheus' ``histogram_quantile``), :mod:`.analysis` (the numbers), :mod:`.verdict` (the judgement),
:mod:`.render` and :mod:`.document` (table and JSON), :mod:`.command` (all of it, with the exit status).
"""

from __future__ import annotations

from .command import Options, run
from .quantile import bucket_quantile

__all__ = ["Options", "bucket_quantile", "run"]
