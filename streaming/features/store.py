"""The feature store's write side: version directories, the manifest swap, garbage collection, locks.

* Crash safety: a run writes only into a fresh version directory (`streaming.versioned_store`)
  and publishes it by atomically replacing manifest.json. A crash before that leaves the
  previous manifest live and the half-written directory unreferenced (collected by a later
  run), so nothing is double counted: the watermarks move only with the manifest.
* Concurrency: a run holds an fcntl lock on ``features_dir/.lock`` (one host or a shared
  filesystem with working locks) and, when a redis client is given, also a redis-py `Lock`
  (``<prefix>feat:lock``; short TTL, renewed by a thread while the run lives) so runs on several
  hosts exclude each other; it is re-checked right before publishing, and a run that lost it aborts.
* Garbage collection: after publishing, version directories that none of the last
  ``KEEP_VERSIONS`` published manifests reference are deleted (a reader that loaded one of
  them can still finish). A sequence bucket's base and segments, and a co-visitation bucket's id file,
  base and segments, stay where the run that wrote them put them (`entry_files` lists an entry's
  files), so an older directory can be referenced for those files alone: its other files are deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from streaming.features.tables import MANIFEST_NAME, entry_files
from streaming.file_lock import flock_exclusive
from streaming.settings import Settings
from streaming.versioned_store import atomic_write_json, read_json, remove_unkept, version_name, version_number

logger = logging.getLogger(__name__)

# 2: sequence buckets as base + segments + state + event-id hashes (streaming.features.tables);
# 3: co-visitation counts as integer pair keys, base + delta segments + id file (same module). A manifest
# of another format is rebuilt from the log by the next run (logged).
MANIFEST_FORMAT = 3
KEEP_VERSIONS = 3  # published versions whose files survive garbage collection
LOCK_FILE_NAME = ".lock"
LOCK_WAIT_S = 600.0  # how long a run waits for another run to finish before giving up
LOCK_POLL_S = 0.2
# A crashed holder's redis lock expires after this long (the next run waits that out: the chaos
# suite's feature-job kills measured 120 s per kill at 120, ~30 s at 30, hence 10)...
REDIS_LOCK_TTL_S = 10
REDIS_LOCK_RENEW_S = 3  # ...while a live holder renews it this often (3 tries per TTL)
PARQUET_COMPRESSION = "zstd"


class FeaturesBusyError(RuntimeError):
    """Another feature run holds the lock for longer than `LOCK_WAIT_S`."""


def write_parquet(table: pa.Table, path: str, *, use_dictionary: bool | list[str] = True,
                  row_group_size: int | None = None) -> None:
    """Write one table file into a version directory (not yet referenced by any manifest).
    `use_dictionary`: the Parquet column paths to dictionary-encode (all by default); `row_group_size`: rows
    per row group (pyarrow's default when None)."""
    # fsync'd: the manifest that will point at this file must never outlive it.
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        pq.write_table(table, fh, compression=PARQUET_COMPRESSION, use_dictionary=use_dictionary,
                       row_group_size=row_group_size)
        fh.flush()
        os.fsync(fh.fileno())


def write_array(values, path: str, dtype: str = "uint64") -> None:
    """Write one numpy array (`.npy`) of `dtype` into a version directory, fsync'd like `write_parquet` (the
    manifest that will point at it must never outlive it). The event-id hashes of a sequence bucket (random
    64-bit values that no codec compresses, so no Parquet around them) and the co-visitation counts' int64
    keys and counts (memory-mapped on read)."""
    import numpy as np

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        np.save(fh, np.ascontiguousarray(values, dtype=dtype), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())


def next_version(features_dir: Path, current: dict | None) -> int:
    """The number of a new run's version: above the live one and above every directory name
    present. A number is never reused: a crashed run's leftovers stay unreferenced until collected."""
    existing = [n for e in features_dir.iterdir() if (n := version_number(e.name)) is not None]
    return max([int(current["version"]) if current else 0, *existing]) + 1


def publish_manifest(features_dir: Path, manifest: dict) -> Path:
    """Make `manifest` the live one: a copy in its version directory, then an atomic replace."""
    vdir = features_dir / version_name(manifest["version"])
    for target in (vdir / MANIFEST_NAME, features_dir / MANIFEST_NAME):
        atomic_write_json(target, manifest)
    return features_dir / MANIFEST_NAME


def collect_garbage(features_dir: Path, manifest: dict) -> list[str]:
    """Delete the version directories the last `KEEP_VERSIONS` published manifests do not
    reference, and leftover temporary files; returns the removed directory names."""
    keep: set[str] = set()
    kept_versions: set[str] = set()
    referenced: set[str] = set()
    for v in manifest["history"][-KEEP_VERSIONS:]:
        m = manifest if v == manifest["version"] else read_json(features_dir / version_name(v) / MANIFEST_NAME)
        keep.add(version_name(v))
        kept_versions.add(version_name(v))
        for name, entries in (m or {}).get("tables", {}).items():
            # (a sequences entry references files of older versions too: its base and segments)
            files = [f for e in entries for f in entry_files(name, e)]
            referenced.update(files)
            keep.update(f.split("/", 1)[0] for f in files)
    removed = remove_unkept(features_dir, keep)
    # An older directory kept only for some bases / segments: its other files (that version's top-K,
    # popularity, ... copies) go, or disk would hold up to MAX_SEGMENTS + 1 extra versions.
    for name in sorted(keep - kept_versions):
        vdir = features_dir / name
        for path in vdir.rglob("*"):
            rel = path.relative_to(features_dir).as_posix()
            if path.is_file() and rel not in referenced and path.name != MANIFEST_NAME:
                path.unlink(missing_ok=True)
    return removed


@contextlib.contextmanager
def run_lock(features_dir: Path, redis_client: Any, settings: Settings) -> Iterator[Any]:
    """Exclusive right to run: a redis lock when a client is given (hosts), then an fcntl lock.
    Yields the redis lock (or None); `reacquire()` on it raises once it is lost."""
    with contextlib.ExitStack() as stack:
        rlock = None
        if redis_client is not None:
            rlock = _acquire_redis_lock(redis_client, f"{settings.redis_prefix}feat:lock")
            stack.callback(_release_redis_lock, rlock, _renew_in_background(rlock))
        path = features_dir / LOCK_FILE_NAME
        fh = stack.enter_context(open(path, "a+"))
        if not flock_exclusive(fh, LOCK_WAIT_S, LOCK_POLL_S):
            raise FeaturesBusyError(f"another feature run holds {path}")
        stack.callback(fcntl.flock, fh, fcntl.LOCK_UN)
        yield rlock


def _acquire_redis_lock(redis_client: Any, name: str) -> Any:
    rlock = redis_client.lock(name, timeout=REDIS_LOCK_TTL_S, blocking_timeout=LOCK_WAIT_S, thread_local=False)
    if not rlock.acquire():
        raise FeaturesBusyError(f"another feature run holds the redis lock {name}")
    return rlock


def _renew_in_background(rlock: Any) -> threading.Event:
    """A short TTL frees the lock soon after a crash; renewing it keeps a long run's lock. If a
    renewal fails, the run notices before publishing (`reacquire` raises) and refuses to publish."""
    from redis.exceptions import LockError

    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(REDIS_LOCK_RENEW_S):
            try:
                rlock.reacquire()
            except (LockError, OSError) as exc:
                logger.warning("could not renew the feature-run lock: %s", exc)
                return

    threading.Thread(target=renew, name="features-lock-renew", daemon=True).start()
    return stop


def _release_redis_lock(rlock: Any, stop_renewing: threading.Event) -> None:
    from redis.exceptions import LockError

    stop_renewing.set()
    with contextlib.suppress(LockError):
        rlock.release()
