"""`streamrec train|evaluate|registry`: help, the failures a user hits first, and `train`'s exit status for
each way a run ends (no services needed: the training run is a fake where a test needs one to end)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import training.train_run as train_run
from training.corpus import CorpusError, NotEnoughData

from services.cli import app
from tests.services.test_cli import assert_help_lists

runner = CliRunner()


def test_help_lists_the_training_commands():
    assert_help_lists([], ("train", "evaluate", "registry"))
    assert_help_lists(["train"], ("--incremental", "--scene", "--workers", "--gpu", "--force", "--preset",
                                  "--outcome-json"))


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


# --- train: exit 0 for every normal end of a run, non-zero only for a failure ---------------------------------


def _ended(kind: str, version: str | None, gate_message: str, detail: str):
    """A fake `run_training` whose run ends in `kind` (what the real one returns, without training)."""

    def run(settings, req, corpus=None):
        run_dir = settings.runs_dir / "default-fake"
        run_dir.mkdir(parents=True)
        published = SimpleNamespace(version=version) if version else None
        metrics = {"val_ndcg10": 0.31, "val_recall10": 0.5, "test_ndcg10": 0.3, "test_recall10": 0.5}
        return train_run.TrainOutcome(run_dir, published, gate_message, metrics, None, kind, detail)

    return run


def _raises(exc: Exception):
    def run(settings, req, corpus=None):
        raise exc

    return run


NO_NEW = "no events past v000002's data window; v000002 stays live"
TOO_FEW = "no user has 3 or more interactions: nothing to evaluate"
REFUSAL = "candidate 0.2000 < current 0.3100 - tolerance 0.0050 = 0.3050: refused; v000002 stays live"

ENDINGS = {
    "published": (_ended(train_run.PUBLISHED, "v000003", "published default/v000003 (accepted)", "accepted"),
                  0, "published", "outcome: published v000003 (accepted)"),
    "gate refused": (_ended(train_run.GATE_REFUSED, None, "gate refused: worse", REFUSAL),
                     0, "gate_refused", f"outcome: gate refused ({REFUSAL})"),
    "not published": (_ended(train_run.NOT_PUBLISHED, None, "not published (--no-publish)", "--no-publish"),
                      0, "not_published", "outcome: not published (--no-publish)"),
    "nothing new": (_raises(NotEnoughData(NO_NEW)), 0, "nothing_new", f"outcome: nothing new ({NO_NEW})"),
    "too few events": (_raises(NotEnoughData(TOO_FEW)), 0, "nothing_new", f"outcome: nothing new ({TOO_FEW})"),
    "corpus error": (_raises(CorpusError("scene 'shop': the events carry no scene field")),
                     1, "failed", "outcome: failed (scene 'shop': the events carry no scene field)"),
    "ray failure": (_raises(RuntimeError("ray cluster unreachable")),
                    1, "failed", "outcome: failed (RuntimeError: ray cluster unreachable)"),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_train_exit_status_and_outcome_for_each_way_a_run_ends(ending, tmp_path, monkeypatch):
    fake, status, kind, line = ENDINGS[ending]
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(train_run, "run_training", fake)
    out = tmp_path / "monitoring" / "train-outcome.json"
    result = runner.invoke(app, ["train", "--incremental", "--no-progress", "--outcome-json", str(out)])
    assert result.exit_code == status, result.output
    assert [ln for ln in result.output.splitlines() if ln.startswith("outcome:")] == [line]
    record = json.loads(out.read_text())
    assert record["outcome"] == kind and record["exit_code"] == status and record["scene"] == "default"
    assert record["version"] == ("v000003" if kind == "published" else None)
    if kind in ("published", "gate_refused", "not_published"):  # a run happened: metrics and its directory
        assert record["metrics"]["val_ndcg10"] == 0.31 and record["run_dir"].endswith("default-fake")


def test_train_records_a_configuration_error_as_failed_with_status_2(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_GATE_TOLERANCE", "2")
    out = tmp_path / "outcome.json"
    result = runner.invoke(app, ["train", "--outcome-json", str(out)])
    assert result.exit_code == 2
    record = json.loads(out.read_text())
    assert record["outcome"] == "failed" and record["exit_code"] == 2
    assert "STREAMREC_GATE_TOLERANCE='2'" in record["detail"]


def test_train_writes_running_before_the_run_and_refuses_an_unwritable_outcome_path(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    out = tmp_path / "outcome.json"
    seen = {}

    def run(settings, req, corpus=None):
        seen.update(json.loads(out.read_text()))
        raise NotEnoughData("no events yet")

    monkeypatch.setattr(train_run, "run_training", run)
    assert runner.invoke(app, ["train", "--outcome-json", str(out)]).exit_code == 0
    assert seen["outcome"] == "running" and json.loads(out.read_text())["outcome"] == "nothing_new"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = runner.invoke(app, ["train", "--outcome-json", str(blocker / "outcome.json")])
    assert result.exit_code == 1 and "--outcome-json" in result.output


def test_the_run_directory_holds_the_outcome_record_too(tmp_path):
    record = train_run.outcome_record(train_run.GATE_REFUSED, REFUSAL, scene="default", run_dir=tmp_path)
    assert train_run.outcome_line(record) == f"outcome: gate refused ({REFUSAL})"
    with pytest.raises(ValueError, match="'exploded'"):
        train_run.outcome_record("exploded", "", scene="default")


def test_evaluate_without_feature_tables_says_what_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["evaluate", "--no-progress"])
    assert result.exit_code == 1
    assert "no feature tables yet" in result.output and "streamrec features" in result.output


@pytest.mark.parametrize("argv, expected", [([], 100_000), (["--max-users", "0"], 0), (["--max-users", "500"], 500)])
def test_evaluate_reads_the_training_runs_user_sample(argv, expected, tmp_path, monkeypatch):
    import training.corpus as corpus
    import training.eval_harness as harness
    from services.cli_training import DEFAULT_EVAL_MAX_USERS

    assert DEFAULT_EVAL_MAX_USERS == corpus.DEFAULT_MAX_USERS  # the default sample is the training run's
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    seen = {}

    def fake_load(settings, *, max_users, source="features"):
        seen["max_users"] = max_users
        return "corpus"

    def fake_harness(c, **kwargs):
        seen["corpus"] = c
        return SimpleNamespace(markdown="| table |", paths={"json": tmp_path / "r.json"})

    monkeypatch.setattr(corpus, "load_corpus", fake_load)
    monkeypatch.setattr(harness, "run_harness", fake_harness)
    result = runner.invoke(app, ["evaluate", "--no-progress", *argv])
    assert result.exit_code == 0, result.output
    assert seen == {"max_users": expected, "corpus": "corpus"}


def test_evaluate_refuses_a_negative_max_users(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    result = runner.invoke(app, ["evaluate", "--max-users", "-1"])
    assert result.exit_code == 2 and "--max-users" in result.output
