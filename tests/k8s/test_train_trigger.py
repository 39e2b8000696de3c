"""The training trigger: the CronJob `streamrec-train` and k8s/training/start_run.py, which creates a
RayJob per run from the template k8s/training/train-rayjob.yaml (so that `kubectl apply` never
owns, suspends or deletes a running fine-tune).

start_run.py runs in the streamrec image with only the standard library and PyYAML; here it is
driven with a fake Kubernetes API, and its wiring in the manifests is checked (mount paths,
ConfigMaps, RBAC).
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import urllib.parse
from pathlib import Path

import pytest

from tests.test_k8s_manifests import K8S_DIR, STREAMREC_IMAGE, TEMPLATES, _of_kind, _one, _pod_spec

SCRIPT = K8S_DIR / "training" / "start_run.py"
IMAGE = "registry.example.com/sr:9.9.9"


def _load_script():
    spec = importlib.util.spec_from_file_location("k8s_start_run", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


start_run = _load_script()


def _template() -> dict:
    (item,) = TEMPLATES
    return item[1]


def _cronjob() -> dict:
    return _one("CronJob", "streamrec-train")


def _trigger_pod(image: str = IMAGE, suffix: str = "-5c7k9m2b4t") -> dict:
    """The trigger pod as the API server returns it: the CronJob's pod template, as kustomize
    renders it (generated ConfigMaps with a hash suffix, the image retagged)."""
    spec = copy.deepcopy(_pod_spec(_cronjob()))
    for holder, key in start_run.configmap_refs(spec):
        holder[key] += suffix
    for c in spec["containers"]:
        c["image"] = image
    return {"metadata": {"name": "streamrec-train-29000000-abcde", "namespace": "streamrec"}, "spec": spec}


class FakeApi:
    def __init__(self, rayjobs: list[dict], fail: str | None = None) -> None:
        self.rayjobs, self.fail, self.calls = rayjobs, fail, []

    def request(self, method: str, path: str, body=None) -> dict:
        self.calls.append((method, path, body))
        if self.fail == method:
            raise start_run.ApiError(f"{method} {path}: HTTP 403: forbidden")
        if method == "GET" and "/pods/" in path:
            return _trigger_pod()
        if method == "GET":
            return {"items": self.rayjobs}
        if method == "POST":
            return {**body, "metadata": {**body["metadata"], "name": body["metadata"]["generateName"] + "x7k2p"}}
        return {}


def _run(status: str, created: str, name: str) -> dict:
    return {"metadata": {"name": name, "creationTimestamp": created}, "status": {"jobDeploymentStatus": status}}


def _env(tmp_path: Path) -> dict:
    template = tmp_path / "rayjob.yaml"
    template.write_text((K8S_DIR / "training" / "train-rayjob.yaml").read_text(encoding="utf-8"))
    return {"POD_NAME": "streamrec-train-29000000-abcde", "POD_NAMESPACE": "streamrec", "TEMPLATE": str(template),
            "CONTAINER": "trigger", "KEEP_FINISHED": "2"}


# --------------------------------------------------------------------------------------------
# the script
# --------------------------------------------------------------------------------------------


def test_build_rayjob_takes_the_trigger_image_and_generated_configmaps():
    template = _template()
    before = copy.deepcopy(template)
    image, configmaps = start_run.own_refs(_trigger_pod(), "trigger")
    job = start_run.build_rayjob(template, image, configmaps, "other-ns")
    assert template == before, "the template is not modified"
    assert job["metadata"]["generateName"] == "streamrec-finetune-" and "name" not in job["metadata"]
    assert job["metadata"]["namespace"] == "other-ns"
    images = [c["image"] for spec in start_run.pod_specs(job) for c in spec["containers"]]
    assert images.count(IMAGE) == sum(1 for spec in start_run.pod_specs(template) for c in spec["containers"]
                                      if c["image"].startswith(STREAMREC_IMAGE + ":"))
    assert not [i for i in images if i.startswith(STREAMREC_IMAGE)], "every streamrec container is retagged"
    refs = {holder[key] for spec in start_run.pod_specs(job) for holder, key in start_run.configmap_refs(spec)}
    assert refs == {"streamrec-env-5c7k9m2b4t", "ray-log-shipper-5c7k9m2b4t"}


def test_build_rayjob_refuses_a_configmap_the_trigger_does_not_know():
    job = copy.deepcopy(_template())
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["volumes"].append(
        {"name": "extra", "configMap": {"name": "something-else"}})
    with pytest.raises(ValueError, match="something-else"):
        start_run.build_rayjob(job, IMAGE, {"streamrec-env-5c7k9m2b4t", "ray-log-shipper-5c7k9m2b4t"}, "streamrec")
    assert start_run.resolve("streamrec-env", {"streamrec-env"}) == "streamrec-env"
    with pytest.raises(ValueError):  # a prefix of another name is not a match
        start_run.resolve("streamrec", {"streamrec-env-5c7k9m2b4t"})


def test_unfinished_and_cleanup():
    runs = [_run("Complete", "2026-01-01T03:00:00Z", "a"), _run("Failed", "2026-01-02T03:00:00Z", "b"),
            _run("Complete", "2026-01-03T03:00:00Z", "c"), _run("Running", "2026-01-04T03:00:00Z", "d"),
            {"metadata": {"name": "e", "creationTimestamp": "2026-01-05T03:00:00Z"}}]  # just created: no status
    assert start_run.unfinished(runs) == ["d", "e"]
    assert start_run.to_delete(runs, keep=2) == ["a"]
    assert start_run.to_delete(runs, keep=5) == []


def test_main_creates_a_run_and_trims_old_ones(tmp_path, capsys):
    runs = [_run("Complete", f"2026-01-0{i}T03:00:00Z", f"streamrec-finetune-{i}") for i in range(1, 5)]
    api = FakeApi(runs)
    assert start_run.main(_env(tmp_path), api) == 0
    methods = [m for m, _, _ in api.calls]
    assert methods == ["GET", "GET", "POST", "DELETE", "DELETE"]
    _, path, body = api.calls[2]
    assert path == "/apis/ray.io/v1/namespaces/streamrec/rayjobs" and body["kind"] == "RayJob"
    assert body["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    assert [p.rsplit("/", 1)[1] for m, p, _ in api.calls if m == "DELETE"] == ["streamrec-finetune-1", "streamrec-finetune-2"]
    selector = urllib.parse.unquote(api.calls[0][1].split("labelSelector=")[1])
    assert selector == start_run.label_selector(_template()) and "app.kubernetes.io/component=training" in selector
    assert "created RayJob streamrec-finetune-x7k2p" in capsys.readouterr().out


def test_main_starts_nothing_while_a_run_is_unfinished(tmp_path, capsys):
    api = FakeApi([_run("Running", "2026-01-04T03:00:00Z", "streamrec-finetune-busy")])
    assert start_run.main(_env(tmp_path), api) == 0
    assert [m for m, _, _ in api.calls] == ["GET"]
    assert "streamrec-finetune-busy has not finished" in capsys.readouterr().out


def test_main_fails_when_the_api_refuses(tmp_path, capsys):
    assert start_run.main(_env(tmp_path), FakeApi([], fail="POST")) == 1
    assert "HTTP 403" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# its wiring in the manifests
# --------------------------------------------------------------------------------------------


def _generator_mount(spec: dict, container: dict, configmap: str) -> str:
    volume = next(v["name"] for v in spec["volumes"] if v.get("configMap", {}).get("name") == configmap)
    return next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume)


def test_cronjob_runs_the_script_on_the_template():
    cj = _cronjob()
    assert cj["spec"]["concurrencyPolicy"] == "Forbid"
    assert "suspend" not in cj["spec"], "a paused CronJob (kubectl patch) must stay paused across `apply`"
    spec = _pod_spec(cj)
    (c,) = spec["containers"]
    assert c["name"] == "trigger"
    assert c["image"].split(":")[0] == STREAMREC_IMAGE, "its image is the one the runs get"
    script = _one("ConfigMap", "streamrec-train-trigger")
    assert script["data"]["start_run.py"] == SCRIPT.read_text(encoding="utf-8")
    assert c["command"] == ["python", f"{_generator_mount(spec, c, 'streamrec-train-trigger')}/start_run.py"]
    env = {e["name"]: e for e in c["env"]}
    (key,) = _one("ConfigMap", "streamrec-train-template")["data"]
    assert env["TEMPLATE"]["value"] == f"{_generator_mount(spec, c, 'streamrec-train-template')}/{key}"
    assert env["CONTAINER"]["value"] == c["name"]
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"


def test_trigger_pod_knows_every_configmap_the_template_uses():
    image, configmaps = start_run.own_refs({"metadata": {"name": "x"}, "spec": _pod_spec(_cronjob())}, "trigger")
    start_run.build_rayjob(_template(), image, configmaps, "streamrec")  # raises if one is missing


def test_trigger_rbac_allows_what_the_script_does_and_no_more():
    spec = _pod_spec(_cronjob())
    sa = spec["serviceAccountName"]
    assert _one("ServiceAccount", sa)
    assert spec.get("automountServiceAccountToken") is True
    (binding,) = [b for b in _of_kind("RoleBinding") if any(s["name"] == sa for s in b["subjects"])]
    role = _one("Role", binding["roleRef"]["name"])
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
              for v in rule["verbs"]}
    assert grants == {("ray.io", "rayjobs", v) for v in ("get", "list", "create", "delete")} | {("", "pods", "get")}


def test_runs_are_told_apart_by_the_template_labels():
    """The runs are the RayJobs with the template's labels: a run of another template (another
    scene: k8s/README.md) needs labels of its own, or the two would block each other."""
    labels = _template()["metadata"]["labels"]
    assert labels.get("app.kubernetes.io/component") == "training"
    assert start_run.label_selector(_template()) == ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
