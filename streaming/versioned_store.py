"""Immutable version directories behind an atomically replaced pointer file, and the atomic
file write they are built on.

The feature store (`streaming.features`) and the adapter registry (`training.registry`) both keep
`<root>/v000001/, v000002/, ...` directories that are never modified once written, and make one of
them live by replacing a small JSON pointer (`manifest.json`, `CURRENT.json`) in one `os.replace`.
A reader sees the old pointer or the new one, never half of either; a crash before the replace
leaves the previous version live. Garbage collection removes version directories that no pointer
keeps, and the temporary files of writers that died before their rename.

Every small state file of the project (pointers, manifests, the stack's state, the trainer's
status) is written with `atomic_write_bytes` / `atomic_write_json`: write a hidden temporary file
beside the target, fsync it, rename it over the target, fsync the directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Callable

VERSION_DIGITS = 6  # v000007: a lexical listing is in version order up to a million versions
VERSION_RE = re.compile(r"^v(\d{%d,})$" % VERSION_DIGITS)
TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | Path) -> None:
    """fsync a directory: a rename or a new entry in it is durable only once the directory is."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_name(target: str | Path) -> str:
    """The hidden name a write of `target` goes through (readers skip names that start with '.')."""
    return f".{Path(target).name}.{uuid.uuid4().hex}{TMP_SUFFIX}"


def is_temp_name(name: str, target_name: str | None = None) -> bool:
    """Whether `name` is a leftover of `atomic_write` (of `target_name`, when given)."""
    prefix = f".{target_name}." if target_name else "."
    return name.startswith(prefix) and name.endswith(TMP_SUFFIX)


def atomic_write(target: str | Path, write: Callable[[IO[bytes]], None], *, durable: bool = True,
                 before_replace: Callable[[], None] | None = None) -> Path:
    """Write `target` whole or not at all: `write(fh)` fills a hidden temporary file beside it,
    which is fsync'd (with `durable`), renamed over `target`, and the directory fsync'd.
    `before_replace` runs between the fsync and the rename (the fault-injection hook of callers
    whose tests crash there)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / temp_name(target)
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        if before_replace is not None:
            before_replace()
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(target.parent)
    return target


def atomic_write_bytes(target: str | Path, data: bytes, **kwargs: Any) -> Path:
    return atomic_write(target, lambda fh: fh.write(data), **kwargs)


def json_bytes(obj: Any, *, indent: int | None = 2) -> bytes:
    """The one JSON layout of state files: sorted keys (diffable), UTF-8, trailing newline."""
    return (json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def atomic_write_json(target: str | Path, obj: Any, *, indent: int | None = 2, **kwargs: Any) -> Path:
    return atomic_write_bytes(target, json_bytes(obj, indent=indent), **kwargs)


def read_json(path: str | Path) -> Any | None:
    """A JSON file's content, or None when it does not exist."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None


def version_name(number: int) -> str:
    return f"v{number:0{VERSION_DIGITS}d}"


def version_number(name: str) -> int | None:
    """7 for "v000007"; None for anything that is not a version directory's name."""
    m = VERSION_RE.match(name)
    return int(m.group(1)) if m else None


def version_dirs(root: str | Path) -> list[Path]:
    """The version directories under `root`, oldest first (none when `root` does not exist)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(n, p) for p in root.iterdir() if p.is_dir() and (n := version_number(p.name)) is not None]
    return [p for _, p in sorted(found)]


def remove_unkept(root: str | Path, keep: set[str]) -> list[str]:
    """Garbage collection: delete the version directories under `root` whose names are not in
    `keep`, and the temporary files of writes that never reached their rename. Returns the
    names of the removed version directories."""
    root = Path(root)
    removed = []
    for vdir in version_dirs(root):
        if vdir.name not in keep:
            shutil.rmtree(vdir, ignore_errors=True)
            removed.append(vdir.name)
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_file() and is_temp_name(entry.name):
                entry.unlink(missing_ok=True)
    return removed
