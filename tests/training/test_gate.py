"""The quality gate (training/gate.py): the decision, and publishing through it into a real registry."""

from __future__ import annotations

import pytest

from tests.training.test_registry import SCENE, caller_manifest, stage
from training.gate import GATE_METRIC, GateRefused, decide, gate_decision, publish_gated
from training.registry import POINTER, Registry


def publish_through_gate(reg: Registry, tmp_path, tag: str, candidate: float, current: float | None, *,
                         tolerance: float = 0.005, force: bool = False, **kwargs):
    """What a training run does: one decision, then a publish that records it."""
    decision = decide(candidate, current, tolerance, force=force)
    return publish_gated(reg, SCENE, stage(tmp_path / f"staged-{tag}", tag), caller_manifest(candidate, tag=tag),
                         decision, **kwargs)


def test_gate_decision():
    assert gate_decision(0.30, None, 0.005)[0]
    ok, why = gate_decision(0.296, 0.30, 0.005)
    assert ok and "0.2960" in why and "0.3000" in why
    assert gate_decision(0.295, 0.30, 0.005)[0]  # exactly at the threshold
    ok, why = gate_decision(0.29, 0.30, 0.005)
    assert not ok and "refused" in why and "0.2950" in why
    assert not gate_decision(float("nan"), 0.30, 0.005)[0]
    with pytest.raises(ValueError):
        gate_decision(0.3, 0.3, -0.1)


def test_decision_record_and_refusal():
    refused = decide(0.28, 0.30, 0.005)
    assert not refused.passed and not refused.allows_publish
    assert refused.manifest_record() == {
        "applied": True, "metric": GATE_METRIC, "candidate": 0.28, "current": 0.30, "tolerance": 0.005,
        "passed": False, "forced": False, "reason": refused.reason}
    err = refused.refusal("home")
    assert isinstance(err, GateRefused) and str(err).startswith("scene 'home': gate refused the candidate: ")
    assert decide(0.28, 0.30, 0.005, force=True).allows_publish
    assert decide(0.28, None, 0.005).allows_publish


def test_gate_refuses_a_worse_candidate_accepts_within_tolerance_and_force_bypasses(tmp_path):
    reg = Registry(str(tmp_path / "registry"))
    publish_through_gate(reg, tmp_path, "a", 0.30, None)

    with pytest.raises(GateRefused) as err:
        publish_through_gate(reg, tmp_path, "worse", 0.28, 0.30, tolerance=0.005)
    assert (err.value.candidate, err.value.current, err.value.tolerance) == (0.28, 0.30, 0.005)
    assert "0.2800" in str(err.value) and SCENE in str(err.value)
    assert [v.version for v in reg.versions(SCENE)] == ["v000001"]
    assert sorted(p.name for p in (tmp_path / "registry" / SCENE).iterdir()) == [".lock", POINTER, "v000001"]

    within = publish_through_gate(reg, tmp_path, "within", 0.297, 0.30, tolerance=0.005)
    assert within.version == "v000002"
    assert within.manifest["gate"]["passed"] and not within.manifest["gate"]["forced"]

    forced = publish_through_gate(reg, tmp_path, "forced", 0.10, 0.297, force=True)
    assert forced.version == "v000003" and reg.current(SCENE).version == "v000003"
    assert forced.manifest["gate"]["passed"] is False and forced.manifest["gate"]["forced"] is True
