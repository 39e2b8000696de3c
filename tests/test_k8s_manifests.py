"""The Kubernetes manifests in k8s/: they parse, validate, and agree with the code.

Fast and offline: no cluster, no network. Built-in kinds are validated against the pinned
Kubernetes version's schemas (kubernetes-validate, strict: unknown fields fail); Strimzi's
custom resources are checked structurally here. The consistency tests catch drift between
the manifests and streamrec itself: env var names, topic names and sizes, service addresses,
mount paths and CLI commands.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from typer.testing import CliRunner

from services.cli import app
from streaming.settings import Settings, env_var_names, load_settings

K8S_DIR = Path(__file__).resolve().parents[1] / "k8s"
K8S_VERSION = "1.31"  # oldest Kubernetes the manifests must be valid for
STRIMZI_API = "kafka.strimzi.io/v1beta2"
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
# API groups validated with kubernetes-validate ("" is the core group).
BUILTIN_GROUPS = {"", "apps", "batch", "policy"}
CLUSTER_SCOPED_KINDS = {"Namespace"}
STREAMREC_IMAGE = "ghcr.io/streamrec/streamrec"


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def _load_all() -> list[tuple[Path, dict]]:
    docs = []
    for path in _yaml_files():
        with path.open(encoding="utf-8") as fh:
            for doc in yaml.safe_load_all(fh):
                if doc is not None:
                    docs.append((path, doc))
    return docs


DOCS = _load_all()
OBJECTS = [(p, d) for p, d in DOCS if d.get("apiVersion") != KUSTOMIZE_API]


def _id(item: tuple[Path, dict]) -> str:
    path, doc = item
    return f"{path.relative_to(K8S_DIR)}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def _group(doc: dict) -> str:
    api = doc["apiVersion"]
    return api.split("/", 1)[0] if "/" in api else ""


def _of_kind(kind: str, api: str | None = None) -> list[dict]:
    return [d for _, d in OBJECTS if d["kind"] == kind and (api is None or d["apiVersion"] == api)]


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for d in _of_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_spec(workload: dict) -> dict:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return workload["spec"]["template"]["spec"]


def _pod_labels(workload: dict) -> dict:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return workload["spec"]["template"]["metadata"]["labels"]


def _workloads() -> list[dict]:
    return [d for _, d in OBJECTS if d["kind"] in ("Deployment", "StatefulSet", "CronJob", "Job")]


def _streamrec_containers() -> list[tuple[dict, dict]]:
    """(workload, container) for every container running the streamrec image."""
    out = []
    for w in _workloads():
        for c in _pod_spec(w).get("containers", []):
            if c["image"].split(":")[0] == STREAMREC_IMAGE:
                out.append((w, c))
    return out


def _namespace() -> str:
    return _one("Namespace")["metadata"]["name"]


def _streamrec_configmap() -> dict:
    names = {
        ref["configMapRef"]["name"]
        for _, c in _streamrec_containers()
        for ref in c.get("envFrom", [])
        if "configMapRef" in ref
    }
    assert len(names) == 1, f"streamrec containers should share one env ConfigMap, got {names}"
    return _one("ConfigMap", names.pop())


@pytest.fixture
def k8s_settings(monkeypatch, tmp_path) -> Settings:
    """The streamrec Settings the pods get: the ConfigMap's data as the only environment."""
    for field, var in env_var_names().items():
        monkeypatch.delenv(var, raising=False)
        monkeypatch.delenv("STREAMREC_" + field.upper(), raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env file
    for key, value in _streamrec_configmap()["data"].items():
        monkeypatch.setenv(key, value)
    return load_settings()


# --------------------------------------------------------------------------------------------
# syntax and schemas
# --------------------------------------------------------------------------------------------


def test_manifests_exist_and_parse():
    assert (K8S_DIR / "kustomization.yaml").is_file()
    assert (K8S_DIR / "README.md").is_file()
    assert len(OBJECTS) >= 10
    for path, doc in DOCS:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion and kind are required"
        if doc["apiVersion"] != KUSTOMIZE_API:
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without metadata.name"


def test_object_names_are_unique():
    seen = set()
    for path, doc in OBJECTS:
        key = (doc["apiVersion"].split("/")[0], doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        assert key not in seen, f"{path}: duplicate {key}"
        seen.add(key)


@pytest.mark.parametrize("item", [o for o in OBJECTS if _group(o[1]) in BUILTIN_GROUPS], ids=_id)
def test_builtin_objects_validate(item):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    path, doc = item
    problem = None
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:  # its str() dumps the whole schema
        problem = f"at {'/'.join(str(x) for x in exc.absolute_path) or '(top)'}: {exc.message}"
    if problem:
        pytest.fail(f"{_id(item)} is not a valid Kubernetes {K8S_VERSION} object {problem}")


def test_only_known_api_groups():
    """A kind outside the validated groups and Strimzi would escape every check here."""
    for path, doc in OBJECTS:
        assert _group(doc) in BUILTIN_GROUPS or doc["apiVersion"] == STRIMZI_API, (
            f"{_id((path, doc))}: add a check for {doc['apiVersion']} to this test"
        )


def test_namespaced_objects_live_in_the_namespace():
    ns = _namespace()
    for path, doc in OBJECTS:
        if doc["kind"] in CLUSTER_SCOPED_KINDS:
            continue
        assert doc["metadata"].get("namespace") == ns, f"{_id((path, doc))}: namespace should be {ns!r}"


def test_workload_selectors_match_their_pods():
    for w in _workloads():
        if w["kind"] in ("Deployment", "StatefulSet"):
            selector = w["spec"]["selector"]["matchLabels"]
            labels = _pod_labels(w)
            assert selector.items() <= labels.items(), f"{w['metadata']['name']}: selector does not match its pods"
    for pdb in _of_kind("PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(sel.items() <= _pod_labels(w).items() for w in _workloads()), (
            f"PodDisruptionBudget {pdb['metadata']['name']} selects no pods"
        )
    for svc in _of_kind("Service"):
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= _pod_labels(w).items() for w in _workloads()), (
            f"Service {svc['metadata']['name']} selects no pods"
        )


def test_pod_volumes_and_claims_resolve():
    claims = {p["metadata"]["name"] for p in _of_kind("PersistentVolumeClaim")}
    configmaps = {c["metadata"]["name"] for c in _of_kind("ConfigMap")}
    for w in _workloads():
        spec = _pod_spec(w)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in w["spec"].get("volumeClaimTemplates", [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{w['metadata']['name']}: unknown claim"
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{w['metadata']['name']}: unknown ConfigMap"
        for c in spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in templates, (
                    f"{w['metadata']['name']}/{c['name']}: mount {m['name']!r} has no volume"
                )
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in configmaps
            assert c.get("resources", {}).get("requests") and c["resources"].get("limits", {}).get("memory"), (
                f"{w['metadata']['name']}/{c['name']}: resource requests and a memory limit are required"
            )


# --------------------------------------------------------------------------------------------
# kustomize
# --------------------------------------------------------------------------------------------


def _kustomization_tree(directory: Path) -> set[Path]:
    """The manifest files reachable from directory/kustomization.yaml (asserting each exists)."""
    kfile = directory / "kustomization.yaml"
    assert kfile.is_file(), f"{directory} is listed as a resource but has no kustomization.yaml"
    k = yaml.safe_load(kfile.read_text(encoding="utf-8"))
    assert k["apiVersion"] == KUSTOMIZE_API and k["kind"] == "Kustomization"
    files: set[Path] = set()
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{kfile}: resource {entry!r} does not exist"
        files |= _kustomization_tree(target) if target.is_dir() else {target}
    return files


def test_kustomization_lists_every_manifest():
    listed = _kustomization_tree(K8S_DIR)
    manifests = {p.resolve() for p in _yaml_files() if p.name != "kustomization.yaml"}
    assert manifests - listed == set(), "manifests no kustomization.yaml lists (kubectl apply -k skips them)"
    assert listed <= manifests


def test_kustomize_images_name_the_images_used():
    k = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    names = {i["name"] for i in k.get("images", [])}
    assert STREAMREC_IMAGE in names, "the streamrec image must be overridable with kustomize `images:`"
    used = {c["image"].split(":")[0] for w in _workloads() for c in _pod_spec(w)["containers"]}
    assert names <= used, f"kustomize images {names - used} match no container"
    assert _streamrec_containers(), "no container runs the streamrec image"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kubectl_kustomize_builds():
    """The real kustomize (built into kubectl) renders the tree offline into the same objects."""
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, rendered)) == sorted(key(d) for _, d in OBJECTS)


# --------------------------------------------------------------------------------------------
# Strimzi custom resources (kubernetes-validate has no schemas for them)
# --------------------------------------------------------------------------------------------

KAFKA_SPEC_KEYS = {"kafka", "entityOperator", "cruiseControl", "kafkaExporter", "clusterCa", "clientsCa",
                   "maintenanceTimeWindows", "jmxTrans", "zookeeper"}
KAFKA_KAFKA_KEYS = {"version", "metadataVersion", "replicas", "image", "listeners", "config", "storage",
                    "authorization", "rack", "brokerRackInitImage", "livenessProbe", "readinessProbe",
                    "jvmOptions", "jmxOptions", "resources", "metricsConfig", "logging", "template", "tieredStorage",
                    "quotas"}
LISTENER_KEYS = {"name", "port", "type", "tls", "authentication", "configuration", "networkPolicyPeers"}
NODEPOOL_SPEC_KEYS = {"replicas", "roles", "storage", "resources", "jvmOptions", "template"}
TOPIC_SPEC_KEYS = {"topicName", "partitions", "replicas", "config"}


def _kafka() -> dict:
    kafkas = _of_kind("Kafka", STRIMZI_API)
    assert len(kafkas) == 1
    return kafkas[0]


def test_strimzi_resources_use_v1beta2():
    for kind in ("Kafka", "KafkaNodePool", "KafkaTopic"):
        assert _of_kind(kind), f"no {kind}"
        for d in _of_kind(kind):
            assert d["apiVersion"] == STRIMZI_API


def test_kafka_is_kraft_with_node_pools():
    kafka = _kafka()
    spec = kafka["spec"]
    assert set(spec) <= KAFKA_SPEC_KEYS and "zookeeper" not in spec
    assert set(spec["kafka"]) <= KAFKA_KAFKA_KEYS, set(spec["kafka"]) - KAFKA_KAFKA_KEYS
    ann = kafka["metadata"].get("annotations", {})
    assert ann.get("strimzi.io/kraft") == "enabled" and ann.get("strimzi.io/node-pools") == "enabled"
    listeners = spec["kafka"]["listeners"]
    assert listeners and all(set(li) <= LISTENER_KEYS for li in listeners)
    for li in listeners:
        assert {"name", "port", "type", "tls"} <= set(li)
        assert isinstance(li["port"], int) and isinstance(li["tls"], bool)
        assert li["type"] in {"internal", "cluster-ip", "route", "loadbalancer", "nodeport", "ingress"}
    assert "topicOperator" in spec.get("entityOperator", {}), "KafkaTopics need the topic operator"

    pools = [p for p in _of_kind("KafkaNodePool") if p["metadata"]["labels"].get("strimzi.io/cluster") == kafka["metadata"]["name"]]
    assert len(pools) == len(_of_kind("KafkaNodePool")), "a KafkaNodePool names another cluster"
    roles = set()
    for pool in pools:
        ps = pool["spec"]
        assert set(ps) <= NODEPOOL_SPEC_KEYS, set(ps) - NODEPOOL_SPEC_KEYS
        assert isinstance(ps["replicas"], int) and ps["replicas"] >= 1
        assert ps["roles"] and set(ps["roles"]) <= {"controller", "broker"}
        roles |= set(ps["roles"])
        assert ps["storage"]["type"] in {"jbod", "persistent-claim", "ephemeral"}
        if ps["storage"]["type"] == "jbod":
            for vol in ps["storage"]["volumes"]:
                assert {"id", "type"} <= set(vol)
    assert roles == {"controller", "broker"}

    config = spec["kafka"].get("config", {})
    brokers = _broker_count()
    assert config.get("min.insync.replicas", 1) < config.get("default.replication.factor", 1) <= brokers
    assert config.get("offsets.topic.replication.factor", 1) <= brokers


def _broker_count() -> int:
    return sum(p["spec"]["replicas"] for p in _of_kind("KafkaNodePool") if "broker" in p["spec"]["roles"])


def _topics() -> dict[str, dict]:
    out = {}
    for t in _of_kind("KafkaTopic", STRIMZI_API):
        assert set(t["spec"]) <= TOPIC_SPEC_KEYS, set(t["spec"]) - TOPIC_SPEC_KEYS
        assert t["metadata"]["labels"].get("strimzi.io/cluster") == _kafka()["metadata"]["name"]
        out[t["spec"].get("topicName", t["metadata"]["name"])] = t
    return out


def test_topics_match_the_settings(k8s_settings):
    topics = _topics()
    s = k8s_settings
    assert set(topics) == {s.events_topic, s.items_topic, s.dlq_topic}
    # the ConfigMap names the topics explicitly, and as the code's defaults
    defaults = Settings.model_fields
    assert (s.events_topic, s.items_topic, s.dlq_topic) == (
        defaults["events_topic"].default, defaults["items_topic"].default, defaults["dlq_topic"].default
    )
    for name, t in topics.items():
        spec = t["spec"]
        # `streamrec ingest` creates a missing topic with these numbers: they must agree.
        assert spec["partitions"] == s.topic_partitions, f"{name}: partitions != STREAMREC_TOPIC_PARTITIONS"
        assert spec["replicas"] == s.topic_replication, f"{name}: replicas != STREAMREC_TOPIC_REPLICATION"
        assert spec["replicas"] <= _broker_count()
        isr = int(spec.get("config", {}).get("min.insync.replicas", 1))
        assert 1 <= isr < spec["replicas"], f"{name}: min.insync.replicas must leave room for one broker down"
    policy = lambda n: str(topics[n]["spec"].get("config", {}).get("cleanup.policy", "delete"))  # noqa: E731
    assert "compact" in policy(s.items_topic)
    assert "compact" not in policy(s.events_topic)
    retention = lambda n: int(topics[n]["spec"]["config"]["retention.ms"])  # noqa: E731
    assert retention(s.dlq_topic) > retention(s.events_topic)


# --------------------------------------------------------------------------------------------
# streamrec config and pods
# --------------------------------------------------------------------------------------------


def test_configmap_names_only_real_settings():
    known = set(env_var_names().values())
    data = _streamrec_configmap()["data"]
    unknown = set(data) - known
    assert not unknown, f"not streamrec settings (see `streamrec config`): {sorted(unknown)}"
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings (quote numbers)"


def test_configmap_loads_as_valid_settings(k8s_settings):
    s = k8s_settings
    assert s.kafka_bootstrap_servers and s.redis_url, "both set, or the CLI would start its embedded stack"
    assert s.features_interval_s == 0, "the CronJob runs the features; ingest pods must not"
    assert str(s.data_dir) == "/data"


def test_bootstrap_servers_are_the_strimzi_bootstrap_service(k8s_settings):
    kafka = _kafka()
    host, port = k8s_settings.kafka_bootstrap_servers.split(",")[0].rsplit(":", 1)
    expected = f"{kafka['metadata']['name']}-kafka-bootstrap.{kafka['metadata']['namespace']}.svc"
    assert host in (expected, expected + ".cluster.local")
    listener = [li for li in kafka["spec"]["kafka"]["listeners"] if li["port"] == int(port)]
    assert listener, f"no Kafka listener on port {port}"
    # streamrec's client has no TLS/SASL settings: it needs a plaintext in-cluster listener
    assert listener[0]["tls"] is False and listener[0]["type"] == "internal" and "authentication" not in listener[0]


def test_redis_url_is_the_redis_service(k8s_settings):
    url = urlparse(k8s_settings.redis_url)
    name, ns, *rest = url.hostname.split(".")
    assert rest in (["svc"], ["svc", "cluster", "local"])
    svc = _one("Service", name)
    assert svc["metadata"]["namespace"] == ns
    assert url.port in {p["port"] for p in svc["spec"]["ports"]}
    targets = [w for w in _workloads() if svc["spec"]["selector"].items() <= _pod_labels(w).items()]
    assert [w["kind"] for w in targets] == ["StatefulSet"]


def _redis_conf() -> dict[str, str]:
    sts = _one("StatefulSet", "redis")
    spec = _pod_spec(sts)
    container = spec["containers"][0]
    conf_path = container["command"][-1]
    for m in container["volumeMounts"]:
        if conf_path.startswith(m["mountPath"].rstrip("/") + "/"):
            volume = next(v for v in spec["volumes"] if v["name"] == m["name"])
            key = conf_path[len(m["mountPath"].rstrip("/")) + 1:]
            text = _one("ConfigMap", volume["configMap"]["name"])["data"][key]
            break
    else:
        pytest.fail(f"redis is started with {conf_path}, which no ConfigMap volume provides")
    conf = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            k, _, v = line.partition(" ")
            conf[k.lower()] = v.strip()
    return conf


def test_redis_is_durable_standalone():
    conf = _redis_conf()
    assert conf.get("appendonly") == "yes"
    assert conf.get("appendfsync") == "everysec"
    assert conf.get("maxmemory-policy") == "noeviction", "evicting sr:wm:* watermarks would double count replays"
    assert conf.get("cluster-enabled", "no") == "no", "ingest's Lua script needs standalone Redis"
    sts = _one("StatefulSet", "redis")
    assert sts["spec"]["replicas"] == 1
    data_mounts = {m["mountPath"] for m in _pod_spec(sts)["containers"][0]["volumeMounts"]
                   if m["name"] in {t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]}}
    assert conf.get("dir") in data_mounts, "the AOF must be written to the PersistentVolumeClaim"


def test_streamrec_pods_share_the_data_volume(k8s_settings):
    for w, c in _streamrec_containers():
        spec = _pod_spec(w)
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert str(k8s_settings.data_dir) in mounts, f"{w['metadata']['name']}: STREAMREC_DATA_DIR is not mounted"
        volume = next(v for v in spec["volumes"] if v["name"] == mounts[str(k8s_settings.data_dir)])
        claim = _one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["metadata"]["name"] == "streamrec-data"
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "ingest pods and the feature job share the log"


def test_ingest_deployment():
    dep = _one("Deployment", "streamrec-ingest")
    spec = _pod_spec(dep)
    (c,) = spec["containers"]
    assert c["command"] == ["streamrec", "ingest", "--no-progress"]
    assert spec.get("terminationGracePeriodSeconds", 30) >= 60, "time for the final flush + commit on SIGTERM"
    assert c["resources"]["limits"].get("memory") and c["resources"]["requests"].get("cpu")
    assert dep["spec"]["replicas"] <= min(t["spec"]["partitions"] for t in _topics().values()), (
        "more ingest replicas than partitions leaves pods idle"
    )


def test_features_cronjob():
    cj = _one("CronJob", "streamrec-features")
    assert cj["spec"]["schedule"] == "*/5 * * * *"
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    (c,) = _pod_spec(cj)["containers"]
    assert c["command"] == ["streamrec", "features", "--no-progress"]


def test_console_script_is_the_cli():
    scripts = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert scripts.get("streamrec") == "services.cli:app"


@pytest.mark.parametrize(
    "command",
    sorted({tuple(c["command"]) for _, c in _streamrec_containers()}),
    ids=lambda cmd: " ".join(cmd),
)
def test_container_commands_exist_in_the_cli(command):
    """`--help` after the arguments: exit 0 only if the subcommand and every option exist."""
    assert command[0] == "streamrec"
    result = CliRunner().invoke(app, [*command[1:], "--help"])
    assert result.exit_code == 0, f"`{' '.join(command)}` is not a valid streamrec command:\n{result.output}"
