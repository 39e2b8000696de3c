"""Who may talk to what on Kubernetes (k8s/README.md, "Security"; k8s/security/).

* NetworkPolicies: `default-deny` selects every pod for ingress and egress, and a small evaluator
  of the NetworkPolicy objects (plus the ones Strimzi writes for its brokers, modelled from the
  Kafka resource) finds exactly the flows of FLOWS allowed -- every one of them, nothing else --
  over a universe of the pods the manifests make, the operators' pods and a few strangers.
* Kafka: one TLS + SCRAM-SHA-512 listener, `authorization: simple`, a KafkaUser per client whose
  ACLs name only the topics and the group streamrec uses; each pod that uses Kafka logs in as one.
  Only the privacy user writes the `forget` topic; ingest reads it. Only the API (the serving
  workers, user streamrec-serving) writes `impressions`, and nothing else; ingest reads it.
* The pseudonym key (Secret streamrec-pseudonym) reaches exactly the pods that see raw user ids
  (ingest, serving, the privacy Jobs), never the feature job or training; the manifest has no data.
* The one-off Jobs (k8s/oneoff/) are CronJobs that never run by themselves.
* Redis: both instances need a password from a Secret without data; no `protected-mode no`; every
  client gets STREAMREC_REDIS_PASSWORD.
* Ray: token authentication (KubeRay authOptions) on the RayService and the RayJob template.
* ServiceAccounts: every pod on the streamrec image runs as a dedicated ServiceAccount without a
  token, except the training trigger (it creates RayJobs) and the serving head (its autoscaler).
* The API refuses to start without keys (STREAMREC_REQUIRE_API_KEYS) and the public Ingress routes
  neither /metrics nor /docs.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import pytest
import yaml

from tests.test_k8s_manifests import K8S_DIR, KUBERAY_API, OBJECTS, STREAMREC_IMAGE, TEMPLATES, operator_secrets

NS = "streamrec"
SR = {"app.kubernetes.io/name": "streamrec", "app.kubernetes.io/part-of": "streamrec"}
REDIS_SECRET = "streamrec-redis"
KAFKA_CA_SECRET = "streamrec-cluster-ca-cert"
MIN_RAY_FOR_TOKEN_AUTH = (2, 52)  # KubeRay refuses authOptions.mode=token below this Ray
PUBLIC_PATHS = {"/v1", "/healthz", "/readyz"}
INTERNAL_PATHS = ("/metrics", "/docs", "/openapi.json", "/redoc")
API_SERVER_PORTS = (443, 6443)
# Ray's ports beyond the declared ones: a worker port and the dashboard agent (every Ray pod).
RAY_INTERNAL_PORTS = {10002, 52365}
KAFKA_INTERNAL_PORTS = {"controller": 9090, "replication": 9091, "metrics": 9404}


def of_kind(kind: str) -> list[dict]:
    return [d for _, d in OBJECTS if d["kind"] == kind]


def one(kind: str, name: str) -> dict:
    (found,) = [d for d in of_kind(kind) if d["metadata"]["name"] == name]
    return found


# --------------------------------------------------------------------------------------------
# the pods: from the manifests, plus the operators' and a few outsiders
# --------------------------------------------------------------------------------------------


class Endpoint(NamedTuple):
    name: str
    namespace: str | None  # None: not a pod (the API server, reached by IP)
    labels: dict
    ports: frozenset[int]
    template: dict | None = None  # the pod template as written, for pods of the manifests


def pod_template(workload: dict) -> dict:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def container_ports(template: dict) -> set[int]:
    return {p["containerPort"] for c in template["spec"]["containers"] for p in c.get("ports", [])}


# pod name here -> how to find it in the manifests
WORKLOAD_PODS = {
    "ingest": ("Deployment", "streamrec-ingest"),
    "features": ("CronJob", "streamrec-features"),
    "trigger": ("CronJob", "streamrec-train"),
    "redis": ("StatefulSet", "redis"),
    "gcs-redis": ("StatefulSet", "ray-gcs-redis"),
    "pushgateway": ("Deployment", "streamrec-pushgateway"),
    # the one-off Jobs of k8s/oneoff/ (suspended CronJobs: `kubectl create job --from`)
    "ingest-fresh": ("CronJob", "streamrec-ingest-fresh"),
    "forget": ("CronJob", "streamrec-forget"),
    "rotate-key": ("CronJob", "streamrec-rotate-pseudonym-key"),
}


def ray_cluster(cr: dict) -> dict:
    return cr["spec"]["rayClusterConfig" if cr["kind"] == "RayService" else "rayClusterSpec"]


def ray_crs() -> list[dict]:
    return [d for _, d in OBJECTS + TEMPLATES if d["apiVersion"] == KUBERAY_API]


def manifest_pods() -> list[Endpoint]:
    pods = []
    for name, (kind, wname) in WORKLOAD_PODS.items():
        t = pod_template(one(kind, wname))
        pods.append(Endpoint(name, NS, t["metadata"]["labels"], frozenset(container_ports(t)), t))
    for cr in ray_crs():
        prefix = {"RayService": "serve", "RayJob": "train"}[cr["kind"]]
        cluster = ray_cluster(cr)
        groups = [("head", cluster["headGroupSpec"])] + [("worker", g) for g in cluster["workerGroupSpecs"]]
        for node_type, group in groups:
            t = group["template"]
            labels = {**t["metadata"]["labels"], "ray.io/node-type": node_type}
            ports = frozenset(container_ports(t) | RAY_INTERNAL_PORTS)
            pods.append(Endpoint(f"{prefix}-{node_type}", NS, labels, ports, t))
        sub = cr["spec"].get("submitterPodTemplate")
        if sub:
            pods.append(Endpoint(f"{prefix}-submitter", NS, sub["metadata"]["labels"], frozenset(), sub))
    return pods


STRIMZI = {"strimzi.io/cluster": "streamrec", "strimzi.io/kind": "Kafka"}
OTHER_PODS = [
    # Strimzi's pods of Kafka `streamrec` (labels as Strimzi 1.x sets them) and its operator,
    # installed in this namespace in README.md's simplest setup
    Endpoint("kafka-broker", NS, {**STRIMZI, "strimzi.io/name": "streamrec-kafka", "strimzi.io/pool-name": "dual-role",
                                  "strimzi.io/broker-role": "true", "strimzi.io/controller-role": "true"},
             frozenset({9093, *KAFKA_INTERNAL_PORTS.values()})),
    Endpoint("kafka-exporter", NS, {**STRIMZI, "strimzi.io/name": "streamrec-kafka-exporter"}, frozenset({9404})),
    Endpoint("entity-operator", NS, {**STRIMZI, "strimzi.io/name": "streamrec-entity-operator"}, frozenset({8080})),
    Endpoint("strimzi-operator", NS, {"name": "strimzi-cluster-operator", "strimzi.io/kind": "cluster-operator"},
             frozenset({8080})),
    # somebody else's pod in the namespace (a debug pod, a sidecar-less tool)
    Endpoint("stranger-in-ns", NS, {"app": "debug"}, frozenset({8080})),
    # outside the namespace
    Endpoint("prometheus", "monitoring", {"app.kubernetes.io/name": "prometheus"}, frozenset({9090})),
    Endpoint("ingress-controller", "ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"}, frozenset({80, 443})),
    Endpoint("kuberay-operator", "kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"}, frozenset({8080})),
    Endpoint("kube-dns", "kube-system", {"k8s-app": "kube-dns"}, frozenset({53})),
    Endpoint("producer", "shop", {"streamrec.io/kafka-producer": "true"}, frozenset({8080})),
    Endpoint("api-client", "shop", {"streamrec.io/api-client": "true"}, frozenset({8080})),
    Endpoint("stranger", "shop", {"app": "web"}, frozenset({8080})),
    Endpoint("api-server", None, {}, frozenset(API_SERVER_PORTS)),
]


@pytest.fixture(scope="module")
def endpoints() -> dict[str, Endpoint]:
    eps = manifest_pods() + OTHER_PODS
    names = [e.name for e in eps]
    assert len(set(names)) == len(names), names
    return {e.name: e for e in eps}


# --------------------------------------------------------------------------------------------
# the evaluator
# --------------------------------------------------------------------------------------------


def selects(selector: dict | None, labels: dict) -> bool:
    """A LabelSelector (matchLabels, matchExpressions In/NotIn/Exists/DoesNotExist) on `labels`."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for e in selector.get("matchExpressions", []):
        key, op, values = e["key"], e["operator"], e.get("values", [])
        ok = {"In": labels.get(key) in values, "NotIn": labels.get(key) not in values,
              "Exists": key in labels, "DoesNotExist": key not in labels}[op]
        if not ok:
            return False
    return True


def namespace_labels(namespace: str) -> dict:
    return {"kubernetes.io/metadata.name": namespace}


def peer_matches(peer: dict, policy_ns: str, ep: Endpoint) -> bool:
    if "ipBlock" in peer:
        # Modelled as the API server only. On a real CNI 0.0.0.0/0 also covers pods: it is only
        # ever used with the API server's ports, and README.md says to narrow it.
        return ep.namespace is None
    if ep.namespace is None:
        return False
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels(ep.namespace)):
            return False
    elif ep.namespace != policy_ns:
        return False
    return selects(peer.get("podSelector"), ep.labels)


def rule_allows(rule: dict, peers_key: str, policy_ns: str, other: Endpoint, port: int) -> bool:
    ports = rule.get("ports")
    if ports and not any(p.get("port") == port for p in ports):
        return False
    peers = rule.get(peers_key)
    return not peers or any(peer_matches(p, policy_ns, other) for p in peers)


def strimzi_policies() -> list[dict]:
    """The ingress NetworkPolicy Strimzi writes for the brokers (networkPolicyGeneration, on by
    default): each listener's port from its networkPolicyPeers (everyone without them), the
    controller and replication ports from Strimzi's own pods and operator, metrics from anyone."""
    kafka = one("Kafka", "streamrec")
    own = [{"podSelector": {"matchLabels": {"strimzi.io/cluster": "streamrec"}}},
           {"namespaceSelector": {}, "podSelector": {"matchLabels": {"strimzi.io/kind": "cluster-operator"}}}]
    rules = [{"from": own, "ports": [{"port": KAFKA_INTERNAL_PORTS["controller"]},
                                     {"port": KAFKA_INTERNAL_PORTS["replication"]}]},
             {"ports": [{"port": KAFKA_INTERNAL_PORTS["metrics"]}]}]
    for li in kafka["spec"]["kafka"]["listeners"]:
        rules.append({"ports": [{"port": li["port"]}], **({"from": li["networkPolicyPeers"]}
                                                           if li.get("networkPolicyPeers") else {})})
    return [{"metadata": {"name": "strimzi-generated", "namespace": NS},
             "spec": {"podSelector": {"matchLabels": {"strimzi.io/cluster": "streamrec", "strimzi.io/broker-role": "true"}},
                      "policyTypes": ["Ingress"], "ingress": rules}}]


def policies() -> list[dict]:
    return of_kind("NetworkPolicy") + strimzi_policies()


def direction_allows(ep: Endpoint, other: Endpoint, port: int, kind: str) -> bool:
    """Does `ep` allow traffic to (kind=Egress) or from (kind=Ingress) `other` on `port`?"""
    if ep.namespace != NS:
        return True  # not governed by these policies
    mine = [p for p in policies() if p["metadata"]["namespace"] == NS and selects(p["spec"]["podSelector"], ep.labels)
            and kind in p["spec"].get("policyTypes", ["Ingress"])]
    if not mine:
        return True
    key, peers = ("egress", "to") if kind == "Egress" else ("ingress", "from")
    return any(rule_allows(r, peers, NS, other, port) for p in mine for r in p["spec"].get(key) or [])


def allowed(src: Endpoint, dst: Endpoint, port: int) -> bool:
    return direction_allows(src, dst, port, "Egress") and direction_allows(dst, src, port, "Ingress")


# --------------------------------------------------------------------------------------------
# the flows of the architecture
# --------------------------------------------------------------------------------------------

SERVE = ("serve-head", "serve-worker")
TRAIN = ("train-head", "train-worker", "train-submitter")
STRIMZI_PODS = ("kafka-broker", "kafka-exporter", "entity-operator")
INGEST = ("ingest", "ingest-fresh")  # the Deployment's pods and the `ingest --fresh` Job's (same labels)
PRIVACY = ("forget", "rotate-key")  # the privacy Jobs (component privacy)
ALL_PORTS = "*"  # every port the destination listens on
# (sources, destinations, ports, why)
FLOWS = [
    (INGEST, ("kafka-broker",), (9093,), "consume events + items + impressions + forget, DLQ writes"),
    (INGEST, ("redis",), (6379,), "the online store"),
    (INGEST, SERVE, (8000,), "`streamrec status` in an ingest pod probes the API"),
    (INGEST, ("ingest",), (9310,), "`streamrec status` reads the other ingest pods' /metrics"),
    (PRIVACY, ("kafka-broker",), (9093,), "forget: tombstones (streamrec-privacy); rotate-key: offsets (streamrec-ops)"),
    (PRIVACY, ("redis",), (6379,), "`streamrec privacy rotate-key` rebuilds Redis from the migrated log"),
    (("features",), ("redis",), (6379,), "the feature push (popularity, trending)"),
    (("features",), ("pushgateway",), (9091,), "the feature run's outcome metrics"),
    (("features",), ("kafka-broker",), (9093,), "one-off Jobs from this pod: rebuild-online, dlq (read-only user)"),
    (SERVE, SERVE, ALL_PORTS, "Ray's own ports inside the serving cluster"),
    (SERVE, ("redis",), (6379,), "the API reads users' recent items, popularity"),
    (SERVE, ("gcs-redis",), (6379,), "GCS fault tolerance"),
    (("serve-worker",), ("kafka-broker",), (9093,), "the Api replicas write impressions (not the head: no replica)"),
    (("serve-head",), ("api-server",), API_SERVER_PORTS, "the autoscaler sidecar"),
    (TRAIN, TRAIN, ALL_PORTS, "Ray's own ports inside a training cluster, the submitter's Jobs API call"),
    (TRAIN, ("pushgateway",), (9091,), "the trainer's outcome metrics"),
    (("trigger",), ("api-server",), API_SERVER_PORTS, "creates RayJobs"),
    (("prometheus",), ("ingest",), (9310,), "scrape"),
    (("prometheus",), SERVE, (8000, 8080), "scrape: the API's /metrics, Ray's metrics"),
    (("prometheus",), ("train-head", "train-worker"), (8080,), "scrape: Ray's metrics"),
    (("prometheus",), ("redis", "gcs-redis"), (9121,), "scrape: redis_exporter"),
    (("prometheus",), ("pushgateway",), (9091,), "scrape"),
    (("prometheus",), ("kafka-broker", "kafka-exporter"), (9404,), "scrape: brokers, Kafka Exporter"),
    (("ingress-controller", "api-client"), SERVE, (8000,), "the API"),
    (("kuberay-operator",), ("serve-head", "train-head"), (8265,), "Serve config, job submission (token)"),
    (("producer",), ("kafka-broker",), (9093,), "events and catalog from upstream"),
    (STRIMZI_PODS + ("strimzi-operator",), ("kafka-broker",), (9090, 9091, 9404), "Strimzi: controller, replication"),
    (STRIMZI_PODS + ("strimzi-operator",), ("api-server",), API_SERVER_PORTS, "Strimzi: operators"),
]
# Strimzi's own policy opens the brokers' metrics port to every pod; streamrec's policies keep the
# pods of this namespace from using it (egress), not the pods of other namespaces.
OPEN_KAFKA_METRICS = ("kafka-broker", KAFKA_INTERNAL_PORTS["metrics"])
DNS_CLIENTS = "every pod of the namespace"


def expected_flows(endpoints: dict[str, Endpoint]) -> set[tuple[str, str, int]]:
    out = set()
    for srcs, dsts, ports, _why in FLOWS:
        for s, d in itertools.product(srcs, dsts):
            for port in (endpoints[d].ports if ports == ALL_PORTS else ports):
                out.add((s, d, port))
    for e in endpoints.values():
        if e.namespace == NS:  # DNS
            out.add((e.name, "kube-dns", 53))
        elif e.namespace is not None:
            out.add((e.name, *OPEN_KAFKA_METRICS))
    return out


def actual_flows(endpoints: dict[str, Endpoint]) -> set[tuple[str, str, int]]:
    out = set()
    for src, dst in itertools.product(endpoints.values(), repeat=2):
        if NS not in (src.namespace, dst.namespace) or src.namespace is None:
            continue  # neither end is ours, or the API server calling out
        for port in dst.ports:
            if allowed(src, dst, port):
                out.add((src.name, dst.name, port))
    return out


def test_every_pod_is_selected_by_default_deny(endpoints):
    deny = [p for p in of_kind("NetworkPolicy") if p["spec"]["podSelector"] == {}
            and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
            and not p["spec"].get("ingress") and not p["spec"].get("egress")]
    assert deny, "no default-deny policy (podSelector {}, Ingress and Egress, no rules)"
    assert all(p["metadata"]["namespace"] == NS for p in deny)
    for e in endpoints.values():
        if e.namespace == NS:
            assert selects(deny[0]["spec"]["podSelector"], e.labels), e.name


def test_the_architecture_flows_are_allowed(endpoints):
    missing = expected_flows(endpoints) - actual_flows(endpoints)
    assert not missing, f"flows of the architecture that the NetworkPolicies block: {sorted(missing)}"


def test_nothing_else_is_allowed(endpoints):
    extra = actual_flows(endpoints) - expected_flows(endpoints)
    assert not extra, f"flows the NetworkPolicies allow beyond FLOWS: {sorted(extra)}"


def one_sided_flows(endpoints: dict[str, Endpoint], kind: str) -> set[tuple[str, str, int]]:
    """What one side alone admits: the egress rules of our pods (kind=Egress) or the ingress rules
    of our pods (kind=Ingress), whatever the other end's policies say."""
    out = set()
    for src, dst in itertools.product(endpoints.values(), repeat=2):
        ours, other = (src, dst) if kind == "Egress" else (dst, src)
        if ours.namespace != NS or src.namespace is None:
            continue
        for port in dst.ports:
            if direction_allows(ours, other, port, kind):
                out.add((src.name, dst.name, port))
    return out


def test_each_side_alone_allows_only_the_flows(endpoints):
    """Defence in depth: the egress rules alone and the ingress rules alone each admit no flow beyond
    FLOWS, so neither a permissive policy in another namespace nor a missing one on our side opens
    a path. (Strimzi's own pods may talk to each other on any port; its brokers' metrics port is
    open to everyone, see OPEN_KAFKA_METRICS.)"""
    expected = expected_flows(endpoints)
    strimzi = set(STRIMZI_PODS) | {"strimzi-operator"}
    egress = {f for f in one_sided_flows(endpoints, "Egress") - expected if not {f[0], f[1]} <= strimzi}
    assert not egress, f"egress rules admit beyond FLOWS: {sorted(egress)}"
    ingress = {f for f in one_sided_flows(endpoints, "Ingress") - expected if (f[1], f[2]) != OPEN_KAFKA_METRICS}
    assert not ingress, f"ingress rules admit beyond FLOWS: {sorted(ingress)}"


def test_a_blocked_flow_is_blocked(endpoints):
    """The evaluator itself: a few flows that must never pass (so that the two tests above are not
    vacuous)."""
    e = endpoints
    assert not allowed(e["stranger-in-ns"], e["serve-head"], 8265), "a pod of the namespace reaches the dashboard"
    assert not allowed(e["serve-head"], e["kafka-broker"], 9093), "the serving head runs no replica: no Kafka"
    assert not allowed(e["serve-worker"], e["kafka-broker"], 9091), "replication port: Strimzi's own pods only"
    assert not allowed(e["serve-worker"], e["ingest"], 9310), "the API reads no ingest metrics"
    assert not allowed(e["train-head"], e["redis"], 6379), "training reads the volume, not Redis"
    assert not allowed(e["stranger"], e["redis"], 6379)
    assert not allowed(e["ingress-controller"], e["serve-head"], 8265)


def test_policies_name_real_ports(endpoints):
    """A port in a rule that no selected pod listens on is a typo waiting to block a flow."""
    listening = {p for e in endpoints.values() for p in e.ports} | {53}
    for p in of_kind("NetworkPolicy"):
        for rule in (p["spec"].get("ingress") or []) + (p["spec"].get("egress") or []):
            for port in rule.get("ports", []):
                assert isinstance(port["port"], int) and port["port"] in listening, (p["metadata"]["name"], port)


# --------------------------------------------------------------------------------------------
# Kafka: TLS + SCRAM, ACLs per user, and who logs in as whom
# --------------------------------------------------------------------------------------------


def streamrec_env() -> dict[str, str]:
    (cm,) = [d for d in of_kind("ConfigMap") if d["metadata"]["name"] == "streamrec-env"]
    return cm["data"]


def streamrec_containers(endpoints) -> list[tuple[Endpoint, dict]]:
    return [(e, c) for e in endpoints.values() if e.template
            for c in e.template["spec"]["containers"] if c["image"].split(":")[0] == STREAMREC_IMAGE]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_kafka_listeners_authenticate_and_authorize():
    kafka = one("Kafka", "streamrec")["spec"]["kafka"]
    assert kafka["authorization"]["type"] == "simple"
    for li in kafka["listeners"]:
        assert li.get("tls") is True, f"listener {li['name']}: plaintext"
        assert li.get("authentication", {}).get("type") in ("scram-sha-512", "tls"), f"listener {li['name']}"
        assert li.get("networkPolicyPeers"), f"listener {li['name']}: open to every pod"
    port = int(streamrec_env()["KAFKA_BOOTSTRAP_SERVERS"].rsplit(":", 1)[1])
    assert port in {li["port"] for li in kafka["listeners"]}


def test_kafka_users_validate_against_the_vendored_crd():
    from tests.k8s.test_crd_schemas import crds, schema_errors

    users = of_kind("KafkaUser")
    assert users and ("kafka.strimzi.io/v1", "KafkaUser") in crds()
    for u in users:
        assert not schema_errors(u), (u["metadata"]["name"], schema_errors(u))
        assert u["metadata"]["labels"]["strimzi.io/cluster"] == "streamrec"


def test_kafka_acls_name_only_what_streamrec_uses():
    env = streamrec_env()
    topics = {t["spec"]["topicName"] for t in of_kind("KafkaTopic")}
    assert {env["STREAMREC_EVENTS_TOPIC"], env["STREAMREC_ITEMS_TOPIC"], env["STREAMREC_DLQ_TOPIC"],
            env["STREAMREC_FORGET_TOPIC"], env["STREAMREC_IMPRESSIONS_TOPIC"]} <= topics
    for u in of_kind("KafkaUser"):
        auth = u["spec"]["authorization"]
        assert auth["type"] == "simple" and u["spec"]["authentication"]["type"] == "scram-sha-512"
        for acl in auth["acls"]:
            r = acl["resource"]
            assert acl.get("type", "allow") == "allow"
            assert not {"All", "Create", "Delete", "Alter", "AlterConfigs"} & set(acl["operations"]), (
                f"{u['metadata']['name']}: topics come from KafkaTopic resources, not from clients")
            if r["type"] in ("topic", "group"):
                assert r.get("patternType", "literal") == "literal", "no prefix or wildcard ACLs"
            if r["type"] == "topic":
                assert r["name"] in topics, (u["metadata"]["name"], r)
            elif r["type"] == "group":
                assert r["name"] == env["STREAMREC_CONSUMER_GROUP"], (u["metadata"]["name"], r)
            else:
                assert r["type"] == "cluster" and set(acl["operations"]) <= {"Describe", "IdempotentWrite"}


def acl_ops(user: str) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for acl in one("KafkaUser", user)["spec"]["authorization"]["acls"]:
        out.setdefault((acl["resource"]["type"], acl["resource"].get("name", "")), set()).update(acl["operations"])
    return out


def test_each_user_can_do_its_job_and_no_more():
    env = streamrec_env()
    ev, it, dlq, group = (env["STREAMREC_EVENTS_TOPIC"], env["STREAMREC_ITEMS_TOPIC"], env["STREAMREC_DLQ_TOPIC"],
                          env["STREAMREC_CONSUMER_GROUP"])
    ingest = acl_ops("streamrec-ingest")
    assert "Read" in ingest[("topic", ev)] and "Read" in ingest[("topic", it)] and "Read" in ingest[("group", group)]
    assert ingest[("topic", dlq)] == {"Write", "Read", "Describe"}, "writes the DLQ; `streamrec dlq` reads it"
    assert "Write" not in ingest[("topic", ev)] | ingest[("topic", it)], "ingest must not forge events"
    ops = acl_ops("streamrec-ops")
    assert all("Write" not in v for v in ops.values()), "streamrec-ops is read-only"
    assert ops[("group", group)] == {"Describe"}, "reads the group's offsets, never joins it (no Read)"
    producer = acl_ops("streamrec-producer")
    assert {k for k, v in producer.items() if "Write" in v} == {("topic", ev), ("topic", it)}
    assert not any("Read" in v for v in producer.values())
    privacy = acl_ops("streamrec-privacy")
    assert privacy == {("topic", env["STREAMREC_FORGET_TOPIC"]): {"Write", "Describe"},
                       ("cluster", ""): {"Describe", "IdempotentWrite"}}, "writes tombstones, nothing else"
    assert "Read" in ingest[("topic", env["STREAMREC_IMPRESSIONS_TOPIC"])], "ingest logs the impressions"
    serving = acl_ops("streamrec-serving")
    assert serving == {("topic", env["STREAMREC_IMPRESSIONS_TOPIC"]): {"Write", "Describe"},
                       ("cluster", ""): {"Describe"}}, "the API writes impressions, nothing else"


def test_only_the_api_writes_impressions_and_ingest_reads_them():
    """An impression says what a user was shown: only the API's replicas (user streamrec-serving) may
    write one (a forged impression would skew attribution and experiments); only ingest reads them,
    in its consumer group."""
    impressions = streamrec_env()["STREAMREC_IMPRESSIONS_TOPIC"]
    ops = {u["metadata"]["name"]: acl_ops(u["metadata"]["name"]).get(("topic", impressions), set())
           for u in of_kind("KafkaUser")}
    assert {u for u, o in ops.items() if "Write" in o} == {"streamrec-serving"}
    assert {u for u, o in ops.items() if "Read" in o} == {"streamrec-ingest"}
    assert ops["streamrec-ingest"] == {"Read", "Describe"}, "ingest never writes impressions"
    assert not any("Delete" in o for o in ops.values()), "nobody deletes impressions: retention does"


def test_only_the_privacy_user_writes_the_forget_topic_and_ingest_reads_it():
    """A tombstone is a deletion order: only `streamrec forget` (user streamrec-privacy) may issue one.
    Every ingest pod reads all partitions with assign(), outside the group, so it needs Read on the
    topic and nothing on a group for it; nobody else reads it."""
    forget = streamrec_env()["STREAMREC_FORGET_TOPIC"]
    ops = {u["metadata"]["name"]: acl_ops(u["metadata"]["name"]).get(("topic", forget), set())
           for u in of_kind("KafkaUser")}
    assert {u for u, o in ops.items() if "Write" in o} == {"streamrec-privacy"}
    assert {u for u, o in ops.items() if "Read" in o} == {"streamrec-ingest"}
    assert ops["streamrec-ingest"] == {"Read", "Describe"}, "ingest never writes tombstones"


def test_the_forget_topic_keeps_every_tombstone():
    """Not compacted (Kafka drops null-value records and all but the newest per key there) and never
    deleted by age or size: a deleted tombstone would let a replay bring the user back."""
    forget = streamrec_env()["STREAMREC_FORGET_TOPIC"]
    (topic,) = [t for t in of_kind("KafkaTopic") if t["spec"]["topicName"] == forget]
    config = topic["spec"]["config"]
    assert config["cleanup.policy"] == "delete"
    assert int(config["retention.ms"]) == -1 and int(config["retention.bytes"]) == -1
    assert int(config["min.insync.replicas"]) >= 2 and topic["spec"]["replicas"] >= 3


def test_kafka_clients_log_in_with_their_user(endpoints):
    """Every pod that uses Kafka: SASL_SSL with SCRAM-SHA-512, a KafkaUser's name, the password
    from that user's Secret, the cluster CA from Strimzi's Secret, mounted where the setting says."""
    users = {u["metadata"]["name"] for u in of_kind("KafkaUser")}
    kafka_pods = {"ingest": "streamrec-ingest", "ingest-fresh": "streamrec-ingest", "features": "streamrec-ops",
                  "forget": "streamrec-privacy", "rotate-key": "streamrec-ops", "serve-worker": "streamrec-serving"}
    for ep, c in streamrec_containers(endpoints):
        env = env_of(c)
        if ep.name not in kafka_pods:
            assert "STREAMREC_KAFKA_SASL_PASSWORD" not in env, f"{ep.name} does not use Kafka"
            continue
        assert env["STREAMREC_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
        assert env["STREAMREC_KAFKA_SASL_MECHANISM"]["value"] == "SCRAM-SHA-512"
        user = env["STREAMREC_KAFKA_SASL_USERNAME"]["value"]
        assert user == kafka_pods[ep.name] and user in users
        assert env["STREAMREC_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": user, "key": "password"}
        cafile = env["STREAMREC_KAFKA_SSL_CAFILE"]["value"]
        mount = next(m for m in c["volumeMounts"] if cafile.startswith(m["mountPath"].rstrip("/") + "/"))
        volume = next(v for v in ep.template["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["secret"]["secretName"] == KAFKA_CA_SECRET
        assert cafile.endswith("/" + volume["secret"]["items"][0]["path"]) and volume["secret"]["items"][0]["key"] == "ca.crt"
    assert KAFKA_CA_SECRET in operator_secrets()


# --------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------


def test_no_redis_config_keeps_protected_mode_off():
    for cm in of_kind("ConfigMap"):
        for key, text in (cm.get("data") or {}).items():
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                assert words[:2] != ["protected-mode", "no"], f"ConfigMap {cm['metadata']['name']}/{key}: {line}"


@pytest.mark.parametrize("sts,key", [("redis", "password"), ("ray-gcs-redis", "gcs-password")])
def test_redis_requires_the_password_from_the_secret(sts, key):
    spec = pod_template(one("StatefulSet", sts))["spec"]
    redis = spec["containers"][0]
    assert redis["command"][0] == "redis-server" and redis["args"] == ["--requirepass", "$(REDIS_PASSWORD)"]
    for c in spec["containers"]:  # redis (and redis-cli in its probe) and the exporter
        env = env_of(c)
        for name in ("REDIS_PASSWORD",) + (("REDISCLI_AUTH",) if c is redis else ()):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": REDIS_SECRET, "key": key}, (sts, c["name"], name)
    assert spec.get("automountServiceAccountToken") is False
    secret = one("Secret", REDIS_SECRET)
    assert not secret.get("data") and not secret.get("stringData"), "never commit a password: patch it (README)"


def test_every_redis_client_has_the_password(endpoints):
    redis_clients = {"ingest", "ingest-fresh", "features", "rotate-key", "serve-head", "serve-worker"}
    for ep, c in streamrec_containers(endpoints):
        env = env_of(c)
        if ep.name in redis_clients:
            ref = env["STREAMREC_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": REDIS_SECRET, "key": "password"}, ep.name
        else:
            assert "STREAMREC_REDIS_PASSWORD" not in env, f"{ep.name} does not use Redis"
    assert "@" not in streamrec_env()["REDIS_URL"], "no password in the ConfigMap"
    (rs,) = [cr for cr in ray_crs() if cr["kind"] == "RayService"]
    gcs = ray_cluster(rs)["gcsFaultToleranceOptions"]["redisPassword"]["valueFrom"]["secretKeyRef"]
    assert gcs == {"name": REDIS_SECRET, "key": "gcs-password"}


# --------------------------------------------------------------------------------------------
# Ray token authentication, ServiceAccounts, the API's keys, the Ingress
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cr", ray_crs(), ids=lambda cr: cr["kind"])
def test_ray_clusters_use_token_auth(cr):
    cluster = ray_cluster(cr)
    assert cluster.get("authOptions", {}).get("mode") == "token", "the dashboard / Jobs API would be open"
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")[:2]) >= MIN_RAY_FOR_TOKEN_AUTH


# Pods on the streamrec image that need an API token: the trigger creates RayJobs, the serving
# head's autoscaler sidecar scales its worker group (with the ServiceAccount KubeRay makes).
TOKEN_PODS = {"trigger": "streamrec-train-trigger", "serve-head": None}


def test_streamrec_pods_have_their_own_service_account_without_token(endpoints):
    accounts = {sa["metadata"]["name"]: sa for sa in of_kind("ServiceAccount")}
    seen = set()
    for ep, _c in streamrec_containers(endpoints):
        spec = ep.template["spec"]
        if ep.name in TOKEN_PODS:
            assert spec.get("serviceAccountName") == TOKEN_PODS[ep.name], ep.name
            continue
        name = spec.get("serviceAccountName")
        assert name in accounts, f"{ep.name}: runs as {name!r}, not a ServiceAccount of the manifests"
        assert spec.get("automountServiceAccountToken") is False, f"{ep.name}: an API token is mounted"
        assert accounts[name].get("automountServiceAccountToken") is False, name
        seen.add((name, ep.labels["app.kubernetes.io/component"]))
    # dedicated: one ServiceAccount per component
    by_account: dict[str, set[str]] = {}
    for name, component in seen:
        by_account.setdefault(name, set()).add(component)
    assert all(len(v) == 1 for v in by_account.values()), by_account
    trigger = accounts["streamrec-train-trigger"]
    assert trigger.get("automountServiceAccountToken") is False, "only the trigger's pod mounts its token"


def test_the_api_refuses_to_start_without_keys():
    from streaming.settings import env_var_names

    assert "STREAMREC_REQUIRE_API_KEYS" in env_var_names().values()
    assert streamrec_env().get("STREAMREC_REQUIRE_API_KEYS") == "true"


def test_the_public_ingress_routes_only_the_api():
    ingresses = of_kind("Ingress")
    assert ingresses, "no Ingress in the manifests"
    for ing in ingresses:
        for rule in ing["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                p = path["path"]
                assert p in PUBLIC_PATHS, f"Ingress {ing['metadata']['name']}: {p} is not public"
                assert not any(i.startswith(p.rstrip("/") + "/") or i == p for i in INTERNAL_PATHS if p != "/")
                assert path["pathType"] in ("Exact", "Prefix")
                svc = path["backend"]["service"]
                assert svc == {"name": "streamrec-serve-svc", "port": {"number": 8000}}
        assert "defaultBackend" not in ing["spec"], "a default backend would route every other path"


def test_kustomization_includes_security():
    k = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    assert "security" in k["resources"]


@pytest.mark.parametrize("pod", ["ingest", "features", "serve-worker", "ingest-fresh", "forget", "rotate-key"])
def test_the_pods_settings_load_with_their_credentials(pod, endpoints, monkeypatch, tmp_path):
    """The ConfigMap plus the pod's own env (Secrets as placeholders, the CA file present) is a
    valid configuration: SASL without a user or TLS settings the code refuses would crash-loop."""
    from streaming.kafka_io import security_config
    from streaming.settings import env_var_names, load_settings

    for var in set(env_var_names().values()) | {"REDIS_URL", "KAFKA_BOOTSTRAP_SERVERS"}:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    for key, value in streamrec_env().items():
        monkeypatch.setenv(key, value)
    (ca := tmp_path / "ca.crt").write_text("placeholder", encoding="utf-8")
    (container,) = [c for e, c in streamrec_containers(endpoints) if e.name == pod]
    for name, e in env_of(container).items():
        if name.startswith("STREAMREC_") and name != "STREAMREC_API_KEYS":
            monkeypatch.setenv(name, e.get("value") or "from-a-secret")
    if "STREAMREC_KAFKA_SSL_CAFILE" in env_of(container):
        monkeypatch.setenv("STREAMREC_KAFKA_SSL_CAFILE", str(ca))
    settings = load_settings()
    assert settings.require_api_keys
    assert (settings.redis_password is not None) == ("STREAMREC_REDIS_PASSWORD" in env_of(container))
    if "STREAMREC_KAFKA_SASL_USERNAME" in env_of(container):
        config = security_config(settings)
        assert config["security_protocol"] == "SASL_SSL" and config["sasl_mechanism"] == "SCRAM-SHA-512"
