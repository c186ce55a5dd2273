"""What an operator deploys beside the library (``integrations/``), checked against the real thing.

A real instrumented KServe model server (iris, echo, failing, stream) is scraped every second by a real
Prometheus (Debian's ``/usr/bin/prometheus``) that loads ``integrations/prometheus/kserve-otel-rules.yaml``.
Its scrape job is the one of the example ``integrations/prometheus/prometheus.yml``, relabelling included;
only the Kubernetes pod discovery (which Debian builds Prometheus without) is replaced by a file of the
targets and ``__meta_kubernetes_*`` labels that the discovery would give for the model server's pod and its
neighbours. After a few seconds of traffic, every PromQL expression of the Grafana dashboard and of the rules
is evaluated through Prometheus' HTTP API: each must succeed and return data, except the ones listed in
``NO_DATA_HERE`` and ``ALERTS_FALSE_HERE`` with the reason, which must still succeed. The Kubernetes manifests
and the Collector configuration are checked against the settings this package reads
(``kserve_otel.config.settings.SETTINGS_TABLE``).
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from dashboard import DASHBOARD, all_panels, dashboard, dashboard_queries, referenced_variables, substitute
from conftest import ROOT, KServeProcess, PrometheusProcess, free_port, scrape, wait_until
from opentelemetry.sdk import environment_variables as otel_environment_variables

from kserve_otel.config.annotations import DEFAULT_ANNOTATIONS_FILE
from kserve_otel.names import ATTR_MODEL_NAME, ATTR_STEP
from kserve_otel.config.settings import SETTINGS_TABLE

pytestmark = pytest.mark.e2e

INTEGRATIONS = Path(ROOT) / "integrations"
RULES = INTEGRATIONS / "prometheus" / "kserve-otel-rules.yaml"
PROMETHEUS_CONFIG = INTEGRATIONS / "prometheus" / "prometheus.yml"
KUBERNETES = INTEGRATIONS / "kubernetes"
COLLECTOR = INTEGRATIONS / "otel-collector" / "config.yaml"
PROMTOOL = "/usr/bin/promtool"

STEPS = ("preprocess", "predict", "postprocess", "explain")
MODELS = ("iris", "echo", "failing", "stream")
NAMESPACE, POD = "kserve-test", "iris-predictor-00001-deployment-5d8f7"
#: What Grafana puts in place of the dashboard's variables: the namespace the scrape config gives the test
#: pod, the test's models as Grafana formats a multi-value selection for a regex, and a rate interval.
TEMPLATE_VALUES = {"namespace": NAMESPACE, "model": "(" + "|".join(MODELS) + ")", "__rate_interval": "1m"}
#: Variables Grafana defines itself (the dashboard uses these in queries and data links).
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__from", "__to", "__field", "__value"}

RAY_PANEL = ("Ray's per-node metrics endpoint exports it: no Ray cluster here; tests/test_ray_serve.py evaluates it "
             "with data, through a Prometheus scraping its Ray cluster")
#: Dashboard panels whose queries cannot have data here (checked for validity only), by title, with why.
NO_DATA_HERE = {
    "Predict p99 per replica (ms)": RAY_PANEL,
    "Queries being processed per replica": RAY_PANEL,
    "Replica processing latency p99 (ms)": RAY_PANEL,
    "GPU memory used (DCGM)": "DCGM_FI_DEV_FB_USED comes from NVIDIA's dcgm-exporter: no GPU in this test",
}
#: Alerts whose condition is false here: their expression must succeed, and the expression without its
#: threshold comparison must have data.
ALERTS_FALSE_HERE = {
    "KServeModelStepLatencyHigh": "every step's p99 here is well under the 0.5 s threshold (the slowest, the "
                                  "streaming predict, takes about 0.2 s)",
}
#: HTTP metrics of the instrumented REST app (kserve_otel.request_path.request_spans): a query over them
#: without data says so.
HTTP_METRICS = ("http_server_active_requests", "http_server_request_duration_seconds")

ROWS = [[6.8, 2.8, 4.8, 1.4], [5.1, 3.5, 1.4, 0.2]]
TRAFFIC_SECONDS = 3.0


# ----------------------------------------------------------------------------------------------- helpers


def _variables(board: dict) -> dict[str, dict]:
    return {variable["name"]: variable for variable in board["templating"]["list"]}


def _substitute(expr: str) -> str:
    """The expression as Grafana sends it, with TEMPLATE_VALUES in place of the variables (others stay)."""
    return substitute(expr, TEMPLATE_VALUES)


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


_THRESHOLD = re.compile(r"(?P<expr>.+?)\s*(?:>|<|>=|<=|==|!=)\s*[0-9.]+\s*", re.S)


def _without_threshold(expr: str) -> str:
    match = _THRESHOLD.fullmatch(expr)
    assert match, f"the alert expression does not end in a threshold comparison: {expr}"
    return match["expr"]


def _sanitize(annotation: str) -> str:
    """An annotation's name as Kubernetes discovery spells it in __meta_kubernetes_pod_annotation_<name>."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", annotation)


def _sample_names(exposition: str) -> set[str]:
    """The sample names of a text exposition, and the name of each histogram (what a Prometheus with native
    histograms stores a native one under)."""
    names = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", exposition, re.M))
    return names | set(re.findall(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) histogram$", exposition, re.M))


def _metric_names(expr: str) -> set[str]:
    """Names in ``expr`` that name this library's or prometheus_client's series (not functions or labels)."""
    return {name for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr)
            if name.startswith(("request_", "http_server_", "process_"))}


def _test_prometheus_config(server: KServeProcess, tmp: Path) -> Path:
    """The example prometheus.yml with 1 s intervals, the rules by absolute path, and pod discovery replaced
    by a file of what Kubernetes discovery would give: the model server's pod (its kserve-container discovered
    on the gRPC port: relabelling must move it to the annotated one) and targets the relabelling must drop."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(RULES)]
    pods_file = tmp / "pods.json"
    for job in config["scrape_configs"]:
        assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}], job["job_name"]
        job["file_sd_configs"] = [{"files": [str(pods_file)]}]

    def pod(name: str, container: str, port: int, annotations: dict[str, str], init: bool = False) -> dict:
        labels = {
            "__meta_kubernetes_namespace": NAMESPACE, "__meta_kubernetes_pod_name": name,
            "__meta_kubernetes_pod_ip": "127.0.0.1", "__meta_kubernetes_pod_container_name": container,
            "__meta_kubernetes_pod_container_init": str(init).lower(),
            "__meta_kubernetes_pod_label_serving_kserve_io_inferenceservice": "iris",
            **{f"__meta_kubernetes_pod_annotation_{_sanitize(key)}": v for key, v in annotations.items()},
        }
        return {"targets": [f"127.0.0.1:{port}"], "labels": labels}

    annotations = {"serving.kserve.io/enable-prometheus-scraping": "true",
                   "prometheus.kserve.io/port": str(server.http_port),
                   "prometheus.kserve.io/path": "/metrics"}
    unused = free_port()
    pods_file.write_text(json.dumps([
        pod(POD, "kserve-container", server.grpc_port, annotations),
        pod(POD, "queue-proxy", unused, annotations),
        pod(POD, "storage-initializer", unused, annotations, init=True),
        pod("not-annotated", "kserve-container", server.http_port, {}),
    ]))
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class Stack:
    server: KServeProcess
    prometheus: PrometheusProcess
    exposition: str  # the model server's /metrics after the traffic
    native: bool  # whether Prometheus runs with native histograms

    def no_data_reason(self, expr: str) -> str:
        missing = sorted(_metric_names(expr) - _sample_names(self.exposition))
        return f"no data{_missing_note(missing)}"


def _missing_note(missing: list[str]) -> str:
    """Which series the model server does not export."""
    if not missing:
        return ""
    note = f": {', '.join(missing)} not on the model server's /metrics"
    if any(name.startswith(HTTP_METRICS) for name in missing):
        note += " (the HTTP metrics come from kserve-otel's request middleware in KServe's REST app)"
    return note


def _send_traffic(url: str, seconds: float) -> None:
    """v1 predicts to iris, echo and the streaming model, and calls whose step raises (failing's predict;
    explain, which KServe answers 501 without an explainer), for ``seconds``."""
    body = {"instances": ROWS}
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=30) as client:
        while time.monotonic() < deadline:
            assert client.post("/v1/models/iris:predict", json=body).json() == {"predictions": [1, 0]}
            client.post("/v1/models/echo:predict", json={"instances": [1]}).raise_for_status()
            client.post("/v1/models/stream:predict", json={"instances": [1]}).raise_for_status()
            # KServe resets a connection after a step raised (bare KServe too): a connection of their own.
            assert httpx.post(f"{url}/v1/models/failing:predict", json=body, timeout=30).status_code == 500
            assert httpx.post(f"{url}/v1/models/iris:explain", json=body, timeout=30).status_code == 501


def _scrapes(prometheus: PrometheusProcess) -> int:
    result = prometheus.query('count_over_time(up{job="kserve-model-servers"}[10m])')["data"]["result"]
    return int(float(result[0]["value"][1])) if result else 0


def _has_data(prometheus: PrometheusProcess, expr: str) -> bool:
    result = prometheus.query(expr)
    return result["status"] == "success" and bool(result["data"]["result"])


@pytest.fixture(scope="module", params=[(), ("native-histograms",)], ids=["classic", "native"])
def stack(request, tmp_path_factory) -> Iterator[Stack]:
    """The server scraped by a Prometheus that stores classic histograms (``_bucket``, ``_count`` and ``_sum``
    series), then by one with native histograms on, which stores the step and HTTP durations as native
    histograms only: every query and rule must have data from both."""
    tmp = tmp_path_factory.mktemp("prometheus")
    server = KServeProcess(",".join(MODELS), env={"OTEL_TRACES_EXPORTER": "none"})
    prometheus = None
    try:
        server.wait_ready()
        prometheus = PrometheusProcess(_test_prometheus_config(server, tmp), tmp, features=request.param)
        wait_until(prometheus.ready, "Prometheus to be ready")
        # Prometheus applies discovered targets up to 5 s after start: traffic before the first scrape would
        # be seen as a constant counter (a rate of zero).
        wait_until(lambda: _scrapes(prometheus) >= 1, "the first scrape of the model server")
        _send_traffic(server.url, TRAFFIC_SECONDS)
        # Two scrapes after the traffic: every series then has two samples in any rate window.
        after_traffic = _scrapes(prometheus)
        wait_until(lambda: _scrapes(prometheus) >= max(after_traffic + 2, 4), "2 scrapes after the traffic")
        # ... and the rules have been evaluated since (each group in order, every second).
        wait_until(lambda: all(_has_data(prometheus, name) for name in {
            "model_step:request_error_ratio:rate5m", 'model_step:request_seconds:p99_5m{step="explain"}',
            "model_step:time_to_first_item_seconds:p99_5m"}), "the recording rules")
        yield Stack(server, prometheus, scrape(f"{server.url}/metrics"), bool(request.param))
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


# ------------------------------------------------------------------------------------------- with Prometheus


def test_the_example_scrape_config_scrapes_the_annotated_port_and_path(stack):
    targets = stack.prometheus.api("targets")["data"]
    active = [t for t in targets["activeTargets"] if t["labels"]["job"] == "kserve-model-servers"]
    assert [t["scrapeUrl"] for t in active] == [f"{stack.server.url}/metrics"]
    assert active[0]["health"] == "up", active[0]["lastError"]
    assert {k: active[0]["labels"][k] for k in ("namespace", "pod", "inferenceservice")} == {
        "namespace": NAMESPACE, "pod": POD, "inferenceservice": "iris"}
    # kserve-model-servers drops queue-proxy, the init container and the pod without the annotation; ray-nodes
    # drops all four (no Ray pod).
    assert len(targets["droppedTargets"]) == 3 + 4


def test_the_scrape_has_every_metric_the_integrations_use(stack):
    used = {name for _, _, expr in dashboard_queries(dashboard()) for name in _metric_names(expr)}
    used |= {name for rule in _rules() for name in _metric_names(rule["expr"])}
    missing = sorted(used - _sample_names(stack.exposition))
    assert not missing, f"the integrations use series the server does not export{_missing_note(missing)}"


def test_each_prometheus_stores_the_durations_in_its_own_form(stack):
    """What makes the two runs of these tests different: with native histograms on, the step and HTTP durations
    have no classic series at all, and the queries' native halves are what answers."""
    for family in ("request_predict_seconds", "http_server_request_duration_seconds"):
        classic = _has_data(stack.prometheus, f"{family}_bucket")
        native = _has_data(stack.prometheus, f"histogram_count({family})")
        assert (classic, native) == (not stack.native, stack.native), family


def test_every_dashboard_query_succeeds_and_has_data(stack):
    queries = dashboard_queries(dashboard())
    assert set(NO_DATA_HERE) <= {title for title, _, _ in queries}, "NO_DATA_HERE names a panel that is gone"
    problems = []
    for title, ref, expr in queries:
        promql = _substitute(expr)
        result = stack.prometheus.query(promql)
        where = f"{title} [{ref}]"
        if referenced_variables(promql):
            problems.append(f"{where}: no test value for {referenced_variables(promql)}")
        elif result["status"] != "success":
            problems.append(f"{where}: {result.get('errorType')}: {result.get('error')}\n    {promql}")
        elif not result["data"]["result"] and title not in NO_DATA_HERE:
            problems.append(f"{where}: {stack.no_data_reason(promql)}\n    {promql}")
    assert not problems, "\n".join(problems)


def test_every_rule_expression_succeeds_and_has_data(stack):
    rules = _rules()
    alerts = {rule["alert"] for rule in rules if "alert" in rule}
    assert set(ALERTS_FALSE_HERE) <= alerts, "ALERTS_FALSE_HERE names an alert that is gone"
    problems = []
    for rule in rules:
        name = rule.get("record") or rule["alert"]
        # (expression, whether it must have data)
        checks = [(rule["expr"], name not in ALERTS_FALSE_HERE)]
        if "record" in rule:  # the series the rule records, as Prometheus stored it
            step = rule.get("labels", {}).get("step")
            checks.append((f'{name}{{step="{step}"}}' if step else name, True))
        elif name in ALERTS_FALSE_HERE:
            checks.append((_without_threshold(rule["expr"]), True))
        for expr, needs_data in checks:
            result = stack.prometheus.query(expr)
            if result["status"] != "success":
                problems.append(f"{name}: {result.get('errorType')}: {result.get('error')}\n    {expr}")
            elif needs_data and not result["data"]["result"]:
                problems.append(f"{name}: {stack.no_data_reason(expr)}\n    {expr}")
    assert not problems, "\n".join(problems)


def test_prometheus_evaluates_every_rule_without_error(stack):
    groups = stack.prometheus.api("rules")["data"]["groups"]
    evaluated = [(rule["name"], rule["health"], rule.get("lastError")) for g in groups for rule in g["rules"]]
    assert len(evaluated) == len(_rules())
    assert {health for _, health, _ in evaluated} == {"ok"}, evaluated


def test_template_variable_queries_find_the_namespace_and_models(stack):
    found = {}
    for name, variable in _variables(dashboard()).items():
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        selector, label = _substitute(match[1]), match[2]
        result = stack.prometheus.api(f"label/{label}/values", **{"match[]": selector})
        assert result["status"] == "success", result
        found[name] = set(result["data"])
    assert found == {"namespace": {NAMESPACE}, "model": set(MODELS)}


# ----------------------------------------------------------------------------------------------- files alone


def test_the_dashboard_is_valid_with_unique_ids_and_defined_variables():
    board = dashboard()
    panels = all_panels(board)
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), ids
    variables = _variables(board)
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    assert variables["traces_datasource"]["type"] == "datasource"
    used = referenced_variables(json.dumps(board["panels"]))
    used |= {name for v in variables.values() for name in referenced_variables(json.dumps(v["query"]))}
    assert used - GRAFANA_BUILTINS <= set(variables), used - GRAFANA_BUILTINS - set(variables)
    assert {"namespace", "model", "datasource", "traces_datasource"} <= used
    boxes = []
    for panel in panels:
        x, y, w, h = (panel["gridPos"][k] for k in "xywh")
        assert x + w <= 24, panel["title"]
        assert all(x >= x2 + w2 or x2 >= x + w or y >= y2 + h2 or y2 >= y + h for x2, y2, w2, h2 in boxes), \
            f"{panel['title']} overlaps another panel"
        boxes.append((x, y, w, h))
        refs = [target["refId"] for target in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]
        assert panel["type"] == "row" or panel["datasource"]["uid"] == "${datasource}", panel["title"]


def test_kserve_latency_panels_in_milliseconds_with_a_link_to_the_steps_traces():
    queries = dashboard_queries(dashboard())
    panels = {panel["title"]: panel for panel in all_panels(dashboard())}
    for step in STEPS:
        exprs = [expr for _, _, expr in queries if re.search(rf"(?<!ray_)request_{step}_seconds_bucket", expr)]
        # each: (classic quantile or native quantile) * 1000, of the same quantile
        quantiles = {tuple(re.findall(r"histogram_quantile\(([0-9.]+),", e)) for e in exprs}
        assert all(len(set(q)) == 1 and len(q) == 2 for q in quantiles), (step, quantiles)
        quantiles = {q[0] for q in quantiles}
        assert quantiles == {"0.5", "0.9", "0.99"}, step
        assert all(e.endswith(" * 1000") for e in exprs), step

        (link,) = panels[f"{step.capitalize()} latency (ms)"]["fieldConfig"]["defaults"]["links"]
        filled = link["url"]
        placeholders = {"${traces_datasource}": "tempo-uid", "${__field.labels.model_name}": "iris",
                        "${__from}": "1700000000000", "${__to}": "now"}
        for placeholder, value in placeholders.items():
            filled = filled.replace(placeholder, value)
        url = urllib.parse.urlsplit(filled)
        assert url.path == "/explore"
        (pane,) = json.loads(urllib.parse.parse_qs(url.query)["panes"][0]).values()
        (query,) = pane["queries"]
        assert pane["datasource"] == query["datasource"]["uid"] == "tempo-uid"
        assert query["query"] == f'{{ span.{ATTR_STEP} = "{step}" && span.{ATTR_MODEL_NAME} = "iris" }}'
        assert pane["range"] == {"from": "1700000000000", "to": "now"}


def test_latency_panels_show_exemplars_that_link_to_their_trace():
    titles = {*(f"{step.capitalize()} latency (ms)" for step in STEPS), "HTTP request duration p99 by route (ms)",
              "Predict p99 per replica (ms)"}
    latency = [panel for panel in all_panels(dashboard()) if panel["title"] in titles]
    assert len(latency) == 6, [panel["title"] for panel in latency]
    for panel in latency:
        p99 = [t for t in panel["targets"] if t["expr"].lstrip("(").startswith("histogram_quantile(0.99")]
        assert p99 and all(t.get("exemplar") is True for t in p99), panel["title"]
        (override,) = [o for o in panel["fieldConfig"]["overrides"] if o["matcher"]["options"] == "trace_id"]
        (link,) = override["properties"][0]["value"]
        filled = link["url"].replace("${traces_datasource}", "tempo-uid").replace("${__value.raw}", "abc123")
        filled = filled.replace("${__from}", "1").replace("${__to}", "now")
        (pane,) = json.loads(urllib.parse.parse_qs(urllib.parse.urlsplit(filled).query)["panes"][0]).values()
        assert pane["datasource"] == "tempo-uid" and pane["queries"][0]["query"] == "abc123", panel["title"]


def _promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, "check", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def test_the_rules_pass_promtool():
    result = _promtool("rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


def test_the_example_prometheus_config_passes_promtool(tmp_path):
    """promtool checks the example as it is where it has Kubernetes discovery. Debian builds Prometheus
    without it (its NEWS: "Kubernetes support has been completely removed"), so there that one field is
    refused, and the example with a file discovery in its place (relabelling, rule file as they are) must
    pass."""
    result = _promtool("config", str(PROMETHEUS_CONFIG), cwd=tmp_path)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        refused = set(re.findall(r"line \d+: field (\w+) not found in type config.ScrapeConfig", output))
        assert refused == {"kubernetes_sd_configs"} and output.count("FAILED") == 1, output
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        for job in config["scrape_configs"]:
            job["file_sd_configs"] = [{"files": ["pods.json"]}]
            del job["kubernetes_sd_configs"]
        (tmp_path / "pods.json").write_text("[]")
        (tmp_path / RULES.name).write_text(RULES.read_text())  # rule_files is relative to the config
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config, sort_keys=False))
        result = _promtool("config", "prometheus.yml", cwd=tmp_path)
        output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {len(_rules())} rules found" in output


def _kubernetes_documents() -> dict[str, list[dict]]:
    """The manifests by file name; RayService's serveConfigV2 (YAML in a string) is parsed in place."""
    documents = {}
    for path in sorted(KUBERNETES.glob("*.yaml")):
        documents[path.name] = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        for doc in documents[path.name]:
            if doc["kind"] == "RayService":
                doc["spec"]["serveConfigV2"] = yaml.safe_load(doc["spec"]["serveConfigV2"])
    return documents


def _walk(node: Any) -> Iterator[Any]:
    """``node`` and everything in it."""
    yield node
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in children:
        yield key
        yield from _walk(value)


def _variables_set(node: Any) -> Iterator[tuple[str, Any]]:
    """(name, value) of every environment variable set: containers' ``env`` entries, ``env_vars`` mappings."""
    for item in _walk(node):
        if not isinstance(item, dict):
            continue
        if isinstance(item.get("name"), str) and {"value", "valueFrom"} & item.keys():
            yield item["name"], item.get("value")
        else:
            yield from ((k, v) for k, v in item.items() if re.fullmatch(r"[A-Z][A-Z0-9_]*", str(k)))


def _pod_specs(documents: dict[str, list[dict]]) -> Iterator[tuple[str, dict, dict]]:
    """(what, metadata annotations, pod spec) of every InferenceService predictor and ServingRuntime that has
    containers of its own (an InferenceService of a runtime gets them from the runtime)."""
    for doc in (doc for docs in documents.values() for doc in docs):
        if doc.get("kind") == "ServingRuntime":
            pod = doc["spec"]
        elif doc.get("kind") == "InferenceService":
            pod = doc["spec"]["predictor"]
        else:
            continue
        if "containers" in pod:
            yield f"{doc['kind']} {doc['metadata']['name']}", doc["metadata"].get("annotations", {}), pod


def _parse(spec: Any, value: Any, where: str) -> Any:
    try:
        return spec.parse(value)
    except ValueError as error:
        raise AssertionError(f"{where}={value!r} is refused by kserve-otel (accepted: {error})") from None


def test_manifests_name_only_settings_and_annotations_this_package_reads():
    env_specs = {spec.env: spec for spec in SETTINGS_TABLE} | {spec.otel_env: spec for spec in SETTINGS_TABLE
                                                                if spec.otel_env}
    otel_sdk = {value for key, value in vars(otel_environment_variables).items() if key.startswith("OTEL_")}
    annotation_specs = {spec.annotation: spec for spec in SETTINGS_TABLE if spec.annotation}

    documents = _kubernetes_documents()
    documents[PROMETHEUS_CONFIG.name] = [yaml.safe_load(PROMETHEUS_CONFIG.read_text())]
    strings = [item for docs in documents.values() for item in _walk(docs) if isinstance(item, str)]
    named = {name for text in strings for name in re.findall(r"\b(?:KSERVE_)?OTEL_[A-Z0-9_]+", text)}
    unknown = {n for n in named if n.startswith("KSERVE_")} - set(env_specs)
    assert not unknown, f"not in SETTINGS_TABLE: {sorted(unknown)}"
    unknown = {n for n in named if n.startswith("OTEL_")} - set(env_specs) - otel_sdk
    assert not unknown, f"no OpenTelemetry SDK reads these: {sorted(unknown)}"
    assert "KSERVE_OTEL_RAY_METRICS" in named  # the RayService example chooses where Ray's step metrics go
    annotation = r"prometheus\.kserve\.io/[\w.-]+|serving\.kserve\.io/enable-prometheus[\w-]*"
    annotations = {a for text in strings for a in re.findall(annotation, text)}
    discovered = r"__meta_kubernetes_pod_annotation_(\w+)"
    annotations |= {f"(discovered) {a}" for text in strings for a in re.findall(discovered, text)}
    known = set(annotation_specs) | {f"(discovered) {_sanitize(a)}" for a in annotation_specs}
    assert not annotations - known, f"annotations kserve-otel does not read: {sorted(annotations - known)}"
    assert len(annotations) >= 5

    # Values kserve-otel parses must parse: annotations and the settings' variables.
    for doc in (doc for docs in documents.values() for doc in docs):
        for item in _walk(doc):
            for key, value in item.items() if isinstance(item, dict) else ():
                if key in annotation_specs:
                    _parse(annotation_specs[key], value, f"annotation {key}")
        for name, value in _variables_set(doc):
            if name in env_specs and value is not None:
                _parse(env_specs[name], value, f"variable {name}")

    pods = list(_pod_specs(documents))
    assert len(pods) == 2
    for what, metadata_annotations, pod in pods:
        if what.startswith("InferenceService"):
            assert metadata_annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
        else:
            assert set(pod["annotations"]) == {"prometheus.kserve.io/port", "prometheus.kserve.io/path"}
        (container,) = pod["containers"]
        env = dict(_variables_set(container))
        assert _parse(env_specs["KSERVE_OTEL_ENABLED"], env["KSERVE_OTEL_ENABLED"], what) is True
        assert {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_TRACES_EXPORTER"} <= set(env), what
        # The downward-API file is the one kserve-otel reads the annotations from.
        volumes = {v["name"]: v["downwardAPI"] for v in pod["volumes"] if "downwardAPI" in v}
        files = {f"{mount['mountPath']}/{item['path']}"
                 for mount in container["volumeMounts"] if mount["name"] in volumes
                 for item in volumes[mount["name"]]["items"]
                 if item["fieldRef"]["fieldPath"] == "metadata.annotations"}
        read = env.get("KSERVE_OTEL_ANNOTATIONS_FILE", DEFAULT_ANNOTATIONS_FILE)
        assert files == {read} == {DEFAULT_ANNOTATIONS_FILE}, what


def test_the_manifests_are_what_an_operator_applies():
    documents = _kubernetes_documents()
    assert {(doc["apiVersion"], doc["kind"]) for docs in documents.values() for doc in docs} == {
        ("serving.kserve.io/v1beta1", "InferenceService"), ("serving.kserve.io/v1alpha1", "ServingRuntime"),
        ("monitoring.coreos.com/v1", "PodMonitor"), ("ray.io/v1", "RayService")}
    (rayservice,) = documents["rayservice.yaml"]
    (application,) = rayservice["spec"]["serveConfigV2"]["applications"]
    assert application["import_path"] == "examples.ray_serve:app"
    env_vars = application["runtime_env"]["env_vars"]
    assert (env_vars["KSERVE_OTEL_ENABLED"], env_vars["KSERVE_OTEL_RAY_METRICS"]) == ("true", "ray")

    # The PodMonitor relabels as the example scrape job (which the tests above run in Prometheus) does; the
    # Operator adds the namespace and pod labels itself.
    (monitor,) = [d for d in documents["podmonitor.yaml"] if d["metadata"]["name"] == "kserve-model-servers"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    (job,) = [job for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]
              if job["job_name"] == "kserve-model-servers"]
    operator_keys = {"source_labels": "sourceLabels", "target_label": "targetLabel"}
    expected = [{operator_keys.get(key, key): value for key, value in relabel.items()}
                for relabel in job["relabel_configs"]
                if relabel.get("target_label") not in ("namespace", "pod")]
    assert endpoint["relabelings"] == expected


def test_the_collector_receives_otlp_and_exports_traces_and_metrics():
    config = yaml.safe_load(COLLECTOR.read_text())
    protocols = config["receivers"]["otlp"]["protocols"]
    assert protocols["grpc"]["endpoint"].endswith(":4317") and protocols["http"]["endpoint"].endswith(":4318")
    pipelines = config["service"]["pipelines"]
    assert set(pipelines) == {"traces", "metrics"}
    for pipeline in pipelines.values():
        for kind in ("receivers", "processors", "exporters"):
            assert set(pipeline[kind]) <= set(config[kind]), (kind, pipeline[kind])
        assert pipeline["receivers"] == ["otlp"]
        assert pipeline["processors"][0] == "memory_limiter" and pipeline["processors"][-1] == "batch"
    assert [e.split("/")[0] for e in pipelines["traces"]["exporters"]] == ["otlp"]
    metrics_exporters = {e.split("/")[0] for e in pipelines["metrics"]["exporters"]}
    assert metrics_exporters <= {"prometheus", "prometheusremotewrite"}
    assert set(config["service"]["extensions"]) <= set(config["extensions"])
    # The manifests send OTLP/HTTP (kserve-otel[otlp]) to the collector's OTLP/HTTP port.
    endpoints = {value for docs in _kubernetes_documents().values() for name, value in _variables_set(docs)
                 if name == "OTEL_EXPORTER_OTLP_ENDPOINT"}
    assert len(endpoints) == 1 and urllib.parse.urlsplit(endpoints.pop()).port == 4318
