"""Experiments between adapter versions: state in the registry, sticky assignment, shares, the
registry's not-live publish and promotion (training/experiments.py, training/registry.py)."""

from __future__ import annotations

import json

import pytest

from tests.training.test_registry import SCENE, caller_manifest, stage
from training import experiments
from training.experiments import CONTROL, ExperimentError
from training.registry import Registry, VersionNotFound


@pytest.fixture()
def reg(tmp_path):
    """A scene with v000001 live and v000002, v000003 published but not live."""
    r = Registry(tmp_path / "registry")
    for tag in ("a", "b", "c"):
        r.publish(SCENE, stage(tmp_path / f"staged-{tag}", tag), caller_manifest(tag=tag), make_live=(tag == "a"))
    return r


def test_a_version_published_not_live_leaves_the_pointer_and_can_be_promoted(reg):
    assert reg.current(SCENE).version == "v000001"
    assert [v.version for v in reg.versions(SCENE)] == ["v000001", "v000002", "v000003"]
    assert reg.pointer(SCENE)["log"][0]["action"] == "publish-candidate"
    reg.promote(SCENE, "v000003", "won its experiment")
    pointer = reg.pointer(SCENE)
    assert pointer["version"] == "v000003" and pointer["history"][0] == "v000001"
    assert pointer["log"][0] == {**pointer["log"][0], "action": "promote", "note": "won its experiment"}
    assert reg.rollback(SCENE).version == "v000001"  # a promotion is undone like a publish


def test_assignment_is_sticky_and_shares_hold_within_tolerance(reg):
    exp = experiments.start(reg, SCENE, {"v000002": 10.0, "v000003": 20.0})
    users = [f"{i:032x}" for i in range(20_000)]
    first = [exp.variant_of(u) for u in users]
    assert first == [exp.variant_of(u) for u in users]  # sticky
    shares = {v: first.count(v) / len(users) for v in (CONTROL, "v000002", "v000003")}
    # binomial sd at n=20000 is <= 0.0035: 4 sd
    assert shares["v000002"] == pytest.approx(0.10, abs=0.014)
    assert shares["v000003"] == pytest.approx(0.20, abs=0.014)
    assert shares[CONTROL] == pytest.approx(0.70, abs=0.014)
    assert exp.variant_of(None) == CONTROL
    # another experiment reshuffles: the users of a 10% candidate overlap by about 10%
    experiments.end(reg, SCENE, "stop", "test")
    again = experiments.start(reg, SCENE, {"v000002": 10.0})
    both = sum(1 for u, f in zip(users, first) if f == "v000002" and again.variant_of(u) == "v000002")
    assert both / max(1, first.count("v000002")) == pytest.approx(0.10, abs=0.04)


def test_every_start_and_end_is_logged_and_the_file_is_whole_json(reg, tmp_path):
    exp = experiments.start(reg, SCENE, {"v000002": 10.0})
    assert experiments.active(reg, SCENE) == exp
    experiments.promote(reg, SCENE, None, "by hand", ctr_diff=0.01)
    assert experiments.active(reg, SCENE) is None
    assert reg.current(SCENE).version == "v000002"
    data = json.loads((tmp_path / "registry" / SCENE / experiments.EXPERIMENT_FILE).read_text())
    assert [e["action"] for e in data["log"]] == ["promote", "start"]
    assert data["log"][0]["ctr_diff"] == 0.01 and data["log"][0]["version"] == "v000002"


@pytest.mark.parametrize("candidates, message", [
    ({}, "at least one --candidate"),
    ({"v000001": 10.0}, "it is the live version"),
    ({"v000002": 0.0}, "--percent 0"),
    ({"v000002": 95.0}, "--percent 95"),
    ({"v000002": 50.0, "v000003": 50.0}, "add up to 100"),
])
def test_bad_experiments_are_refused_naming_the_value(reg, candidates, message):
    with pytest.raises(ExperimentError, match=message):
        experiments.start(reg, SCENE, candidates)
    assert experiments.active(reg, SCENE) is None


def test_unknown_versions_a_second_start_and_ending_nothing_are_refused(reg):
    with pytest.raises(VersionNotFound, match="v000009"):
        experiments.start(reg, SCENE, {"v000009": 10.0})
    experiments.start(reg, SCENE, {"v000002": 10.0})
    with pytest.raises(ExperimentError, match="already runs experiment"):
        experiments.start(reg, SCENE, {"v000003": 10.0})
    with pytest.raises(ExperimentError, match="not a candidate"):
        experiments.promote(reg, SCENE, "v000003", "x")
    experiments.end(reg, SCENE, "stop", "done")
    with pytest.raises(ExperimentError, match="runs no experiment"):
        experiments.end(reg, SCENE, "stop", "again")


def test_a_corrupt_experiment_file_is_an_error_naming_it(reg, tmp_path):
    (tmp_path / "registry" / SCENE / experiments.EXPERIMENT_FILE).write_text("{not json")
    with pytest.raises(ExperimentError, match="does not parse"):
        experiments.read(reg, SCENE)
