"""Print the Ray version that the RayService and the RayJob template declare (`rayVersion`).

    python k8s/image/ray_version.py

The image must carry exactly this Ray: build.sh's smoke test compares it with the `ray` inside the
image, and tests/k8s/test_image.py with the lock files' pin. Exits 1 when the manifests disagree.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

K8S = Path(__file__).resolve().parents[1]
MANIFESTS = (K8S / "serving" / "rayservice.yaml", K8S / "training" / "train-rayjob.yaml")
RAY_VERSION = re.compile(r'^\s*rayVersion:\s*"?([0-9][0-9A-Za-z.+-]*)"?', re.M)


def manifest_ray_versions() -> dict[str, set[str]]:
    """Each manifest's declared rayVersion values (a RayService may declare it more than once)."""
    return {str(p.relative_to(K8S.parent)): set(RAY_VERSION.findall(p.read_text())) for p in MANIFESTS}


def main() -> int:
    found = manifest_ray_versions()
    versions = set().union(*found.values())
    if len(versions) != 1 or any(not v for v in found.values()):
        print(f"the manifests must declare one rayVersion, found {found}", file=sys.stderr)
        return 1
    print(versions.pop())
    return 0


if __name__ == "__main__":
    sys.exit(main())
