"""The container image: its lock files agree with pyproject.toml and the manifests, and (marked
`image`) k8s/image/build.sh builds it with podman and smoke-tests it inside the image."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
IMAGE_DIR = ROOT / "k8s" / "image"
LOCKS = {v: IMAGE_DIR / f"requirements-{v}.lock" for v in ("cpu", "gpu")}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)", re.M)
# the whole image test: debootstrap (once), ~1 GB of wheels (once), the build, the smoke test
IMAGE_BUILD_TIMEOUT_S = 1800

sys.path.insert(0, str(IMAGE_DIR))
from ray_version import manifest_ray_versions  # noqa: E402  (a script's module, not a package)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(variant: str) -> dict[str, str]:
    return {_norm(n): v for n, v in PIN.findall(LOCKS[variant].read_text())}


def _requirement_name(req: str) -> str:
    return _norm(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", req).group(0))


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.parametrize("variant", LOCKS)
def test_the_lock_pins_the_ray_the_manifests_declare(variant):
    declared = manifest_ray_versions()
    versions = set().union(*declared.values())
    assert len(versions) == 1, f"the RayService and the RayJob must declare one rayVersion: {declared}"
    assert _pins(variant)["ray"] == versions.pop(), (
        f"{LOCKS[variant].name} pins ray {_pins(variant)['ray']} but the manifests declare {declared}: "
        "change both together (k8s/image/lock.sh regenerates the locks)")


@pytest.mark.parametrize("variant", LOCKS)
def test_every_dependency_of_pyproject_is_locked_with_hashes(variant):
    pins = _pins(variant)
    for req in PYPROJECT["project"]["dependencies"]:
        name = _requirement_name(req)
        if variant == "gpu" and name == "faiss-cpu":
            name = "faiss-gpu"
        assert name in pins, f"{req!r} of pyproject.toml is not in {LOCKS[variant].name}: run k8s/image/lock.sh"
    text = LOCKS[variant].read_text()
    unhashed = [n for n, _ in PIN.findall(text)
                if not re.search(rf"^{re.escape(n)}==\S+ \\\n\s+--hash=sha256:", text, re.M)]
    assert not unhashed, f"pins without hashes in {LOCKS[variant].name}: {unhashed}"


def test_the_variants_differ_only_where_they_should():
    cpu, gpu = _pins("cpu"), _pins("gpu")
    assert cpu["torch"].endswith("+cpu") and "faiss-cpu" in cpu and "faiss-gpu" not in cpu
    assert not gpu["torch"].endswith("+cpu") and "faiss-gpu" in gpu and "faiss-cpu" not in gpu
    assert gpu["faiss-gpu"] == cpu["faiss-cpu"], "one FAISS release in both images"
    assert any(n.startswith("nvidia-") for n in gpu), "the GPU lock carries torch's CUDA runtime wheels"


def test_the_dockerfile_runs_streamrec_as_the_manifests_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "USER 10001:10001" in dockerfile and '--uid 10001' in dockerfile and '--gid 10001' in dockerfile
    assert 'ENTRYPOINT ["streamrec"]' in dockerfile
    assert re.search(r"pip install --no-index --find-links /wheels --require-hashes", dockerfile)
    for label in ("title", "version", "revision", "created", "source"):
        assert f"org.opencontainers.image.{label}=" in dockerfile
    # every pod that runs the streamrec image runs it as that user
    checked = 0
    for manifest in (ROOT / "k8s").rglob("*.yaml"):
        for doc in yaml.safe_load_all(manifest.read_text()):
            for pod in _pod_specs(doc):
                ours = [c for c in pod["containers"] if "streamrec/streamrec" in str(c.get("image", ""))]
                ids = [v for c in ours for k, v in (c.get("securityContext") or {}).items() if k in UID_KEYS]
                if ours:
                    ids += [v for k, v in (pod.get("securityContext") or {}).items() if k in UID_KEYS]
                    checked += 1
                assert set(ids) <= {10001}, f"{manifest.relative_to(ROOT)} runs the image as {ids}, it runs as 10001"
    assert checked >= 5, "the ingest, features, train trigger, RayService and RayJob pods run the image"


UID_KEYS = ("runAsUser", "runAsGroup", "fsGroup")


def _pod_specs(node):
    """Every pod spec (a mapping with `containers`) anywhere in a manifest."""
    if isinstance(node, dict):
        if isinstance(node.get("containers"), list):
            yield node
        for v in node.values():
            yield from _pod_specs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _pod_specs(v)


def test_the_build_context_leaves_out_the_venv_and_the_data():
    rules = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert rules[0] == "*", "an allow-list: everything not named after '*' stays out of the build context"
    assert not {"!.venv/", "!streamrec-data/", "!tests/"} & set(rules)


def _image_tools_missing() -> list[str]:
    return [t for t in ("podman", "buildah", "debootstrap") if shutil.which(t) is None]


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.timeout(IMAGE_BUILD_TIMEOUT_S)
def test_the_image_builds_and_passes_its_smoke_test(tmp_path):
    missing = _image_tools_missing()
    if missing and os.geteuid() != 0:
        pytest.skip(f"{missing} not installed and not root to install them (.ci/run installs them)")
    tag = "localhost/streamrec:test"
    proc = subprocess.run([str(IMAGE_DIR / "build.sh"), "--tag", tag], cwd=ROOT, capture_output=True,
                          text=True, timeout=IMAGE_BUILD_TIMEOUT_S)
    out = proc.stdout + proc.stderr
    print(out[-3000:])  # the size and the build time, in the test log
    assert proc.returncode == 0, out[-6000:]
    assert "smoke test passed" in out
    size_mb = int(re.search(r"image \S+: (\d+) MB", out).group(1))
    assert size_mb > 100, f"an image of {size_mb} MB cannot hold torch and ray"
