"""Names shared by every way in: metric names, label and attribute keys, KServe's buckets.

Dashboards, alerts and tests depend on these strings, so they live in one place.
"""

from __future__ import annotations

import re

#: KServe's step histogram buckets, in seconds (prometheus_client's defaults, which KServe uses).
KSERVE_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)

#: The steps of KServe's pipeline. Users may add their own (``tokenize``, ``retrieve``...).
KSERVE_STEPS: tuple[str, ...] = ("preprocess", "predict", "postprocess", "explain")

#: A step name becomes part of a Prometheus metric name, so it is restricted to this pattern.
STEP_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")

#: Metric label (and metric attribute) carrying the model's name, as in KServe.
LABEL_MODEL_NAME = "model_name"
#: Label of the step on metrics that span several steps (errors, time to first item).
LABEL_STEP = "step"
#: Label of the exception's class name on the error counter.
LABEL_ERROR_TYPE = "error_type"

#: Unit of every duration instrument; the Prometheus exporter turns ``s`` into the ``_seconds`` suffix.
UNIT_SECONDS = "s"

#: OpenTelemetry instrument counting steps that raised; Prometheus shows ``request_step_errors_total``.
ERRORS_INSTRUMENT = "request_step_errors"
ERRORS_METRIC = f"{ERRORS_INSTRUMENT}_total"
#: OpenTelemetry histogram of the time from a streaming step's start to its first item;
#: Prometheus shows ``request_time_to_first_item_seconds``.
FIRST_ITEM_INSTRUMENT = "request_time_to_first_item"
FIRST_ITEM_METRIC = f"{FIRST_ITEM_INSTRUMENT}_seconds"
#: OpenTelemetry histogram of the time a request waits for its batch (``@serve.batch``);
#: Prometheus shows ``request_batch_wait_seconds``.
BATCH_WAIT_INSTRUMENT = "request_batch_wait"
BATCH_WAIT_METRIC = f"{BATCH_WAIT_INSTRUMENT}_seconds"
#: OpenTelemetry's HTTP server instruments (semantic conventions) and their Prometheus names.
ACTIVE_REQUESTS_INSTRUMENT = "http.server.active_requests"
ACTIVE_REQUESTS_METRIC = "http_server_active_requests"
REQUEST_DURATION_INSTRUMENT = "http.server.request.duration"
REQUEST_DURATION_METRIC = "http_server_request_duration_seconds"

#: Span attribute keys.
ATTR_MODEL_NAME = "kserve.model.name"
ATTR_STEP = "kserve.step"
ATTR_ERROR_TYPE = "error.type"

#: Instrumentation scope of everything this package records.
SCOPE_NAME = "kserve_otel"


def step_instrument_name(step: str) -> str:
    """The OpenTelemetry instrument name of a step's duration histogram (``request_<step>``).

    With unit ``s`` the Prometheus endpoint shows it as ``request_<step>_seconds``, KServe's name.
    """
    return f"request_{step}"


def step_metric_name(step: str) -> str:
    """The Prometheus metric family name of a step's duration histogram (``request_<step>_seconds``)."""
    return f"request_{step}_seconds"


def validate_step_name(step: object) -> str:
    """Return ``step`` if it can name a step, else raise ``ValueError`` saying what is accepted."""
    if not isinstance(step, str) or not STEP_NAME_PATTERN.match(step):
        raise ValueError(
            f"step name {step!r} is not valid: a step name is 1-63 characters of lowercase letters, "
            f"digits and underscores starting with a letter, because it becomes the metric name "
            f"request_<step>_seconds (KServe's steps are {', '.join(KSERVE_STEPS)}; "
            f"your own, such as 'tokenize', are accepted too)"
        )
    return step
