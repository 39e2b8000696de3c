"""The statistics of an experiment: CTR with its interval, the difference against control, and the
canary's sequential decision.

The unit is the impression (one recommendation answer); an impression is *clicked* when at least one
click was attributed to it (streaming/features/attribution.py), so CTR = clicked impressions /
impressions, a proportion. Impressions of one user are treated as independent (users are split, not
answers; with many users per variant the effect on the intervals is small, and the simulator's A/A
runs measure the false-alarm rate that results).

Two tests, for two uses:

* `compare` -- `streamrec experiment status`: a fixed-horizon two-proportion z-test (pooled) and a
  95 % Wald interval of the difference, plus each CTR's Wilson interval. Read once, at the end.
* `confidence_sequence` / `canary_decision` -- the continuous trainer looks at a canary again and
  again, and a fixed-horizon test looked at repeatedly would call an identical copy different far
  more often than its alpha. It uses an *always-valid* confidence sequence for the difference: the
  normal-mixture mSPRT bound (Robbins 1970; Johari, Pekelis & Walsh, "Always valid inference", 2017)
  with mixing scale `MIXTURE_TAU`. The probability that it *ever* excludes the true difference,
  over every look, is at most alpha.

The canary's rule (`canary_decision`), evaluated at every look, with margin m (a share of control's CTR):
  1. rollback as soon as the whole confidence sequence lies below -m x CTR(control): the canary is
     significantly worse than control by more than the margin;
  2. once the canary has `min_impressions` impressions (and some arm has an attributed click), promote
     it: the test could not show it worse by more than the margin;
  3. otherwise wait.
Why the margin sits in the rollback test and not in a point-estimate rule at M: with the point estimate
(promote when CTR(canary) >= (1 - m) x CTR(control) at M) an identical copy was rolled back in 2 of 3
quick A/A runs of bench/online.py (M = 300: the estimate's noise is larger than the margin); through the
confidence sequence an identical copy is rolled back with probability below alpha, and a clearly worse
one is still rolled back long before M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from scipy.stats import norm

Z95 = 1.959963984540054
# Mixing scale of the mSPRT prior on the CTR difference (absolute): the effect size the sequential
# test is most sensitive to. CTR differences of a few points are what a recommender change moves.
MIXTURE_TAU = 0.05


@dataclass(frozen=True)
class Arm:
    """One variant's counts."""

    impressions: int
    clicked: int  # impressions with at least one attributed click

    @property
    def ctr(self) -> float:
        return self.clicked / self.impressions if self.impressions else 0.0

    @property
    def var(self) -> float:
        """Variance of the CTR estimate (Bernoulli, plug-in), 0 with no impressions."""
        if not self.impressions:
            return 0.0
        p = self.ctr
        return p * (1 - p) / self.impressions


def wilson(arm: Arm, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the arm's CTR ((0, 1) with no impressions)."""
    n = arm.impressions
    if n == 0:
        return 0.0, 1.0
    p = arm.ctr
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class Comparison:
    """A candidate against control, fixed horizon."""

    diff: float  # CTR(candidate) - CTR(control)
    ci95: tuple[float, float]
    p_value: float | None  # two-sided, pooled two-proportion z-test; None when it cannot be computed


def compare(control: Arm, candidate: Arm) -> Comparison:
    diff = candidate.ctr - control.ctr
    se = math.sqrt(control.var + candidate.var)
    ci = (diff - Z95 * se, diff + Z95 * se)
    n1, n2 = control.impressions, candidate.impressions
    if n1 == 0 or n2 == 0:
        return Comparison(diff, ci, None)
    pooled = (control.clicked + candidate.clicked) / (n1 + n2)
    se0 = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se0 == 0:
        return Comparison(diff, ci, 1.0 if diff == 0 else None)
    return Comparison(diff, ci, float(2 * norm.sf(abs(diff) / se0)))


def confidence_sequence(control: Arm, candidate: Arm, alpha: float, tau: float = MIXTURE_TAU) -> tuple[float, float, float]:
    """(difference, low, high): an always-valid (1 - alpha) confidence sequence for CTR(candidate) -
    CTR(control). With V the variance of the difference, the normal-mixture likelihood ratio exceeds
    1/alpha exactly when |diff| > sqrt(V (V + tau^2) / tau^2 * (2 log(1/alpha) + log((V + tau^2) / V)))."""
    diff = candidate.ctr - control.ctr
    v = control.var + candidate.var
    if control.impressions == 0 or candidate.impressions == 0:
        return diff, -1.0, 1.0
    # a CTR of exactly 0 or 1 has a plug-in variance of 0: floor it at one success / failure's worth
    v = max(v, 0.25 / control.impressions ** 2 + 0.25 / candidate.impressions ** 2)
    t2 = tau * tau
    half = math.sqrt(v * (v + t2) / t2 * (2 * math.log(1 / alpha) + math.log((v + t2) / v)))
    return diff, diff - half, diff + half


Action = Literal["promote", "rollback", "wait"]


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    diff: float
    low: float
    high: float

    def record(self) -> dict:
        """The figures kept with the decision (registry log, metrics)."""
        return {"decision": self.action, "ctr_diff": round(self.diff, 6), "cs_low": round(self.low, 6),
                "cs_high": round(self.high, 6)}


def canary_decision(control: Arm, candidate: Arm, *, min_impressions: int, margin: float, alpha: float) -> Decision:
    """The canary's rule (module docstring): rollback when significantly worse than control by more than
    `margin` (a share of control's CTR) at any look; at `min_impressions`, promote; otherwise wait."""
    diff, lo, hi = confidence_sequence(control, candidate, alpha)
    tolerance = margin * control.ctr
    shown = (f"CTR {candidate.ctr:.4f} vs control {control.ctr:.4f} ({candidate.impressions} / "
             f"{control.impressions} impressions; always-valid {1 - alpha:.0%} interval of the difference "
             f"[{lo:+.4f}, {hi:+.4f}], margin -{tolerance:.4f})")
    if hi < -tolerance:
        return Decision("rollback", f"worse than control by more than {margin:.0%}: {shown}", diff, lo, hi)
    if candidate.impressions >= min_impressions:
        if control.clicked + candidate.clicked == 0:  # nothing to compare: clients may not send request_id back
            return Decision("wait", f"no attributed click in either arm after {candidate.impressions} impressions "
                                    "(do clicks carry the answer's request_id?): " + shown, diff, lo, hi)
        return Decision("promote", f"not shown worse than control by more than {margin:.0%}: {shown}", diff, lo, hi)
    return Decision("wait", f"{candidate.impressions} of {min_impressions} impressions: {shown}", diff, lo, hi)


__all__ = ["MIXTURE_TAU", "Arm", "Comparison", "Decision", "canary_decision", "compare", "confidence_sequence", "wilson"]
