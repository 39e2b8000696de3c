"""The adapter registry: versioned, checksummed, atomically published adapters per scene.

Plain versioned storage: it never judges a candidate (whether one may be published is decided
once, before `Registry.publish`, by `training.gate`), and it does not know what an adapter holds
(`training.adapter` does). Layout (the root is a local directory or any `pyarrow.fs` URI, see
`training.registry_storage`)::

    <root>/<scene>/CURRENT.json          the pointer: which version is live (see below)
    <root>/<scene>/v000001/              one published version: the adapter's files (any nesting)
    <root>/<scene>/v000001/manifest.json   the caller's fields (base model, data window, metrics,
                                           gate decision, ...) + scene, version, parent,
                                           created_at and the sha256 + size of every file
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
2. check ``expected_parent`` against the live version -> `ConcurrentPublish` (nothing has been
   written yet);
3. delete leftovers of crashed publishes: every ``.staging-*`` directory, pointer temp files
   and version directories above ``latest_published``. All of them, regardless of age: we hold
   the lock, so no live publish can own them;
4. copy the staged files into ``.staging-<uuid>/`` (hashing the bytes as they are written, so the
   manifest describes exactly what the registry holds), write ``manifest.json``, fsync every
   file and directory;
5. rename ``.staging-<uuid>`` to ``<version>`` (one atomic ``rename``), fsync the scene directory;
6. write the new pointer to a temp file, fsync, ``os.replace`` it onto ``CURRENT.json``, fsync
   the scene directory (`streaming.versioned_store.atomic_write_bytes`).

Why that is crash-safe: readers look only at the pointer and at the version it names. Until
step 6's ``os.replace`` the pointer still names the previous version, whose directory is never
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
one PUT. There is a small window between that re-read and the PUT, so run one publisher per scene
against a remote root (the continuous trainer does). Leftover orphan version directories on a remote root are
only removed once they are more than `STALE_LEFTOVER_S` old, since without a lock a younger one may
belong to a publish in progress.

The crash-safety tests kill a publishing process between these steps through the fault-injection
setting of `training.fault_injection` (inert unless set).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streaming.versioned_store import is_temp_name, version_name, version_number
from training.registry_storage import (
    MANIFEST,
    ChecksumMismatch,
    LocalStore,
    ObjectStore,
    STAGING_PREFIX,
    RegistryError,
    encode_json,
    file_checksums,
    iter_files,
    open_store,
    sha256_file,
    verify_local_dir,
    verify_stored,
)

POINTER = "CURRENT.json"

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

HISTORY_MAX = 20  # rollback targets kept in the pointer
LOG_MAX = 50  # pointer changes kept in the pointer's log
STALE_LEFTOVER_S = 3600.0  # remote roots: orphans older than this are from crashed publishes

# Keys of the manifest the registry writes; a caller may not supply them.
RESERVED_KEYS = frozenset({"scene", "version", "parent", "created_at", "files"})


# --- errors (RegistryError and ChecksumMismatch come from the storage layer) ------------------
class VersionNotFound(RegistryError):
    """The scene has no such (published) version, or no live version at all."""


class ConcurrentPublish(RegistryError):
    """The live version changed since the caller (or this publish) read it."""


class Unset:
    """Sentinel type: `expected_parent` not given (None means 'expect no live version')."""

    _instance: "Unset | None" = None

    def __new__(cls) -> "Unset":
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNSET"


UNSET = Unset()


def validate_name(value: str, kind: str = "scene") -> str:
    """Return `value` if it is a safe scene/version name (no path separators, no leading dot)."""
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise RegistryError(f"invalid {kind} name {value!r}: expected {NAME_RE.pattern}")
    return value


def _now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _label(scene: str, version: str) -> str:
    return f"scene {scene!r} version {version!r}"


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


def default_cache_dir() -> Path:
    """Where `Registry.open` puts remote versions when no cache_dir is given."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "streamrec" / "registry"


# --- the registry --------------------------------------------------------------------------
class Registry:
    """Versioned adapters per scene under `root` (a local directory or a `pyarrow.fs` URI)."""

    def __init__(self, root: str | Path):
        self.root = str(root)
        self._store: LocalStore | ObjectStore = open_store(self.root)

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
        limit = _published_limit(pointer)
        numbers = sorted(
            n for name, is_dir, _ in self._store.list_dir(scene)
            if is_dir and (n := version_number(name)) is not None and n <= limit
        )
        out = []
        for n in numbers:
            try:
                out.append(self._load(scene, version_name(n)))
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
        number = version_number(version)
        if number is None or number > _published_limit(pointer):
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
            raise RegistryError(f"{_label(scene, version)}: {self._store.uri(rel)} is not valid JSON: {exc}") from None
        if not isinstance(manifest, dict) or manifest.get("scene") != scene or manifest.get("version") != version:
            raise RegistryError(
                f"{_label(scene, version)}: {self._store.uri(rel)} describes "
                f"scene {manifest.get('scene')!r} version {manifest.get('version')!r}"
                if isinstance(manifest, dict) else f"{_label(scene, version)}: {self._store.uri(rel)} is not an object"
            )
        return VersionInfo(scene, version, self._store.uri(f"{scene}/{version}"), manifest)

    def _resolve(self, scene: str, version: str | None) -> VersionInfo:
        if version is not None:
            return self.get(scene, version)
        info = self.current(scene)
        if info is None:
            raise VersionNotFound(f"scene {scene!r} has no live version (under {self.root})")
        return info

    # --- verification and opening --------------------------------------------------------
    def verify(self, scene: str, version: str | None = None) -> VersionInfo:
        """Check every file of a version (default: the live one) against its manifest, in place:
        `ChecksumMismatch` for a changed file, `RegistryError` for a missing or unexpected one."""
        info = self._resolve(scene, version)
        verify_stored(self._store, f"{scene}/{info.version}", _label(scene, info.version), info.files)
        return info

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
        label = _label(scene, info.version)
        store = self._store
        if isinstance(store, LocalStore):
            path = store.path(f"{scene}/{info.version}")
            if verify:
                verify_local_dir(label, path, info.files)
            return path
        target = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / scene / info.version
        return store.download(f"{scene}/{info.version}", label, info.manifest, target, verify)

    # --- publishing ----------------------------------------------------------------------
    def publish(
        self,
        scene: str,
        staged_dir: Path,
        manifest: dict,
        *,
        expected_parent: str | None | Unset = UNSET,
        make_live: bool = True,
    ) -> VersionInfo:
        """Publish the files under `staged_dir` (a local directory) as the scene's next version.

        `make_live=False` publishes it without making it live (a canary, training/canary.py): the pointer
        keeps its version and records the new one as published; `promote` makes it live later. The
        scene's first version is always live.

        `manifest` holds the caller's fields (base_model, data_window, metrics, gate decision,
        ...); the registry adds scene, version, parent, created_at and files.
        `expected_parent`: the live version the candidate was trained against (None: no live
        version) -> `ConcurrentPublish` when it is no longer live. See the module docstring for
        the step order."""
        validate_name(scene, "scene")
        staged = Path(staged_dir)
        if not staged.is_dir():
            raise RegistryError(f"scene {scene!r}: staged directory {staged} does not exist")
        sources = list(iter_files(staged))
        if not sources:
            raise RegistryError(f"scene {scene!r}: staged directory {staged} holds no files")
        if any(rel == MANIFEST for rel, _ in sources):
            raise RegistryError(f"scene {scene!r}: staged directory {staged} holds a {MANIFEST}, which the registry writes")
        if not isinstance(manifest, dict):
            raise RegistryError(f"scene {scene!r}: manifest must be a dict, got {type(manifest).__name__}")
        reserved = sorted(RESERVED_KEYS & manifest.keys())
        if reserved:
            raise RegistryError(f"scene {scene!r}: manifest keys {reserved} are written by the registry")
        encode_json(manifest, f"scene {scene!r}: manifest")  # fail before taking the lock

        with self._store.scene_lock(scene):
            pointer = self.pointer(scene)
            live = pointer["version"] if pointer else None
            _check_expected(scene, expected_parent, live)

            self._remove_leftovers(scene, pointer)
            version = self._next_version(scene, pointer)
            full = {**manifest, "scene": scene, "version": version, "parent": live, "created_at": _now_iso()}
            full["files"] = self._store.write_version(scene, version, sources, full)

            if self._store.remote:
                # Compare-and-swap: no lock spans hosts, so re-read the pointer just before the swap.
                latest = self.pointer(scene)
                if (latest["version"] if latest else None) != live:
                    self._store.remove_tree(f"{scene}/{version}")
                    raise ConcurrentPublish(
                        f"scene {scene!r}: the live version changed from {live!r} to "
                        f"{latest['version'] if latest else None!r} during the publish of {version!r}"
                    )
            if make_live or pointer is None:
                self._write_pointer(scene, pointer, version, "publish", latest_published=version)
            else:
                self._write_pointer(scene, pointer, live, "publish-candidate", latest_published=version,
                                    note=f"{version} published, not live")
        return VersionInfo(scene, version, self._store.uri(f"{scene}/{version}"), full)

    def promote(self, scene: str, version: str, reason: str) -> VersionInfo:
        """Make a published, not-live version live (a canary that won, `streamrec experiment promote`):
        like a publish, the version it replaces goes onto the rollback stack. `reason` is kept in the
        pointer's log. The target's files are verified first."""
        validate_name(scene, "scene")
        validate_name(version, "version")
        with self._store.scene_lock(scene):
            pointer = self.pointer(scene)
            if pointer is None:
                raise VersionNotFound(f"scene {scene!r} has no published versions (under {self.root})")
            if pointer["version"] == version:
                raise RegistryError(f"scene {scene!r}: {version!r} is already the live version")
            info = self.verify(scene, version)
            self._write_pointer(scene, pointer, version, "promote", note=reason)
        return info

    # --- small scene files (the experiment of a scene: training/experiments.py) ----------------
    def locked(self, scene: str):
        """The scene's lock (a context manager) for a read-modify-write of a scene file; not reentrant:
        publish, promote and rollback take it themselves."""
        validate_name(scene, "scene")
        return self._store.scene_lock(scene)

    def read_scene_file(self, scene: str, name: str) -> bytes | None:
        """The bytes of `<scene>/<name>`, or None when it does not exist."""
        validate_name(scene, "scene")
        return self._store.read_bytes(f"{scene}/{name}")

    def write_scene_file(self, scene: str, name: str, data: bytes) -> None:
        """Replace `<scene>/<name>` atomically (readers see the old or the new bytes, never half)."""
        validate_name(scene, "scene")
        if name == POINTER or not NAME_RE.match(name):
            raise RegistryError(f"scene {scene!r}: {name!r} is not a scene file name")
        self._store.write_pointer(f"{scene}/{name}", data)

    def _next_version(self, scene: str, pointer: dict | None) -> str:
        numbers = [n for name, is_dir, _ in self._store.list_dir(scene) if is_dir and (n := version_number(name)) is not None]
        if pointer:
            numbers.append(_published_limit(pointer))
        return version_name(max(numbers, default=0) + 1)

    def _remove_leftovers(self, scene: str, pointer: dict | None) -> None:
        """Delete what crashed publishes left: staging dirs, pointer temp files and version
        directories above ``latest_published``. Local roots hold the lock, so all of them are
        leftovers; remote roots only remove those older than `STALE_LEFTOVER_S`."""
        limit = _published_limit(pointer) if pointer else 0
        now = time.time()
        store = self._store
        for name, is_dir, mtime in store.list_dir(scene):
            number = version_number(name)
            leftover = (
                (is_dir and name.startswith(STAGING_PREFIX))
                or (not is_dir and is_temp_name(name, POINTER))
                or (is_dir and number is not None and number > limit)
            )
            if not leftover:
                continue
            if isinstance(store, ObjectStore):
                age_ref = store.newest_mtime(f"{scene}/{name}") if is_dir else mtime
                if now - (age_ref or mtime) < STALE_LEFTOVER_S:
                    continue
            store.remove_tree(f"{scene}/{name}")

    def _write_pointer(
        self, scene: str, old: dict | None, version: str, action: str, *, latest_published: str | None = None,
        note: str | None = None,
    ) -> None:
        now = _now_iso()
        previous = old["version"] if old else None
        history = list(old.get("history", [])) if old else []
        if action in ("publish", "promote"):
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
        if note:
            log_entry["note"] = note
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
        self._store.write_pointer(f"{scene}/{POINTER}", encode_json(data, f"scene {scene!r}: pointer"))

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
        with self._store.scene_lock(scene):
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

    def retire(self, scene: str, version: str) -> None:
        """Delete a version that is not live (its data must not be served again: a forget request,
        training/forget_retrain.py). A rollback to it is then refused as not found."""
        validate_name(scene, "scene")
        validate_name(version, "version")
        with self._store.scene_lock(scene):
            pointer = self.pointer(scene)
            if pointer is not None and pointer["version"] == version:
                raise RegistryError(f"scene {scene!r}: {version!r} is the live version; publish another first")
            self._store.remove_tree(f"{scene}/{version}")


def _published_limit(pointer: dict) -> int:
    """The number of the highest version ever made live: versions above it are crash leftovers."""
    return version_number(pointer.get("latest_published") or pointer["version"]) or 0


def _check_expected(scene: str, expected: str | None | Unset, live: str | None) -> None:
    if isinstance(expected, Unset):
        return
    if expected != live:
        raise ConcurrentPublish(
            f"scene {scene!r}: expected live version {expected!r} but {live!r} is live "
            "(another publish or rollback happened since it was read)"
        )


__all__ = ["ChecksumMismatch", "ConcurrentPublish", "MANIFEST", "NAME_RE", "POINTER", "Registry", "RegistryError",
           "UNSET", "Unset", "VersionInfo", "VersionNotFound", "default_cache_dir", "file_checksums", "sha256_file",
           "validate_name"]
