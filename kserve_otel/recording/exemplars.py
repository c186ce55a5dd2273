"""Exemplars: which observations of a histogram are kept as the exemplar of their bucket, with the trace and span
they were made in, so that a latency on a dashboard leads to the request behind it.

Why it exists: a step histogram keeps, per bucket, its latest observation made inside a span (the C extension's
``observe_exemplar``, in the series' cells, where other worker processes read it too). Which observations
qualify is OpenTelemetry's exemplar filter, ``OTEL_METRICS_EXEMPLAR_FILTER``: ``trace_based`` (the default:
observations made in a sampled span), ``always_on`` (in any valid span context, sampled or not) or ``always_off``.
Under ``trace_based`` a step without a sampled span costs nothing more than before: its wrapper already knows
it has no span, and observes as ever.
"""

from __future__ import annotations

from typing import Any

from opentelemetry import trace

__all__ = ["EXEMPLAR_FILTERS", "observe_in_current_span", "observe_in_span", "set_filter"]

EXEMPLAR_FILTERS = ("trace_based", "always_on", "always_off")

#: Whether observations made without a sampled span of this package's may be exemplars (``always_on``).
unsampled_too = False
#: Whether any observation may be an exemplar (not ``always_off``).
enabled = True


def set_filter(name: str) -> None:
    """Apply the exemplar filter ``name`` (one of :data:`EXEMPLAR_FILTERS`) from now on."""
    global unsampled_too, enabled
    if name not in EXEMPLAR_FILTERS:
        raise ValueError(f"exemplar filter {name!r}: one of {', '.join(EXEMPLAR_FILTERS)}")
    unsampled_too, enabled = name == "always_on", name != "always_off"


def observe_in_span(series: Any, seconds: float, span: Any) -> None:
    """Observe ``seconds`` made in ``span`` (a step's): an exemplar of its bucket when the filter lets it."""
    # A SpanContext is a tuple (trace_id, span_id, is_remote, trace_flags, trace_state, is_valid): read by index,
    # four property calls fewer on every traced step (tests/test_steps.py checks the layout).
    context = span.get_span_context()
    if enabled and (context[3] & 1 or (unsampled_too and context[5])):
        series.observe_exemplar(seconds, context[0], context[1])
    else:
        series.observe(seconds)


def observe_in_current_span(series: Any, seconds: float) -> None:
    """Observe ``seconds`` made with no span of its own, under ``always_on``: an exemplar of the current span
    context (an unsampled request's, say) when there is a valid one."""
    context = trace.get_current_span().get_span_context()
    if enabled and context.is_valid:
        series.observe_exemplar(seconds, context.trace_id, context.span_id)
    else:
        series.observe(seconds)
