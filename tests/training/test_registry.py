"""The adapter registry (training/registry.py, training/registry_storage.py) and its CLI, on the
real filesystem.

Covers: the publish/open round trip, atomic visibility under concurrent readers, crash safety
at every publish step (a subprocess killed through the fault-injection setting of
training/fault_injection.py), checksum verification, compare-and-swap on the parent, rollback, a
pyarrow.fs URI root, and `streamrec registry list|show|rollback`. The gate: tests/training/test_gate.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.registry_cli import registry_app
from training.fault_injection import CRASH_EXIT_CODE, FAULT_ENV, registry_point
from training.registry import (
    MANIFEST,
    POINTER,
    ChecksumMismatch,
    ConcurrentPublish,
    Registry,
    RegistryError,
    VersionNotFound,
    file_checksums,
    sha256_file,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SCENE = "home-feed"
FILE_NAMES = ("adapter_model.safetensors", "adapter_config.json", "tokenizer/vocab.txt", "extra.bin")
FILE_BYTES = 96 * 1024  # a few hundred KB per version over FILE_NAMES


def payload(tag: str, name: str, size: int = FILE_BYTES) -> bytes:
    """Deterministic content derived from a tag (e.g. a version id) and a file name."""
    block = hashlib.sha256(f"{tag}/{name}".encode()).digest()
    return (block * (size // len(block) + 1))[:size]


def stage(directory: Path, tag: str, size: int = FILE_BYTES) -> Path:
    """A staged adapter directory whose every file's content derives from `tag`."""
    for name in FILE_NAMES:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(payload(tag, name, size))
    return directory


def caller_manifest(ndcg: float = 0.30, **extra) -> dict:
    return {
        "base_model": "all-MiniLM-L6-v2",
        "base_model_sha256": "ab" * 32,
        "data_window": {"start_offset": 0, "end_offset": 1000},
        "metrics": {"val_ndcg10": ndcg},
        **extra,
    }


def publish_tagged(reg: Registry, tmp_path: Path, tag: str, ndcg: float = 0.30, **kwargs):
    return reg.publish(SCENE, stage(tmp_path / f"staged-{tag}", tag), caller_manifest(ndcg, tag=tag), **kwargs)


# --- round trip ----------------------------------------------------------------------------
def test_publish_round_trip_and_parent_chain(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    assert reg.scenes() == [] and reg.versions(SCENE) == [] and reg.current(SCENE) is None

    v1 = publish_tagged(reg, tmp_path, "a", ndcg=0.30)
    v2 = publish_tagged(reg, tmp_path, "b", ndcg=0.31, expected_parent="v000001")

    assert (v1.version, v2.version) == ("v000001", "v000002")
    assert (v1.parent, v2.parent) == (None, "v000001")
    assert reg.scenes() == [SCENE]
    assert [v.version for v in reg.versions(SCENE)] == ["v000001", "v000002"]
    assert reg.current(SCENE).version == "v000002"
    assert reg.get(SCENE, "v000001").manifest == v1.manifest
    assert v2.metrics == {"val_ndcg10": 0.31} and v2.created_at.endswith("Z")

    m = reg.get(SCENE, "v000002").manifest
    assert m["scene"] == SCENE and m["version"] == "v000002" and m["base_model"] == "all-MiniLM-L6-v2"
    assert m["data_window"] == {"start_offset": 0, "end_offset": 1000}
    assert m["files"] == file_checksums(tmp_path / "staged-b")
    assert set(m["files"]) == set(FILE_NAMES)
    assert m["files"]["extra.bin"] == {"sha256": hashlib.sha256(payload("b", "extra.bin")).hexdigest(), "bytes": FILE_BYTES}

    live_dir = reg.open(SCENE)
    assert live_dir == tmp_path / "registry" / SCENE / "v000002"
    for name in FILE_NAMES:
        assert (live_dir / name).read_bytes() == payload("b", name)
    assert json.loads((live_dir / MANIFEST).read_text())["version"] == "v000002"
    assert sha256_file(reg.open(SCENE, "v000001") / "extra.bin") == v1.manifest["files"]["extra.bin"]["sha256"]

    with pytest.raises(VersionNotFound, match="v000009"):
        reg.get(SCENE, "v000009")
    with pytest.raises(VersionNotFound, match="nosuch"):
        reg.open("nosuch")


@pytest.mark.parametrize("bad", ["../etc", "a/b", ".hidden", "", "x" * 65, "sp ace"])
def test_bad_scene_and_version_names_are_refused(tmp_path, bad):
    reg = Registry(str(tmp_path))
    with pytest.raises(RegistryError, match="invalid scene name"):
        reg.current(bad)
    with pytest.raises(RegistryError, match="invalid version name"):
        reg.get("ok", bad)
    with pytest.raises(RegistryError, match="invalid scene name"):
        reg.publish(bad, stage(tmp_path / "s", "x"), {})


def test_publish_refuses_reserved_manifest_keys_and_empty_dirs(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    with pytest.raises(RegistryError, match="version"):
        reg.publish(SCENE, stage(tmp_path / "s", "x"), {"version": "v9"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="no files"):
        reg.publish(SCENE, tmp_path / "empty", {})
    assert reg.versions(SCENE) == []


# --- atomicity -----------------------------------------------------------------------------
def test_concurrent_readers_never_see_a_mixed_version(tmp_path):
    root = str(tmp_path / "registry")
    publisher_reg = Registry(root)
    publish_tagged(publisher_reg, tmp_path, "v000001")
    n_versions = 15
    done = threading.Event()
    errors: list[str] = []
    seen: list[set[str]] = [set() for _ in range(3)]
    reads = [0, 0, 0]

    def publisher() -> None:
        try:
            for i in range(2, n_versions + 1):
                tag = f"v{i:06d}"
                info = publish_tagged(publisher_reg, tmp_path, tag)
                assert info.version == tag  # content is derived from the id it gets
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(f"publisher: {exc!r}")
        finally:
            done.set()

    def reader(idx: int) -> None:
        reg = Registry(root)
        while not done.is_set() or reads[idx] < 3:
            try:
                directory = reg.open(SCENE)  # verify=True: every checksum matches
                version = json.loads((directory / MANIFEST).read_text())["version"]
                for name in FILE_NAMES:
                    if (directory / name).read_bytes() != payload(version, name):
                        errors.append(f"reader {idx}: {name} of {version} holds another version's bytes")
                seen[idx].add(version)
                reads[idx] += 1
            except Exception as exc:  # noqa: BLE001 - any failure is an inconsistent read
                errors.append(f"reader {idx}: {exc!r}")
                return

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(3)]
    threads.append(threading.Thread(target=publisher))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors[:5]
    assert len(set().union(*seen)) > 1, seen
    assert all(len(s) >= 1 for s in seen) and sum(reads) > n_versions
    assert [v.version for v in publisher_reg.versions(SCENE)] == [f"v{i:06d}" for i in range(1, n_versions + 1)]
    assert not list((tmp_path / "registry" / SCENE).glob(".staging-*"))


# --- crash safety --------------------------------------------------------------------------
_CRASHING_PUBLISH = """
import sys, pathlib
from training.registry import Registry
Registry(sys.argv[1]).publish(sys.argv[2], pathlib.Path(sys.argv[3]), {"metrics": {"val_ndcg10": 0.5}})
"""


def _publish_in_subprocess(root: str, staged: Path, crash_at: str) -> int:
    env = {**os.environ, FAULT_ENV: registry_point(crash_at), "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", _CRASHING_PUBLISH, root, SCENE, str(staged)],
        env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == CRASH_EXIT_CODE, proc.stderr
    return proc.returncode


def _leftovers(scene_dir: Path) -> list[str]:
    return sorted(p.name for p in scene_dir.iterdir() if p.name.startswith((".staging-", ".CURRENT.json.")))


@pytest.mark.parametrize(
    "step, leftover",
    [
        ("after_staging", ".staging-"),  # files copied and fsync'd, not yet moved
        ("after_move", "v000002"),  # version directory in place, pointer untouched
        ("before_pointer_replace", ".CURRENT.json."),  # new pointer written to its temp file only
    ],
)
def test_a_crash_before_the_pointer_swap_leaves_the_previous_version_live(tmp_path, step, leftover):
    root = str(tmp_path / "registry")
    scene_dir = tmp_path / "registry" / SCENE
    reg = Registry(root)
    publish_tagged(reg, tmp_path, "v000001")
    pointer_before = (scene_dir / POINTER).read_bytes()

    _publish_in_subprocess(root, stage(tmp_path / "crashing", "v000002"), step)

    assert any(p.name.startswith(leftover) for p in scene_dir.iterdir()), sorted(os.listdir(scene_dir))
    assert (scene_dir / POINTER).read_bytes() == pointer_before
    assert reg.current(SCENE).version == "v000001"
    assert [v.version for v in reg.versions(SCENE)] == ["v000001"]  # the orphan is never listed
    with pytest.raises(VersionNotFound):
        reg.get(SCENE, "v000002")
    directory = reg.open(SCENE, verify=True)
    assert (directory / "extra.bin").read_bytes() == payload("v000001", "extra.bin")

    # The next publish works and removes what the crash left behind.
    info = publish_tagged(reg, tmp_path, "next", expected_parent="v000001")
    assert info.version == "v000002" and info.parent == "v000001"
    assert _leftovers(scene_dir) == []
    assert sorted(p.name for p in scene_dir.iterdir() if not p.name.startswith(".")) == [POINTER, "v000001", "v000002"]
    assert (reg.open(SCENE) / "extra.bin").read_bytes() == payload("next", "extra.bin")


def test_a_crash_after_the_pointer_swap_leaves_the_new_version_live(tmp_path):
    root = str(tmp_path / "registry")
    reg = Registry(root)
    publish_tagged(reg, tmp_path, "v000001")
    _publish_in_subprocess(root, stage(tmp_path / "crashing", "v000002"), "after_pointer_replace")
    assert reg.current(SCENE).version == "v000002"
    assert (reg.open(SCENE) / "extra.bin").read_bytes() == payload("v000002", "extra.bin")
    assert [v.version for v in reg.versions(SCENE)] == ["v000001", "v000002"]


def test_a_crash_of_the_first_publish_leaves_no_scene(tmp_path):
    root = str(tmp_path / "registry")
    _publish_in_subprocess(root, stage(tmp_path / "crashing", "x"), "after_move")
    reg = Registry(root)
    assert reg.scenes() == [] and reg.current(SCENE) is None and reg.versions(SCENE) == []
    assert publish_tagged(reg, tmp_path, "v000001", expected_parent=None).version == "v000001"


# --- checksums -----------------------------------------------------------------------------
def test_a_corrupt_file_is_detected_and_a_corrupt_version_cannot_be_rolled_back_to(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    publish_tagged(reg, tmp_path, "a")
    publish_tagged(reg, tmp_path, "b")
    v1_dir = tmp_path / "registry" / SCENE / "v000001"
    target = v1_dir / "tokenizer" / "vocab.txt"
    expected = sha256_file(target)
    target.write_bytes(b"tampered" + target.read_bytes()[8:])  # same size, other bytes

    with pytest.raises(ChecksumMismatch) as err:
        reg.open(SCENE, "v000001", verify=True)
    assert err.value.file == "tokenizer/vocab.txt" and err.value.expected == expected
    assert err.value.actual == sha256_file(target)
    assert "tokenizer/vocab.txt" in str(err.value) and expected in str(err.value) and err.value.actual in str(err.value)
    assert reg.open(SCENE, "v000001", verify=False) == v1_dir  # the caller may opt out

    with pytest.raises(ChecksumMismatch, match="vocab.txt"):
        reg.rollback(SCENE)
    assert reg.current(SCENE).version == "v000002"  # nothing moved

    (v1_dir / "extra.bin").unlink()
    with pytest.raises(RegistryError, match="missing file.*extra.bin"):
        reg.open(SCENE, "v000001")


# --- compare-and-swap ----------------------------------------------------------------------
def test_stale_expected_parent_raises_concurrent_publish(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    with pytest.raises(ConcurrentPublish):
        publish_tagged(reg, tmp_path, "a", expected_parent="v000001")
    publish_tagged(reg, tmp_path, "a", expected_parent=None)
    publish_tagged(reg, tmp_path, "b", expected_parent="v000001")
    with pytest.raises(ConcurrentPublish, match="v000002"):
        publish_tagged(reg, tmp_path, "c", expected_parent="v000001")  # trained against a stale parent
    with pytest.raises(ConcurrentPublish):
        publish_tagged(reg, tmp_path, "c", expected_parent=None)
    assert [v.version for v in reg.versions(SCENE)] == ["v000001", "v000002"]


# --- rollback ------------------------------------------------------------------------------
def test_rollback_to_previous_and_to_an_explicit_version(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    for tag in ("a", "b", "c", "d"):
        publish_tagged(reg, tmp_path, tag)
    assert reg.pointer(SCENE)["history"] == ["v000003", "v000002", "v000001"]

    assert reg.rollback(SCENE).version == "v000003"
    assert reg.current(SCENE).version == "v000003"
    assert (reg.open(SCENE) / "extra.bin").read_bytes() == payload("c", "extra.bin")
    pointer = reg.pointer(SCENE)
    assert pointer["history"] == ["v000002", "v000001"]
    assert pointer["log"][0]["action"] == "rollback"
    assert (pointer["log"][0]["from"], pointer["log"][0]["to"]) == ("v000004", "v000003")

    assert reg.rollback(SCENE).version == "v000002"  # again: further back, not back and forth

    assert reg.rollback(SCENE, "v000004").version == "v000004"  # any published version
    pointer = reg.pointer(SCENE)
    assert pointer["version"] == "v000004" and pointer["history"] == ["v000001"]
    assert [(e["action"], e["from"], e["to"]) for e in pointer["log"][:3]] == [
        ("rollback", "v000002", "v000004"), ("rollback", "v000003", "v000002"), ("rollback", "v000004", "v000003")
    ]
    # all versions stay listed; the next publish's parent is the live version
    assert [v.version for v in reg.versions(SCENE)] == ["v000001", "v000002", "v000003", "v000004"]
    assert reg.rollback(SCENE, "v000001").version == "v000001"
    assert publish_tagged(reg, tmp_path, "e").parent == "v000001"

    with pytest.raises(RegistryError, match="already the live"):
        reg.rollback(SCENE, "v000005")
    with pytest.raises(VersionNotFound, match="v000042"):
        reg.rollback(SCENE, "v000042")
    with pytest.raises(VersionNotFound, match="nosuch"):
        reg.rollback("nosuch")


def test_rollback_with_no_history_is_refused(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    publish_tagged(reg, tmp_path, "a")
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback(SCENE)


# --- remote-style root ---------------------------------------------------------------------
def test_a_pyarrow_fs_uri_root_downloads_into_the_cache(tmp_path):
    uri = (tmp_path / "remote").as_uri()  # file:///... goes through pyarrow.fs like s3:// would
    assert uri.startswith("file://")
    reg = Registry(uri)
    assert reg.is_remote
    v1 = publish_tagged(reg, tmp_path, "a")
    publish_tagged(reg, tmp_path, "b", expected_parent="v000001")
    assert v1.path == f"{uri}/{SCENE}/v000001"
    assert not list((tmp_path / "remote" / SCENE).glob(".staging-*"))
    assert [v.version for v in reg.versions(SCENE)] == ["v000001", "v000002"]

    cache = tmp_path / "cache"
    live = reg.open(SCENE, cache_dir=cache)
    assert live == cache / SCENE / "v000002"
    for name in FILE_NAMES:
        assert (live / name).read_bytes() == payload("b", name)
    assert reg.open(SCENE, cache_dir=cache) == live  # reused
    # a damaged cached copy is downloaded again
    (live / "extra.bin").write_bytes(b"junk")
    assert (reg.open(SCENE, cache_dir=cache) / "extra.bin").read_bytes() == payload("b", "extra.bin")
    assert not list((cache / SCENE).glob(".download-*"))

    # corruption in the remote store is caught while downloading, and nothing is cached
    (tmp_path / "remote" / SCENE / "v000001" / "extra.bin").write_bytes(b"bad")
    with pytest.raises(ChecksumMismatch, match="extra.bin"):
        reg.open(SCENE, "v000001", cache_dir=cache)
    assert not (cache / SCENE / "v000001").exists()
    with pytest.raises(ChecksumMismatch):
        reg.rollback(SCENE)

    (tmp_path / "remote" / SCENE / "v000001" / "extra.bin").write_bytes(payload("a", "extra.bin"))
    assert reg.rollback(SCENE).version == "v000001"
    assert reg.current(SCENE).version == "v000001"


# --- CLI -----------------------------------------------------------------------------------
runner = CliRunner()


@pytest.fixture
def cli_registry(tmp_path, monkeypatch):
    root = tmp_path / "registry"
    monkeypatch.setenv("STREAMREC_REGISTRY_ROOT", str(root))
    monkeypatch.delenv("STREAMREC_GATE_TOLERANCE", raising=False)
    reg = Registry(str(root))
    publish_tagged(reg, tmp_path, "a", ndcg=0.3012)
    publish_tagged(reg, tmp_path, "b", ndcg=0.3155)
    return reg


def test_cli_list(cli_registry):
    result = runner.invoke(registry_app, ["list"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split() == ["SCENE", "VERSION", "CREATED_AT", "PARENT", "VAL_NDCG@10", "LIVE"]
    assert lines[1].split()[:2] == [SCENE, "v000001"] and "0.3012" in lines[1] and not lines[1].endswith("*")
    assert lines[2].split()[3:] == ["v000001", "0.3155", "*"]

    result = runner.invoke(registry_app, ["list", "--scene", SCENE, "--json"])
    assert result.exit_code == 0
    rows = json.loads(result.output)
    assert [(r["version"], r["live"], r["val_ndcg10"]) for r in rows] == [("v000001", False, 0.3012), ("v000002", True, 0.3155)]

    result = runner.invoke(registry_app, ["list", "--scene", "ghost"])
    assert result.exit_code == 1 and "ghost" in result.output


def test_cli_show(cli_registry, tmp_path):
    result = runner.invoke(registry_app, ["show", SCENE])
    assert result.exit_code == 0, result.output
    assert "v000002 (live)" in result.output and "checksums: ok (4 files)" in result.output

    result = runner.invoke(registry_app, ["show", SCENE, "v000001", "--json"])
    assert result.exit_code == 0
    data = json.loads(result.output)
    assert data["version"] == "v000001" and data["live"] is False
    assert data["manifest"]["files"]["extra.bin"]["bytes"] == FILE_BYTES
    assert data["verification"] == {"checked": True, "ok": True, "error": None}

    (tmp_path / "registry" / SCENE / "v000001" / "extra.bin").write_bytes(b"x")
    result = runner.invoke(registry_app, ["show", SCENE, "v000001"])
    assert result.exit_code == 1 and "FAILED" in result.output and "extra.bin" in result.output

    for args, named in ((["show", "ghost"], "ghost"), (["show", SCENE, "v000077"], "v000077"), (["show", "../x"], "../x")):
        result = runner.invoke(registry_app, args)
        assert result.exit_code == 1 and named in result.output, result.output


def test_cli_rollback(cli_registry):
    result = runner.invoke(registry_app, ["rollback", SCENE])
    assert result.exit_code == 0, result.output
    assert f"{SCENE}: v000002 -> v000001" in result.output
    assert cli_registry.current(SCENE).version == "v000001"

    result = runner.invoke(registry_app, ["rollback", SCENE, "--to", "v000002"])
    assert result.exit_code == 0 and "v000001 -> v000002" in result.output

    result = runner.invoke(registry_app, ["rollback", "ghost"])
    assert result.exit_code == 1 and "ghost" in result.output
    result = runner.invoke(registry_app, ["rollback", SCENE, "--to", "v000099"])
    assert result.exit_code == 1 and "v000099" in result.output


def test_cli_bad_configuration_exits_2(cli_registry, monkeypatch):
    monkeypatch.setenv("STREAMREC_GATE_TOLERANCE", "-1")
    result = runner.invoke(registry_app, ["list"])
    assert result.exit_code == 2
    assert "STREAMREC_GATE_TOLERANCE='-1'" in result.output
