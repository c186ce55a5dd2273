"""KServe's per-request latency line (logger ``kserve.trace``), with the request's trace id added.

``Model.__call__`` logs ``requestId: ..., preprocess_ms: ..., explain_ms: ..., predict_ms: ...,
postprocess_ms: ...`` when latency logging is on (KServe's ``--enable_latency_logging``, on by default). A
filter on that logger appends ``, trace_id: <32 hex digits>`` while a trace is current, so a slow line in the
logs leads straight to its trace. The setting ``latency_log`` chooses: ``trace_id`` (default), ``kserve``
(the line unchanged), ``off`` (no line).
"""

from __future__ import annotations

import logging

from opentelemetry import trace

#: KServe's logger of the latency line (``kserve.constants.constants.KSERVE_TRACE_LOGGER_NAME``).
TRACE_LOGGER = "kserve.trace"
_PREFIX = "requestId: "


class LatencyLogFilter(logging.Filter):
    """Adds the trace id to KServe's latency line (``mode="trace_id"``) or drops the line (``mode="off"``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def filter(self, record: logging.LogRecord) -> bool:
        if not isinstance(record.msg, str) or not record.msg.startswith(_PREFIX):
            return True  # other kserve.trace lines (timing middleware) are not ours to touch
        if self.mode == "off":
            return False
        if self.mode == "trace_id":
            span_context = trace.get_current_span().get_span_context()
            if span_context.is_valid:
                record.msg = f"{record.msg}, trace_id: {span_context.trace_id:032x}"
        return True


def install(mode: str) -> LatencyLogFilter | None:
    """Attach the filter for ``mode`` to KServe's trace logger; ``None`` for ``kserve`` (nothing to do)."""
    if mode == "kserve":
        return None
    log_filter = LatencyLogFilter(mode)
    logging.getLogger(TRACE_LOGGER).addFilter(log_filter)
    return log_filter


def uninstall(log_filter: LatencyLogFilter | None) -> None:
    if log_filter is not None:
        logging.getLogger(TRACE_LOGGER).removeFilter(log_filter)
