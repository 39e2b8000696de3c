"""An experiment's figures per variant, from the attributed impressions: what `streamrec experiment
status` prints (services/experiment_cli.py) and what the canary's decision reads (training/canary.py).

The counts come from the attribution (streaming/features/attribution.py, `read_attribution(settings,
scene=..., experiment=...)`): one `ArmCounts(impressions, clicked, clicks)` per (scene, version,
variant, experiment). A variant's counts are the sum over its versions -- control follows the live
pointer, so a rollback or promotion of the live version during an experiment gives control two
versions, both listed. The statistics are training/experiment_stats.py's: each CTR with its 95 %
Wilson interval, each candidate against control with a fixed-horizon z-test (p-value, 95 % interval
of the difference) and, for a canary, the always-valid interval and the canary rule's verdict.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from training.experiment_stats import Arm, Decision, canary_decision, compare, confidence_sequence, wilson
from training.experiments import CONTROL, Experiment

# (settings, *, scene, experiment) -> an Attribution (streaming.features.attribution.read_attribution)
AttributionReader = Callable[..., Any]


def read_experiment_attribution(settings: Any, exp: Experiment, read: AttributionReader | None = None) -> Any:
    """The attribution of `exp`'s impressions (and the orphan clicks since it started)."""
    return (read or default_reader())(settings, scene=exp.scene, experiment=exp.id, since_ms=exp.started_ms)


def default_reader() -> AttributionReader:
    """streaming.features.attribution.read_attribution, imported when first needed."""
    from streaming.features.attribution import read_attribution

    return read_attribution


@dataclass(frozen=True)
class VariantCounts:
    """One variant's summed counts and the versions that answered for it."""

    variant: str
    versions: tuple[str, ...]
    impressions: int
    clicked: int  # impressions with at least one attributed click
    clicks: int  # attributed clicks

    @property
    def arm(self) -> Arm:
        return Arm(self.impressions, self.clicked)


def variant_counts(attribution: Any, exp: Experiment) -> dict[str, VariantCounts]:
    """Control and each candidate of `exp` -> its counts in `attribution` (zeros for a variant with
    no impression yet). Arms of other experiments or scenes are ignored."""
    sums: dict[str, list] = {v: [set(), 0, 0, 0] for v in (CONTROL, *exp.candidates)}
    for key, counts in attribution.arms.items():
        scene, version, variant, experiment = key
        if scene != exp.scene or experiment != exp.id or variant not in sums:
            continue
        acc = sums[variant]
        if version is not None:
            acc[0].add(version)
        acc[1] += int(counts.impressions)
        acc[2] += int(counts.clicked)
        acc[3] += int(counts.clicks)
    return {v: VariantCounts(v, tuple(sorted(s)), n, c, k) for v, (s, n, c, k) in sums.items()}


def canary_verdict(counts: dict[str, VariantCounts], exp: Experiment, settings: Any) -> Decision:
    """The canary rule (experiment_stats.canary_decision) on the experiment's control and its one
    candidate, with the settings' M, margin and alpha."""
    candidate = next(iter(exp.candidates))
    return canary_decision(counts[CONTROL].arm, counts[candidate].arm,
                           min_impressions=settings.canary_min_impressions, margin=settings.canary_margin,
                           alpha=settings.canary_alpha)


def _r(x: float | None, digits: int = 6) -> float | None:
    return None if x is None else round(float(x), digits)


def experiment_report(settings: Any, exp: Experiment, attribution: Any, *, live: str | None) -> dict[str, Any]:
    """The status of `exp` as a JSON-ready dict: one row per variant (control first), the canary's
    figures (None for a manual experiment) and the attribution counters. `live`: the scene's live
    version now (control's version when it served nothing yet)."""
    counts = variant_counts(attribution, exp)
    control = counts[CONTROL]
    rows = []
    for variant, c in counts.items():
        lo, hi = wilson(c.arm)
        row: dict[str, Any] = {
            "variant": variant,
            "versions": list(c.versions) or ([live] if variant == CONTROL and live else
                                              [] if variant == CONTROL else [variant]),
            "percent": (100.0 - sum(exp.candidates.values())) if variant == CONTROL else exp.candidates[variant],
            "impressions": c.impressions, "clicked": c.clicked, "clicks": c.clicks,
            "ctr": _r(c.arm.ctr), "ctr_ci95": [_r(lo), _r(hi)],
            "diff": None, "diff_ci95": None, "p_value": None,
        }
        if variant != CONTROL:
            cmp = compare(control.arm, c.arm)
            row.update(diff=_r(cmp.diff), diff_ci95=[_r(cmp.ci95[0]), _r(cmp.ci95[1])], p_value=_r(cmp.p_value))
        rows.append(row)
    canary = None
    if exp.kind == "canary" and len(exp.candidates) == 1:
        candidate = next(iter(exp.candidates))
        decision = canary_verdict(counts, exp, settings)
        _, lo, hi = confidence_sequence(control.arm, counts[candidate].arm, settings.canary_alpha)
        canary = {"candidate": candidate, "verdict": decision.action, "reason": decision.reason,
                  "always_valid_ci": [_r(lo), _r(hi)], "confidence": 1 - settings.canary_alpha,
                  "min_impressions": settings.canary_min_impressions, "margin": settings.canary_margin}
    return {
        "experiment": exp.model_dump(mode="json"),
        "variants": rows,
        "canary": canary,
        # clicks not in the table (streaming/features/attribution.py): after the window, before their impression,
        # without an impression, on an item the answer did not show
        "late_clicks": int(attribution.late_clicks),
        "early_clicks": int(attribution.early_clicks),
        "orphan_clicks": int(attribution.orphan_clicks),
        "unshown_clicks": int(attribution.unshown_clicks),
    }


__all__ = ["AttributionReader", "VariantCounts", "canary_verdict", "default_reader", "experiment_report",
           "read_experiment_attribution", "variant_counts"]
