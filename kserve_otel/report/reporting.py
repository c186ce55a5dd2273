"""Who stopped reporting during the window: scrape targets and Ray Serve replicas, asked of Prometheus.

Why: in a cluster, a node that leaves or a replica that dies takes its numbers with it, and the report would
otherwise describe fewer processes than the operator thinks, without a word. Prometheus knows better:

* a **target** whose ``up`` had a sample in the window is now down (``up == 0``) or no longer scraped (no
  current sample: service discovery dropped it, as Ray's discovery file drops a node that left);
* a **Ray Serve replica** that Serve's controller reported healthy in the window
  (``ray_serve_deployment_replica_healthy``) has not been reported healthy in the window's last quarter: it was
  unhealthy there, or no longer reported at all (Serve drops a replica it replaced). Its own series cannot
  tell: Ray keeps exporting a dead replica's counters, unchanged. Not the last sample, because that gauge comes
  and goes on a healthy replica: the controller sets it at each health check (about every 10 s, measured) and Ray
  drops a gauge not set for two export intervals, so with an export interval under 5 s it is missing between
  checks. A replica that stopped within the last quarter of the window is not named yet.

Each names the Ray node it ran on when its series say so (Ray's ``NodeAddress`` label on the replica's step
series and on ``ray_serve_replica_processing_queries``, which a replica exports itself).
"""

from __future__ import annotations

from collections.abc import Callable

from . import metric_names
from .window import Stopped

Vector = list[tuple[dict[str, str], float]]
HEALTHY_METRIC = "ray_serve_deployment_replica_healthy"
#: Series that Ray exports from a replica's own process, with its NodeAddress.
REPLICA_SERIES = f"ray_serve_replica_processing_queries|{metric_names.STEP_COUNT_PROMQL}"
NODE_LABEL = "NodeAddress"


def stopped_reporting(query: Callable[[str], Vector], select: Callable[..., str], window: str,
                      recent: str) -> list[Stopped]:
    """What reported during the last ``window`` and no longer does (replicas: not healthy during the last
    ``recent``); both are PromQL durations. ``select(name, *matchers)`` adds the report's selector to a series
    selector; ``query`` evaluates an instant vector."""
    replica_nodes, instance_nodes = _nodes(query, select, window)
    stopped = []
    targets = ("job", "instance")
    now = _by(query(f"max by (job, instance) ({select('up')})"), targets)
    for key, _ in sorted(_by(query(f"max by (job, instance) (last_over_time({select('up')}[{window}]))"),
                             targets).items()):
        state = _state(now.get(key), "down", "no longer scraped")
        if state is not None:
            job, instance = key
            stopped.append(Stopped("target", instance, state, instance_nodes.get(instance), job=job or None))
    replicas = ("application", "deployment", "replica")
    healthy = f"max by (application, deployment, replica) (max_over_time({select(HEALTHY_METRIC)}[{recent}]))"
    now = _by(query(healthy), replicas)
    seen = query(f"max by (application, deployment, replica) (max_over_time({select(HEALTHY_METRIC)}[{window}])) == 1")
    for key, _ in sorted(_by(seen, replicas).items()):
        state = _state(now.get(key), "unhealthy", "no longer reported")
        if state is not None:
            application, deployment, replica = key
            stopped.append(Stopped("replica", replica, state, replica_nodes.get(replica), deployment=deployment,
                                   application=application))
    return stopped


def _state(now: float | None, zero: str, absent: str) -> str | None:
    if now is None:
        return absent
    return zero if now == 0 else None


def _nodes(query: Callable[[str], Vector], select: Callable[..., str],
           window: str) -> tuple[dict[str, str], dict[str, str]]:
    """Replica id -> node, and target instance -> node, from the series replicas export with Ray's node label."""
    series = select("", f'__name__=~"{REPLICA_SERIES}"', f'{NODE_LABEL}!=""')
    vector = query(f"group by (instance, replica, {NODE_LABEL}) (last_over_time({series}[{window}]))")
    replicas, instances = {}, {}
    for labels, _ in sorted(vector, key=lambda item: sorted(item[0].items())):
        node = labels[NODE_LABEL]
        if labels.get("replica"):
            replicas.setdefault(labels["replica"], node)
        if labels.get("instance"):
            instances.setdefault(labels["instance"], node)
    return replicas, instances


def _by(vector: Vector, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
    return {tuple(item.get(label, "") for label in labels): value for item, value in vector}


def describe(item: Stopped) -> str:
    """``target 10.0.0.3:8080 (node 10.0.0.3): no longer scraped``, ``replica abc of Scorer (application
    ranker, node 10.0.0.3): no longer reported``."""
    if item.kind == "replica":
        where = ", ".join(part for part in (f"application {item.application}" if item.application else "",
                                            f"node {item.node}" if item.node else "") if part)
        of = f" of {item.deployment}" if item.deployment else ""
        return f"replica {item.name}{of}{f' ({where})' if where else ''}: {item.state}"
    return f"{item.kind} {item.name}{f' (node {item.node})' if item.node else ''}: {item.state}"
