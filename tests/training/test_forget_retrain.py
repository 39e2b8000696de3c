"""Forget requests reach the adapters (training/forget_retrain.py and the continuous trainer)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

import streaming.features as features
import training.continuous_trainer as ct
import training.registry as registry
from training.continuous_trainer import ContinuousTrainer, Schedule
from training.forget_retrain import (
    honoured,
    honoured_by_run,
    pending_tombstones,
    retire_remembering,
    retrain_due,
)


def _manifest(*ids: str) -> dict:
    return {"data_window": {"events": 100, "forgotten": list(ids)}}


def test_an_incremental_run_honours_only_what_its_parent_honoured():
    assert honoured_by_run(["t1", "t2"], None) == ["t1", "t2"]  # from scratch: whatever the data honours
    assert honoured_by_run(["t1", "t2"], _manifest("t1")) == ["t1"]  # its weights remember what t2 names
    assert honoured({}) == set() and honoured(_manifest("a")) == {"a"}


def test_pending_tombstones_are_those_the_features_honour_and_the_adapter_does_not():
    assert pending_tombstones({"forgotten": ["t1", "t2"]}, _manifest("t1")) == {"t2"}
    assert pending_tombstones({"forgotten": []}, _manifest()) == set()
    assert pending_tombstones(None, None) == set()


def test_the_retrain_starts_when_the_oldest_tombstone_is_half_the_deadline_old(monkeypatch):
    import training.forget_retrain as fr

    monkeypatch.setattr(fr, "tombstone_times", lambda s: {"t1": 1_000_000, "t2": 1_500_000})
    settings = SimpleNamespace(forget_retrain_s=1000.0)
    assert retrain_due(settings, {"t2"}, now_s=1_500 + 499) == (False, 499.0)
    assert retrain_due(settings, {"t1", "t2"}, now_s=1_500) == (True, 500.0)
    assert retrain_due(settings, set()) == (False, 0.0)
    assert retrain_due(settings, {"unknown"}, now_s=1_500)[0]  # a time it cannot read: err on forgetting


class Trainer:
    """The continuous trainer's world: a feature manifest honouring tombstones, one live adapter."""

    def __init__(self, monkeypatch, tmp_path, *, forgotten, live_honours, due):
        self.runs = []
        self.live = SimpleNamespace(version="v000001", manifest=_manifest(*live_honours))
        monkeypatch.setattr(features, "run_features", lambda *a, **k: None)
        monkeypatch.setattr(features, "read_manifest",
                            lambda s: {"counts": {"events": 100}, "forgotten": list(forgotten)})
        live = self.live

        class FakeRegistry:
            def __init__(self, uri):
                pass

            def current(self, scene):
                return live

            def read_scene_file(self, scene, name):  # no experiment: no canary to review (training/canary.py)
                return None

        monkeypatch.setattr(registry, "Registry", FakeRegistry)
        monkeypatch.setattr(ct, "retrain_due", lambda s, pending: (due, 7.0))
        self.loop = ContinuousTrainer(SimpleNamespace(registry_uri="unused", runs_dir=tmp_path / "runs"),
                                      schedule=Schedule(seconds=3600), preset="quick", min_events=10,
                                      status_path=tmp_path / "status.json", train=self.train)

    def train(self, settings, req):
        self.runs.append(req)
        return SimpleNamespace(published=SimpleNamespace(version="v000002"), gate_message="published anyway",
                               metrics={}, run_dir=settings.runs_dir / "default-1")


def test_a_due_forget_retrain_runs_from_scratch_and_is_published_past_the_gate(monkeypatch, tmp_path):
    t = Trainer(monkeypatch, tmp_path, forgotten=["t1"], live_honours=[], due=True)
    assert t.loop.check() == "published"
    (req,) = t.runs
    assert not req.incremental and req.force and "forget retrain" in req.force_reason


def test_nothing_pending_or_not_yet_due_leaves_the_schedule_in_charge(monkeypatch, tmp_path):
    t = Trainer(monkeypatch, tmp_path, forgotten=["t1"], live_honours=["t1"], due=True)
    assert t.loop.check() == "waiting" and t.runs == []  # the live adapter honours it already
    t = Trainer(monkeypatch, tmp_path, forgotten=["t1"], live_honours=[], due=False)
    assert t.loop.check() == "waiting" and t.runs == []


@pytest.mark.integration
def test_retiring_deletes_the_versions_and_runs_that_remember(tmp_path):
    """A real registry: the older versions (not honouring the tombstone) go, and a rollback to one is refused."""
    from tests.fixtures.synthetic_adapter import publish_synthetic_adapter
    from training.registry import Registry, VersionNotFound

    reg = Registry(str(tmp_path / "registry"))
    for seed in range(3):
        publish_synthetic_adapter(reg, tmp_path / f"stage{seed}", n_items=8, seed=seed)
    runs = tmp_path / "runs"
    for name in ("default-20261203T100000", "default-20261203T110000", "other-20261203T100000", "default-notes"):
        (runs / name).mkdir(parents=True)
    retired = retire_remembering(reg, "default", {"t1"}, runs, runs / "default-20261203T110000")
    assert retired == ["v000001", "v000002"]
    assert [v.version for v in reg.versions("default")] == ["v000003"] and reg.current("default").version == "v000003"
    with pytest.raises(VersionNotFound):
        reg.rollback("default", "v000001")
    assert sorted(p.name for p in runs.iterdir()) == ["default-20261203T110000", "default-notes",
                                                      "other-20261203T100000"]
    with pytest.raises(registry.RegistryError, match="live version"):
        reg.retire("default", "v000003")
