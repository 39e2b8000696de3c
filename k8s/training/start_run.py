"""Start one training run: create a RayJob from the template k8s/training/train-rayjob.yaml.

Runs in the pods of the CronJob `streamrec-train` (k8s/training/train-cronjob.yaml), on the
streamrec image (Python and PyYAML, which Ray depends on; nothing else is needed: the
Kubernetes API is called with the standard library and the pod's service account token).

What it does, in order:

1. Lists the RayJobs that carry the template's labels. If one of them has not finished
   (jobDeploymentStatus not Complete/Failed), it starts nothing and exits 0: one fine-tune at a
   time, like the CronJob's `concurrencyPolicy: Forbid`, but across manual runs too.
2. Reads its own pod and copies into the RayJob
   - its own image into every container that runs the streamrec image (kustomize `images:`
     retags this CronJob, but cannot reach into the template, which is ConfigMap data);
   - the names of the ConfigMaps it references itself (kustomize generates them with a content
     hash, e.g. `streamrec-env-5c7k9m2b4t`) for the template's base names (`streamrec-env`).
   A template that references a ConfigMap this pod does not know is an error.
3. Creates the RayJob (generateName `streamrec-finetune-`), which KubeRay runs and, 10 minutes
   after it ends, tears the GPU cluster down (`shutdownAfterJobFinishes`).
4. Deletes finished RayJobs beyond the newest KEEP_FINISHED (the clusters are gone already;
   this only trims the objects kept for `kubectl describe`).

Exit status: 0 when a run was created or one is still running; 1 when the Kubernetes API
refused something (the Job's backoffLimit retries; step 1 makes a retry after a successful
create a no-op).

Environment: POD_NAME, POD_NAMESPACE (downward API), TEMPLATE (the template's path),
CONTAINER (this container's name, default `trigger`), KEEP_FINISHED (default 5).
"""

from __future__ import annotations

import copy
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any

import yaml

STREAMREC_IMAGE = "ghcr.io/streamrec/streamrec"
TERMINAL = {"Complete", "Failed"}  # KubeRay's IsJobDeploymentTerminal
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
RAYJOBS = "/apis/ray.io/v1/namespaces/{ns}/rayjobs"
# kustomize's generated names: <name>-<10 characters of the content hash>
GENERATED = r"(-[a-z0-9]{10})?"


class ApiError(RuntimeError):
    pass


class KubeApi:
    """The few calls this script needs, authenticated with the pod's service account."""

    def __init__(self, base_url: str | None = None, sa_dir: str = SA_DIR) -> None:
        host = os.environ.get("KUBERNETES_SERVICE_HOST", "kubernetes.default.svc")
        port = os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.base = base_url or f"https://{host}:{port}"
        self.sa_dir = sa_dir
        self.ctx = ssl.create_default_context(cafile=os.path.join(sa_dir, "ca.crt"))

    def request(self, method: str, path: str, body: Mapping | None = None) -> dict:
        with open(os.path.join(self.sa_dir, "token"), encoding="utf-8") as fh:  # rotated by the kubelet
            token = fh.read().strip()
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base + path, data=data, method=method, headers={
            "Authorization": f"Bearer {token}", "Accept": "application/json",
            **({"Content-Type": "application/json"} if data else {})})
        try:
            with urllib.request.urlopen(req, context=self.ctx, timeout=30) as resp:
                return json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            raise ApiError(f"{method} {path}: HTTP {exc.code}: {exc.read()[:500].decode(errors='replace')}") from exc
        except (urllib.error.URLError, OSError) as exc:
            raise ApiError(f"{method} {path}: {exc}") from exc


def pod_specs(rayjob: Mapping) -> Iterator[dict]:
    """The pod specs a RayJob holds: the head's, each worker group's, the submitter's."""
    cluster = rayjob["spec"].get("rayClusterSpec") or {}
    if cluster.get("headGroupSpec"):
        yield cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster.get("workerGroupSpecs") or []:
        yield group["template"]["spec"]
    if rayjob["spec"].get("submitterPodTemplate"):
        yield rayjob["spec"]["submitterPodTemplate"]["spec"]


def configmap_refs(spec: Mapping) -> Iterator[tuple[dict, str]]:
    """(the dict holding the name, the key) for every ConfigMap reference in a pod spec."""
    for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
        for ref in c.get("envFrom", []):
            if "configMapRef" in ref:
                yield ref["configMapRef"], "name"
        for env in c.get("env", []):
            if "configMapKeyRef" in env.get("valueFrom", {}):
                yield env["valueFrom"]["configMapKeyRef"], "name"
    for vol in spec.get("volumes", []):
        if "configMap" in vol:
            yield vol["configMap"], "name"
        for src in vol.get("projected", {}).get("sources", []):
            if "configMap" in src:
                yield src["configMap"], "name"


def own_refs(pod: Mapping, container: str) -> tuple[str, set[str]]:
    """This pod's image (of `container`) and the ConfigMap names it references."""
    matches = [c for c in pod["spec"]["containers"] if c["name"] == container]
    if not matches:
        raise ApiError(f"pod {pod['metadata']['name']} has no container {container!r}")
    return matches[0]["image"], {holder[key] for holder, key in configmap_refs(pod["spec"])}


def resolve(base: str, known: set[str]) -> str:
    """The generated name for `base` among `known` (or `base` itself, if known as is)."""
    found = sorted(n for n in known if re.fullmatch(re.escape(base) + GENERATED, n))
    if len(found) != 1:
        raise ValueError(f"the template references ConfigMap {base!r}, but the trigger pod references "
                         f"{'none' if not found else found} of that name: mount it in train-cronjob.yaml")
    return found[0]


def build_rayjob(template: Mapping, image: str, configmaps: set[str], namespace: str) -> dict:
    """The RayJob to create: the template with this deployment's image, ConfigMaps and namespace."""
    job = copy.deepcopy(dict(template))
    meta = job.setdefault("metadata", {})
    meta.pop("name", None)
    meta.setdefault("generateName", "streamrec-finetune-")
    meta["namespace"] = namespace
    for spec in pod_specs(job):
        for c in [*spec.get("initContainers", []), *spec.get("containers", [])]:
            if c["image"].rsplit(":", 1)[0] == STREAMREC_IMAGE:
                c["image"] = image
        for holder, key in configmap_refs(spec):
            holder[key] = resolve(holder[key], configmaps)
    return job


def label_selector(template: Mapping) -> str:
    labels = template.get("metadata", {}).get("labels") or {}
    if not labels:
        raise ValueError("the template has no labels: its runs could not be told apart from other RayJobs")
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def unfinished(rayjobs: list[Mapping]) -> list[str]:
    return sorted(j["metadata"]["name"] for j in rayjobs
                  if j.get("status", {}).get("jobDeploymentStatus", "") not in TERMINAL)


def to_delete(rayjobs: list[Mapping], keep: int) -> list[str]:
    """Finished RayJobs beyond the newest `keep` (oldest first)."""
    done = sorted((j for j in rayjobs if j.get("status", {}).get("jobDeploymentStatus", "") in TERMINAL),
                  key=lambda j: (j["metadata"].get("creationTimestamp", ""), j["metadata"]["name"]))
    return [j["metadata"]["name"] for j in done[:max(0, len(done) - keep)]]


def main(env: Mapping[str, str] = os.environ, api: Any = None) -> int:
    ns, pod_name = env["POD_NAMESPACE"], env["POD_NAME"]
    keep = int(env.get("KEEP_FINISHED", "5"))
    with open(env["TEMPLATE"], encoding="utf-8") as fh:
        template = yaml.safe_load(fh)
    api = api or KubeApi()
    base = RAYJOBS.format(ns=urllib.parse.quote(ns))
    try:
        runs = api.request("GET", f"{base}?labelSelector={urllib.parse.quote(label_selector(template))}")
        items = runs.get("items", [])
        busy = unfinished(items)
        if busy:
            print(f"streamrec-train: {', '.join(busy)} has not finished: not starting another run", flush=True)
            return 0
        pod = api.request("GET", f"/api/v1/namespaces/{urllib.parse.quote(ns)}/pods/{urllib.parse.quote(pod_name)}")
        image, configmaps = own_refs(pod, env.get("CONTAINER", "trigger"))
        created = api.request("POST", base, build_rayjob(template, image, configmaps, ns))
        name = created["metadata"]["name"]
        print(f"streamrec-train: created RayJob {name} ({image}); follow it with\n"
              f"  kubectl -n {ns} get rayjob {name} -w\n  kubectl -n {ns} logs -f job/{name}", flush=True)
        for old in to_delete(items, keep):
            api.request("DELETE", f"{base}/{urllib.parse.quote(old)}", {"propagationPolicy": "Background"})
            print(f"streamrec-train: deleted finished RayJob {old} (keeping the newest {keep})", flush=True)
    except (ApiError, ValueError) as exc:
        print(f"streamrec-train: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
