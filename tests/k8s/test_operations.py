"""The operational properties of k8s/ that an SRE review asked for, each checked on the manifests
(k8s/README.md explains each): Kafka pinned, spread, bounded on disk and exporting lag; the
consumer's session timeout paired with its poll interval; Redis memory exported; the serving
head fault tolerant with its own Redis and a disruption budget; serving autoscaled on workers
sized to their replicas; Ray's logs shipped to stdout.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from tests.test_k8s_manifests import (
    K8S_DIR,
    _broker_count,
    _kafka,
    _of_kind,
    _one,
    _pod_spec,
    _pod_template,
    _pods,
    _quantity,
    _ray_cluster,
    _ray_container,
    _ray_container_of,
    _ray_cpus,
    _ray_pods,
    _rayservice,
    _serve_app_config,
    _topics,
    _workloads,
    k8s_settings,  # noqa: F401  (the fixture)
)

CRD_DIR = Path(__file__).resolve().parents[1] / "data" / "crds"
STRIMZI_RELEASE = "strimzi-1.2.0"
# Kafka options Strimzi manages itself and rejects in spec.kafka.config (Strimzi 1.2.0,
# api/.../kafka/KafkaClusterSpec.java FORBIDDEN_PREFIXES / _EXCEPTIONS): the CRD schema cannot say so.
STRIMZI_FORBIDDEN_PREFIXES = (
    "listeners", "advertised.", "broker.", "listener.", "host.name", "port", "inter.broker.listener.name", "sasl.",
    "ssl.", "security.", "password.", "log.dir", "zookeeper.connect", "zookeeper.set.acl", "zookeeper.ssl",
    "zookeeper.clientCnxnSocket", "authorizer.", "super.user", "cruise.control.metrics.topic",
    "cruise.control.metrics.reporter.bootstrap.servers", "node.id", "process.roles", "controller.",
    "metadata.log.dir", "zookeeper.metadata.migration.enable", "client.quota.callback.static.kafka.admin.",
    "client.quota.callback.static.produce", "client.quota.callback.static.fetch",
    "client.quota.callback.static.storage.per.volume.limit.min.available.",
    "client.quota.callback.static.excluded.principal.name.list", "prometheus.metrics.reporter.", "cordoned.log.dirs",
)
STRIMZI_FORBIDDEN_EXCEPTIONS = {
    "zookeeper.connection.timeout.ms", "sasl.server.max.receive.size", "ssl.cipher.suites", "ssl.protocol",
    "ssl.enabled.protocols", "ssl.secure.random.implementation", "cruise.control.metrics.topic.num.partitions",
    "cruise.control.metrics.topic.replication.factor", "cruise.control.metrics.topic.retention.ms",
    "cruise.control.metrics.topic.auto.create.retries", "cruise.control.metrics.topic.auto.create.timeout.ms",
    "cruise.control.metrics.topic.min.insync.replicas", "broker.session.timeout.ms", "broker.heartbeat.interval.ms",
    "controller.socket.timeout.ms", "controller.quorum.election.backoff.max.ms",
    "controller.quorum.election.timeout.ms", "controller.quorum.fetch.timeout.ms",
}
# Kafka's broker defaults for the consumer-group session bounds
GROUP_MIN_SESSION_MS, GROUP_MAX_SESSION_MS = 6000, 1_800_000
DISK_SHARE = 0.75  # of a broker volume the delete-policy topics may fill (the rest: compacted topics, metadata)
# The forget topic keeps every tombstone forever (retention -1, k8s/kafka/topics.yaml): its size grows
# with the number of `streamrec forget` requests, a few hundred bytes each, not with time. Budgeted
# per broker at this much (a few million requests).
FORGET_TOPIC_ALLOWANCE = 2**30  # bytes
ZONE = "topology.kubernetes.io/zone"
HOST = "kubernetes.io/hostname"


# --------------------------------------------------------------------------------------------
# Kafka: version, placement, disk, metrics
# --------------------------------------------------------------------------------------------


def test_kafka_version_is_pinned_and_supported():
    kafka = _kafka()["spec"]["kafka"]
    assert kafka.get("version"), "pin spec.kafka.version: upgrades happen when it changes, not with the operator"
    versions = yaml.safe_load((CRD_DIR / STRIMZI_RELEASE / "kafka-versions.yaml").read_text(encoding="utf-8"))
    entry = next((v for v in versions if v["version"] == kafka["version"]), None)
    assert entry and entry["supported"], f"Kafka {kafka['version']} is not supported by {STRIMZI_RELEASE}"
    assert kafka.get("metadataVersion") == entry["metadata"], (
        f"metadataVersion {kafka.get('metadataVersion')!r}: Kafka {kafka['version']}'s is {entry['metadata']!r}"
    )


def test_kafka_config_avoids_options_strimzi_manages():
    for key in _kafka()["spec"]["kafka"].get("config", {}):
        assert key in STRIMZI_FORBIDDEN_EXCEPTIONS or not key.startswith(STRIMZI_FORBIDDEN_PREFIXES), (
            f"spec.kafka.config.{key}: Strimzi manages it and refuses the Kafka resource"
        )


def test_brokers_one_per_node_and_spread_over_zones():
    for pool in _of_kind("KafkaNodePool"):
        pod = pool["spec"]["template"]["pod"]
        labels = {"strimzi.io/cluster": pool["metadata"]["labels"]["strimzi.io/cluster"],
                  "strimzi.io/pool-name": pool["metadata"]["name"]}
        required = pod.get("affinity", {}).get("podAntiAffinity", {}).get(
            "requiredDuringSchedulingIgnoredDuringExecution", [])
        assert any(t["topologyKey"] == HOST and t["labelSelector"]["matchLabels"].items() <= labels.items()
                   for t in required), f"{pool['metadata']['name']}: two brokers must never share a node (required)"
        spread = [c for c in pod.get("topologySpreadConstraints", []) if c["topologyKey"] == ZONE]
        assert spread and spread[0]["labelSelector"]["matchLabels"].items() <= labels.items(), (
            f"{pool['metadata']['name']}: spread the brokers over zones (made required by components/zones)"
        )
        # soft in the base: a zone constraint that is required would leave every broker Pending on
        # a cluster whose nodes have no zone label
        assert spread[0]["whenUnsatisfiable"] == "ScheduleAnyway"
        assert pool["spec"]["replicas"] >= 3


def test_kafka_exports_metrics_and_consumer_lag(k8s_settings):  # noqa: F811
    spec = _kafka()["spec"]
    assert spec["kafka"].get("metricsConfig", {}).get("type"), "brokers export no metrics (metricsConfig)"
    exporter = spec.get("kafkaExporter")
    assert exporter is not None, "no Kafka Exporter: consumer lag would not exist as a metric"
    assert re.fullmatch(exporter.get("groupRegex", ".*"), k8s_settings.consumer_group), "ingest's group is not exported"
    for topic in _topics():
        assert re.fullmatch(exporter.get("topicRegex", ".*"), topic), f"topic {topic} is not exported"


def test_topics_fit_on_the_broker_volumes(k8s_settings):  # noqa: F811
    """Kafka deletes closed segments only, so a delete-policy partition holds up to retention.bytes
    + segment.bytes; with every broker holding replicas/brokers of all partitions, that must fit in
    DISK_SHARE of a broker's volume. The forget topic, never deleted, counts with its allowance."""
    brokers = _broker_count()
    config = _kafka()["spec"]["kafka"]["config"]
    assert int(config.get("log.retention.bytes", -1)) > 0, "bound topics created outside topics.yaml too"
    default_segment = int(config.get("log.segment.bytes", 2**30))
    per_broker = 0.0
    for name, t in _topics().items():
        cfg = t["spec"].get("config", {})
        if "delete" not in str(cfg.get("cleanup.policy", "delete")):
            continue
        if name == k8s_settings.forget_topic:
            per_broker += FORGET_TOPIC_ALLOWANCE
            continue
        assert int(cfg.get("retention.bytes", -1)) > 0, f"{name}: set retention.bytes (the volume must not fill)"
        partition = int(cfg["retention.bytes"]) + int(cfg.get("segment.bytes", default_segment))
        per_broker += t["spec"]["partitions"] * t["spec"]["replicas"] / brokers * partition
    for pool in _of_kind("KafkaNodePool"):
        storage = pool["spec"]["storage"]
        volumes = storage["volumes"] if storage["type"] == "jbod" else [storage]
        size = sum(_quantity(v["size"]) for v in volumes if v["type"] == "persistent-claim")
        assert per_broker <= DISK_SHARE * size, (
            f"{pool['metadata']['name']}: topics may hold {per_broker / 2**30:.1f} GiB per broker, "
            f"more than {DISK_SHARE:.0%} of {size / 2**30:.0f} GiB"
        )


# --------------------------------------------------------------------------------------------
# the consumer's timeouts (kafka-python's rules)
# --------------------------------------------------------------------------------------------


def test_consumer_session_timeout_pairs_with_the_poll_interval(k8s_settings):  # noqa: F811
    s = k8s_settings
    config = _kafka()["spec"]["kafka"]["config"]
    low = int(config.get("group.min.session.timeout.ms", GROUP_MIN_SESSION_MS))
    high = int(config.get("group.max.session.timeout.ms", GROUP_MAX_SESSION_MS))
    assert low <= s.session_timeout_ms <= high, "the brokers refuse a session timeout outside their group bounds"
    assert s.session_timeout_ms > low, (
        "at the brokers' minimum a CPU-throttled or GC-paused pod misses its session and rebalances the group"
    )
    # kafka-python: heartbeat_interval_ms < session_timeout_ms, and should be <= a third of it.
    # streamrec heartbeats every min(its constant, session/3) (streaming/kafka_io.py)
    from streaming import kafka_io

    heartbeat = min(getattr(kafka_io, "HEARTBEAT_INTERVAL_MS", 3000), s.session_timeout_ms // 3)
    assert 3 * heartbeat <= s.session_timeout_ms
    # max.poll.interval bounds a poll-process-flush round (the hang detector); the session
    # timeout detects dead pods and must not be the looser of the two
    assert s.session_timeout_ms <= s.max_poll_interval_ms


# --------------------------------------------------------------------------------------------
# Redis: memory exported, bounded
# --------------------------------------------------------------------------------------------


def _redis_statefulsets() -> list[dict]:
    return [w for w in _workloads() if w["kind"] == "StatefulSet"
            and re.search(r"(^|/)(redis|valkey)[:@]", _pod_spec(w)["containers"][0]["image"])]


def _conf_of(sts: dict) -> dict[str, str]:
    spec = _pod_spec(sts)
    c = spec["containers"][0]
    path = c["command"][-1]
    mount = next(m for m in c["volumeMounts"] if path.startswith(m["mountPath"].rstrip("/") + "/"))
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    text = _one("ConfigMap", volume["configMap"]["name"])["data"][path[len(mount["mountPath"].rstrip("/")) + 1:]]
    return {k.lower(): v.strip() for k, _, v in (line.strip().partition(" ") for line in text.splitlines()
                                                 if line.strip() and not line.strip().startswith("#"))}


def test_every_redis_exports_its_memory():
    """The Redis memory alert (k8s/README.md, "Redis") needs redis_memory_used_bytes and
    redis_memory_max_bytes: a redis_exporter next to each Redis, scraped on its metrics port."""
    found = _redis_statefulsets()
    assert {w["metadata"]["name"] for w in found} >= {"redis", "ray-gcs-redis"}
    for sts in found:
        spec = _pod_spec(sts)
        exporters = [c for c in spec["containers"] if "redis_exporter" in c["image"]]
        assert exporters, f"StatefulSet {sts['metadata']['name']}: no redis_exporter"
        env = {e["name"]: e.get("value") for e in exporters[0].get("env", [])}
        port = spec["containers"][0]["ports"][0]["containerPort"]
        assert env.get("REDIS_ADDR") == f"redis://localhost:{port}"
        metrics = {p["name"]: p["containerPort"] for p in exporters[0]["ports"]}.get("metrics")
        ann = _pod_template(sts)["metadata"].get("annotations", {})
        assert ann.get("prometheus.io/scrape") == "true" and int(ann["prometheus.io/port"]) == metrics


def test_every_redis_bounds_its_memory_below_its_limit():
    for sts in _redis_statefulsets():
        conf = _conf_of(sts)
        limit = _quantity(_pod_spec(sts)["containers"][0]["resources"]["limits"]["memory"])
        maxmemory = _quantity(conf["maxmemory"].replace("gb", "Gi").replace("mb", "Mi"))
        assert conf.get("maxmemory-policy") == "noeviction", f"{sts['metadata']['name']}: never evict state"
        assert conf.get("appendonly") == "yes"
        assert maxmemory <= 0.7 * limit, f"{sts['metadata']['name']}: leave room for the AOF-rewrite fork"


# --------------------------------------------------------------------------------------------
# serving: head fault tolerance, disruption budgets
# --------------------------------------------------------------------------------------------


def test_serving_head_is_fault_tolerant_with_its_own_redis(k8s_settings):  # noqa: F811
    cluster = _ray_cluster(_rayservice())
    ft = cluster.get("gcsFaultToleranceOptions")
    assert ft, "without GCS fault tolerance, losing the head pod takes the whole API down"
    host, port = ft["redisAddress"].removeprefix("redis://").rsplit(":", 1)
    name, ns, *rest = host.split(".")
    assert rest in ([], ["svc"], ["svc", "cluster", "local"]) and ns == _rayservice()["metadata"]["namespace"]
    svc = _one("Service", name)
    assert int(port) in {p["port"] for p in svc["spec"]["ports"]}
    online = k8s_settings.redis_url.split("//")[1].split(".")[0]
    assert name != online, "the GCS needs its own Redis, not the online store (REDIS_URL)"
    targets = [w for w in _redis_statefulsets() if svc["spec"]["selector"].items() <= _pod_template(w)["metadata"]["labels"].items()]
    assert len(targets) == 1, f"Service {name} must select exactly one Redis StatefulSet"
    # KubeRay 1.7.0's validation (controllers/ray/utils/validation.go): the operator sets these itself
    head = cluster["headGroupSpec"]
    assert "redis-password" not in head["rayStartParams"]
    env = {e["name"] for e in _ray_container_of(head).get("env", [])}
    assert not env & {"RAY_REDIS_ADDRESS", "REDIS_PASSWORD"}
    assert "ray.io/external-storage-namespace" not in _rayservice()["metadata"].get("annotations", {}), (
        "KubeRay keys each cluster's GCS state by its UID: the clusters of an upgrade must not share it"
    )
    assert "externalStorageNamespace" not in ft


def test_serving_head_has_a_disruption_budget():
    head = [p for p in _ray_pods("RayService") if p.role == "ray-head"]
    budgets = [b for b in _of_kind("PodDisruptionBudget")
               if any(b["spec"]["selector"]["matchLabels"].items() <= p.labels.items() for p in head)]
    assert len(budgets) == 1, "one PodDisruptionBudget for the serving head"
    spec = budgets[0]["spec"]
    assert spec.get("minAvailable") == 1 or spec.get("maxUnavailable") == 0, "the head is moved by hand, not evicted"
    others = [p.owner for p in _pods() if p not in head and spec["selector"]["matchLabels"].items() <= p.labels.items()]
    assert not others, f"the head's budget also selects {others}"


# --------------------------------------------------------------------------------------------
# serving: autoscaling on workers sized to their replicas
# --------------------------------------------------------------------------------------------


def _api():
    from services import serve_app

    return serve_app.Api


def test_serving_autoscales():
    cluster = _ray_cluster(_rayservice())
    groups = cluster["workerGroupSpecs"]
    if any(g["maxReplicas"] > g["minReplicas"] for g in groups):
        assert cluster.get("enableInTreeAutoscaling") is True, "maxReplicas does nothing without the Ray autoscaler"
    if any("idleTimeoutSeconds" in g for g in groups):  # KubeRay 1.7.0 validation
        assert cluster.get("autoscalerOptions", {}).get("version") == "v2"
    api_cfg = next(d for d in _serve_app_config()["deployments"] if d["name"] == "Api")
    scaling = api_cfg.get("autoscaling_config")
    assert scaling, "Serve must autoscale `Api` (a fixed num_replicas ignores load)"
    assert api_cfg.get("num_replicas") in ("auto", None)
    per_replica = float(_api().ray_actor_options["num_cpus"])
    low = sum(g["minReplicas"] * _ray_cpus(g) for g in groups) / per_replica
    high = sum(g["maxReplicas"] * _ray_cpus(g) for g in groups) / per_replica
    assert scaling["min_replicas"] == low, f"min_replicas {scaling['min_replicas']}: the minimum workers hold {low:g}"
    assert scaling["max_replicas"] == high, f"max_replicas {scaling['max_replicas']}: the most workers hold {high:g}"
    assert scaling["min_replicas"] <= scaling.get("initial_replicas", scaling["min_replicas"]) <= scaling["max_replicas"]
    target = scaling.get("target_ongoing_requests", 2)
    assert 0 < target < _api().max_ongoing_requests, "a replica must be able to hold more than the target"
    assert scaling.get("upscale_delay_s", 30) < scaling.get("downscale_delay_s", 600)


def test_serving_workers_are_sized_to_their_replicas():
    """A replica is one Python process, bound to about one core; the node's Serve proxy, raylet
    and metrics agent take one more. So a worker whose Ray CPUs hold R replicas gets R + 1
    cores, requested = limited (k8s/README.md, "Scaling")."""
    per_replica = float(_api().ray_actor_options["num_cpus"])
    for g in _ray_cluster(_rayservice())["workerGroupSpecs"]:
        replicas = _ray_cpus(g) / per_replica
        assert replicas == int(replicas) >= 1, f"{g['groupName']}: Ray CPUs must hold whole replicas"
        res = _ray_container_of(g)["resources"]
        assert _quantity(res["requests"]["cpu"]) == _quantity(res["limits"]["cpu"]) == replicas + 1, (
            f"{g['groupName']}: {replicas:g} replicas per worker need {replicas + 1:g} cores, not {res['limits']['cpu']}"
        )
        assert not g.get("resources") or "num-cpus" not in g["rayStartParams"], "KubeRay: not both"


# --------------------------------------------------------------------------------------------
# Ray logs: shipped to stdout
# --------------------------------------------------------------------------------------------


def _shipper_config() -> dict:
    cm = _one("ConfigMap", "ray-log-shipper")
    (text,) = cm["data"].values()
    return yaml.safe_load(text)


def test_ray_logs_go_to_stdout():
    """Ray writes its logs to files under /tmp/ray; a sidecar in every Ray pod (serving and the
    training template) tails them onto its stdout, where the cluster's log collector takes them."""
    config = _shipper_config()
    inputs, outputs = config["pipeline"]["inputs"], config["pipeline"]["outputs"]
    assert all(i["name"] == "tail" and all(p.startswith("/tmp/ray/session_latest/logs/") for p in i["path"].split(","))
               for i in inputs)
    assert [o["name"] for o in outputs] == ["stdout"]
    (config_file,) = _one("ConfigMap", "ray-log-shipper")["data"]
    for pod in _ray_pods():
        ray = _ray_container(pod)
        volumes = {v["name"]: v for v in pod.spec["volumes"]}
        logs = next((m["name"] for m in ray["volumeMounts"] if m["mountPath"] == "/tmp/ray"), None)
        assert logs, f"{pod.owner}: mount a volume at /tmp/ray (KubeRay would add an unbounded one)"
        assert volumes[logs].get("emptyDir", {}).get("sizeLimit"), f"{pod.owner}: bound the log volume"
        env = {e["name"] for e in ray.get("env", [])}
        assert {"RAY_ROTATION_MAX_BYTES", "RAY_ROTATION_BACKUP_COUNT"} <= env, f"{pod.owner}: rotate Ray's logs"
        shippers = [c for c in pod.spec["containers"][1:]
                    if any(m["name"] == logs and m["mountPath"] == "/tmp/ray" and m.get("readOnly")
                           for m in c.get("volumeMounts", []))]
        assert len(shippers) == 1, f"{pod.owner}: no log sidecar reads the Ray logs"
        shipper = shippers[0]
        conf_path = shipper["command"][shipper["command"].index("-c") + 1]
        mount = next(m for m in shipper["volumeMounts"] if conf_path == f"{m['mountPath'].rstrip('/')}/{config_file}")
        assert volumes[mount["name"]]["configMap"]["name"] == "ray-log-shipper", f"{pod.owner}: shipper config"
