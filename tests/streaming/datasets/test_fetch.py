"""Fetching MovieLens-100K (streaming/datasets/fetch.py): extraction, fallbacks, nothing half-written."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from streaming.datasets import (
    DatasetError,
    download_recbole_wheel,
    extract_grouplens_zip,
    extract_recbole_wheel,
    fetch,
    fetch_ml100k,
    load_movielens,
)
from tests.streaming.datasets.files import U_DATA, Downloads, grouplens_zip, make_zip, recbole_wheel


def test_extract_grouplens_zip(tmp_path):
    out = extract_grouplens_zip(grouplens_zip(tmp_path / "a.zip"), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["u.data", "u.genre", "u.item", "u.user"]
    assert (out / "u.data").read_text() == U_DATA
    with pytest.raises(DatasetError, match="missing u.item"):
        extract_grouplens_zip(make_zip(tmp_path / "b.zip", {"ml-100k/u.data": U_DATA}), tmp_path / "out2")
    (tmp_path / "c.zip").write_text("<html>not found</html>")
    with pytest.raises(DatasetError, match="not a zip archive"):
        extract_grouplens_zip(tmp_path / "c.zip", tmp_path / "out3")


def test_extract_recbole_wheel(tmp_path):
    out = extract_recbole_wheel(recbole_wheel(tmp_path / "recbole-1.2.1-py3-none-any.whl"), tmp_path / "out")
    assert sorted(p.name for p in out.iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    assert load_movielens(out).name == "ml-100k"
    with pytest.raises(DatasetError, match="missing ml-100k.inter, ml-100k.item"):
        extract_recbole_wheel(make_zip(tmp_path / "w.whl", {"recbole/__init__.py": ""}), tmp_path / "out2")


def test_fetch_prefers_grouplens_and_is_idempotent(tmp_path, monkeypatch):
    dl = Downloads(monkeypatch, tmp_path, grouplens_ok=True, recbole_ok=True)
    target = fetch_ml100k(tmp_path / "ds", progress=False)
    assert target == tmp_path / "ds" / "ml-100k"
    assert dl.calls == ["grouplens"]
    assert sorted(p.name for p in target.iterdir()) == ["u.data", "u.genre", "u.item", "u.user"]
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["ml-100k"]  # no temp dir left
    dl2 = Downloads(monkeypatch, tmp_path, grouplens_ok=False, recbole_ok=False)
    assert fetch_ml100k(tmp_path / "ds", progress=False) == target  # already there: no download
    assert dl2.calls == []


def test_fetch_falls_back_to_recbole_wheel(tmp_path, monkeypatch):
    dl = Downloads(monkeypatch, tmp_path, grouplens_ok=False, recbole_ok=True)
    target = fetch_ml100k(tmp_path / "ds", progress=False)
    assert dl.calls == ["grouplens", "recbole"]
    assert sorted(p.name for p in target.iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    assert [p.name for p in (tmp_path / "ds").iterdir()] == ["ml-100k"]


def test_fetch_falls_back_when_grouplens_download_is_corrupt(tmp_path, monkeypatch):
    Downloads(monkeypatch, tmp_path, grouplens_ok=True, recbole_ok=True)
    monkeypatch.setattr(fetch, "download_grouplens_zip", lambda dest, progress=True: Path(dest).write_text("<html>") and dest)
    target = fetch_ml100k(tmp_path / "ds", progress=False)
    assert (target / "ml-100k.inter").is_file()


def test_fetch_both_fail(tmp_path, monkeypatch):
    Downloads(monkeypatch, tmp_path, grouplens_ok=False, recbole_ok=False)
    with pytest.raises(DatasetError) as info:
        fetch_ml100k(tmp_path / "ds", progress=False)
    msg = str(info.value)
    assert "GroupLens" in msg and "no network" in msg and "recbole==1.2.1" in msg
    assert str(tmp_path / "ds" / "ml-100k") in msg and "u.data" in msg and "ml-100k.inter" in msg
    assert list((tmp_path / "ds").iterdir()) == []  # nothing half-written


def test_fetch_into_existing_dirs(tmp_path, monkeypatch):
    Downloads(monkeypatch, tmp_path, grouplens_ok=True, recbole_ok=True)
    (tmp_path / "a" / "ml-100k").mkdir(parents=True)  # empty: filled
    assert (fetch_ml100k(tmp_path / "a", progress=False) / "u.data").is_file()
    (tmp_path / "b" / "ml-100k").mkdir(parents=True)
    (tmp_path / "b" / "ml-100k" / "u.data").write_text(U_DATA)  # partial, someone else's: refused
    with pytest.raises(DatasetError, match="remove it to fetch again"):
        fetch_ml100k(tmp_path / "b", progress=False)


def test_download_recbole_wheel_only_downloads(tmp_path, monkeypatch):
    seen = {}

    class Proc:
        returncode, stdout, stderr = 0, "", ""

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        recbole_wheel(Path(cmd[cmd.index("-d") + 1]) / "recbole-1.2.1-py3-none-any.whl")
        return Proc()

    monkeypatch.setattr(fetch.subprocess, "run", run)
    wheel = download_recbole_wheel(tmp_path / "w", progress=False)
    assert wheel.name == "recbole-1.2.1-py3-none-any.whl"
    cmd = seen["cmd"]
    assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
    assert {"--no-deps", "--only-binary=:all:", "recbole==1.2.1"} <= set(cmd) and "install" not in cmd

    Proc.returncode, Proc.stderr = 1, "ERROR: No matching distribution found for recbole==1.2.1"
    monkeypatch.setattr(fetch.subprocess, "run", lambda cmd, **kw: Proc())
    with pytest.raises(DatasetError, match="exited 1: ERROR: No matching distribution"):
        download_recbole_wheel(tmp_path / "w2", progress=False)
