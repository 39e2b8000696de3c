"""The continuous trainer's schedule and decisions (unit tests: the feature job, registry and the
training run are fakes here; tests/services/test_up_e2e.py runs the real loop end to end)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

import streaming.features as features
import training.registry as registry
from training.continuous_trainer import MAX_CONSECUTIVE_FAILURES, ContinuousTrainer, Schedule, parse_every, read_status
from training.corpus import CorpusError, NotEnoughData


@pytest.mark.parametrize("text, expected", [
    ("10m", Schedule(seconds=600)), ("10", Schedule(seconds=600)), ("90s", Schedule(seconds=90)),
    ("1.5h", Schedule(seconds=5400)), ("2 min", Schedule(seconds=120)),
    ("5000events", Schedule(events=5000)), ("5000e", Schedule(events=5000)), ("1 event", Schedule(events=1)),
])
def test_parse_every(text, expected):
    assert parse_every(text) == expected


@pytest.mark.parametrize("text", ["", "soon", "10x", "0m", "-5m", "2.5events", "m10"])
def test_parse_every_refuses_with_the_value_named(text):
    with pytest.raises(ValueError, match="--train-every"):
        parse_every(text)


@dataclass
class World:
    """What the trainer looks at: the feature tables' event count and the registry's live version."""

    events: int = 0
    live: str | None = None
    live_events: int = 0
    publish: bool = True
    fail: Exception | None = None
    runs: list = None

    def train(self, settings, req):
        self.runs.append(req)
        if self.fail is not None:
            raise self.fail
        if not self.publish:
            return SimpleNamespace(published=None, gate_message="gate refused: worse", metrics={}, run_dir="r")
        n = int((self.live or "v000000")[1:]) + 1
        self.live, self.live_events = f"v{n:06d}", self.events
        return SimpleNamespace(published=SimpleNamespace(version=self.live), gate_message="accepted",
                               metrics={"val_ndcg10": 0.1}, run_dir="r")


@pytest.fixture
def world(monkeypatch):
    w = World(runs=[])
    monkeypatch.setattr(features, "run_features", lambda *a, **k: None)
    monkeypatch.setattr(features, "read_manifest", lambda s: {"counts": {"events": w.events}} if w.events else None)

    class FakeRegistry:
        def __init__(self, uri):
            pass

        def current(self, scene):
            return (SimpleNamespace(version=w.live, manifest={"data_window": {"events": w.live_events}})
                    if w.live else None)

        def read_scene_file(self, scene, name):  # no experiment (training/experiments.py): no canary to review
            return None

    monkeypatch.setattr(registry, "Registry", FakeRegistry)
    return w


def _trainer(world, tmp_path, schedule, **kw):
    return ContinuousTrainer(SimpleNamespace(registry_uri="unused"), schedule=schedule, preset="quick",
                             min_events=1000, status_path=tmp_path / "status.json", train=world.train, **kw)


def test_first_adapter_waits_for_min_events_then_incremental_runs_follow_the_event_schedule(world, tmp_path):
    t = _trainer(world, tmp_path, Schedule(events=500))
    assert t.check() == "waiting" and "0 of 1,000 events" in t.status.detail
    world.events = 999
    assert t.check() == "waiting"
    world.events = 1200
    assert t.check() == "published" and world.live == "v000001" and not world.runs[0].incremental
    assert world.runs[0].train_config.epochs == 4  # the quick preset, from scratch
    assert t.check() == "waiting" and "no new events" in t.status.detail
    world.events = 1600
    assert t.check() == "waiting" and "400 of 500" in t.status.detail
    world.events = 1700
    assert t.check() == "published" and world.live == "v000002"
    req = world.runs[-1]
    assert req.incremental and req.train_config.epochs == 2  # the preset's incremental epochs
    status = read_status(tmp_path / "status.json")
    assert status["state"] == "published" and status["live_version"] == "v000002" and status["published"] == 2


def test_a_refused_candidate_waits_for_the_next_batch_not_the_next_check(world, tmp_path):
    world.events, world.live, world.live_events = 2000, "v000001", 1000
    world.publish = False
    t = _trainer(world, tmp_path, Schedule(events=500))
    assert t.check() == "refused" and "v000001 stays live" in t.status.detail
    assert t.check() == "waiting" and len(world.runs) == 1  # same data: no retry
    world.events = 2499
    assert t.check() == "waiting"
    world.events, world.publish = 2500, True
    assert t.check() == "published" and len(world.runs) == 2


def test_time_schedule_trains_at_most_that_often_and_only_with_new_events(world, tmp_path, monkeypatch):
    import training.continuous_trainer as continuous

    clock = [1000.0]
    monkeypatch.setattr(continuous.time, "monotonic", lambda: clock[0])
    world.events, world.live, world.live_events = 1500, "v000001", 1500
    t = _trainer(world, tmp_path, Schedule(seconds=60))
    assert t.check() == "waiting" and "no new events" in t.status.detail
    world.events = 1600
    assert t.check() == "published"  # nothing attempted yet: due now
    world.events = 1700
    clock[0] += 30
    assert t.check() == "waiting" and "next run in 30 s" in t.status.detail
    clock[0] += 31
    assert t.check() == "published" and len(world.runs) == 2


def test_not_enough_data_is_waiting_and_repeated_failures_end_the_loop(world, tmp_path):
    world.events = 5000
    world.fail = NotEnoughData("need at least 3 events per user")
    t = _trainer(world, tmp_path, Schedule(events=1))
    assert t.check() == "waiting" and "need at least" in t.status.detail
    world.fail = RuntimeError("ray cluster unreachable")
    for n in range(1, MAX_CONSECUTIVE_FAILURES):
        world.events += 1
        assert t.check() == "failed" and f"{n} in a row" in t.status.detail
    world.events += 1
    with pytest.raises(RuntimeError, match="unreachable"):
        t.check()
    assert json.loads((tmp_path / "status.json").read_text())["state"] == "failed"


def test_a_refusal_is_recorded_as_such_and_a_corpus_error_that_is_not_missing_data_is_a_failure(world, tmp_path):
    """The loop ends runs as `streamrec train` does: too little data waits, a gate refusal is a normal end
    (the live adapter stays), any other error -- a corpus error included -- counts toward giving up."""
    world.events, world.live, world.live_events = 2000, "v000001", 1000
    world.publish = False
    t = _trainer(world, tmp_path, Schedule(events=1))
    assert t.check() == "refused" and t.failures == 0
    assert read_status(tmp_path / "status.json")["last_outcome"]["outcome"] == "gate_refused"
    world.fail = CorpusError("scene 'shop': the events carry no scene field")
    world.events += 1
    assert t.check() == "failed" and t.failures == 1 and "no scene field" in t.status.detail
    world.fail, world.publish = None, True
    world.events += 1
    assert t.check() == "published" and t.failures == 0
    assert read_status(tmp_path / "status.json")["last_outcome"]["outcome"] == "published"
