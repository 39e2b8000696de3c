"""The adapter registry: versioned, checksummed, atomically published adapters per scene.

Layout (the root is a local directory or any `pyarrow.fs` URI: s3://, gs://, file:///...)::

    <root>/<scene>/CURRENT.json          the pointer: which version is live (see below)
    <root>/<scene>/v000001/              one published version: the adapter's files (any nesting)
    <root>/<scene>/v000001/manifest.json   base model + hash, version, parent, data window,
                                           metrics, gate decision, sha256 + size of every file
    <root>/<scene>/.lock                 local roots only: the scene's fcntl publish/rollback lock
    <root>/<scene>/.staging-<uuid>/      local roots only: a publish in progress (never listed)

The pointer ``CURRENT.json`` is the only thing that makes a version visible::

    {"scene": ..., "version": "v000002", "updated_at": ISO-UTC,
     "latest_published": "v000002",     # the highest version id ever made live
     "history": ["v000001", ...],       # rollback stack: earlier live versions, newest first (<= 20)
     "log": [{"action": "publish"|"rollback", "from": ..., "to": ..., "at": ...}, ...]}  # newest first

A publish pushes the version it replaces onto ``history``; a rollback pops down to its target
(so rolling back twice goes two versions back, not back and forth) and, like every pointer
change, is recorded in ``log`` (at most 50 entries).

A version directory whose id is above ``latest_published`` was left by a publish that crashed
before its pointer swap: it is never listed, never returned by `get`/`open`, and the next
publish deletes it. Version ids are assigned under the lock, after that clean-up, as the highest
remaining id (or ``latest_published``) + 1, so the id of a crashed attempt may be reused: it was
never visible to anyone.

Publish, in this order (local root):

1. take the scene's lock (``<scene>/.lock``, an exclusive ``flock``), read the pointer;
2. check ``expected_parent`` against the live version -> `ConcurrentPublish`;
3. the gate, unless ``force``: refuse a candidate below ``current - tolerance`` -> `GateRefused`
   (nothing has been written yet);
4. delete leftovers of crashed publishes: every ``.staging-*`` directory, pointer temp files
   and version directories above ``latest_published``. All of them, regardless of age: we hold
   the lock, so no live publish can own them;
5. copy the staged files into ``.staging-<uuid>/`` (hashing the bytes as they are written, so the
   manifest describes exactly what the registry holds), write ``manifest.json``, fsync every
   file and directory;
6. rename ``.staging-<uuid>`` to ``<version>`` (one atomic ``rename``), fsync the scene directory;
7. write the new pointer to a temp file, fsync, ``os.replace`` it onto ``CURRENT.json``, fsync
   the scene directory.

Why that is crash-safe: readers look only at the pointer and at the version it names. Until
step 7's ``os.replace`` the pointer still names the previous version, whose directory is never
modified; a crash anywhere before leaves at most an unlisted staging directory, an orphan version
directory above ``latest_published`` or a pointer temp file, which the next publish removes. The
``os.replace`` itself is atomic: a reader sees the old pointer or the new one, never a mix, and
the version the new pointer names was complete and durable (fsync'd) before it. Published
version directories are immutable, so a reader that resolved a version keeps a consistent view
of it even while newer versions are published or the pointer is rolled back.

Remote roots (object stores) have no atomic directory rename and no cross-host ``flock``:
a publish uploads the files straight into ``<version>/`` (``manifest.json`` last) -- still
invisible, because the version is above ``latest_published`` until the pointer names it -- then
re-reads the pointer and raises `ConcurrentPublish` if the live version changed since it was read
(compare-and-swap on ``expected_parent`` / the live version), and finally writes the pointer with
one PUT, which object stores apply atomically. There is a small window between that re-read and
the PUT, so run one publisher per scene against a remote root (the trainer does). Leftover orphan
version directories on a remote root are only removed once they are more than
`STALE_LEFTOVER_S` old, since without a lock a younger one may belong to a publish in progress.
(For a ``file://`` URI the pointer is written to a temp object and moved into place, because a
local file is not replaced atomically by an overwrite.)

Test hook: when the environment variable ``STREAMREC_REGISTRY_CRASH_AT`` names a publish step
(`CRASH_STEPS`), the process calls ``os._exit(99)`` at that point. The crash-safety tests use it
to kill a publishing subprocess between steps; it does nothing unless set.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import math
import os
import re
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow.fs as pafs

from streaming.versioned_store import fsync_dir
from streaming.file_lock import flock_exclusive

MANIFEST = "manifest.json"
POINTER = "CURRENT.json"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
DOWNLOAD_PREFIX = ".download-"
POINTER_TMP_PREFIX = ".CURRENT.json."
TMP_SUFFIX = ".tmp"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
VERSION_RE = re.compile(r"^v(\d{6,})$")
VERSION_DIGITS = 6

HISTORY_MAX = 20  # rollback targets kept in the pointer
LOG_MAX = 50  # pointer changes kept in the pointer's log

LOCK_TIMEOUT_S = 300.0  # a publish copies the adapter while holding the lock; wait that long
LOCK_POLL_S = 0.05
STALE_LEFTOVER_S = 3600.0  # remote roots: orphans older than this are from crashed publishes
GATE_EPSILON = 1e-12  # so that `candidate == current - tolerance` passes despite float rounding
CHUNK_BYTES = 1 << 20

CRASH_ENV = "STREAMREC_REGISTRY_CRASH_AT"
CRASH_EXIT_CODE = 99
CRASH_STEPS = ("after_staging", "after_move", "before_pointer_replace", "after_pointer_replace")

# Keys of the manifest the registry writes; a caller may not supply them.
RESERVED_KEYS = frozenset({"scene", "version", "parent", "created_at", "files", "gate"})


# --- errors --------------------------------------------------------------------------------
class RegistryError(Exception):
    """A registry operation failed; the message names the scene, version or file at fault."""


class VersionNotFound(RegistryError):
    """The scene has no such (published) version, or no live version at all."""


class ChecksumMismatch(RegistryError):
    """A file's content differs from its manifest entry."""

    def __init__(self, message: str, *, file: str, expected: str, actual: str):
        super().__init__(message)
        self.file, self.expected, self.actual = file, expected, actual


class GateRefused(RegistryError):
    """The candidate's metric is below the live version's minus the tolerance."""

    def __init__(self, message: str, *, candidate: float, current: float | None, tolerance: float):
        super().__init__(message)
        self.candidate, self.current, self.tolerance = candidate, current, tolerance


class ConcurrentPublish(RegistryError):
    """The live version changed since the caller (or this publish) read it."""


class _Unset:
    """Sentinel type: `expected_parent` not given (None means 'expect no live version')."""

    _instance: "_Unset | None" = None

    def __new__(cls) -> "_Unset":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"


UNSET = _Unset()


# --- helpers -------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def _iter_files(directory: Path) -> Iterator[tuple[str, Path]]:
    """(posix relative path, path) of every regular file under `directory`, sorted."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            yield path.relative_to(directory).as_posix(), path


def file_checksums(directory: str | Path) -> dict[str, dict[str, Any]]:
    """``{relpath: {"sha256": ..., "bytes": ...}}`` for every file under `directory` (recursive)."""
    directory = Path(directory)
    return {rel: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for rel, p in _iter_files(directory)}


def gate_decision(candidate: float, current: float | None, tolerance: float) -> tuple[bool, str]:
    """Whether a candidate with metric `candidate` may replace one with `current`, and why.

    Passes when there is no current metric or ``candidate >= current - tolerance``. A NaN
    candidate never passes."""
    if tolerance < 0 or math.isnan(tolerance):
        raise ValueError(f"gate tolerance must be >= 0, got {tolerance!r}")
    if current is None:
        return True, f"no current metric to compare with; candidate {candidate:.4f} accepted"
    threshold = current - tolerance
    if candidate >= threshold - GATE_EPSILON:
        return True, (
            f"candidate {candidate:.4f} >= current {current:.4f} - tolerance {tolerance:.4f} "
            f"= {threshold:.4f}: accepted"
        )
    return False, (
        f"candidate {candidate:.4f} < current {current:.4f} - tolerance {tolerance:.4f} "
        f"= {threshold:.4f}: refused"
    )


def validate_name(value: str, kind: str = "scene") -> str:
    """Return `value` if it is a safe scene/version name (no path separators, no leading dot)."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise RegistryError(f"invalid {kind} name {value!r}: expected {NAME_RE.pattern}")
    return value


def _version_number(version: str) -> int | None:
    m = VERSION_RE.match(version)
    return int(m.group(1)) if m else None


def _version_name(number: int) -> str:
    return f"v{number:0{VERSION_DIGITS}d}"


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _crash_point(step: str) -> None:
    # Test hook (see the module docstring): die here, like a SIGKILL would, without cleanup.
    if os.environ.get(CRASH_ENV) == step:
        os._exit(CRASH_EXIT_CODE)


def _json_bytes(obj: Any, what: str) -> bytes:
    try:
        return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} is not JSON-serializable: {exc}") from None


def _copy_hashing(src: IO[bytes], dst: IO[bytes]) -> tuple[str, int]:
    """Copy a stream, returning the sha256 and size of exactly the bytes written."""
    h = hashlib.sha256()
    n = 0
    for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):
        dst.write(chunk)
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def _hash_stream(src: IO[bytes]) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


# --- version info --------------------------------------------------------------------------
@dataclass(frozen=True)
class VersionInfo:
    """One published version: `path` is its directory (a local path, or a URI for remote roots)."""

    scene: str
    version: str
    path: str
    manifest: dict

    @property
    def created_at(self) -> str | None:
        return self.manifest.get("created_at")

    @property
    def parent(self) -> str | None:
        return self.manifest.get("parent")

    @property
    def metrics(self) -> dict:
        return dict(self.manifest.get("metrics") or {})

    @property
    def files(self) -> dict[str, dict[str, Any]]:
        return dict(self.manifest.get("files") or {})


# --- storage backends ----------------------------------------------------------------------
class _LocalStore:
    """A local directory: os calls, so that files and directories can be fsync'd and renamed."""

    remote = False

    def __init__(self, root: str):
        self.root = Path(root).expanduser().absolute()

    def path(self, rel: str) -> Path:
        return self.root / rel if rel else self.root

    def uri(self, rel: str) -> str:
        return str(self.path(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            return self.path(rel).read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None

    def list_dir(self, rel: str) -> list[tuple[str, bool, float]]:
        """(name, is_dir, mtime) of the entries of a directory; [] when it does not exist."""
        try:
            entries = list(os.scandir(self.path(rel)))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            try:
                out.append((e.name, e.is_dir(follow_symlinks=False), e.stat(follow_symlinks=False).st_mtime))
            except FileNotFoundError:  # removed meanwhile
                continue
        return out

    def list_files(self, rel: str) -> dict[str, int]:
        base = self.path(rel)
        return {r: p.stat().st_size for r, p in _iter_files(base)} if base.is_dir() else {}

    def open_input(self, rel: str) -> IO[bytes]:
        return open(self.path(rel), "rb")

    def remove_tree(self, rel: str) -> None:
        p = self.path(rel)
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def write_pointer(self, rel: str, data: bytes) -> None:
        target = self.path(rel)
        tmp = target.parent / f"{POINTER_TMP_PREFIX}{uuid.uuid4().hex}{TMP_SUFFIX}"
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _crash_point("before_pointer_replace")
        os.replace(tmp, target)
        _crash_point("after_pointer_replace")
        fsync_dir(target.parent)


class _ArrowStore:
    """Any `pyarrow.fs` filesystem named by a URI (object stores, file://)."""

    remote = True

    def __init__(self, uri: str):
        try:
            self.fs, base = pafs.FileSystem.from_uri(uri)
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError for bad or unknown URIs
            raise RegistryError(f"cannot open registry root {uri!r}: {exc}") from None
        self.base = base.rstrip("/")
        self.root_uri = uri.rstrip("/")
        # A local file is not replaced atomically by an overwrite; a rename is.
        self._rename_pointer = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def uri(self, rel: str) -> str:
        return f"{self.root_uri}/{rel}" if rel else self.root_uri

    def _info(self, rel: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError:
            if self._info(rel).type == pafs.FileType.NotFound:
                return None
            raise

    def list_dir(self, rel: str) -> list[tuple[str, bool, float]]:
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        out = []
        for info in self.fs.get_file_info(selector):
            mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
            out.append((info.base_name, info.type == pafs.FileType.Directory, mtime))
        return out

    def newest_mtime(self, rel: str) -> float:
        selector = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=True)
        times = [i.mtime.timestamp() for i in self.fs.get_file_info(selector) if i.mtime is not None]
        return max(times, default=0.0)

    def list_files(self, rel: str) -> dict[str, int]:
        base = self.path(rel)
        selector = pafs.FileSelector(base, allow_not_found=True, recursive=True)
        out = {}
        for info in self.fs.get_file_info(selector):
            if info.type == pafs.FileType.File:
                out[info.path[len(base) + 1:]] = info.size
        return dict(sorted(out.items()))

    def open_input(self, rel: str) -> IO[bytes]:
        return self.fs.open_input_stream(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        info = self._info(rel)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def put(self, rel: str, src: IO[bytes]) -> tuple[str, int]:
        path = self.path(rel)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as out:
            return _copy_hashing(src, out)

    def write_pointer(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self._rename_pointer:
            tmp = f"{parent}/{POINTER_TMP_PREFIX}{uuid.uuid4().hex}{TMP_SUFFIX}"
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            _crash_point("before_pointer_replace")
            self.fs.move(tmp, path)
        else:
            _crash_point("before_pointer_replace")
            # One small PUT: object stores make the new object visible whole, or not at all.
            with self.fs.open_output_stream(path) as out:
                out.write(data)
        _crash_point("after_pointer_replace")


def _make_store(root: str) -> _LocalStore | _ArrowStore:
    if not isinstance(root, (str, os.PathLike)) or not str(root).strip():
        raise RegistryError(f"invalid registry root {root!r}")
    root = str(root)
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", root):
        return _ArrowStore(root)
    return _LocalStore(root)


# --- the registry --------------------------------------------------------------------------
class Registry:
    """Versioned adapters per scene under `root` (a local directory or a `pyarrow.fs` URI)."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self._store = _make_store(self.root)

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    @property
    def is_remote(self) -> bool:
        return self._store.remote

    # --- reading -------------------------------------------------------------------------
    def pointer(self, scene: str) -> dict | None:
        """The scene's pointer (``CURRENT.json``) as a dict, or None if nothing was published."""
        validate_name(scene, "scene")
        raw = self._store.read_bytes(f"{scene}/{POINTER}")
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise RegistryError(f"scene {scene!r}: pointer {self._store.uri(f'{scene}/{POINTER}')} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("version"), str):
            raise RegistryError(f"scene {scene!r}: pointer {self._store.uri(f'{scene}/{POINTER}')} names no version")
        return data

    def scenes(self) -> list[str]:
        """Scenes with at least one published version, sorted."""
        out = []
        for name, is_dir, _ in self._store.list_dir(""):
            if is_dir and NAME_RE.match(name) and self._store.read_bytes(f"{name}/{POINTER}") is not None:
                out.append(name)
        return sorted(out)

    def versions(self, scene: str) -> list[VersionInfo]:
        """The scene's published versions, oldest first (staging and crash leftovers excluded)."""
        pointer = self.pointer(scene)
        if pointer is None:
            return []
        limit = _version_number(pointer.get("latest_published") or pointer["version"]) or 0
        numbers = sorted(
            n for name, is_dir, _ in self._store.list_dir(scene)
            if is_dir and (n := _version_number(name)) is not None and n <= limit
        )
        out = []
        for n in numbers:
            try:
                out.append(self._load(scene, _version_name(n)))
            except VersionNotFound:  # a version directory deleted by hand; list the rest
                continue
        return out

    def current(self, scene: str) -> VersionInfo | None:
        """The live version (the one the pointer names), or None if the scene has none."""
        pointer = self.pointer(scene)
        if pointer is None:
            return None
        return self._load(scene, pointer["version"])

    def get(self, scene: str, version: str) -> VersionInfo:
        """A published version; `VersionNotFound` for an unknown or never-published one."""
        validate_name(scene, "scene")
        validate_name(version, "version")
        pointer = self.pointer(scene)
        if pointer is None:
            raise VersionNotFound(f"scene {scene!r} has no published versions (under {self.root})")
        number = _version_number(version)
        limit = _version_number(pointer.get("latest_published") or pointer["version"]) or 0
        if number is None or number > limit:
            raise VersionNotFound(f"scene {scene!r} has no version {version!r}")
        return self._load(scene, version)

    def _load(self, scene: str, version: str) -> VersionInfo:
        rel = f"{scene}/{version}/{MANIFEST}"
        raw = self._store.read_bytes(rel)
        if raw is None:
            raise VersionNotFound(f"scene {scene!r} has no version {version!r} ({self._store.uri(rel)} is missing)")
        try:
            manifest = json.loads(raw)
        except ValueError as exc:
            raise RegistryError(f"scene {scene!r} version {version!r}: {self._store.uri(rel)} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("scene") != scene or manifest.get("version") != version:
            raise RegistryError(
                f"scene {scene!r} version {version!r}: {self._store.uri(rel)} describes "
                f"scene {manifest.get('scene')!r} version {manifest.get('version')!r}"
                if isinstance(manifest, dict) else f"scene {scene!r} version {version!r}: {self._store.uri(rel)} is not an object"
            )
        return VersionInfo(scene, version, self._store.uri(f"{scene}/{version}"), manifest)

    def _resolve(self, scene: str, version: str | None) -> VersionInfo:
        if version is not None:
            return self.get(scene, version)
        info = self.current(scene)
        if info is None:
            raise VersionNotFound(f"scene {scene!r} has no live version (under {self.root})")
        return info

    # --- verification --------------------------------------------------------------------
    def verify(self, scene: str, version: str | None = None) -> VersionInfo:
        """Check every file of a version (default: the live one) against its manifest, in place:
        `ChecksumMismatch` for a changed file, `RegistryError` for a missing or unexpected one."""
        info = self._resolve(scene, version)
        rel = f"{scene}/{info.version}"
        present = self._store.list_files(rel)
        present.pop(MANIFEST, None)
        _check_file_set(info, set(present))
        for name, entry in info.files.items():
            with self._store.open_input(f"{rel}/{name}") as fh:
                digest, size = _hash_stream(fh)
            _check_entry(info, name, entry, digest, size)
        return info

    # --- opening -------------------------------------------------------------------------
    def open(
        self,
        scene: str,
        version: str | None = None,
        *,
        verify: bool = True,
        cache_dir: Path | None = None,
    ) -> Path:
        """A local directory holding the version's files and its ``manifest.json``.

        Local root: the version directory itself (published versions are never modified).
        Remote root: a copy under ``cache_dir/<scene>/<version>/`` (default
        `default_cache_dir()`), downloaded to a temp directory and renamed into place, reused
        when its manifest matches. ``verify`` checks every file's sha256 and size."""
        info = self._resolve(scene, version)
        if not self._store.remote:
            path = self._store.path(f"{scene}/{info.version}")
            if verify:
                _verify_local_dir(info, path)
            return path
        return self._download(info, Path(cache_dir) if cache_dir is not None else default_cache_dir(), verify)

    def _download(self, info: VersionInfo, cache_dir: Path, verify: bool) -> Path:
        store = self._store
        assert isinstance(store, _ArrowStore)
        scene_cache = cache_dir / info.scene
        target = scene_cache / info.version
        manifest_bytes = _json_bytes(info.manifest, "manifest")
        if target.is_dir():
            cached = target / MANIFEST
            try:
                same = json.loads(cached.read_bytes()) == info.manifest
            except (OSError, ValueError):
                same = False
            if same:
                if not verify:
                    return target
                try:
                    _verify_local_dir(info, target)
                    return target
                except RegistryError:
                    pass  # a damaged cached copy: download it again below
        scene_cache.mkdir(parents=True, exist_ok=True)
        tmp = scene_cache / f"{DOWNLOAD_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name, entry in info.files.items():
                dest = tmp / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    src = store.open_input(f"{info.scene}/{info.version}/{name}")
                except FileNotFoundError:
                    raise RegistryError(
                        f"scene {info.scene!r} version {info.version!r}: file {name!r} is missing from {info.path}"
                    ) from None
                with src, open(dest, "wb") as out:
                    digest, size = _copy_hashing(src, out)
                if verify:
                    _check_entry(info, name, entry, digest, size)
            (tmp / MANIFEST).write_bytes(manifest_bytes)
            if target.exists():
                # Stale or damaged copy: move it aside first, so the rename below is atomic.
                trash = scene_cache / f"{DOWNLOAD_PREFIX}{uuid.uuid4().hex}-old"
                try:
                    os.rename(target, trash)
                except FileNotFoundError:
                    trash = None
                if trash is not None:
                    shutil.rmtree(trash, ignore_errors=True)
            try:
                os.rename(tmp, target)
            except OSError as exc:
                if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                # Another process installed the same version meanwhile: use theirs.
                shutil.rmtree(tmp, ignore_errors=True)
                if verify:
                    _verify_local_dir(info, target)
            return target
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    # --- publishing ----------------------------------------------------------------------
    def publish(
        self,
        scene: str,
        staged_dir: Path,
        manifest: dict,
        *,
        expected_parent: str | None | _Unset = UNSET,
        gate: tuple[float, float | None] | None = None,
        tolerance: float = 0.005,
        force: bool = False,
    ) -> VersionInfo:
        """Publish the files under `staged_dir` (a local directory) as the scene's next version.

        `manifest` holds the caller's fields (base_model, base_model_sha256, data_window, metrics,
        config, ...); the registry adds scene, version, parent, created_at, files and gate.
        `expected_parent`: the live version the candidate was trained against (None: no live
        version) -> `ConcurrentPublish` when it is no longer live. `gate`: (candidate metric,
        current version's metric on the same split) -> `GateRefused` unless `force`; None
        publishes ungated. See the module docstring for the step order."""
        validate_name(scene, "scene")
        staged = Path(staged_dir)
        if not staged.is_dir():
            raise RegistryError(f"scene {scene!r}: staged directory {staged} does not exist")
        sources = list(_iter_files(staged))
        if not sources:
            raise RegistryError(f"scene {scene!r}: staged directory {staged} holds no files")
        if any(rel == MANIFEST for rel, _ in sources):
            raise RegistryError(f"scene {scene!r}: staged directory {staged} holds a {MANIFEST}, which the registry writes")
        if not isinstance(manifest, dict):
            raise RegistryError(f"scene {scene!r}: manifest must be a dict, got {type(manifest).__name__}")
        reserved = sorted(RESERVED_KEYS & manifest.keys())
        if reserved:
            raise RegistryError(f"scene {scene!r}: manifest keys {reserved} are written by the registry")
        _json_bytes(manifest, f"scene {scene!r}: manifest")  # fail before taking the lock

        with self._scene_lock(scene):
            pointer = self.pointer(scene)
            live = pointer["version"] if pointer else None
            _check_expected(scene, expected_parent, live)
            gate_record = _gate(scene, gate, tolerance, force)

            self._remove_leftovers(scene, pointer)
            version = self._next_version(scene, pointer)
            full = {
                **manifest,
                "scene": scene,
                "version": version,
                "parent": live,
                "created_at": _now_iso(),
                "gate": gate_record,
            }
            if self._store.remote:
                full["files"] = self._upload(scene, version, sources, full)
            else:
                full["files"] = self._stage_and_move(scene, version, sources, full)

            if self._store.remote:
                # Compare-and-swap: no lock spans hosts, so re-read the pointer just before the swap.
                latest = self.pointer(scene)
                if (latest["version"] if latest else None) != live:
                    self._store.remove_tree(f"{scene}/{version}")
                    raise ConcurrentPublish(
                        f"scene {scene!r}: the live version changed from {live!r} to "
                        f"{latest['version'] if latest else None!r} during the publish of {version!r}"
                    )
            self._write_pointer(scene, pointer, version, "publish", latest_published=version)
        return VersionInfo(scene, version, self._store.uri(f"{scene}/{version}"), full)

    def _stage_and_move(self, scene: str, version: str, sources: list[tuple[str, Path]], manifest: dict) -> dict:
        store = self._store
        assert isinstance(store, _LocalStore)
        scene_dir = store.path(scene)
        staging = scene_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        files: dict[str, dict[str, Any]] = {}
        dirs = {staging}
        for rel, src in sources:
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dirs.update(p for p in dest.parents if p != staging and staging in p.parents)
            with open(src, "rb") as fin, open(dest, "wb") as fout:
                digest, size = _copy_hashing(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())
            files[rel] = {"sha256": digest, "bytes": size}
        manifest["files"] = files
        with open(staging / MANIFEST, "wb") as fh:
            fh.write(_json_bytes(manifest, f"scene {scene!r} version {version!r}: manifest"))
            fh.flush()
            os.fsync(fh.fileno())
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        _crash_point("after_staging")
        target = scene_dir / version
        try:
            os.rename(staging, target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise RegistryError(f"scene {scene!r}: cannot move the staged version to {target}: {exc}") from None
        fsync_dir(scene_dir)
        _crash_point("after_move")
        return files

    def _upload(self, scene: str, version: str, sources: list[tuple[str, Path]], manifest: dict) -> dict:
        store = self._store
        assert isinstance(store, _ArrowStore)
        files: dict[str, dict[str, Any]] = {}
        for rel, src in sources:
            with open(src, "rb") as fin:
                digest, size = store.put(f"{scene}/{version}/{rel}", fin)
            files[rel] = {"sha256": digest, "bytes": size}
        manifest["files"] = files
        _crash_point("after_staging")
        # The manifest goes last: a version directory with a manifest has all its files.
        data = _json_bytes(manifest, f"scene {scene!r} version {version!r}: manifest")
        store.put(f"{scene}/{version}/{MANIFEST}", _BytesReader(data))
        _crash_point("after_move")  # no move on object stores: the pointer alone makes it visible
        return files

    def _next_version(self, scene: str, pointer: dict | None) -> str:
        numbers = [n for name, is_dir, _ in self._store.list_dir(scene) if is_dir and (n := _version_number(name)) is not None]
        if pointer:
            numbers.append(_version_number(pointer.get("latest_published") or pointer["version"]) or 0)
        return _version_name(max(numbers, default=0) + 1)

    def _remove_leftovers(self, scene: str, pointer: dict | None) -> None:
        """Delete what crashed publishes left: staging dirs, pointer temp files and version
        directories above ``latest_published``. Local roots hold the lock, so all of them are
        leftovers; remote roots only remove those older than `STALE_LEFTOVER_S`."""
        limit = _version_number((pointer.get("latest_published") or pointer["version"])) if pointer else 0
        now = time.time()
        for name, is_dir, mtime in self._store.list_dir(scene):
            number = _version_number(name)
            leftover = (
                (is_dir and name.startswith(STAGING_PREFIX))
                or (not is_dir and name.startswith(POINTER_TMP_PREFIX) and name.endswith(TMP_SUFFIX))
                or (is_dir and number is not None and number > (limit or 0))
            )
            if not leftover:
                continue
            if self._store.remote:
                age_ref = self._store.newest_mtime(f"{scene}/{name}") if is_dir else mtime
                if now - (age_ref or mtime) < STALE_LEFTOVER_S:
                    continue
            self._store.remove_tree(f"{scene}/{name}")

    def _write_pointer(
        self, scene: str, old: dict | None, version: str, action: str, *, latest_published: str | None = None
    ) -> None:
        now = _now_iso()
        previous = old["version"] if old else None
        history = list(old.get("history", [])) if old else []
        if action == "publish":
            # A publish pushes the version it replaces onto the rollback stack.
            if previous is not None:
                history.insert(0, previous)
        elif version in history:
            # A rollback walks back down the stack: the target and everything above it leave it,
            # so that rolling back again goes further back instead of undoing the rollback. The
            # version rolled back from is recorded in the log.
            history = history[history.index(version) + 1:]
        history = [v for i, v in enumerate(history) if v != version and v not in history[:i]][:HISTORY_MAX]
        log_entry = {"action": action, "from": previous, "to": version, "at": now}
        log = [log_entry, *(old.get("log", []) if old else [])][:LOG_MAX]
        latest = latest_published or (old.get("latest_published") if old else None) or version
        data = {
            "scene": scene,
            "version": version,
            "updated_at": now,
            "latest_published": latest,
            "history": history,
            "log": log,
        }
        self._store.write_pointer(f"{scene}/{POINTER}", _json_bytes(data, f"scene {scene!r}: pointer"))

    # --- rollback ------------------------------------------------------------------------
    def rollback(self, scene: str, to_version: str | None = None) -> VersionInfo:
        """Make an earlier version live again by moving the pointer (nothing else changes).

        ``to_version`` None: the newest entry of the pointer's history (the version live before
        the current one); repeating walks further back. An explicit version may be any published
        version; the history entries down to it are dropped. Every rollback is recorded in the
        pointer's ``log`` (from, to, time). The target's files are verified first: a corrupt or
        incomplete version is refused (`ChecksumMismatch` / `RegistryError`) and nothing changes."""
        validate_name(scene, "scene")
        if to_version is not None:
            validate_name(to_version, "version")
        if self.pointer(scene) is None:
            raise VersionNotFound(f"scene {scene!r} has no published versions (under {self.root})")
        with self._scene_lock(scene):
            pointer = self.pointer(scene)
            assert pointer is not None
            live = pointer["version"]
            if to_version is None:
                history = [v for v in pointer.get("history", []) if v != live]
                if not history:
                    raise RegistryError(f"scene {scene!r}: no earlier version to roll back to from {live!r}")
                target = history[0]
            else:
                target = to_version
            if target == live:
                raise RegistryError(f"scene {scene!r}: {target!r} is already the live version")
            info = self.verify(scene, target)  # VersionNotFound / ChecksumMismatch before any change
            if self._store.remote:
                latest = self.pointer(scene)
                if (latest["version"] if latest else None) != live:
                    raise ConcurrentPublish(
                        f"scene {scene!r}: the live version changed from {live!r} to "
                        f"{latest['version'] if latest else None!r} during the rollback to {target!r}"
                    )
            self._write_pointer(scene, pointer, target, "rollback")
        return info

    # --- locking -------------------------------------------------------------------------
    def _scene_lock(self, scene: str) -> "_SceneLock":
        return _SceneLock(self, scene)


class _SceneLock:
    """The exclusive publish/rollback lock of a scene: an fcntl lock file for local roots; a no-op
    for remote ones, which rely on the compare-and-swap before the pointer write instead."""

    def __init__(self, registry: Registry, scene: str):
        self.registry, self.scene = registry, scene
        self.fh: IO | None = None

    def __enter__(self) -> "_SceneLock":
        store = self.registry._store
        if store.remote:
            return self
        assert isinstance(store, _LocalStore)
        scene_dir = store.path(self.scene)
        if not scene_dir.is_dir():
            scene_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(scene_dir.parent)  # the first version must not outlive its scene's entry
        path = scene_dir / LOCK_FILE
        self.fh = open(path, "a+")
        if not flock_exclusive(self.fh, LOCK_TIMEOUT_S, LOCK_POLL_S):
            self.fh.close()
            self.fh = None
            raise RegistryError(f"scene {self.scene!r}: another publish or rollback held {path} for {LOCK_TIMEOUT_S:.0f} s")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            self.fh.close()
            self.fh = None


class _BytesReader:
    """A minimal binary reader over bytes (for `_ArrowStore.put`)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk = self.data[self.pos:end]
        self.pos += len(chunk)
        return chunk


def default_cache_dir() -> Path:
    """Where `Registry.open` puts remote versions when no cache_dir is given."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamrec" / "registry"


def _check_expected(scene: str, expected: str | None | _Unset, live: str | None) -> None:
    if isinstance(expected, _Unset):
        return
    if expected != live:
        raise ConcurrentPublish(
            f"scene {scene!r}: expected live version {expected!r} but {live!r} is live "
            "(another publish or rollback happened since it was read)"
        )


def _gate(scene: str, gate: tuple[float, float | None] | None, tolerance: float, force: bool) -> dict:
    if gate is None:
        return {"applied": False, "forced": force, "reason": "no gate requested"}
    candidate, current = gate
    passed, reason = gate_decision(float(candidate), None if current is None else float(current), tolerance)
    record = {
        "applied": True,
        "metric": "val_ndcg10",
        "candidate": float(candidate),
        "current": None if current is None else float(current),
        "tolerance": tolerance,
        "passed": passed,
        "forced": force,
        "reason": reason,
    }
    if not passed and not force:
        raise GateRefused(f"scene {scene!r}: gate refused the candidate: {reason}", candidate=candidate, current=current, tolerance=tolerance)
    return record


def _check_file_set(info: VersionInfo, present: set[str]) -> None:
    expected = set(info.files)
    missing = sorted(expected - present)
    if missing:
        raise RegistryError(f"scene {info.scene!r} version {info.version!r}: missing file(s) {missing} in {info.path}")
    extra = sorted(present - expected)
    if extra:
        raise RegistryError(f"scene {info.scene!r} version {info.version!r}: unexpected file(s) {extra} in {info.path} (not in the manifest)")


def _check_entry(info: VersionInfo, name: str, entry: dict, digest: str, size: int) -> None:
    if digest != entry.get("sha256") or size != entry.get("bytes"):
        raise ChecksumMismatch(
            f"scene {info.scene!r} version {info.version!r}: file {name!r} has sha256 {digest} ({size} bytes), "
            f"expected sha256 {entry.get('sha256')} ({entry.get('bytes')} bytes)",
            file=name,
            expected=str(entry.get("sha256")),
            actual=digest,
        )


def _verify_local_dir(info: VersionInfo, directory: Path) -> None:
    present = {rel for rel, _ in _iter_files(directory)}
    present.discard(MANIFEST)
    shown = VersionInfo(info.scene, info.version, str(directory), info.manifest)
    _check_file_set(shown, present)
    for name, entry in info.files.items():
        path = directory / name
        size = path.stat().st_size
        digest = sha256_file(path)
        _check_entry(shown, name, entry, digest, size)
