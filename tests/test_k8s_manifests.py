"""The Kubernetes manifests in k8s/: they parse, validate, and agree with the code.

Fast and offline: no cluster, no network. Built-in kinds are validated against the pinned
Kubernetes version's schemas (kubernetes-validate, strict: unknown fields fail); Strimzi's and
KubeRay's custom resources against the CRD schemas of the pinned operator releases
(tests/k8s/test_crd_schemas.py, CRDs vendored in tests/data/crds/), and the pod templates and
Service inside the KubeRay ones also as built-in objects. The consistency tests catch drift
between the manifests and streamrec itself: env var names, topic names and sizes, service
addresses, mount paths, CLI commands, the Ray Serve application (import path, deployments,
user_config, routes, port) and the training entrypoint against the GPUs it gets.

What `kubectl apply -k k8s/` creates is read here without kubectl: the YAML files the
kustomizations list, plus the ConfigMaps their `configMapGenerator`s make (named without the
content hash kustomize appends). Files that are generator inputs are not objects; the one that
is a RayJob (k8s/training/train-rayjob.yaml, the template the training CronJob creates runs
from) is checked like a KubeRay resource (TEMPLATES). With kubectl installed, the real
kustomize render is compared with this reading.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlparse

import pytest
import yaml
from typer.testing import CliRunner

from services.cli import app
from streaming.settings import Settings, env_var_names, load_settings

K8S_DIR = Path(__file__).resolve().parents[1] / "k8s"
K8S_VERSION = "1.31"  # oldest Kubernetes the manifests must be valid for
STRIMZI_API = "kafka.strimzi.io/v1"  # Strimzi 1.x serves only v1 (k8s/README.md pins 1.2.0)
KUBERAY_API = "ray.io/v1"
MONITORING_API = "monitoring.coreos.com/v1"  # Prometheus Operator (k8s/monitoring/; CRDs vendored too)
KUSTOMIZE_API = "kustomize.config.k8s.io/v1beta1"
KUSTOMIZE_GROUP = "kustomize.config.k8s.io"  # Kustomization (v1beta1) and Component (v1alpha1)
# API groups validated with kubernetes-validate ("" is the core group).
BUILTIN_GROUPS = {"", "apps", "batch", "policy", "rbac.authorization.k8s.io", "networking.k8s.io"}
CLUSTER_SCOPED_KINDS = {"Namespace"}
STREAMREC_IMAGE = "ghcr.io/streamrec/streamrec"
DATA_CLAIM = "streamrec-data"
API_KEYS_VAR = "STREAMREC_API_KEYS"
GPU = "nvidia.com/gpu"
DAY_MS = 86_400_000


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


# YAML under k8s/ that is neither a manifest nor a kustomize input: promtool's unit tests of the
# alert rules (tests/k8s/test_monitoring.py runs them).
NOT_MANIFESTS = {K8S_DIR / "monitoring" / "tests"}


def _yaml_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file()
                  and not any(d in p.parents for d in NOT_MANIFESTS))


def _load_yaml(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def _kustomizations() -> list[tuple[Path, dict]]:
    """Every kustomization.yaml under k8s/ (Kustomizations and Components)."""
    return [(p, _load_yaml(p)[0]) for p in sorted(K8S_DIR.rglob("kustomization.yaml"))]


def _generator_source(directory: Path, entry: str) -> tuple[str, Path]:
    """A configMapGenerator `files:` entry ("key=path" or "path") as (data key, file)."""
    key, _, src = entry.rpartition("=")
    return key or Path(src).name, directory / src


def _read_env_file(path: Path) -> dict[str, str]:
    """kustomize's env-file format: KEY=VALUE lines; blank lines and `#` lines are skipped."""
    data = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path}:{n}: not KEY=VALUE: {line!r}"
        assert key not in data, f"{path}:{n}: {key} set twice"
        data[key] = value
    return data


def _kustomize_inputs() -> set[Path]:
    """Files kustomize reads as inputs, not as manifests: generator sources, configurations."""
    inputs = set()
    for kfile, k in _kustomizations():
        for gen in k.get("configMapGenerator", []) + k.get("secretGenerator", []):
            inputs |= {(kfile.parent / e).resolve() for e in gen.get("envs", [])}
            inputs |= {_generator_source(kfile.parent, e)[1].resolve() for e in gen.get("files", [])}
        inputs |= {(kfile.parent / c).resolve() for c in k.get("configurations", [])}
        inputs |= {(kfile.parent / p["path"]).resolve() for p in k.get("patches", []) if "path" in p}
    return inputs


def _generated_configmaps() -> list[tuple[Path, dict]]:
    """The ConfigMaps the configMapGenerators make, named as written (kustomize adds -<hash>)."""
    out = []
    for kfile, k in _kustomizations():
        assert not k.get("secretGenerator"), "add secretGenerator support to this test"
        for gen in k.get("configMapGenerator", []):
            data: dict[str, str] = {}
            for e in gen.get("envs", []):
                data.update(_read_env_file(kfile.parent / e))
            for e in gen.get("files", []):
                key, src = _generator_source(kfile.parent, e)
                data[key] = src.read_text(encoding="utf-8")
            for lit in gen.get("literals", []):
                key, _, value = lit.partition("=")
                data[key] = value
            meta = {"name": gen["name"], "namespace": gen.get("namespace", k.get("namespace")),
                    "labels": dict(gen.get("options", {}).get("labels", {}))}
            out.append((kfile, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}))
    return out


_INPUTS = _kustomize_inputs()
DOCS = [(p, d) for p in _yaml_files() if p.resolve() not in _INPUTS for d in _load_yaml(p)]
GENERATED = _generated_configmaps()
GENERATED_NAMES = {d["metadata"]["name"] for _, d in GENERATED}
# Generated without a content hash (`disableNameSuffixHash`): only for ConfigMaps no pod uses
# (the Grafana dashboard, which a hashed name would duplicate); test_pods_use_only_generated_configmaps
# keeps pods off them.
UNHASHED_NAMES = {g["name"] for _, k in _kustomizations() for g in k.get("configMapGenerator", [])
                  if g.get("options", {}).get("disableNameSuffixHash")}
OBJECTS = [(p, d) for p, d in DOCS if not str(d.get("apiVersion", "")).startswith(KUSTOMIZE_GROUP)] + GENERATED
# Generator inputs that are RayJobs: templates of runs, created by the training trigger.
TEMPLATES = [(p, d) for p in sorted(_INPUTS) if p.suffix in (".yaml", ".yml")
             for d in _load_yaml(p) if isinstance(d, dict) and d.get("kind") == "RayJob"]


def _name(doc: dict) -> str:
    meta = doc.get("metadata", {})
    return meta.get("name") or meta.get("generateName", "")


def _id(item: tuple[Path, dict]) -> str:
    path, doc = item
    return f"{path.relative_to(K8S_DIR)}:{doc.get('kind')}/{_name(doc)}"


def _group(doc: dict) -> str:
    api = doc["apiVersion"]
    return api.split("/", 1)[0] if "/" in api else ""


def _of_kind(kind: str, api: str | None = None) -> list[dict]:
    return [d for _, d in OBJECTS if d["kind"] == kind and (api is None or d["apiVersion"] == api)]


def _one(kind: str, name: str | None = None) -> dict:
    found = [d for d in _of_kind(kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _pod_template(workload: dict) -> dict:
    if workload["kind"] == "CronJob":
        return workload["spec"]["jobTemplate"]["spec"]["template"]
    return workload["spec"]["template"]


def _pod_spec(workload: dict) -> dict:
    return _pod_template(workload)["spec"]


def _pod_labels(workload: dict) -> dict:
    return _pod_template(workload)["metadata"]["labels"]


def _workloads() -> list[dict]:
    return [d for _, d in OBJECTS if d["kind"] in ("Deployment", "StatefulSet", "CronJob", "Job")]


def _ray_crs(kind: str | None = None) -> list[dict]:
    """The KubeRay resources: the applied ones and the RayJob templates."""
    return [d for _, d in OBJECTS + TEMPLATES
            if d["apiVersion"] == KUBERAY_API and (kind is None or d["kind"] == kind)]


def _ray_cluster(cr: dict) -> dict:
    """The RayClusterSpec of a RayService (rayClusterConfig) or RayJob (rayClusterSpec)."""
    return cr["spec"]["rayClusterConfig" if cr["kind"] == "RayService" else "rayClusterSpec"]


class Pod(NamedTuple):
    """A pod the manifests make: a workload's template, a Ray group's template or a RayJob submitter."""

    owner: str  # "Deployment/streamrec-ingest", "RayService/streamrec:serve", ...
    role: str  # "workload" | "ray-head" | "ray-worker" | "submitter"
    template: dict  # the pod template as written (metadata + spec)
    labels: dict  # as the pods get them (for Ray pods: plus the ray.io/ labels KubeRay adds)
    cr: dict | None = None  # the KubeRay resource of a Ray pod or submitter
    group: dict | None = None  # the Ray group (headGroupSpec or a workerGroupSpec) of a Ray pod

    @property
    def spec(self) -> dict:
        return self.template["spec"]


def _pods() -> list[Pod]:
    pods = [Pod(f"{w['kind']}/{w['metadata']['name']}", "workload", _pod_template(w), _pod_labels(w))
            for w in _workloads()]
    for cr in _ray_crs():
        name = f"{cr['kind']}/{_name(cr)}"
        cluster = _ray_cluster(cr)
        groups = [("head", "ray-head", "headgroup", cluster["headGroupSpec"])]
        groups += [(g["groupName"], "ray-worker", g["groupName"], g) for g in cluster.get("workerGroupSpecs", [])]
        for suffix, role, group_label, group in groups:
            labels = {**group["template"].get("metadata", {}).get("labels", {}),
                      "ray.io/node-type": role.removeprefix("ray-"), "ray.io/group": group_label}
            pods.append(Pod(f"{name}:{suffix}", role, group["template"], labels, cr, group))
        sub = cr["spec"].get("submitterPodTemplate")
        if sub:
            pods.append(Pod(f"{name}:submitter", "submitter", sub, sub.get("metadata", {}).get("labels", {}), cr))
    return pods


def _ray_pods(kind: str | None = None) -> list[Pod]:
    return [p for p in _pods() if p.role in ("ray-head", "ray-worker") and (kind is None or p.cr["kind"] == kind)]


def _streamrec_containers() -> list[tuple[Pod, dict]]:
    """(pod, container) for every container running the streamrec image."""
    return [(p, c) for p in _pods() for c in p.spec.get("containers", [])
            if c["image"].split(":")[0] == STREAMREC_IMAGE]


def _quantity(value: str | int | float) -> float:
    """A Kubernetes quantity ("8Gi", "1536Mi", "500m", 4) as a number (bytes or cores)."""
    m = re.fullmatch(r"([0-9.]+)(m|k|Ki|M|Mi|G|Gi|T|Ti)?", str(value))
    assert m, f"cannot read quantity {value!r}"
    scale = {None: 1, "m": 1e-3, "k": 1e3, "Ki": 2**10, "M": 1e6, "Mi": 2**20, "G": 1e9, "Gi": 2**30,
             "T": 1e12, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * scale


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
    for path, doc in DOCS + TEMPLATES:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
        assert doc.get("apiVersion") and doc.get("kind"), f"{path}: apiVersion and kind are required"
        if not doc["apiVersion"].startswith(KUSTOMIZE_GROUP) and (path, doc) not in TEMPLATES:
            assert doc.get("metadata", {}).get("name"), f"{path}: {doc['kind']} without metadata.name"
    for path, doc in TEMPLATES:
        assert doc["metadata"].get("generateName") and not doc["metadata"].get("name"), (
            f"{path}: a run template has generateName (one object per run), not a name"
        )


def test_object_names_are_unique():
    seen = set()
    for path, doc in OBJECTS:
        key = (doc["apiVersion"].split("/")[0], doc["kind"], doc["metadata"].get("namespace"), doc["metadata"]["name"])
        assert key not in seen, f"{path}: duplicate {key}"
        seen.add(key)


def _k8s_validate(doc: dict, what: str) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    problem = None
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:  # its str() dumps the whole schema
        problem = f"at {'/'.join(str(x) for x in exc.absolute_path) or '(top)'}: {exc.message}"
    if problem:
        pytest.fail(f"{what} is not a valid Kubernetes {K8S_VERSION} object {problem}")


@pytest.mark.parametrize("item", [o for o in OBJECTS if _group(o[1]) in BUILTIN_GROUPS], ids=_id)
def test_builtin_objects_validate(item):
    _k8s_validate(item[1], _id(item))


def test_only_known_api_groups():
    """A kind outside the validated groups, Strimzi and KubeRay would escape every check here."""
    for path, doc in OBJECTS + TEMPLATES:
        assert _group(doc) in BUILTIN_GROUPS or doc["apiVersion"] in (STRIMZI_API, KUBERAY_API, MONITORING_API), (
            f"{_id((path, doc))}: add a check for {doc['apiVersion']} to this test"
        )
        if _group(doc) == "ray.io":
            assert doc["kind"] in ("RayService", "RayJob"), f"{_id((path, doc))}: add a check for {doc['kind']}"


def test_namespaced_objects_live_in_the_namespace():
    ns = _namespace()
    for path, doc in OBJECTS + TEMPLATES:
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
        assert any(sel.items() <= p.labels.items() for p in _pods() if p.role != "submitter"), (
            f"PodDisruptionBudget {pdb['metadata']['name']} selects no pods"
        )
    for svc in _of_kind("Service"):
        sel = svc["spec"]["selector"]
        assert any(sel.items() <= _pod_labels(w).items() for w in _workloads()), (
            f"Service {svc['metadata']['name']} selects no pods"
        )


def operator_secrets() -> set[str]:
    """Secrets an operator makes: Strimzi's cluster CA certificate and one per KafkaUser (its password)."""
    return ({f"{k['metadata']['name']}-cluster-ca-cert" for k in _of_kind("Kafka")}
            | {u["metadata"]["name"] for u in _of_kind("KafkaUser")})


def test_pod_volumes_and_claims_resolve():
    claims = {p["metadata"]["name"] for p in _of_kind("PersistentVolumeClaim")}
    configmaps = {c["metadata"]["name"] for c in _of_kind("ConfigMap")}
    secrets = {s["metadata"]["name"] for s in _of_kind("Secret")} | operator_secrets()
    templates_of = {f"{w['kind']}/{w['metadata']['name']}": w["spec"].get("volumeClaimTemplates", [])
                    for w in _workloads()}
    for pod in _pods():
        volumes = {v["name"]: v for v in pod.spec.get("volumes", [])}
        templates = {t["metadata"]["name"] for t in templates_of.get(pod.owner, [])}
        for v in volumes.values():
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{pod.owner}: unknown claim"
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, f"{pod.owner}: unknown ConfigMap"
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, f"{pod.owner}: unknown Secret"
        for c in pod.spec["containers"]:
            for m in c.get("volumeMounts", []):
                assert m["name"] in volumes or m["name"] in templates, (
                    f"{pod.owner}/{c['name']}: mount {m['name']!r} has no volume"
                )
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    assert ref["configMapRef"]["name"] in configmaps
                if "secretRef" in ref:
                    assert ref["secretRef"]["name"] in secrets
            for e in c.get("env", []):
                if "secretKeyRef" in e.get("valueFrom", {}):
                    assert e["valueFrom"]["secretKeyRef"]["name"] in secrets, f"{pod.owner}/{c['name']}: unknown Secret"
                if "configMapKeyRef" in e.get("valueFrom", {}):
                    assert e["valueFrom"]["configMapKeyRef"]["name"] in configmaps
            assert c.get("resources", {}).get("requests") and c["resources"].get("limits", {}).get("memory"), (
                f"{pod.owner}/{c['name']}: resource requests and a memory limit are required"
            )


# --------------------------------------------------------------------------------------------
# kustomize
# --------------------------------------------------------------------------------------------


def _kustomization_tree(directory: Path) -> set[Path]:
    """The manifest files reachable from directory/kustomization.yaml (asserting each exists),
    generator inputs included."""
    kfile = directory / "kustomization.yaml"
    assert kfile.is_file(), f"{directory} is listed as a resource but has no kustomization.yaml"
    k = yaml.safe_load(kfile.read_text(encoding="utf-8"))
    assert k["apiVersion"] == KUSTOMIZE_API and k["kind"] == "Kustomization"
    files: set[Path] = set()
    for entry in k.get("resources", []):
        target = (directory / entry).resolve()
        assert target.exists(), f"{kfile}: resource {entry!r} does not exist"
        files |= _kustomization_tree(target) if target.is_dir() else {target}
    for gen in k.get("configMapGenerator", []):
        for e in gen.get("envs", []) + gen.get("files", []):
            src = _generator_source(directory, e)[1] if e in gen.get("files", []) else directory / e
            assert src.is_file(), f"{kfile}: generator {gen['name']} reads {e!r}, which does not exist"
            files.add(src.resolve())
    for c in k.get("configurations", []):
        assert (directory / c).is_file(), f"{kfile}: configuration {c!r} does not exist"
        files.add((directory / c).resolve())
    return files


def test_kustomization_lists_every_manifest():
    listed = _kustomization_tree(K8S_DIR)
    # Components are used from overlays (k8s/README.md), not by k8s/ itself.
    components = {p.parent for p, k in _kustomizations() if k["kind"] == "Component"}
    manifests = {p.resolve() for p in _yaml_files()
                 if p.name != "kustomization.yaml" and not any(c in p.parents for c in components)}
    assert manifests - listed == set(), "manifests no kustomization.yaml lists (kubectl apply -k skips them)"
    assert listed - _INPUTS <= manifests


def test_kustomize_images_name_the_images_used():
    k = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text(encoding="utf-8"))
    names = {i["name"] for i in k.get("images", [])}
    assert STREAMREC_IMAGE in names, "the streamrec image must be overridable with kustomize `images:`"
    used = {c["image"].split(":")[0] for p in _pods() for c in p.spec["containers"]}
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
    assert sorted(map(_render_key, rendered)) == sorted((d["kind"], d["metadata"]["name"]) for _, d in OBJECTS)
    # the generated ConfigMaps' data is what this test reads from the generator inputs
    generated = {d["metadata"]["name"]: d for _, d in GENERATED}
    for d in rendered:
        kind, name = _render_key(d)
        if kind == "ConfigMap" and name in generated:
            if name not in UNHASHED_NAMES:
                assert d["metadata"]["name"] != name, f"{name}: generated without a content hash"
            assert d.get("data") == generated[name]["data"], f"ConfigMap {name}: read differently here"


def _render_key(doc: dict) -> tuple[str, str]:
    """(kind, name) with kustomize's content-hash suffix taken off a generated ConfigMap's name."""
    name = doc["metadata"]["name"]
    base = re.sub(r"-[a-z0-9]{10}$", "", name)
    return doc["kind"], base if doc["kind"] == "ConfigMap" and base in GENERATED_NAMES else name


def _configmap_refs(node) -> list[str]:
    """Every ConfigMap name a pod template anywhere in a rendered object refers to."""
    if isinstance(node, list):
        return [r for x in node for r in _configmap_refs(x)]
    if not isinstance(node, dict):
        return []
    found = [v["configMap"]["name"] for v in node.get("volumes") or [] if isinstance(v, dict) and "configMap" in v]
    for c in (node.get("containers") or []) + (node.get("initContainers") or []):
        found += [e["configMapRef"]["name"] for e in c.get("envFrom", []) if "configMapRef" in e]
    return found + [r for v in node.values() for r in _configmap_refs(v)]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_gives_every_pod_the_hashed_configmaps():
    """Config edits reach pods evenly: each ConfigMap a pod uses is generated with a content hash
    and every reference is rewritten to it, the RayService's nested pod templates included
    (k8s/kustomizeconfig.yaml), so a changed setting changes the pod templates and rolls them."""
    out = subprocess.run(["kubectl", "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    rendered = [d for d in yaml.safe_load_all(out.stdout) if d]
    configmaps = {d["metadata"]["name"] for d in rendered if d["kind"] == "ConfigMap"}
    for d in rendered:
        for ref in _configmap_refs(d.get("spec", {})):
            assert ref in configmaps, f"{d['kind']}/{d['metadata']['name']} refers to ConfigMap {ref!r}, not rendered"
            assert _render_key({"kind": "ConfigMap", "metadata": {"name": ref}})[1] != ref, (
                f"{d['kind']}/{d['metadata']['name']}: ConfigMap {ref!r} has no content hash (pods would not roll)"
            )


def test_pods_use_only_generated_configmaps():
    """The same without kubectl: no pod refers to a hand-written ConfigMap object."""
    plain = {d["metadata"]["name"] for p, d in OBJECTS if d["kind"] == "ConfigMap" and (p, d) not in GENERATED}
    assert not plain, f"ConfigMaps without a content hash (write them as configMapGenerator inputs): {plain}"
    for pod in _pods():
        refs = {v["configMap"]["name"] for v in pod.spec.get("volumes", []) if "configMap" in v}
        refs |= {e["configMapRef"]["name"] for c in pod.spec["containers"] for e in c.get("envFrom", [])
                 if "configMapRef" in e}
        assert refs <= GENERATED_NAMES, f"{pod.owner}: {refs - GENERATED_NAMES} not generated"
        assert not refs & UNHASHED_NAMES, f"{pod.owner}: {refs & UNHASHED_NAMES} have no content hash (no roll)"


def _images(node) -> list[str]:
    """Every `image` of a container anywhere in a rendered object (pod templates nested in CRs too)."""
    if isinstance(node, list):
        return [i for x in node for i in _images(x)]
    if not isinstance(node, dict):
        return []
    found = [c["image"] for key in ("containers", "initContainers") for c in node.get(key) or [] if "image" in c]
    return found + [i for v in node.values() for i in _images(v)]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomize_images_reach_the_ray_pods(tmp_path):
    """An overlay's `images:` must retag every streamrec container, also those KubeRay's
    resources nest (head, workers, submitter), or a deploy would mix image versions."""
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": KUSTOMIZE_API, "kind": "Kustomization",
        "resources": [os.path.relpath(K8S_DIR, tmp_path)],
        "images": [{"name": STREAMREC_IMAGE, "newName": "registry.example.com/sr", "newTag": "9.9.9"}],
    }))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    images = _images([d for d in yaml.safe_load_all(out.stdout) if d])
    assert not [i for i in images if i.startswith(STREAMREC_IMAGE)], "containers kustomize `images:` did not retag"
    # The RayJob templates are ConfigMap data, out of kustomize's reach: the training trigger
    # gives the runs its own (retagged) image (tests/k8s/test_train_trigger.py).
    applied = [(p, c) for p, c in _streamrec_containers() if p.cr is None or p.cr in _ray_crs("RayService")]
    assert images.count("registry.example.com/sr:9.9.9") == len(applied)


# --------------------------------------------------------------------------------------------
# Strimzi custom resources (their schemas: tests/k8s/test_crd_schemas.py)
# --------------------------------------------------------------------------------------------


def _kafka() -> dict:
    kafkas = _of_kind("Kafka", STRIMZI_API)
    assert len(kafkas) == 1
    return kafkas[0]


def test_strimzi_resources_use_v1():
    """Strimzi 1.x serves kafka.strimzi.io/v1 only (1.0 removed v1beta2)."""
    for kind in ("Kafka", "KafkaNodePool", "KafkaTopic"):
        assert _of_kind(kind), f"no {kind}"
        for d in _of_kind(kind):
            assert d["apiVersion"] == STRIMZI_API, f"{kind} {d['metadata']['name']}: use {STRIMZI_API}"


def test_kafka_is_kraft_with_node_pools():
    kafka = _kafka()
    spec = kafka["spec"]
    listeners = spec["kafka"]["listeners"]
    assert listeners and "topicOperator" in spec.get("entityOperator", {}), "KafkaTopics need the topic operator"
    pools = [p for p in _of_kind("KafkaNodePool") if p["metadata"]["labels"].get("strimzi.io/cluster") == kafka["metadata"]["name"]]
    assert len(pools) == len(_of_kind("KafkaNodePool")), "a KafkaNodePool names another cluster"
    roles = set()
    for pool in pools:
        roles |= set(pool["spec"]["roles"])
    assert roles == {"controller", "broker"}, "KRaft: the pools must provide controllers and brokers"

    config = spec["kafka"].get("config", {})
    brokers = _broker_count()
    assert config.get("min.insync.replicas", 1) < config.get("default.replication.factor", 1) <= brokers
    assert config.get("offsets.topic.replication.factor", 1) <= brokers


def _broker_count() -> int:
    return sum(p["spec"]["replicas"] for p in _of_kind("KafkaNodePool") if "broker" in p["spec"]["roles"])


def _topics() -> dict[str, dict]:
    out = {}
    for t in _of_kind("KafkaTopic", STRIMZI_API):
        assert t["metadata"]["labels"].get("strimzi.io/cluster") == _kafka()["metadata"]["name"]
        out[t["spec"].get("topicName", t["metadata"]["name"])] = t
    return out


def test_topics_match_the_settings(k8s_settings):
    topics = _topics()
    s = k8s_settings
    assert set(topics) == {s.events_topic, s.items_topic, s.dlq_topic, s.forget_topic, s.impressions_topic}
    # the ConfigMap names the topics explicitly, and as the code's defaults
    defaults = Settings.model_fields
    names = ("events_topic", "items_topic", "dlq_topic", "forget_topic", "impressions_topic")
    assert tuple(getattr(s, n) for n in names) == tuple(defaults[n].default for n in names)
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
    assert "compact" not in policy(s.forget_topic), "compaction drops tombstones (kafka/topics.yaml)"
    retention = lambda n: int(topics[n]["spec"]["config"]["retention.ms"])  # noqa: E731
    assert retention(s.dlq_topic) > retention(s.events_topic)
    # impressions: the largest stream, logged by ingest: kept days (an ingest outage), never forever
    assert "compact" not in policy(s.impressions_topic), "one record per answer: nothing to compact"
    assert DAY_MS <= retention(s.impressions_topic) <= retention(s.events_topic), "days, not forever"
    assert int(topics[s.impressions_topic]["spec"]["config"]["retention.bytes"]) > 0, "bounded by size too"


# --------------------------------------------------------------------------------------------
# KubeRay custom resources: RayService (serving) and RayJob (training)
# --------------------------------------------------------------------------------------------

# Fields KubeRay's schema still has but ignores since 1.1 (Serve's health checks restart
# unhealthy replicas). The schemas themselves: tests/k8s/test_crd_schemas.py.
RAYSERVICE_DEPRECATED_KEYS = {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
RAY_OBJECT_STORE_SHARE = 0.3  # Ray's default object store: 30% of the memory it sees (the container limit)
SERVE_DEFAULT_PORT = 8000  # Ray Serve's proxy port when http_options names none


def _rayservice() -> dict:
    (rs,) = _ray_crs("RayService")
    return rs


def _rayjob() -> dict:
    (job,) = _ray_crs("RayJob")
    return job


def _ray_container(pod: Pod) -> dict:
    return pod.spec["containers"][0]  # KubeRay runs Ray in the first container


def _ports(container: dict) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}


def _ray_container_of(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # as _ray_container, for a group spec


def _gpus(group: dict) -> int:
    return int(_ray_container_of(group)["resources"].get("limits", {}).get(GPU, 0))


def test_kuberay_resources_use_v1():
    assert _ray_crs("RayService") and _ray_crs("RayJob"), "serving (RayService) and training (RayJob)"
    for kind in ("RayService", "RayJob", "RayCluster", "RayCronJob"):
        for d in _of_kind(kind):
            assert d["apiVersion"] == KUBERAY_API, f"{kind} {d['metadata']['name']}: use {KUBERAY_API}"


@pytest.mark.parametrize("cr", _ray_crs(), ids=lambda d: f"{d['kind']}/{_name(d)}")
def test_kuberay_resources_are_well_formed(cr):
    spec = cr["spec"]
    if cr["kind"] == "RayService":
        assert {"serveConfigV2", "rayClusterConfig"} <= set(spec)
        assert isinstance(spec["serveConfigV2"], str), "serveConfigV2 is a YAML string (a `|` block)"
        assert not set(spec) & RAYSERVICE_DEPRECATED_KEYS, (
            "KubeRay ignores these since 1.1 (Serve's health checks restart unhealthy replicas): drop them"
        )
        assert spec.get("upgradeStrategy", {}).get("type", "NewCluster") in UPGRADE_TYPES
    else:
        assert isinstance(spec.get("entrypoint"), str) and spec["entrypoint"].strip()
        assert "rayClusterSpec" in spec and "clusterSelector" not in spec, "the job brings its own cluster"
        assert spec.get("submissionMode", "K8sJobMode") in SUBMISSION_MODES
    cluster = _ray_cluster(cr)
    installed = importlib.metadata.version("ray")
    assert str(cluster.get("rayVersion", "")).split(".")[:2] == installed.split(".")[:2], (
        f"rayVersion {cluster.get('rayVersion')!r} but the code runs on ray {installed}: keep them in step"
    )
    head = cluster["headGroupSpec"]
    assert {"template", "rayStartParams"} <= set(head)
    groups = cluster.get("workerGroupSpecs", [])
    names = [g["groupName"] for g in groups]
    assert len(names) == len(set(names)), f"duplicate worker group names {names}"
    for g in groups:
        assert {"groupName", "template", "rayStartParams", "minReplicas", "maxReplicas"} <= set(g)
        assert g["minReplicas"] <= g.get("replicas", 0) <= g["maxReplicas"], f"{g['groupName']}: min <= replicas <= max"
    for group in [head, *groups]:
        params = group["rayStartParams"]
        assert all(isinstance(v, str) for v in params.values()), "rayStartParams values are strings (quote numbers)"
        labels = group["template"].get("metadata", {}).get("labels", {})
        assert not [k for k in labels if k.startswith("ray.io/")], "ray.io/ labels belong to KubeRay"
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0", (
        "KubeRay reaches the dashboard from outside the pod (Serve config, job submission)"
    )


@pytest.mark.parametrize("pod", [p for p in _pods() if p.cr is not None], ids=lambda p: p.owner)
def test_kuberay_pod_templates_validate(pod):
    """The pod templates inside RayService/RayJob, validated like a built-in object."""
    doc = {"apiVersion": "v1", "kind": "PodTemplate",
           "metadata": {"name": _name(pod.cr).rstrip("-"), "namespace": pod.cr["metadata"]["namespace"]},
           "template": pod.template}
    _k8s_validate(doc, f"the pod template of {pod.owner}")


@pytest.mark.parametrize("pod", _ray_pods(), ids=lambda p: p.owner)
def test_ray_containers(pod):
    c = _ray_container(pod)
    assert c["image"].split(":")[0] == STREAMREC_IMAGE, (
        f"{pod.owner}: the Ray container must run the streamrec image (the Serve app and `streamrec train` import it)"
    )
    assert "command" not in c and "args" not in c, f"{pod.owner}: KubeRay generates `ray start ...` itself"
    params = pod.group["rayStartParams"]
    ports = _ports(c)
    if "metrics-export-port" in params:
        assert ports.get("metrics") == int(params["metrics-export-port"]), f"{pod.owner}: metrics port"
    ann = pod.template.get("metadata", {}).get("annotations", {})
    if ann.get("prometheus.io/scrape") == "true":
        assert int(ann["prometheus.io/port"]) == ports.get("metrics"), f"{pod.owner}: scrape Ray's metrics port"


@pytest.mark.parametrize("pod", _ray_pods(), ids=lambda p: p.owner)
def test_ray_object_store_fits_in_dev_shm(pod):
    """Ray puts its object store in /dev/shm only if it fits; otherwise it falls back to a much
    slower store on disk. A memory-backed /dev/shm counts against the memory limit."""
    c = _ray_container(pod)
    limit = _quantity(c["resources"]["limits"]["memory"])
    mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"), None)
    assert mount, f"{pod.owner}: mount a memory-backed emptyDir at /dev/shm (the container default is 64 MiB)"
    volume = next(v for v in pod.spec["volumes"] if v["name"] == mount["name"])
    assert volume.get("emptyDir", {}).get("medium") == "Memory"
    size = _quantity(volume["emptyDir"]["sizeLimit"])
    params = pod.group["rayStartParams"]
    store = (_quantity(params["object-store-memory"]) if "object-store-memory" in params
             else RAY_OBJECT_STORE_SHARE * limit)
    assert store <= size < limit, f"{pod.owner}: object store {store / 2**30:.1f}Gi, /dev/shm {size / 2**30:.1f}Gi"


# --- serving --------------------------------------------------------------------------------


def _serve_config() -> dict:
    cfg = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])
    assert isinstance(cfg, dict), "serveConfigV2 does not parse as a YAML mapping"
    return cfg


def _serve_app_config() -> dict:
    apps = _serve_config()["applications"]
    assert len(apps) == 1, "one application: streamrec's API"
    return apps[0]


def _import(import_path: str):
    module_name, sep, attr = import_path.partition(":")
    assert sep and attr, f"import_path {import_path!r}: write it as module:attribute"
    module = importlib.import_module(module_name)
    assert hasattr(module, attr), f"import_path {import_path!r}: {module_name} has no attribute {attr!r}"
    return module, getattr(module, attr)


def _route_paths(app) -> set[str]:
    paths = set(app.openapi().get("paths", {}))
    stack = list(app.routes)
    while stack:
        route = stack.pop()
        if getattr(route, "path", None):
            paths.add(route.path)
        stack.extend(getattr(getattr(route, "original_router", None), "routes", []))
    return paths


def test_serve_config_is_a_valid_serve_config():
    """Checked with Ray Serve's own schema (what `serve deploy` and KubeRay submit), plus the
    field names: Serve ignores unknown ones, so a typo would be silently dropped."""
    schema = pytest.importorskip("ray.serve.schema")
    cfg = _serve_config()
    schema.ServeDeploySchema.model_validate(cfg)
    assert set(cfg) <= set(schema.ServeDeploySchema.model_fields)
    assert set(cfg.get("http_options", {})) <= set(schema.HTTPOptionsSchema.model_fields)
    for app_cfg in cfg["applications"]:
        assert set(app_cfg) <= set(schema.ServeApplicationSchema.model_fields), set(app_cfg)
        for d in app_cfg.get("deployments", []):
            assert set(d) <= set(schema.DeploymentSchema.model_fields), set(d)


def test_serve_config_matches_the_code(k8s_settings):
    from fastapi import FastAPI
    from ray import serve

    from training.registry import validate_name

    app_cfg = _serve_app_config()
    module, target = _import(app_cfg["import_path"])
    if not isinstance(target, serve.Application):  # an application builder: f(args) -> Application
        assert callable(target) and len(inspect.signature(target).parameters) == 1, (
            f"{app_cfg['import_path']} is neither an Application nor a builder taking the `args` dict"
        )
    deployments = {d.name: d for d in vars(module).values() if isinstance(d, serve.Deployment)}
    configured = {d["name"]: d for d in app_cfg.get("deployments", [])}
    assert set(configured) <= set(deployments), (
        f"serveConfigV2 names deployments {sorted(set(configured) - set(deployments))} that "
        f"{module.__name__} does not define (it has {sorted(deployments)})"
    )
    assert "Api" in configured, "the ingress deployment `Api` is configured in serveConfigV2"
    api_cfg, api = configured["Api"], deployments["Api"]

    # user_config is what Api.reconfigure takes: {"pins": {scene: version}}
    pins = api_cfg.get("user_config", {}).get("pins")
    assert isinstance(pins, dict), "Api's user_config needs `pins` (a mapping scene -> version; {} = none)"
    for scene, version in pins.items():
        validate_name(scene, "scene")
        assert isinstance(version, str), f"pins[{scene!r}]: a version name is a string"
        validate_name(version, "version")
    reconfigure = getattr(api.func_or_class, "reconfigure", None)
    assert callable(reconfigure) and len(inspect.signature(reconfigure).parameters) == 2, (
        "Api needs reconfigure(self, user_config) for pins to apply without restarting replicas"
    )

    # the HTTP port: Serve's proxy = the `serve` container ports = STREAMREC_SERVE_PORT
    http = _serve_config().get("http_options", {})
    port = http.get("port", SERVE_DEFAULT_PORT)
    assert http.get("host") == "0.0.0.0", "the proxy must listen beyond localhost (probes, the Service)"
    assert port == k8s_settings.serve_port, "http_options.port != STREAMREC_SERVE_PORT"
    for pod in _ray_pods("RayService"):
        assert _ports(_ray_container(pod)).get("serve") == port, f"{pod.owner}: container port `serve` != {port}"
    serve_svc = _rayservice()["spec"].get("serveService")
    if serve_svc:
        assert [p["port"] for p in serve_svc["spec"]["ports"] if p.get("name") == "serve"] == [port]

    # the routes the probes and README rely on
    apps = [v for v in vars(module).values() if isinstance(v, FastAPI)]
    assert apps, f"{module.__name__} has no FastAPI app"
    paths = set().union(*(_route_paths(a) for a in apps))
    assert {"/healthz", "/readyz", "/metrics", "/v1/recommendations", "/v1/models"} <= paths, sorted(paths)
    assert app_cfg.get("route_prefix", "/") == "/", "the routes are served at the root"
    for pod in _ray_pods("RayService"):
        for kind in ("readinessProbe", "livenessProbe", "startupProbe"):
            for probe_port, path in _probe_urls(_ray_container(pod).get(kind) or {}):
                if probe_port not in ("serve", port):
                    continue  # not through Serve (e.g. the raylet's agent)
                assert path in paths | SERVE_PROXY_ROUTES, f"{pod.owner}: {kind} asks {path}, not a route"

    # the replicas fit on the serving workers (Serve would stay DEPLOYING otherwise); with
    # autoscaling, the most replicas fit on the most workers (tests/k8s/test_operations.py)
    replicas = api_cfg.get("num_replicas", api.num_replicas)
    per_replica = float((api.ray_actor_options or {}).get("num_cpus", 1))
    groups = _ray_cluster(_rayservice()).get("workerGroupSpecs", [])
    if "autoscaling_config" in api_cfg:
        assert replicas in ("auto", None), "num_replicas is `auto` (or unset) when autoscaling_config is set"
        replicas, size = api_cfg["autoscaling_config"]["max_replicas"], "maxReplicas"
    else:
        size = "replicas"
    cpus = sum(g.get(size, 0) * _ray_cpus(g) for g in groups)
    assert replicas * per_replica <= cpus, f"{replicas} Api replicas x {per_replica} CPU > {cpus} worker CPUs"


SERVE_PROXY_ROUTES = {"/-/healthz", "/-/routes"}  # Serve's proxy answers these itself
PROBE_URL = re.compile(r"https?://(?:localhost|127\.0\.0\.1):(\d+)(/[^\s'\"|&;]*)")


def _probe_urls(probe: dict) -> list[tuple[int | str, str]]:
    """(port, path) of every HTTP request a probe makes: its httpGet, or the URLs of an exec
    probe's command (`wget ... http://localhost:8000/readyz`)."""
    if "httpGet" in probe:
        return [(probe["httpGet"]["port"], probe["httpGet"]["path"])]
    command = " ".join(probe.get("exec", {}).get("command", []))
    return [(int(m.group(1)), m.group(2)) for m in PROBE_URL.finditer(command)]


def _ray_cpus(group: dict) -> float:
    """The CPUs Ray schedules on a pod of this group: num-cpus, or the container's CPU limit."""
    return _quantity(group["rayStartParams"].get("num-cpus", _ray_container_of(group)["resources"]["limits"]["cpu"]))


def test_rayservice_serves_from_workers():
    rs = _rayservice()
    cluster = _ray_cluster(rs)
    workers = [p for p in _ray_pods("RayService") if p.role == "ray-worker"]
    assert sum(g.get("replicas", 0) for g in cluster.get("workerGroupSpecs", [])) >= 2, (
        "at least two serving workers: one can be drained while the other answers"
    )
    if rs["spec"].get("excludeHeadPodFromServeSvc"):
        assert cluster["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0", (
            "a head left out of the Service should not host Api replicas either"
        )
    port = _serve_config().get("http_options", {}).get("port", SERVE_DEFAULT_PORT)
    for pod in workers:
        container = _ray_container(pod)
        asked = {path for p, path in _probe_urls(container.get("readinessProbe", {})) if p in ("serve", port)}
        # ready = the API can answer (every live scene loaded or on fallback), through a proxy not draining
        assert "/readyz" in asked, f"{pod.owner}: readiness must ask the API's /readyz, not only that it lives"
        assert "/-/healthz" in asked, f"{pod.owner}: readiness must also ask the proxy (a draining one says 503)"
        probe = container["readinessProbe"]
        if "exec" in probe:  # each request's own timeout (wget -T) must fit in the probe's
            timeouts = [int(t) for t in re.findall(r"-T\s*(\d+)", " ".join(probe["exec"]["command"]))]
            assert len(timeouts) == len(asked) and sum(timeouts) < probe.get("timeoutSeconds", 1), probe
        # a liveness probe through the node's proxy would end pods whose replicas moved away
        live = {path for p, path in _probe_urls(container.get("livenessProbe", {})) if p in ("serve", port)}
        assert not live, f"{pod.owner}: liveness through the Serve proxy ({live}); Serve's check_health does it"
    svc = rs["spec"].get("serveService")
    assert svc, "name the Service clients use (KubeRay manages its selector)"
    assert "selector" not in svc["spec"], "KubeRay sets the serve Service's selector itself"
    _k8s_validate({"apiVersion": "v1", "kind": "Service",
                   "metadata": {**svc["metadata"], "namespace": rs["metadata"]["namespace"]}, "spec": svc["spec"]},
                  "RayService serveService")
    budgets = [b for b in _of_kind("PodDisruptionBudget")
               if any(b["spec"]["selector"]["matchLabels"].items() <= p.labels.items() for p in workers)]
    assert budgets, "no PodDisruptionBudget for the serving workers"
    for b in budgets:
        sel = b["spec"]["selector"]["matchLabels"].items()
        others = [p.owner for p in _pods() if p not in workers and sel <= p.labels.items()]
        assert not others, f"PodDisruptionBudget {b['metadata']['name']} also selects {others}"


def test_api_keys_come_from_a_secret():
    assert API_KEYS_VAR in env_var_names().values()
    secrets = {s["metadata"]["name"]: s for s in _of_kind("Secret")}
    for pod in _ray_pods("RayService"):
        env = {e["name"]: e for e in _ray_container(pod).get("env", [])}
        # the head builds the application from its environment, the workers run Api
        assert API_KEYS_VAR in env, f"{pod.owner}: {API_KEYS_VAR} is not set"
        ref = env[API_KEYS_VAR].get("valueFrom", {}).get("secretKeyRef")
        assert ref, f"{pod.owner}: {API_KEYS_VAR} must come from a Secret"
        assert ref["key"] == API_KEYS_VAR and ref["name"] in secrets
        assert not ref.get("optional", False), "fail closed: without keys the API must not start open"
        secret = secrets[ref["name"]]
        assert not secret.get("data") and not secret.get("stringData"), (
            "never commit API keys: the manifest has no data, keys are set with `kubectl patch` (README)"
        )


# --- training -------------------------------------------------------------------------------


def _train_params() -> dict:
    """The RayJob entrypoint's options, parsed by the real CLI (`streamrec train ...`)."""
    import typer.main

    argv = shlex.split(_rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["streamrec", "train"], f"the training RayJob runs {argv[:2]}"
    command = typer.main.get_command(app).commands["train"]
    return command.make_context("train", argv[2:]).params


def test_training_rayjob_gets_the_gpus_it_asks_for():
    from training.train_run import TrainRequest

    params = _train_params()
    cluster = _ray_cluster(_rayjob())
    gpu_groups = [g for g in cluster.get("workerGroupSpecs", []) if _gpus(g) > 0]
    gpus = sum(g.get("replicas", 0) * _gpus(g) for g in gpu_groups)
    if params["gpu"]:
        assert gpu_groups, "`--gpu` but no worker group requests nvidia.com/gpu"
        # ScalingConfig(num_workers=W, use_gpu=True): one GPU per Ray Train worker, or it waits forever
        assert params["workers"] <= gpus, f"--workers {params['workers']} > {gpus} GPUs in the cluster"
        assert TrainRequest().embed_actors <= gpus, "the catalog embedding's GPU actors do not fit"
    else:
        assert not gpu_groups, "GPU workers reserved for a run without --gpu"
    assert params["incremental"], "the periodic run continues from the live adapter"
    assert not params["force"], "a scheduled run must not bypass the quality gate"
    for g in gpu_groups:
        res = _ray_container_of(g)["resources"]
        assert GPU not in res.get("requests", {}) or res["requests"][GPU] == res["limits"][GPU], (
            "extended resources: requests must equal limits"
        )
        assert "num-gpus" not in g["rayStartParams"] or int(g["rayStartParams"]["num-gpus"]) == _gpus(g)
        # each Ray Train worker also takes one CPU
        assert _quantity(res["limits"]["cpu"]) >= _gpus(g) + 1, f"{g['groupName']}: too few CPUs per GPU"


def test_training_rayjob_lifecycle():
    spec = _rayjob()["spec"]
    assert not [d for _, d in OBJECTS if d["kind"] == "RayJob"], (
        "no RayJob is applied: `kubectl apply -k` or a GitOps sync would own it, and re-applying a "
        "parked one suspends a running run (KubeRay then deletes its GPU cluster). Runs are created "
        "from the template by the CronJob streamrec-train"
    )
    assert "suspend" not in spec, "a run created from the template starts at once"
    assert spec.get("shutdownAfterJobFinishes") is True, "the GPU cluster must go away after the run"
    assert spec.get("ttlSecondsAfterFinished", -1) >= 0
    assert spec.get("activeDeadlineSeconds", 0) > 0, "a hung run must not hold GPUs forever"
    assert spec.get("backoffLimit", 0) == 0, "a retry is a new GPU cluster: the next scheduled run retries"
    assert not spec.get("runtimeEnvYAML"), "the image holds the code: no runtime_env downloads"


# --------------------------------------------------------------------------------------------
# streamrec config and pods
# --------------------------------------------------------------------------------------------


def test_configmap_names_only_real_settings():
    known = set(env_var_names().values())
    data = _streamrec_configmap()["data"]
    unknown = set(data) - known
    assert not unknown, f"not streamrec settings (see `streamrec config`): {sorted(unknown)}"
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings (quote numbers)"
    assert API_KEYS_VAR not in data, "API keys belong in a Secret, not in the ConfigMap"


def test_container_env_names_are_real_settings():
    """A misspelt STREAMREC_* variable on a container is silently ignored by the code."""
    known = set(env_var_names().values())
    for pod, c in _streamrec_containers():
        for e in c.get("env", []):
            if e["name"].startswith("STREAMREC_") or e["name"] in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL"):
                assert e["name"] in known, f"{pod.owner}/{c['name']}: {e['name']} is not a streamrec setting"
            if pod.role.startswith("ray-"):
                # KubeRay sets RAY_ADDRESS itself (127.0.0.1:6379 on the head, the head Service on workers).
                assert e["name"] != "RAY_ADDRESS", f"{pod.owner}: leave RAY_ADDRESS to KubeRay"


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
    # in-cluster, TLS + SCRAM-SHA-512: every pod that uses Kafka says so (tests/k8s/test_security.py
    # checks the credentials and the ACLs)
    assert listener[0]["tls"] is True and listener[0]["type"] == "internal"
    assert listener[0]["authentication"]["type"] == "scram-sha-512"


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


def test_per_user_redis_keys_expire_under_noeviction(k8s_settings):
    """With `noeviction` a key nobody deletes stays until Redis is full and ingest's writes fail:
    the per-user keys must carry a TTL (0 would mean never), long enough for returning users."""
    assert _redis_conf().get("maxmemory-policy") == "noeviction"
    assert "STREAMREC_USER_TTL_S" in _streamrec_configmap()["data"], "set the per-user TTL explicitly"
    assert 86_400 <= k8s_settings.user_ttl_s <= 90 * 86_400, k8s_settings.user_ttl_s


# Pods on the streamrec image that do not touch the data: the training trigger only calls the
# Kubernetes API (k8s/training/start_run.py); `streamrec forget` only publishes to Kafka.
NO_DATA_PODS = {"CronJob/streamrec-train", "CronJob/streamrec-forget"}


def test_streamrec_pods_share_the_data_volume(k8s_settings):
    """Ingest, the feature job and every Ray head and worker (the API follows the registry; Ray
    Train's storage_path and the run directories are under it) see the same volume at the same
    path. Only the RayJob submitter, which just runs `ray job submit`, does without."""
    for pod, c in _streamrec_containers():
        if pod.role == "submitter" or pod.owner in NO_DATA_PODS:
            continue
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
        assert str(k8s_settings.data_dir) in mounts, f"{pod.owner}: STREAMREC_DATA_DIR is not mounted"
        volume = next(v for v in pod.spec["volumes"] if v["name"] == mounts[str(k8s_settings.data_dir)])
        claim = _one("PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert claim["metadata"]["name"] == DATA_CLAIM
        assert "ReadWriteMany" in claim["spec"]["accessModes"], "ingest, features, training and serving share it"


def test_streamrec_pods_are_locked_down():
    """Every pod running the streamrec image, Ray's included: non-root, no privilege escalation,
    no capabilities, read-only root filesystem with a writable /tmp (HOME, Ray's session dir)."""
    for pod, c in _streamrec_containers():
        psc, sc = pod.spec.get("securityContext", {}), c.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, pod.owner
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", pod.owner
        assert sc.get("allowPrivilegeEscalation") is False, pod.owner
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], pod.owner
        assert sc.get("readOnlyRootFilesystem") is True, pod.owner
        assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, f"{pod.owner}: /tmp must be writable"
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env.get("HOME") == "/tmp", f"{pod.owner}: HOME on the read-only root"


def test_registry_is_on_the_shared_volume(k8s_settings):
    """`streamrec train` publishes to registry_uri and the API reads it: a local path must lie
    on the shared volume (an object-store URI would need no mount)."""
    uri = k8s_settings.registry_uri
    if "://" in uri and not uri.startswith("file://"):
        return
    path = Path(uri.removeprefix("file://"))
    assert path.is_absolute(), f"STREAMREC_REGISTRY_ROOT={uri}: a relative path depends on the working directory"
    assert path.is_relative_to(k8s_settings.data_dir), f"registry {path} is not under {k8s_settings.data_dir}"


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


def _streamrec_commands() -> list[tuple[str, ...]]:
    """Container commands and RayJob entrypoints (a shell string) that run `streamrec`."""
    commands = {tuple(c["command"]) for _, c in _streamrec_containers() if c.get("command", [""])[0] == "streamrec"}
    commands |= {tuple(shlex.split(j["spec"]["entrypoint"])) for j in _ray_crs("RayJob")}
    return sorted(commands)


@pytest.mark.parametrize("command", _streamrec_commands(), ids=lambda cmd: " ".join(cmd))
def test_container_commands_exist_in_the_cli(command):
    """`--help` after the arguments: exit 0 only if the subcommand and every option exist."""
    assert command[0] == "streamrec"
    result = CliRunner().invoke(app, [*command[1:], "--help"])
    assert result.exit_code == 0, f"`{' '.join(command)}` is not a valid streamrec command:\n{result.output}"
