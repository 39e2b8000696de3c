"""The quality gate: may a candidate adapter replace the live one?

A candidate is published only if its validation NDCG@10 is not below the live adapter's -- scored
on the same validation cases -- minus a tolerance (`STREAMREC_GATE_TOLERANCE`): retraining on
noisy fresh data must never silently make serving worse, but a candidate within noise of the
live one should still ship, since it knows newer items and events.

The decision is taken once per publish (`decide`), by the training run, before any catalog
embedding is spent on a candidate that will not ship; `publish_gated` then publishes only a
candidate the decision lets through and records the decision in the version's manifest
(``gate``: metric, candidate, current, tolerance, passed, forced, reason). That the live version
is still the one the candidate was compared with is the registry's compare-and-swap on the parent
(`expected_parent`), so the registry itself stays plain versioned storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.registry import UNSET, Registry, RegistryError, Unset, VersionInfo

GATE_METRIC = "val_ndcg10"
GATE_EPSILON = 1e-12  # so that `candidate == current - tolerance` passes despite float rounding


class GateRefused(RegistryError):
    """The candidate's metric is below the live version's minus the tolerance."""

    def __init__(self, message: str, *, candidate: float, current: float | None, tolerance: float):
        super().__init__(message)
        self.candidate, self.current, self.tolerance = candidate, current, tolerance


def gate_decision(candidate: float, current: float | None, tolerance: float) -> tuple[bool, str]:
    """Whether a candidate with metric `candidate` may replace one with `current`, and why.

    Passes when there is no current metric or ``candidate >= current - tolerance``. A NaN
    candidate never passes."""
    if tolerance < 0 or math.isnan(tolerance):
        raise ValueError(f"gate tolerance must be >= 0, got {tolerance!r}")
    if current is None:
        return True, f"no current metric to compare with; candidate {candidate:.4f} accepted"
    threshold = current - tolerance
    if candidate >= threshold - GATE_EPSILON:
        return True, (
            f"candidate {candidate:.4f} >= current {current:.4f} - tolerance {tolerance:.4f} "
            f"= {threshold:.4f}: accepted"
        )
    return False, (
        f"candidate {candidate:.4f} < current {current:.4f} - tolerance {tolerance:.4f} "
        f"= {threshold:.4f}: refused"
    )


@dataclass(frozen=True)
class GateDecision:
    """One gate decision: a candidate's metric against the live version's, and whether to publish."""

    candidate: float
    current: float | None
    tolerance: float
    passed: bool
    forced: bool
    reason: str

    @property
    def allows_publish(self) -> bool:
        """Passed, or refused but forced (``streamrec train --force``)."""
        return self.passed or self.forced

    def manifest_record(self) -> dict[str, Any]:
        """The manifest's ``gate`` field."""
        return {
            "applied": True,
            "metric": GATE_METRIC,
            "candidate": self.candidate,
            "current": self.current,
            "tolerance": self.tolerance,
            "passed": self.passed,
            "forced": self.forced,
            "reason": self.reason,
        }

    def refusal(self, scene: str) -> GateRefused:
        return GateRefused(f"scene {scene!r}: gate refused the candidate: {self.reason}", candidate=self.candidate,
                           current=self.current, tolerance=self.tolerance)


def decide(candidate: float, current: float | None, tolerance: float, *, force: bool = False) -> GateDecision:
    """The gate's decision for a candidate scoring `candidate` where the live version scores
    `current` (None: no live version, or one that could not be scored)."""
    candidate = float(candidate)
    current = None if current is None else float(current)
    passed, reason = gate_decision(candidate, current, tolerance)
    return GateDecision(candidate, current, tolerance, passed, force, reason)


def publish_gated(registry: Registry, scene: str, staged_dir: Path, manifest: dict, decision: GateDecision, *,
                  expected_parent: str | None | Unset = UNSET, make_live: bool = True) -> VersionInfo:
    """Publish a candidate the gate let through, with the decision in its manifest; `GateRefused`
    (nothing written) when it did not. `make_live=False`: published, not live (a canary:
    training/canary.py decides that, and starts its experiment)."""
    if not decision.allows_publish:
        raise decision.refusal(scene)
    return registry.publish(scene, staged_dir, {**manifest, "gate": decision.manifest_record()},
                            expected_parent=expected_parent, make_live=make_live)


__all__ = ["GATE_METRIC", "GateDecision", "GateRefused", "decide", "gate_decision", "publish_gated"]
