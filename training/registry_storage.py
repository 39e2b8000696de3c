"""Where the adapter registry's bytes live: a local directory or any `pyarrow.fs` URI.

Why two backends: a local root (a disk, a PVC) has what makes a publish crash-safe on its own --
fsync, an atomic directory rename and ``flock`` -- so `LocalStore` uses os calls and stages a
version in a hidden directory that one ``rename`` puts in place. An object store (s3://, gs://)
has none of these: `ObjectStore` uploads straight into the version's directory (``manifest.json``
last), which stays invisible because no pointer names it yet, and writes the pointer with one PUT,
which object stores apply atomically. A ``file://`` URI goes through `ObjectStore` too; its
pointer is written to a temp object and moved into place, since a local file is not replaced
atomically by an overwrite.

Both backends hash the bytes as they write or read them, so a manifest describes exactly what
the store holds and a reader checks exactly what it got (`ChecksumMismatch`). The versions, the
pointer and the publish protocol on top are `training.registry`'s.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Iterator

import pyarrow.fs as pafs

from streaming.file_lock import flock_exclusive
from streaming.versioned_store import atomic_write_bytes, fsync_dir, temp_name
from training.fault_injection import crash_point, registry_point

MANIFEST = "manifest.json"
LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
DOWNLOAD_PREFIX = ".download-"
CHUNK_BYTES = 1 << 20  # read/write/hash files in 1 MiB chunks

LOCK_TIMEOUT_S = 300.0  # a publish copies the adapter while holding the lock; wait that long
LOCK_POLL_S = 0.05

URI_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


# --- errors --------------------------------------------------------------------------------
class RegistryError(Exception):
    """A registry operation failed; the message names the scene, version or file at fault."""


class ChecksumMismatch(RegistryError):
    """A file's content differs from its manifest entry."""

    def __init__(self, message: str, *, file: str, expected: str, actual: str):
        super().__init__(message)
        self.file, self.expected, self.actual = file, expected, actual


# --- bytes ---------------------------------------------------------------------------------
def sha256_file(path: str | Path) -> str:
    """The hex sha256 of a file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK_BYTES), b""):
            h.update(chunk)
    return h.hexdigest()


def iter_files(directory: Path) -> Iterator[tuple[str, Path]]:
    """(posix relative path, path) of every regular file under `directory`, sorted."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            yield path.relative_to(directory).as_posix(), path


def file_checksums(directory: str | Path) -> dict[str, dict[str, Any]]:
    """``{relpath: {"sha256": ..., "bytes": ...}}`` for every file under `directory` (recursive)."""
    directory = Path(directory)
    return {rel: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for rel, p in iter_files(directory)}


def copy_hashing(src: IO[bytes], dst: IO[bytes] | None = None) -> tuple[str, int]:
    """Copy a stream (or only read it, without `dst`), returning the sha256 and size of exactly
    the bytes that went through."""
    h = hashlib.sha256()
    n = 0
    for chunk in iter(lambda: src.read(CHUNK_BYTES), b""):
        if dst is not None:
            dst.write(chunk)
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n


def encode_json(obj: Any, what: str) -> bytes:
    """The bytes of a manifest or pointer (sorted keys; NaN refused: it is not JSON)."""
    try:
        return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    except (TypeError, ValueError) as exc:
        raise RegistryError(f"{what} is not JSON-serializable: {exc}") from None


class BytesReader:
    """A minimal binary reader over bytes (to `ObjectStore.put` a manifest)."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def read(self, n: int = -1) -> bytes:
        end = len(self.data) if n < 0 else self.pos + n
        chunk = self.data[self.pos:end]
        self.pos += len(chunk)
        return chunk


# --- checking files against a manifest -----------------------------------------------------
def check_file_set(label: str, where: str, expected: set[str], present: set[str]) -> None:
    """`RegistryError` unless the files `present` in `where` are exactly the manifest's."""
    missing = sorted(expected - present)
    if missing:
        raise RegistryError(f"{label}: missing file(s) {missing} in {where}")
    extra = sorted(present - expected)
    if extra:
        raise RegistryError(f"{label}: unexpected file(s) {extra} in {where} (not in the manifest)")


def check_entry(label: str, name: str, entry: dict, digest: str, size: int) -> None:
    """`ChecksumMismatch` unless a file's sha256 and size are its manifest entry's."""
    if digest != entry.get("sha256") or size != entry.get("bytes"):
        raise ChecksumMismatch(
            f"{label}: file {name!r} has sha256 {digest} ({size} bytes), "
            f"expected sha256 {entry.get('sha256')} ({entry.get('bytes')} bytes)",
            file=name,
            expected=str(entry.get("sha256")),
            actual=digest,
        )


def verify_local_dir(label: str, directory: Path, files: dict[str, dict]) -> None:
    """Check a local copy of a version (its files beside its ``manifest.json``)."""
    present = {rel for rel, _ in iter_files(directory)}
    present.discard(MANIFEST)
    check_file_set(label, str(directory), set(files), present)
    for name, entry in files.items():
        path = directory / name
        check_entry(label, name, entry, sha256_file(path), path.stat().st_size)


def verify_stored(store: "LocalStore | ObjectStore", rel: str, label: str, files: dict[str, dict]) -> None:
    """Check a version in place, in its store."""
    present = store.list_files(rel)
    present.pop(MANIFEST, None)
    check_file_set(label, store.uri(rel), set(files), set(present))
    for name, entry in files.items():
        with store.open_input(f"{rel}/{name}") as fh:
            digest, size = copy_hashing(fh)
        check_entry(label, name, entry, digest, size)


# --- a local directory ---------------------------------------------------------------------
class LocalStore:
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
        return {r: p.stat().st_size for r, p in iter_files(base)} if base.is_dir() else {}

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
        atomic_write_bytes(self.path(rel), data,
                           before_replace=lambda: crash_point(registry_point("before_pointer_replace")))
        crash_point(registry_point("after_pointer_replace"))

    @contextlib.contextmanager
    def scene_lock(self, scene: str) -> Iterator[None]:
        """The scene's exclusive publish/rollback lock (an ``flock`` on ``<scene>/.lock``)."""
        scene_dir = self.path(scene)
        if not scene_dir.is_dir():
            scene_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(scene_dir.parent)  # the first version must not outlive its scene's entry
        path = scene_dir / LOCK_FILE
        with open(path, "a+") as fh:
            if not flock_exclusive(fh, LOCK_TIMEOUT_S, LOCK_POLL_S):
                raise RegistryError(f"scene {scene!r}: another publish or rollback held {path} for {LOCK_TIMEOUT_S:.0f} s")
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def write_version(self, scene: str, version: str, sources: list[tuple[str, Path]], manifest: dict) -> dict:
        """Copy `sources` into a hidden staging directory (hashing the bytes as they are written,
        so the manifest describes exactly what is stored), add ``manifest.json``, fsync every file
        and directory, then rename it to ``<scene>/<version>`` and fsync the scene directory.
        Returns the manifest's ``files``."""
        scene_dir = self.path(scene)
        staging = scene_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        staging.mkdir()
        files: dict[str, dict[str, Any]] = {}
        dirs = {staging}
        for rel, src in sources:
            dest = staging / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dirs.update(p for p in dest.parents if p != staging and staging in p.parents)
            with open(src, "rb") as fin, open(dest, "wb") as fout:
                digest, size = copy_hashing(fin, fout)
                fout.flush()
                os.fsync(fout.fileno())
            files[rel] = {"sha256": digest, "bytes": size}
        manifest["files"] = files
        with open(staging / MANIFEST, "wb") as fh:
            fh.write(encode_json(manifest, f"scene {scene!r} version {version!r}: manifest"))
            fh.flush()
            os.fsync(fh.fileno())
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            fsync_dir(d)
        crash_point(registry_point("after_staging"))
        target = scene_dir / version
        try:
            os.rename(staging, target)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            raise RegistryError(f"scene {scene!r}: cannot move the staged version to {target}: {exc}") from None
        fsync_dir(scene_dir)
        crash_point(registry_point("after_move"))
        return files


# --- a pyarrow.fs URI ----------------------------------------------------------------------
class ObjectStore:
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
        self.rename_pointer = isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str) -> str:
        return f"{self.base}/{rel}" if rel else self.base

    def uri(self, rel: str) -> str:
        return f"{self.root_uri}/{rel}" if rel else self.root_uri

    def info(self, rel: str) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path(rel))

    def read_bytes(self, rel: str) -> bytes | None:
        try:
            with self.fs.open_input_stream(self.path(rel)) as fh:
                return fh.read()
        except FileNotFoundError:
            return None
        except OSError:
            if self.info(rel).type == pafs.FileType.NotFound:
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
        info = self.info(rel)
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    def put(self, rel: str, src: IO[bytes]) -> tuple[str, int]:
        path = self.path(rel)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(path) as out:
            return copy_hashing(src, out)

    def write_pointer(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        if self.rename_pointer:
            tmp = f"{parent}/{temp_name(path)}"
            with self.fs.open_output_stream(tmp) as out:
                out.write(data)
            crash_point(registry_point("before_pointer_replace"))
            self.fs.move(tmp, path)
        else:
            crash_point(registry_point("before_pointer_replace"))
            # One small PUT: object stores make the new object visible whole, or not at all.
            with self.fs.open_output_stream(path) as out:
                out.write(data)
        crash_point(registry_point("after_pointer_replace"))

    @contextlib.contextmanager
    def scene_lock(self, scene: str) -> Iterator[None]:
        """No lock spans hosts: remote publishes rely on the compare-and-swap before the pointer write."""
        yield

    def write_version(self, scene: str, version: str, sources: list[tuple[str, Path]], manifest: dict) -> dict:
        """Upload `sources` into ``<scene>/<version>/``, ``manifest.json`` last (a version directory
        with a manifest has all its files). Returns the manifest's ``files``."""
        files: dict[str, dict[str, Any]] = {}
        for rel, src in sources:
            with open(src, "rb") as fin:
                digest, size = self.put(f"{scene}/{version}/{rel}", fin)
            files[rel] = {"sha256": digest, "bytes": size}
        manifest["files"] = files
        crash_point(registry_point("after_staging"))
        data = encode_json(manifest, f"scene {scene!r} version {version!r}: manifest")
        self.put(f"{scene}/{version}/{MANIFEST}", BytesReader(data))
        crash_point(registry_point("after_move"))  # no move on object stores: the pointer alone makes it visible
        return files

    def download(self, rel: str, label: str, manifest: dict, target: Path, verify: bool) -> Path:
        """A local copy of the version at `rel` in `target` (whose parent is the scene's cache):
        reused when its manifest is the same (and, with `verify`, its files check out), else
        downloaded into a temp directory beside it -- checking every file as it arrives -- and
        renamed into place."""
        files = dict(manifest.get("files") or {})
        manifest_bytes = encode_json(manifest, "manifest")
        if target.is_dir():
            try:
                same = json.loads((target / MANIFEST).read_bytes()) == manifest
            except (OSError, ValueError):
                same = False
            if same:
                if not verify:
                    return target
                try:
                    verify_local_dir(label, target, files)
                    return target
                except RegistryError:
                    pass  # a damaged cached copy: download it again below
        cache = target.parent
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f"{DOWNLOAD_PREFIX}{uuid.uuid4().hex}"
        tmp.mkdir()
        try:
            for name, entry in files.items():
                dest = tmp / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    src = self.open_input(f"{rel}/{name}")
                except FileNotFoundError:
                    raise RegistryError(f"{label}: file {name!r} is missing from {self.uri(rel)}") from None
                with src, open(dest, "wb") as out:
                    digest, size = copy_hashing(src, out)
                if verify:
                    check_entry(label, name, entry, digest, size)
            (tmp / MANIFEST).write_bytes(manifest_bytes)
            if target.exists():
                # Stale or damaged copy: move it aside first, so the rename below is atomic.
                trash = cache / f"{DOWNLOAD_PREFIX}{uuid.uuid4().hex}-old"
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
                    verify_local_dir(label, target, files)
            return target
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def open_store(root: str | os.PathLike) -> LocalStore | ObjectStore:
    """The store of a registry root: a URI (``scheme://``) -> `ObjectStore`, else a local path."""
    if not isinstance(root, (str, os.PathLike)) or not str(root).strip():
        raise RegistryError(f"invalid registry root {root!r}")
    root = str(root)
    if URI_RE.match(root):
        return ObjectStore(root)
    return LocalStore(root)


__all__ = ["BytesReader", "ChecksumMismatch", "LocalStore", "MANIFEST", "ObjectStore", "RegistryError", "STAGING_PREFIX",
           "check_entry", "check_file_set", "copy_hashing", "encode_json", "file_checksums", "iter_files",
           "open_store", "sha256_file", "verify_local_dir", "verify_stored"]
