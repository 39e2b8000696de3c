"""Canary publishing and decisions (training/canary.py) on a real local registry, with a fake click
attribution reader (the real one reads the offline log: tests/streaming/test_attribution.py)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

import streaming.features as features
from streaming.features.attribution import ArmCounts, ArmKey, Attribution
from streaming.job_metrics import metrics_file, read_job_metrics
from streaming.settings import Settings
from training import experiments
from training.canary import (
    CANARY,
    CTR,
    DECISIONS,
    IMPRESSIONS,
    RUNNING,
    blocking_experiment,
    canary_metrics_name,
    publish_candidate,
    review_canary,
)
from training.continuous_trainer import ContinuousTrainer, Schedule
from training.experiments import CONTROL
from training.gate import decide
from training.registry import Registry

SCENE = "home"
M = 2000  # canary_min_impressions of these tests


def settings_for(tmp_path: Path, **overrides) -> Settings:
    values = {"canary_percent": 10.0, "canary_min_impressions": M, "canary_margin": 0.05, "canary_alpha": 0.05}
    return Settings(data_dir=tmp_path, **{**values, **overrides})


def staged(tmp_path: Path, tag: str) -> Path:
    d = tmp_path / f"staged-{tag}"
    d.mkdir()
    (d / "adapter.pt").write_bytes(f"adapter {tag}".encode())
    return d


PASSED = decide(0.30, 0.30, 0.01)  # the gate let it through


def publish(settings: Settings, reg: Registry, tmp_path: Path, tag: str, decision=PASSED):
    current = reg.current(SCENE)
    return publish_candidate(settings, reg, SCENE, staged(tmp_path, tag), {"metrics": {"val_ndcg10": 0.3}},
                             decision, expected_parent=current.version if current else None)


class FakeAttribution:
    """The attribution reader: control and candidate counts set by the test (called like read_attribution)."""

    def __init__(self) -> None:
        self.counts: dict[str, tuple[int, int]] = {}  # variant -> (impressions, clicked)
        self.calls: list[dict] = []
        self.late, self.orphan = 0, 0

    def __call__(self, settings, *, scene=None, experiment=None, since_ms=None) -> Attribution:
        self.calls.append({"scene": scene, "experiment": experiment, "since_ms": since_ms})
        exp = experiments.active(Registry(settings.registry_uri), scene)
        arms = {}
        for variant, (n, clicked) in self.counts.items():
            version = exp.control if variant == CONTROL else variant
            arms[ArmKey(scene, version, variant, experiment)] = ArmCounts(n, clicked, clicked)
        arms[ArmKey(scene, "v000001", CONTROL, None)] = ArmCounts(10**6, 0, 0)  # outside the experiment: ignored
        return Attribution(arms=arms, by_position=pa.table({}), items=pa.table({}), window_ms=1_800_000,
                           late_clicks=self.late, orphan_clicks=self.orphan)


@pytest.fixture
def world(tmp_path):
    settings = settings_for(tmp_path)
    reg = Registry(settings.registry_uri)
    first = publish(settings, reg, tmp_path, "a")
    return SimpleNamespace(settings=settings, reg=reg, tmp=tmp_path, first=first.info, read=FakeAttribution())


def canary_metrics(settings) -> dict[str, float]:
    m = read_job_metrics(metrics_file(settings, canary_metrics_name(SCENE)))
    return {"promote": m.value(DECISIONS, scene=SCENE, decision="promote"),
            "rollback": m.value(DECISIONS, scene=SCENE, decision="rollback"),
            "running": m.value(RUNNING, scene=SCENE),
            "control_impressions": m.value(IMPRESSIONS, scene=SCENE, variant=CONTROL),
            "canary_impressions": m.value(IMPRESSIONS, scene=SCENE, variant=CANARY),
            "canary_ctr": m.value(CTR, scene=SCENE, variant=CANARY)}


# --- publishing ------------------------------------------------------------------------------------
def test_the_first_version_goes_live_even_with_canaries_on(world):
    assert world.first.version == "v000001" and world.reg.current(SCENE).version == "v000001"
    assert experiments.active(world.reg, SCENE) is None


def test_a_candidate_that_passed_the_gate_is_published_not_live_and_starts_a_canary(world):
    pub = publish(world.settings, world.reg, world.tmp, "b")
    assert pub.info.version == "v000002" and world.reg.current(SCENE).version == "v000001"
    assert world.reg.pointer(SCENE)["log"][0]["action"] == "publish-candidate"
    exp = experiments.active(world.reg, SCENE)
    assert pub.experiment == exp and exp.kind == CANARY and exp.candidates == {"v000002": 10.0}
    assert exp.control == "v000001" and "canary for 10% of the users" in pub.canary
    manifest = world.reg.get(SCENE, "v000002").manifest
    assert manifest["gate"]["passed"] is True


def test_with_canaries_off_a_candidate_goes_live(world, tmp_path):
    off = settings_for(tmp_path, canary_percent=0)
    pub = publish(off, world.reg, world.tmp, "b")
    assert pub.canary is None and world.reg.current(SCENE).version == "v000002"
    assert experiments.active(world.reg, SCENE) is None


def test_a_second_candidate_waits_published_not_live_while_an_experiment_runs(world):
    first = publish(world.settings, world.reg, world.tmp, "b").experiment
    pub = publish(world.settings, world.reg, world.tmp, "c")
    assert pub.info.version == "v000003" and pub.experiment is None
    assert "no canary started" in pub.canary and f"already runs experiment {first.id!r}" in pub.canary
    assert f"streamrec experiment start {SCENE} --candidate v000003 --percent 10" in pub.canary
    assert experiments.active(world.reg, SCENE) == first and world.reg.current(SCENE).version == "v000001"


def test_a_forced_publish_goes_live_and_stops_the_canary_it_supersedes(world):
    exp = publish(world.settings, world.reg, world.tmp, "b").experiment
    forced = decide(0.10, 0.30, 0.01, force=True)
    pub = publish(world.settings, world.reg, world.tmp, "c", decision=forced)
    assert pub.canary is None and world.reg.current(SCENE).version == "v000003"
    assert experiments.active(world.reg, SCENE) is None
    entry = experiments.read(world.reg, SCENE).log[0]
    assert entry["id"] == exp.id and entry["action"] == "stop" and "v000003 was published live" in entry["detail"]


# --- decisions -------------------------------------------------------------------------------------
def test_no_canary_no_review_and_a_manual_experiment_is_not_decided(world):
    assert review_canary(world.settings, world.reg, SCENE, read=world.read) is None
    publish(world.settings, world.reg, world.tmp, "b")
    experiments.end(world.reg, SCENE, "stop", "by hand")
    experiments.start(world.reg, SCENE, {"v000002": 20})
    assert review_canary(world.settings, world.reg, SCENE, read=world.read) is None and world.read.calls == []


def test_a_clearly_worse_canary_is_rolled_back_before_m_impressions(world):
    exp = publish(world.settings, world.reg, world.tmp, "b").experiment
    decided = None
    for n in range(100, M + 1, 100):  # the trainer looks again at every check as impressions arrive
        world.read.counts = {CONTROL: (9 * n, 9 * n // 10), "v000002": (n, 3 * n // 50)}  # CTR 0.10 vs 0.06
        decision = review_canary(world.settings, world.reg, SCENE, read=world.read)
        if decision.action != "wait":
            decided = (n, decision)
            break
        assert experiments.active(world.reg, SCENE) == exp and canary_metrics(world.settings)["running"] == 1
    assert decided is not None, "never decided"
    n, decision = decided
    assert decision.action == "rollback" and 100 < n < M and decision.high < 0  # looked several times first
    assert world.read.calls[-1] == {"scene": SCENE, "experiment": exp.id, "since_ms": exp.started_ms}
    assert experiments.active(world.reg, SCENE) is None and world.reg.current(SCENE).version == "v000001"
    entry = experiments.read(world.reg, SCENE).log[0]
    assert entry["id"] == exp.id and entry["action"] == "rollback" and entry["decision"] == "rollback"
    assert entry["cs_high"] < 0 and entry["impressions"] == {CONTROL: 9 * n, CANARY: n}
    assert "worse than control" in entry["detail"]
    assert canary_metrics(world.settings) == {"promote": 0, "rollback": 1, "running": 0, "control_impressions": 9 * n,
                                              "canary_impressions": n, "canary_ctr": pytest.approx(0.06, abs=1e-3)}
    assert review_canary(world.settings, world.reg, SCENE, read=world.read) is None  # over


def test_an_equal_canary_waits_for_m_impressions_then_is_promoted(world):
    exp = publish(world.settings, world.reg, world.tmp, "b").experiment
    actions = []
    for n in (500, 1000, M - 1, M):
        world.read.counts = {CONTROL: (9 * n, 9 * n // 10), "v000002": (n, n // 10)}  # the same CTR
        actions.append(review_canary(world.settings, world.reg, SCENE, read=world.read).action)
    assert actions == ["wait", "wait", "wait", "promote"]
    assert world.reg.current(SCENE).version == "v000002" and experiments.active(world.reg, SCENE) is None
    pointer = world.reg.pointer(SCENE)
    assert pointer["log"][0]["action"] == "promote" and exp.id in pointer["log"][0]["note"]
    assert pointer["history"][0] == "v000001"  # `streamrec registry rollback` undoes it
    entry = experiments.read(world.reg, SCENE).log[0]
    assert entry["action"] == "promote" and entry["decision"] == "promote" and entry["version"] == "v000002"
    assert entry["impressions"] == {CONTROL: 9 * M, CANARY: M}
    m = canary_metrics(world.settings)
    assert (m["promote"], m["rollback"], m["running"], m["canary_impressions"]) == (1, 0, 0, M)


def test_decisions_add_up_across_canaries_in_the_metrics_file(world):
    for tag, clicked_per_10 in (("b", 0), ("c", 1)):  # a bad canary rolled back, then a good one promoted
        publish(world.settings, world.reg, world.tmp, tag)
        world.read.counts = {CONTROL: (9 * M, 9 * M // 10), next(iter(experiments.active(world.reg, SCENE).candidates)):
                             (M, M * clicked_per_10 // 10)}
        review_canary(world.settings, world.reg, SCENE, read=world.read)
    m = canary_metrics(world.settings)
    assert (m["promote"], m["rollback"]) == (1, 1) and world.reg.current(SCENE).version == "v000003"


def test_blocking_experiment(world, tmp_path):
    assert blocking_experiment(world.settings, world.reg, SCENE) is None
    exp = publish(world.settings, world.reg, world.tmp, "b").experiment
    off = settings_for(tmp_path, canary_percent=0)
    assert blocking_experiment(off, world.reg, SCENE) == exp  # a canary always holds the next run back
    experiments.end(world.reg, SCENE, "stop", "by hand")
    manual = experiments.start(world.reg, SCENE, {"v000002": 20})
    assert blocking_experiment(world.settings, world.reg, SCENE) == manual  # a canary could not start
    assert blocking_experiment(off, world.reg, SCENE) is None  # canaries off: a new version goes live


# --- the continuous trainer ------------------------------------------------------------------------
def test_a_run_that_publishes_a_canary_ends_the_check_as_canary(world, monkeypatch):
    monkeypatch.setattr(features, "run_features", lambda *a, **k: None)
    monkeypatch.setattr(features, "read_manifest", lambda s: {"counts": {"events": 5000}})
    runs = []

    def train(settings, req):  # what run_training does once the gate passed (training/train_run.py)
        runs.append(req)
        pub = publish(world.settings, world.reg, world.tmp, f"run{len(runs)}")
        return SimpleNamespace(published=pub.info, kind=CANARY, gate_message=pub.canary, metrics={}, run_dir="r")

    trainer = ContinuousTrainer(world.settings, schedule=Schedule(events=1), preset="quick", scene=SCENE,
                                train=train, review=lambda s, r, scene: review_canary(s, r, scene, read=world.read), canary_review_s=0)
    assert trainer.check() == "canary" and len(runs) == 1 and "canary for 10%" in trainer.status.detail
    assert trainer.status.last_outcome["outcome"] == CANARY and trainer.status.live_version == "v000001"
    train_prom = read_job_metrics(metrics_file(world.settings, f"train-{SCENE}"))
    assert train_prom.value("streamrec_train_runs_total", scene=SCENE, outcome="published") == 1
    assert experiments.active(world.reg, SCENE).candidates == {"v000002": 10.0}


def test_the_trainer_waits_while_the_canary_is_undecided_then_trains(world, monkeypatch):
    events = {"n": 5000}
    monkeypatch.setattr(features, "run_features", lambda *a, **k: None)
    monkeypatch.setattr(features, "read_manifest", lambda s: {"counts": {"events": events["n"]}})
    exp = publish(world.settings, world.reg, world.tmp, "b").experiment
    runs = []

    def train(settings, req):
        runs.append(req)
        return SimpleNamespace(published=None, kind="gate_refused", gate_message="gate refused: worse", metrics={},
                               run_dir="r")

    trainer = ContinuousTrainer(world.settings, schedule=Schedule(events=1), preset="quick", scene=SCENE,
                                train=train, review=lambda s, r, scene: review_canary(s, r, scene, read=world.read), canary_review_s=0)
    world.read.counts = {CONTROL: (900, 90), "v000002": (100, 10)}
    for _ in range(3):
        events["n"] += 10  # new events at every check: only the canary holds the run back
        assert trainer.check() == "canary" and runs == []
        assert f"canary v000002 ({exp.id})" in trainer.status.detail and "of 2000 impressions" in trainer.status.detail
    world.read.counts = {CONTROL: (9 * M, 9 * M // 10), "v000002": (M, M // 10)}
    events["n"] += 10
    assert trainer.check() == "refused" and len(runs) == 1  # promoted, then the next run started
    assert world.reg.current(SCENE).version == "v000002" and trainer.status.live_version == "v000002"


def test_the_trainer_does_not_train_while_a_manual_experiment_runs_with_canaries_on(world, monkeypatch):
    monkeypatch.setattr(features, "run_features", lambda *a, **k: None)
    monkeypatch.setattr(features, "read_manifest", lambda s: {"counts": {"events": 5000}})
    publish(world.settings, world.reg, world.tmp, "b")
    experiments.end(world.reg, SCENE, "stop", "by hand")
    manual = experiments.start(world.reg, SCENE, {"v000002": 20})
    trainer = ContinuousTrainer(world.settings, schedule=Schedule(events=1), preset="quick", scene=SCENE,
                                train=lambda s, r: pytest.fail("trained during an experiment"),
                                review=lambda s, r, scene: review_canary(s, r, scene, read=world.read), canary_review_s=0)
    assert trainer.check() == "waiting" and manual.id in trainer.status.detail
    assert f"streamrec experiment stop {SCENE}" in trainer.status.detail


def test_an_unreadable_attribution_holds_the_run_back_and_says_why(world, monkeypatch):
    monkeypatch.setattr(features, "run_features", lambda *a, **k: None)
    monkeypatch.setattr(features, "read_manifest", lambda s: {"counts": {"events": 5000}})
    publish(world.settings, world.reg, world.tmp, "b")

    def broken(settings, **kw):
        raise OSError("log unreadable")

    trainer = ContinuousTrainer(world.settings, schedule=Schedule(events=1), preset="quick", scene=SCENE,
                                train=lambda s, r: pytest.fail("trained during a canary"),
                                review=lambda s, r, scene: review_canary(s, r, scene, read=broken), canary_review_s=0)
    assert trainer.check() == "canary" and "OSError: log unreadable" in trainer.status.detail


def test_a_running_canary_is_reviewed_at_most_every_canary_review_s(world, monkeypatch):
    import training.continuous_trainer as continuous

    clock = [1000.0]
    monkeypatch.setattr(continuous.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(features, "run_features", lambda *a, **k: None)
    monkeypatch.setattr(features, "read_manifest", lambda s: {"counts": {"events": 5000}})
    publish(world.settings, world.reg, world.tmp, "b")
    world.read.counts = {CONTROL: (900, 90), "v000002": (100, 10)}
    trainer = ContinuousTrainer(world.settings, schedule=Schedule(events=1), preset="quick", scene=SCENE,
                                train=lambda s, r: pytest.fail("trained during a canary"),
                                review=lambda s, r, scene: review_canary(s, r, scene, read=world.read))
    assert trainer.check() == "canary" and len(world.read.calls) == 1
    clock[0] += continuous.CANARY_REVIEW_S - 1
    assert trainer.check() == "canary" and len(world.read.calls) == 1  # the last verdict stands
    clock[0] += 1
    assert trainer.check() == "canary" and len(world.read.calls) == 2


# --- a real training run ---------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.slow
def test_a_training_run_with_canaries_on_publishes_the_next_adapter_as_a_canary(tmp_path, first_adapter):
    """The first adapter goes live; the next one, which passes the gate, is published not live as a
    canary, and the run's outcome says so -- real local Ray, the real feature job and registry.
    The first run (canaries on) is shared with test_training.py (tests/fixtures/trained_adapter.py):
    this test continues on a copy of the data directory it left."""
    import dataclasses

    from streaming.datasets import load_dataset
    from tests.fixtures.trained_adapter import CANARY_PERCENT, FIRST_EVENTS
    from tests.training.test_training import QUICK, SPEC, ingest
    from training.train_run import OUTCOME_FILE, PUBLISHED, outcome_line, run_training

    data_dir, offsets = first_adapter.copy_to(tmp_path / "data")
    settings = Settings(data_dir=data_dir, user_buckets=2, features_interval_s=0, canary_percent=CANARY_PERCENT)
    first = first_adapter.outcome
    assert first.kind == PUBLISHED and first.published.version == "v000001", first.gate_message
    reg = Registry(settings.registry_uri)
    assert reg.current("default").version == "v000001"
    assert experiments.active(reg, "default") is None  # the first version is always live

    ds = load_dataset(SPEC, tmp_path / "datasets")
    ingest(settings, ds, FIRST_EVENTS, 12000, offsets, with_items=False)
    second = run_training(settings, dataclasses.replace(first_adapter.request, incremental=True,
                                                        train_config=dataclasses.replace(QUICK, epochs=2)))
    assert second.kind == CANARY and second.published.version == "v000002", second.gate_message
    assert reg.current("default").version == "v000001"
    exp = experiments.active(reg, "default")
    assert exp.kind == CANARY and exp.candidates == {"v000002": 10.0} and exp.control == "v000001"
    record = json.loads((second.run_dir / OUTCOME_FILE).read_text())
    assert record["outcome"] == CANARY and record["version"] == "v000002"
    assert outcome_line(record).startswith("outcome: canary (v000002 is a canary for 10% of the users against v000001")
