"""Every Strimzi and KubeRay custom resource in k8s/ validates against the CRD schemas of the
operator releases k8s/README.md pins, vendored verbatim in tests/data/crds/ (SOURCES.yaml says
from where, with checksums).

The API server prunes fields a structural CRD schema does not know without an error, so a
misspelt or removed field would silently do nothing on a cluster. Here unknown fields fail:
every object schema without `x-kubernetes-preserve-unknown-fields` gets
`additionalProperties: false`. What jsonschema cannot check is left to the API server and named
in the failure message where it matters: CEL rules (`x-kubernetes-validations`) and `format`s.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.test_k8s_manifests import (
    BUILTIN_GROUPS,
    K8S_DIR,
    KUSTOMIZE_API,
    OBJECTS,
    STRIMZI_API,
    TEMPLATES,
    _group,
    _id,
)

jsonschema = pytest.importorskip("jsonschema")

CRD_DIR = Path(__file__).resolve().parents[1] / "data" / "crds"
SOURCES = yaml.safe_load((CRD_DIR / "SOURCES.yaml").read_text(encoding="utf-8"))
Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the KubeRay CRDs are 1 MB each
CUSTOM_RESOURCES = [o for o in OBJECTS + TEMPLATES if _group(o[1]) not in BUILTIN_GROUPS]


def strict(schema: dict) -> dict:
    """A CRD's openAPIV3Schema as a JSON schema that rejects unknown fields and allows `nullable`."""
    s = {k: v for k, v in schema.items() if k not in ("nullable",)}
    if schema.get("nullable") and "type" in s:
        s["type"] = [s["type"], "null"]
    if "properties" in s:
        s["properties"] = {k: strict(v) for k, v in s["properties"].items()}
        if not s.get("x-kubernetes-preserve-unknown-fields") and "additionalProperties" not in s:
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = strict(s["additionalProperties"])
    if isinstance(s.get("items"), dict):
        s["items"] = strict(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [strict(x) for x in s[key]]
    return s


@functools.cache
def crds() -> dict[tuple[str, str], dict]:
    """(apiVersion, kind) -> the served version's strict schema, from every vendored CRD."""
    out = {}
    for path in sorted(CRD_DIR.glob("*/*.yaml")):
        for crd in yaml.load_all(path.read_text(encoding="utf-8"), Loader=Loader):
            if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                if version.get("served"):
                    out[(f"{group}/{version['name']}", kind)] = strict(version["schema"]["openAPIV3Schema"])
    return out


def schema_errors(doc: dict) -> list[str]:
    key = (doc["apiVersion"], doc["kind"])
    served = sorted(f"{a} {k}" for a, k in crds() if k == doc["kind"])
    if key not in crds():
        return [f"the pinned operators serve no {doc['apiVersion']} {doc['kind']} (they serve: {served or 'none'})"]
    validator = jsonschema.Draft4Validator(crds()[key])
    return [f"at {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message[:300]}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


# --------------------------------------------------------------------------------------------
# the vendored CRDs are the pinned releases, and the README installs those
# --------------------------------------------------------------------------------------------


def test_vendored_files_are_the_pinned_releases():
    listed = set()
    for operator in SOURCES.values():
        for rel, meta in operator["files"].items():
            path = CRD_DIR / rel
            listed.add(path)
            assert path.is_file(), f"{rel} is listed in SOURCES.yaml but missing"
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            assert digest == meta["sha256"], (
                f"{rel} is not {operator['repository']} {operator['tag']}:{meta['path']} (sha256 differs): "
                "vendor the file unchanged"
            )
    assert set(CRD_DIR.glob("*/*.yaml")) == listed, "every vendored file is listed in SOURCES.yaml"


def test_readme_installs_the_pinned_operators():
    """The install commands in k8s/README.md name the releases whose CRDs the manifests are
    validated against (an unpinned `latest` is how v1beta2 manifests met a v1-only Strimzi)."""
    readme = (K8S_DIR / "README.md").read_text(encoding="utf-8")
    for operator in SOURCES.values():
        version = operator["tag"].removeprefix("v")
        pin = operator.get("install", f"--version {version}")  # a Helm chart's version, or the release's URL
        assert pin in readme, f"k8s/README.md does not install {operator['operator']} {version} ({pin})"
    assert "install/latest" not in readme, "k8s/README.md installs an unpinned operator"


def test_every_custom_resource_kind_has_a_vendored_crd():
    assert CUSTOM_RESOURCES, "no custom resources found"
    kinds = {(d["apiVersion"], d["kind"]) for _, d in CUSTOM_RESOURCES}
    assert kinds <= set(crds()), f"no vendored CRD serves {kinds - set(crds())}"


# --------------------------------------------------------------------------------------------
# the custom resources validate
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("item", CUSTOM_RESOURCES, ids=_id)
def test_custom_resource_validates_against_the_pinned_crd(item):
    errors = schema_errors(item[1])
    assert not errors, f"{_id(item)} is not valid for the pinned operator release:\n  " + "\n  ".join(errors[:20])


def test_the_schema_check_rejects_what_the_api_server_would_drop_or_refuse():
    """The validation above is strict: a misspelt field, a wrong type, a removed API version fail."""
    kafka = next(d for _, d in CUSTOM_RESOURCES if d["kind"] == "Kafka")
    typo = copy.deepcopy(kafka)
    typo["spec"]["kafka"]["metricConfig"] = typo["spec"]["kafka"].pop("metricsConfig")
    assert any("metricConfig" in e for e in schema_errors(typo))
    wrong_type = copy.deepcopy(kafka)
    wrong_type["spec"]["kafka"]["listeners"][0]["port"] = "9092"
    assert schema_errors(wrong_type)
    old_api = {**kafka, "apiVersion": "kafka.strimzi.io/v1beta2"}
    assert "serve no kafka.strimzi.io/v1beta2" in schema_errors(old_api)[0]
    service = next(d for _, d in CUSTOM_RESOURCES if d["kind"] == "RayService")
    nested = copy.deepcopy(service)  # deep inside the embedded pod template
    nested["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["readynessProbe"] = {}
    assert any("readynessProbe" in e for e in schema_errors(nested))
    job = next(d for _, d in CUSTOM_RESOURCES if d["kind"] == "RayJob")
    assert schema_errors({**job, "spec": {**job["spec"], "suspended": True}})
    # config maps of Kafka (x-kubernetes-preserve-unknown-fields) take any key
    free = copy.deepcopy(kafka)
    free["spec"]["kafka"]["config"]["any.broker.option"] = 1
    assert not schema_errors(free)


# --------------------------------------------------------------------------------------------
# the zones component (used from overlays) renders valid resources
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_zones_component_renders_valid_resources(tmp_path):
    component = K8S_DIR / "components" / "zones"
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": KUSTOMIZE_API, "kind": "Kustomization",
        "resources": [os.path.relpath(K8S_DIR, tmp_path)],
        "components": [os.path.relpath(component, tmp_path)],
    }))
    out = subprocess.run(["kubectl", "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(out.stdout) if d}
    pool, kafka = rendered[("KafkaNodePool", "dual-role")], rendered[("Kafka", "streamrec")]
    for doc in (pool, kafka):
        assert doc["apiVersion"] == STRIMZI_API
        errors = schema_errors(doc)
        assert not errors, f"{doc['kind']} with components/zones:\n  " + "\n  ".join(errors)
    spread = pool["spec"]["template"]["pod"]["topologySpreadConstraints"]
    assert [c["whenUnsatisfiable"] for c in spread if c["topologyKey"] == "topology.kubernetes.io/zone"] == [
        "DoNotSchedule"], "with zones, the brokers' zone spread is required"
    assert kafka["spec"]["kafka"]["rack"]["topologyKey"] == "topology.kubernetes.io/zone", "rack awareness"
    # the component changes nothing else
    base = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(subprocess.run(
        ["kubectl", "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60, check=True).stdout) if d}
    assert set(rendered) == base


def test_zones_component_is_a_kustomize_component():
    k = yaml.safe_load((K8S_DIR / "components" / "zones" / "kustomization.yaml").read_text(encoding="utf-8"))
    assert k["kind"] == "Component" and k["apiVersion"] == "kustomize.config.k8s.io/v1alpha1"
    assert re.search(r"components/zones", (K8S_DIR / "README.md").read_text(encoding="utf-8")), (
        "k8s/README.md says when and how to use components/zones"
    )
