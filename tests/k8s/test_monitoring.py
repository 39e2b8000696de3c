"""k8s/monitoring/: the alert rules pass promtool (syntax, lint, and unit tests with synthetic series
in which every alert fires when it should and stays quiet when it should not), every alert links
its runbook section, every metric the rules and the dashboard use exists -- in the code that exports
it or in a known exporter -- and the scrape objects reach the ports the pods open.

promtool comes with Debian's `prometheus` package (`apt-get install prometheus`); CI installs it.
The Prometheus Operator objects' schemas are checked with the other custom resources
(tests/k8s/test_crd_schemas.py, CRDs vendored in tests/data/crds/).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_k8s_manifests import (
    K8S_DIR,
    OBJECTS,
    k8s_settings,  # noqa: F401  (the fixture: the settings the pods get)
)

MONITORING = K8S_DIR / "monitoring"
RULES_FILE = MONITORING / "prometheus-rules.yaml"
PROMTOOL_TESTS = sorted((MONITORING / "tests").glob("*.yaml"))
DASHBOARD = MONITORING / "dashboards" / "streamrec.json"
RUNBOOK = K8S_DIR / "RUNBOOK.md"
PROMTOOL = shutil.which("promtool")
PROMTOOL_TIMEOUT_S = 120
RULES_NAME = "rules.yaml"  # what the promtool tests' rule_files name (written next to them)

# The alerts the metric contract names (issue 14); the rules may have more.
CONTRACT_ALERTS = {
    "StreamrecIngestLagGrowing", "StreamrecIngestNoCommit", "StreamrecIngestDown", "StreamrecDLQRateHigh",
    "StreamrecFeaturesStale", "StreamrecTrainerStale", "StreamrecGateRefusing", "StreamrecAdapterReloadFailures",
    "StreamrecFallbackShareHigh", "StreamrecAPILatencyHigh", "StreamrecAPI5xxHigh", "StreamrecRedisMemoryHigh",
    "StreamrecReplicaNotReady",
    # issue 17: impressions and canaries
    "StreamrecImpressionsDropped", "StreamrecCanaryRolledBack",
}
SEVERITIES = {"warning", "critical"}

# Metrics of other exporters the rules and the dashboard use, by where they come from.
EXPORTER_METRICS = {
    "up",  # Prometheus itself, per target
    # redis_exporter (k8s/redis/statefulset.yaml, k8s/serving/gcs-redis.yaml)
    "redis_up", "redis_memory_used_bytes", "redis_memory_max_bytes", "redis_db_keys",
    # Strimzi's Kafka Exporter and the brokers' Strimzi Metrics Reporter (k8s/kafka/kafka.yaml)
    "kafka_consumergroup_lag", "kafka_server_replicamanager_underreplicatedpartitions",
    "kafka_controller_kafkacontroller_offlinepartitionscount",
    # Ray's metrics agent on the serving pods (Ray Serve's own metrics, `ray_` + their name)
    "ray_serve_deployment_replica_healthy", "ray_serve_num_ongoing_requests_at_replicas",
    # the proxies' responses by status_code and their latency (Ray 2.60, serve/_private/request_ingress_metrics.py)
    "ray_serve_num_http_requests_total", "ray_serve_http_request_latency_ms_bucket",
    "ray_serve_http_request_latency_ms_count",
}
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
                   "offset", "bool", "inf", "nan"}


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def rule_groups() -> list[dict]:
    return yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["spec"]["groups"]


def alert_rules() -> list[dict]:
    return [r for g in rule_groups() for r in g["rules"] if "alert" in r]


def write_rules_file(path: Path, *, annotations: bool = True) -> Path:
    """The PrometheusRule's groups as a plain Prometheus rules file (what the operator hands
    Prometheus). Without annotations for the unit tests: they test labels and timing (promtool
    compares annotations too, and the templates are checked by `promtool check rules`)."""
    groups = rule_groups()
    if not annotations:
        groups = [{**g, "rules": [{k: v for k, v in r.items() if k != "annotations"} for r in g["rules"]]}
                  for g in groups]
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False), encoding="utf-8")
    return path


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords, label names and values,
    durations and numbers left out)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)  # label lists
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range and subquery durations
    expr = re.sub(r"\b(offset)\s+\d+[smhdwy]", "", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        word, after = m.group(0), expr[m.end():].lstrip()[:1]
        if after == "(" or word.lower() in PROMQL_KEYWORDS:
            continue
        if m.start() > 0 and (expr[m.start() - 1].isdigit() or expr[m.start() - 1] == "."):
            continue  # the unit of a number like 5m, or 1e9
        names.add(word)
    return names


def registry_names(registry) -> set[str]:
    """The sample names a prometheus_client registry exports (counters with _total, histograms with
    their _bucket/_count/_sum series), also for labelled metrics that have no child yet."""
    names = set()
    for family in registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


def code_metrics() -> set[str]:
    """The metric names the code exports: each exporter's registry, built as it is in the processes
    (the API's replicas, `streamrec ingest`, the feature job), and the trainer's and the canary
    reviewer's named constants (their registries are built per run from its outcome)."""
    from services.metrics import ServeMetrics
    from streaming.features import run_metrics
    from streaming.ingest_metrics import IngestMetrics
    from training import canary, train_metrics

    names = registry_names(ServeMetrics("test").registry)
    names |= registry_names(IngestMetrics(features_timer=True).registry)
    names |= registry_names(run_metrics.features_registry(last_success=0, last_run=0, ok=True, duration_s=0, rows=0,
                                                          files=0, version=0))
    for module in (train_metrics, canary):
        names |= {v for v in vars(module).values() if isinstance(v, str) and v.startswith("streamrec_")}
    return names


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    panels += [p for row in dash["panels"] if row["type"] == "row" for p in row.get("panels", [])]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def runbook_anchors() -> set[str]:
    """GitHub's anchors of RUNBOOK.md's headings (lower case, punctuation dropped, spaces -> '-')."""
    anchors = set()
    for line in RUNBOOK.read_text(encoding="utf-8").splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            anchors.add(re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-"))
    return anchors


def _run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_S,
                          check=False)


needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian: apt-get install "
                                    "prometheus); CI installs it and runs these")


# --------------------------------------------------------------------------------------------
# promtool
# --------------------------------------------------------------------------------------------


@needs_promtool
def test_promtool_checks_the_rules(tmp_path):
    """Syntax, PromQL, annotation templates and lint (e.g. two rules of one alert with the same labels)."""
    rules = write_rules_file(tmp_path / RULES_NAME)
    out = _run_promtool("check", "rules", str(rules), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in rule_groups())} rules found" in out.stdout


@needs_promtool
def test_promtool_unit_tests_pass(tmp_path):
    """Each alert fires on synthetic series when it should, and stays quiet when it should not
    (k8s/monitoring/tests/*.yaml)."""
    write_rules_file(tmp_path / RULES_NAME, annotations=False)
    for src in PROMTOOL_TESTS:
        shutil.copy(src, tmp_path / src.name)
    out = _run_promtool("test", "rules", *(p.name for p in PROMTOOL_TESTS), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_the_unit_tests_catch_a_broken_rule(tmp_path):
    """The unit tests are not vacuous: with a threshold changed, promtool fails."""
    write_rules_file(tmp_path / RULES_NAME, annotations=False)
    rules = tmp_path / RULES_NAME
    broken = rules.read_text(encoding="utf-8").replace("> 1000", "> 100000")  # the lag floor
    assert broken != rules.read_text(encoding="utf-8")
    rules.write_text(broken, encoding="utf-8")
    for src in PROMTOOL_TESTS:
        shutil.copy(src, tmp_path / src.name)
    out = _run_promtool("test", "rules", "ingest.yaml", cwd=tmp_path)
    assert out.returncode != 0 and "StreamrecIngestLagGrowing" in out.stdout + out.stderr


@needs_promtool
def test_the_dashboard_queries_parse(tmp_path):
    """Every panel's query is valid PromQL (checked by promtool as recording rules)."""
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e}
                                                        for i, e in enumerate(dashboard_exprs())]}]}
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False), encoding="utf-8")
    out = _run_promtool("check", "rules", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------------------------
# the rules and their tests, without promtool
# --------------------------------------------------------------------------------------------


def test_promtool_tests_load_the_extracted_rules():
    assert PROMTOOL_TESTS, "no promtool unit tests in k8s/monitoring/tests/"
    for path in PROMTOOL_TESTS:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert doc["rule_files"] == [RULES_NAME], f"{path.name}: rule_files must be [{RULES_NAME}]"
        assert doc["tests"], path.name


def test_every_alert_is_tested_firing_and_quiet():
    fired, quiet = set(), set()
    for path in PROMTOOL_TESTS:
        for case in yaml.safe_load(path.read_text(encoding="utf-8"))["tests"]:
            for check in case.get("alert_rule_test", []):
                (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {r["alert"] for r in alert_rules()}
    assert alerts - fired == set(), f"no promtool test in which these fire: {sorted(alerts - fired)}"
    assert alerts - quiet == set(), f"no promtool test in which these stay quiet: {sorted(alerts - quiet)}"
    assert (fired | quiet) <= alerts, f"tests of alerts that do not exist: {sorted((fired | quiet) - alerts)}"


def test_the_contract_alerts_exist():
    alerts = {r["alert"] for r in alert_rules()}
    assert CONTRACT_ALERTS <= alerts, f"missing: {sorted(CONTRACT_ALERTS - alerts)}"


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda r: f"{r['alert']}-{r['labels'].get('severity')}")
def test_every_alert_is_actionable(rule):
    """A severity, a summary, a description, and a runbook_url whose anchor is a section of
    k8s/RUNBOOK.md named after the alert."""
    assert rule["labels"].get("severity") in SEVERITIES, rule["alert"]
    notes = rule.get("annotations", {})
    assert notes.get("summary") and notes.get("description"), f"{rule['alert']}: summary and description"
    url = notes.get("runbook_url", "")
    page, _, anchor = url.partition("#")
    assert page.endswith("/k8s/RUNBOOK.md"), f"{rule['alert']}: runbook_url {url!r} is not k8s/RUNBOOK.md"
    assert anchor == rule["alert"].lower(), f"{rule['alert']}: runbook_url anchor {anchor!r}"
    assert anchor in runbook_anchors(), f"k8s/RUNBOOK.md has no section {rule['alert']} (#{anchor})"


def test_the_metric_name_scanner():
    assert metric_names('sum by (topic) (rate(streamrec_ingest_records_total{topic="events"}[5m])) > 0.1') == {
        "streamrec_ingest_records_total"}
    assert metric_names("histogram_quantile(0.99, sum by (le) (rate(a_bucket[5m]))) > 1e-3 and on () b") == {
        "a_bucket", "b"}
    assert metric_names("x unless x offset 15m and on (pod) (up offset 15m)") == {"x", "up"}
    assert metric_names('time() - max(y) > 32 * 3600 or absent(z{job="a b"})') == {"y", "z"}


def test_every_metric_in_the_rules_and_the_dashboard_exists():
    """A misspelt or renamed metric makes an alert silently never fire and a panel silently empty."""
    known = code_metrics() | EXPORTER_METRICS
    used = {(name, where) for r in alert_rules() for name in metric_names(r["expr"]) for where in [r["alert"]]}
    used |= {(name, "dashboard") for e in dashboard_exprs() for name in metric_names(e)}
    unknown = sorted((n, w) for n, w in used if n not in known)
    assert not unknown, f"metrics no exporter exports (metric, where): {unknown}"
    contract = {n for n in known if n.startswith("streamrec_")}
    assert {n for n, _ in used} & contract, "the rules use none of the code's metrics"


def test_the_code_metrics_include_the_contract():
    """The names the alerts are written against (METRICS14) are the ones the code registers."""
    names = code_metrics()
    for name in ("streamrec_ingest_consumer_lag", "streamrec_ingest_seconds_since_last_commit",
                 "streamrec_ingest_dlq_records_total", "streamrec_features_last_success_timestamp_seconds",
                 "streamrec_train_last_success_timestamp_seconds", "streamrec_train_gate_refusals_in_a_row",
                 "streamrec_recommendations_total", "streamrec_request_seconds_bucket", "streamrec_replica_ready",
                 # issue 17
                 "streamrec_impressions_dropped_total", "streamrec_impressions_written_total",
                 "streamrec_canary_decisions_total"):
        assert name in names, name


# --------------------------------------------------------------------------------------------
# the dashboard
# --------------------------------------------------------------------------------------------


def test_dashboard_is_a_grafana_dashboard_in_a_labelled_configmap():
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    assert any(v["type"] == "datasource" for v in dash["templating"]["list"]), "Prometheus chosen by a variable"
    exprs = dashboard_exprs()
    assert len(exprs) >= 20 and all(e.strip() for e in exprs)
    for p in dash["panels"]:
        if p["type"] != "row":
            assert p.get("targets"), f"panel {p['title']!r} has no query"
    (cm,) = [d for _, d in OBJECTS if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "streamrec-dashboard"]
    assert cm["metadata"]["labels"].get("grafana_dashboard") == "1", "Grafana's sidecar finds dashboards by label"
    assert json.loads(cm["data"]["streamrec.json"]) == dash


# --------------------------------------------------------------------------------------------
# what is scraped
# --------------------------------------------------------------------------------------------


def _objects(kind: str) -> list[dict]:
    return [d for _, d in OBJECTS if d["kind"] == kind]


def _pod_templates() -> list[tuple[dict, dict]]:
    """(labels, pod spec) of every pod the manifests make (Ray pods with the labels KubeRay adds)."""
    out = []
    for d in _objects("Deployment") + _objects("StatefulSet"):
        t = d["spec"]["template"]
        out.append((t["metadata"]["labels"], t["spec"]))
    for d in _objects("RayService"):
        cluster = d["spec"]["rayClusterConfig"]
        for kind, group in [("head", cluster["headGroupSpec"])] + [("worker", g) for g in cluster["workerGroupSpecs"]]:
            t = group["template"]
            out.append(({**t["metadata"]["labels"], "ray.io/node-type": kind}, t["spec"]))
    return out


def _selects(selector: dict, labels: dict) -> bool:
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    for e in selector.get("matchExpressions", []):
        if e["operator"] == "In" and labels.get(e["key"]) not in e["values"]:
            return False
    return True


@pytest.mark.parametrize("monitor", [d for d in _objects("PodMonitor") if "strimzi.io/cluster" not in
                                     d["spec"]["selector"].get("matchLabels", {})],
                         ids=lambda d: d["metadata"]["name"])
def test_pod_monitors_reach_a_named_port(monitor):
    """Each PodMonitor of our pods selects pods that open the port it scrapes (a port name that no
    container has gives no target, and no error). Strimzi's pods are made by the operator."""
    pods = [(labels, spec) for labels, spec in _pod_templates() if _selects(monitor["spec"]["selector"], labels)]
    assert pods, f"PodMonitor {monitor['metadata']['name']} selects no pods"
    for ep in monitor["spec"]["podMetricsEndpoints"]:
        ports = {p.get("name") for _, spec in pods for c in spec["containers"] for p in c.get("ports", [])}
        assert ep["port"] in ports, f"{monitor['metadata']['name']}: no selected pod opens port {ep['port']!r}"
        jobs = [r for r in ep.get("relabelings", []) if r.get("targetLabel") == "job"]
        assert jobs and jobs[0]["replacement"].startswith("streamrec-"), "a fixed job label the rules select on"


def test_ingest_port_is_the_setting(k8s_settings):
    dep = next(d for d in _objects("Deployment") if d["metadata"]["name"] == "streamrec-ingest")
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["metrics"] == k8s_settings.ingest_metrics_port != 0
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}, probe


def test_batch_runs_push_to_the_scraped_pushgateway(k8s_settings):
    svc = next(d for d in _objects("Service") if d["metadata"]["name"] == "streamrec-pushgateway")
    url = k8s_settings.pushgateway_url or ""
    m = re.fullmatch(r"http://([a-z0-9-]+)\.([a-z0-9-]+)\.svc(?:\.cluster\.local)?:(\d+)/?", url)
    assert m, f"STREAMREC_PUSHGATEWAY_URL={url!r} is not the in-cluster Service address"
    assert (m.group(1), m.group(2)) == (svc["metadata"]["name"], svc["metadata"]["namespace"])
    assert int(m.group(3)) in {p["port"] for p in svc["spec"]["ports"]}
    (sm,) = [d for d in _objects("ServiceMonitor") if d["metadata"]["name"] == "streamrec-pushgateway"]
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    (ep,) = sm["spec"]["endpoints"]
    assert ep["honorLabels"] is True, "keep the pushed job/scene labels the alerts select on"
    assert ep["port"] in {p["name"] for p in svc["spec"]["ports"]}


def test_everything_is_scraped():
    """ingest, the API, both Redis, Kafka and the batch runs (through the Pushgateway)."""
    jobs = {r["replacement"] for d in _objects("PodMonitor") for ep in d["spec"]["podMetricsEndpoints"]
            for r in ep.get("relabelings", []) if r.get("targetLabel") == "job"}
    assert {"streamrec-ingest", "streamrec-serve", "streamrec-redis", "streamrec-kafka"} <= jobs
    assert _objects("ServiceMonitor")
