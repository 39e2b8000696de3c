"""The trainer's outcome metrics (training/train_metrics.py): what carries over from run to run (runs
by outcome, gate refusals in a row, the last success), the live adapter's NDCG@10 from its manifest,
and that `streamrec train` and the continuous trainer write them for every way a run ends (unit
tests: the training run and the registry are fakes; test_training.py checks a real run's file)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

import streaming.features as features
import training.registry as registry
import training.train_run as train_run
from streaming.job_metrics import JobMetrics, metrics_file, parse_job_metrics, read_job_metrics
from streaming.settings import Settings
from training import train_metrics as tm
from training.continuous_trainer import ContinuousTrainer, Schedule
from training.corpus import NotEnoughData

from services.cli import app

SCENE = "default"


def _file(totals: tm.TrainTotals, outcome: str) -> JobMetrics:
    """What a run's file says, parsed back as the next run reads it."""
    from prometheus_client import generate_latest

    text = generate_latest(tm.train_registry(SCENE, outcome, totals, ended=100.0, duration_s=1.0, live_ndcg=None))
    return JobMetrics(None, parse_job_metrics(text.decode()))


def test_refusals_in_a_row_count_up_until_a_publish_and_runs_add_up():
    prev, seen = None, []
    for t, outcome in enumerate(["refused", "refused", "nothing_new", "failed", "refused", "published", "refused"]):
        totals = tm.next_totals(prev, SCENE, outcome, ended=1000.0 + t)
        seen.append(totals.refusals_in_a_row)
        prev = _file(totals, outcome)
    assert seen == [1, 2, 2, 2, 3, 0, 1]  # nothing new and failures say nothing about the gate
    assert totals.runs == {"published": 1, "refused": 4, "nothing_new": 1, "failed": 1}


def test_the_last_success_is_any_end_without_error_and_a_failure_keeps_it():
    first = tm.next_totals(None, SCENE, "failed", ended=50.0)
    assert first.last_success == 0 and first.runs["failed"] == 1  # never succeeded
    ok = tm.next_totals(_file(first, "failed"), SCENE, "nothing_new", ended=60.0)
    assert ok.last_success == 60.0
    failed = tm.next_totals(_file(ok, "nothing_new"), SCENE, "failed", ended=70.0)
    assert failed.last_success == 60.0


def test_another_scenes_file_does_not_count():
    other = JobMetrics(None, parse_job_metrics(
        'streamrec_train_gate_refusals_in_a_row{scene="homepage"} 5\n'))
    assert tm.next_totals(other, SCENE, "refused", ended=1.0).refusals_in_a_row == 1


def test_an_unknown_outcome_is_refused_by_name():
    with pytest.raises(ValueError, match="'gate_refused'"):
        tm.next_totals(None, SCENE, "gate_refused", ended=1.0)


def test_every_outcome_kind_of_a_run_maps_to_a_metric_outcome_or_is_left_out():
    assert set(tm.METRIC_OUTCOME.values()) == set(tm.TRAIN_OUTCOMES)
    assert set(tm.METRIC_OUTCOME) | {train_run.NOT_PUBLISHED, train_run.RUNNING} == set(train_run.OUTCOMES)


@pytest.fixture()
def live(monkeypatch):
    """The registry's live adapter of SCENE: `live["ndcg"]` (None: no live adapter)."""
    state = {"ndcg": 0.31}

    class FakeRegistry:
        def __init__(self, uri):
            pass

        def current(self, scene):
            if state["ndcg"] is None:
                return None
            return SimpleNamespace(version="v000002", manifest={"metrics": {"val_ndcg10": state["ndcg"]},
                                                                "data_window": {"events": 0}})

        def read_scene_file(self, scene, name):  # no experiment: no canary to review (training/canary.py)
            return None

    monkeypatch.setattr(registry, "Registry", FakeRegistry)
    return state


def test_record_writes_the_whole_table(tmp_path, live):
    s = Settings(data_dir=tmp_path)
    tm.record_train_run(s, SCENE, train_run.GATE_REFUSED, started=0.0)
    m = read_job_metrics(metrics_file(s, "train-default"))
    assert m.value(tm.LAST_OUTCOME, scene=SCENE, outcome="refused") == 1
    assert [m.value(tm.LAST_OUTCOME, scene=SCENE, outcome=o) for o in tm.TRAIN_OUTCOMES] == [0, 1, 0, 0]
    assert [m.value(tm.RUNS, scene=SCENE, outcome=o) for o in tm.TRAIN_OUTCOMES] == [0, 1, 0, 0]
    assert m.value(tm.REFUSALS_IN_A_ROW, scene=SCENE) == 1
    assert m.value(tm.LIVE_NDCG, scene=SCENE) == 0.31
    assert m.value(tm.LAST_SUCCESS, scene=SCENE) == m.value(tm.LAST_RUN, scene=SCENE) > 0
    assert m.value(tm.LAST_DURATION, scene=SCENE) == pytest.approx(m.value(tm.LAST_RUN, scene=SCENE))

    live["ndcg"] = None  # the scene has no live adapter: no NDCG series
    tm.record_train_run(s, SCENE, train_run.NOT_PUBLISHED, started=0.0)  # an experiment: not recorded
    assert read_job_metrics(metrics_file(s, "train-default")).samples == m.samples
    tm.record_train_run(s, SCENE, train_run.FAILED, started=0.0)
    m = read_job_metrics(metrics_file(s, "train-default"))
    assert m.value(tm.LIVE_NDCG, scene=SCENE) is None and m.value(tm.RUNS, scene=SCENE, outcome="failed") == 1


# --- the commands write them ----------------------------------------------------------------------------
def _outcome(kind: str, version: str | None = None):
    """A fake run_training whose run ends as `kind` (what `streamrec train` reads of a TrainOutcome)."""
    def run(settings, req, corpus=None):
        return SimpleNamespace(metrics={"val_ndcg10": 0.3, "test_ndcg10": 0.2, "test_recall10": 0.4},
                               gate_message=kind, run_dir="r",
                               record=lambda scene: train_run.outcome_record(kind, "why", scene=scene, version=version))
    return run


def test_streamrec_train_records_each_run_and_adds_them_up(tmp_path, monkeypatch, live):
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    runner = CliRunner()
    path = metrics_file(Settings(data_dir=tmp_path), "train-shop")
    for fake, code in [(_outcome(train_run.PUBLISHED, "v000002"), 0), (_outcome(train_run.GATE_REFUSED), 0),
                       (_outcome(train_run.GATE_REFUSED), 0)]:
        monkeypatch.setattr(train_run, "run_training", fake)
        assert runner.invoke(app, ["train", "--scene", "shop", "--no-progress"]).exit_code == code

    def nothing(settings, req, corpus=None):
        raise NotEnoughData("no events past v000002's data window")

    def broken(settings, req, corpus=None):
        raise RuntimeError("ray cluster unreachable")

    for fake, code in [(nothing, 0), (broken, 1)]:
        monkeypatch.setattr(train_run, "run_training", fake)
        assert runner.invoke(app, ["train", "--scene", "shop", "--no-progress"]).exit_code == code
    m = read_job_metrics(path)
    assert [m.value(tm.RUNS, scene="shop", outcome=o) for o in tm.TRAIN_OUTCOMES] == [1, 2, 1, 1]
    assert m.value(tm.LAST_OUTCOME, scene="shop", outcome="failed") == 1
    assert m.value(tm.REFUSALS_IN_A_ROW, scene="shop") == 2
    assert m.value(tm.LAST_SUCCESS, scene="shop") < m.value(tm.LAST_RUN, scene="shop")

    monkeypatch.setattr(train_run, "run_training", _outcome(train_run.NOT_PUBLISHED))
    assert runner.invoke(app, ["train", "--scene", "shop", "--no-publish", "--no-progress"]).exit_code == 0
    assert read_job_metrics(path).samples == m.samples  # --no-publish: an experiment, not recorded


def test_a_bad_configuration_is_not_recorded_anywhere(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMREC_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("STREAMREC_GATE_TOLERANCE", "2")
    assert CliRunner().invoke(app, ["train"]).exit_code == 2
    assert not (tmp_path / "metrics").exists()


def test_the_continuous_trainer_records_its_runs(tmp_path, monkeypatch, live):
    monkeypatch.setattr(features, "run_features", lambda *a, **k: None)
    events = {"n": 2000}
    monkeypatch.setattr(features, "read_manifest", lambda s: {"counts": {"events": events["n"]}})
    answers = iter([NotEnoughData("users too short"), RuntimeError("boom"),
                    SimpleNamespace(published=None, gate_message="gate refused: worse", metrics={}, run_dir="r"),
                    SimpleNamespace(published=SimpleNamespace(version="v000003"), gate_message="accepted",
                                    metrics={}, run_dir="r")])

    def train(settings, req):
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    s = Settings(data_dir=tmp_path)
    t = ContinuousTrainer(s, schedule=Schedule(events=1), preset="quick", train=train)
    ends = []
    for _ in range(4):
        events["n"] += 10  # new events each time: the schedule is due at every check
        ends.append(t.check())
        m = read_job_metrics(metrics_file(s, "train-default"))
        ends.append([o for o in tm.TRAIN_OUTCOMES if m.value(tm.LAST_OUTCOME, scene=SCENE, outcome=o) == 1])
    assert ends == ["waiting", ["nothing_new"], "failed", ["failed"], "refused", ["refused"],
                    "published", ["published"]]
    assert [m.value(tm.RUNS, scene=SCENE, outcome=o) for o in tm.TRAIN_OUTCOMES] == [1, 1, 1, 1]
    assert m.value(tm.REFUSALS_IN_A_ROW, scene=SCENE) == 0 and m.value(tm.LIVE_NDCG, scene=SCENE) == 0.31
