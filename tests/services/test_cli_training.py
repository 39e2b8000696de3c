"""`streamrec train|evaluate|registry`: help and the failures a user hits first (no services needed)."""

from __future__ import annotations

from typer.testing import CliRunner

from services.cli import app
from tests.services.test_cli import assert_help_lists

runner = CliRunner()


def test_help_lists_the_training_commands():
    assert_help_lists([], ("train", "evaluate", "registry"))
    assert_help_lists(["train"], ("--incremental", "--scene", "--workers", "--gpu", "--force", "--preset"))


def test_train_without_feature_tables_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["train", "--no-progress"])
    assert result.exit_code == 1
    assert "no feature tables yet" in result.output and "streamrec features" in result.output


def test_train_refuses_a_bad_scene_name(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["train", "--scene", "../etc"])
    assert result.exit_code == 1 and "../etc" in result.output


def test_train_bad_gate_tolerance_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_GATE_TOLERANCE", "2")
    result = runner.invoke(app, ["train"])
    assert result.exit_code == 2 and "STREAMREC_GATE_TOLERANCE='2'" in result.output


def test_missing_base_model_directory_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STREAMREC_BASE_MODEL", str(tmp_path / "no-such-model"))
    result = runner.invoke(app, ["evaluate", "--dataset", "synthetic:n_users=50,n_items=20,n_events=500",
                                 "--no-progress"])
    assert result.exit_code == 1 and "no-such-model" in result.output
