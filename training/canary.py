"""Canary publishing: a new adapter that passed the offline gate takes a share of the users before it
takes all of them, and the continuous trainer promotes it or rolls it back on its online CTR.

Publishing (`publish_candidate`, called by the training run, training/train_run.py). With
`STREAMREC_CANARY_PERCENT` > 0, a candidate that *passed* the gate on a scene that has a live version
is published not live (`Registry.publish(make_live=False)`) and started as a canary experiment
(training/experiments.py, kind "canary") with that percent of the users; the run's outcome is
"canary". Otherwise it goes live as before: the scene's first version, a forced publish
(`streamrec train --force`, a forget retrain: the live adapter must be replaced now -- a running
canary is then stopped, since it was trained before the forget request), and every publish with
canary publishing off. When the scene already runs an experiment, no second one can start: the
candidate is published not live, the outcome says so and names the command that starts its
experiment by hand. (The continuous trainer does not get there: it trains no new candidate while an
experiment holds the scene, see `blocking_experiment`.)

Decisions (`review_canary`, called by the continuous trainer at every check). The canary's counts
come from the click attribution (streaming/features/attribution.py), summed per variant
(training/experiment_report.py); the rule is training/experiment_stats.py's `canary_decision` -- an
always-valid confidence sequence (mSPRT), so looking every few seconds does not inflate the
false-alarm rate: roll back as soon as the canary is significantly worse than control by more than
the margin (`STREAMREC_CANARY_MARGIN`, a share of control's CTR), at any look; once it has
`STREAMREC_CANARY_MIN_IMPRESSIONS` impressions, promote it. A promotion makes the candidate live (`experiments.promote`: the
registry pointer's log has it); a rollback ends the experiment (the candidate stays published, not
live). Both go into the experiment log with the decision's figures.

Metrics: `<data_dir>/metrics/canary-<scene>.prom` (job `streamrec_canary`, grouped by scene, pushed
to the Pushgateway when set; streaming/job_metrics.py), rewritten at every review of a running canary:

    streamrec_canary_decisions_total{scene,decision}   promote / rollback decisions, carried over from the file
    streamrec_canary_running{scene}                    1 while a canary is undecided
    streamrec_canary_impressions{scene,variant}        control / canary impressions of the current (last) canary
    streamrec_canary_ctr{scene,variant}                their CTR (clicked impressions / impressions)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Gauge

from streaming.job_metrics import metrics_file, read_previous, write_job_metrics
from training import experiments
from training.experiment_report import AttributionReader, canary_verdict, read_experiment_attribution, variant_counts
from training.experiment_stats import Decision
from training.experiments import CONTROL, Experiment, ExperimentError
from training.gate import GateDecision, publish_gated
from training.registry import UNSET, Registry, Unset, VersionInfo

logger = logging.getLogger(__name__)

CANARY = "canary"  # the experiment kind, and the metrics' variant label of the candidate
CANARY_JOB = "streamrec_canary"  # the Pushgateway job label
FINAL_ACTIONS = ("promote", "rollback")  # the decisions that end a canary (the metric's `decision` label)

DECISIONS = "streamrec_canary_decisions_total"
RUNNING = "streamrec_canary_running"
IMPRESSIONS = "streamrec_canary_impressions"
CTR = "streamrec_canary_ctr"


def canary_metrics_name(scene: str) -> str:
    """The metrics file's name of `scene`'s canary: canary-<scene> (.prom)."""
    return f"canary-{scene}"


# --- publishing ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Published:
    """What `publish_candidate` did: the version, and -- when it did not go live -- why (`canary`:
    the outcome's detail) and the canary experiment it started (None when one could not start)."""

    info: VersionInfo
    canary: str | None = None
    experiment: Experiment | None = None


def publish_candidate(settings: Any, registry: Registry, scene: str, staged_dir: Path, manifest: dict,
                      decision: GateDecision, *, expected_parent: str | None | Unset = UNSET) -> Published:
    """Publish a candidate the gate let through: live, or as a canary (module docstring)."""
    live = registry.current(scene)
    if settings.canary_percent <= 0 or live is None or decision.forced:
        info = publish_gated(registry, scene, staged_dir, manifest, decision, expected_parent=expected_parent)
        if decision.forced and live is not None:
            _stop_superseded_canary(registry, scene, info.version)
        return Published(info)
    info = publish_gated(registry, scene, staged_dir, manifest, decision, expected_parent=expected_parent,
                         make_live=False)
    percent = settings.canary_percent
    try:
        exp = experiments.start(registry, scene, {info.version: percent}, kind=CANARY)
    except ExperimentError as exc:
        detail = (f"{info.version} published, not live: no canary started ({exc}); once it ends: "
                  f"`streamrec experiment start {scene} --candidate {info.version} --percent {percent:g}`")
        logger.warning("scene %s: %s", scene, detail)
        return Published(info, detail)
    detail = (f"{info.version} is a canary for {percent:g}% of the users against {live.version} "
              f"(experiment {exp.id}); the continuous trainer promotes or rolls it back")
    logger.info("scene %s: %s", scene, detail)
    return Published(info, detail, exp)


def _stop_superseded_canary(registry: Registry, scene: str, version: str) -> None:
    exp = experiments.active(registry, scene)
    if exp is not None and exp.kind == CANARY:
        experiments.end(registry, scene, "stop", f"superseded: {version} was published live past the gate")
        logger.warning("scene %s: canary %s stopped: %s was published live past the gate", scene, exp.id, version)


def blocking_experiment(settings: Any, registry: Registry, scene: str) -> Experiment | None:
    """The running experiment that holds the continuous trainer's next run back: a canary (it waits
    for its decision), or any experiment while canary publishing is on (a new canary could not
    start). With canary publishing off a manual experiment does not: a new version goes live and
    control follows it."""
    exp = experiments.active(registry, scene)
    if exp is None or (exp.kind != CANARY and settings.canary_percent <= 0):
        return None
    return exp


# --- decisions -------------------------------------------------------------------------------------
def review_canary(settings: Any, registry: Registry, scene: str,
                  read: AttributionReader | None = None) -> Decision | None:
    """Decide the scene's running canary: promote, roll back, or wait (returned); None when the scene
    runs no canary. Writes the canary's metrics. `read`: the attribution reader (default
    streaming.features.attribution.read_attribution)."""
    exp = experiments.active(registry, scene)
    if exp is None or exp.kind != CANARY:
        return None
    if len(exp.candidates) != 1:
        raise ExperimentError(f"canary {exp.id!r} has {len(exp.candidates)} candidates; expected one "
                              f"(`streamrec experiment stop {scene}`)")
    candidate = next(iter(exp.candidates))
    attribution = read_experiment_attribution(settings, exp, read)
    counts = variant_counts(attribution, exp)
    decision = canary_verdict(counts, exp, settings)
    record = {**decision.record(), "impressions": {CONTROL: counts[CONTROL].impressions,
                                                   CANARY: counts[candidate].impressions},
              "ctr": {CONTROL: round(counts[CONTROL].arm.ctr, 6), CANARY: round(counts[candidate].arm.ctr, 6)}}
    if decision.action == "promote":
        experiments.promote(registry, scene, candidate, f"canary promoted: {decision.reason}", **record)
        logger.info("scene %s: canary %s promoted: %s", scene, candidate, decision.reason)
    elif decision.action == "rollback":
        experiments.end(registry, scene, "rollback", f"canary {candidate} rolled back: {decision.reason}", **record)
        logger.warning("scene %s: canary %s rolled back: %s", scene, candidate, decision.reason)
    record_canary(settings, scene, decision, counts[CONTROL].arm, counts[candidate].arm)
    return decision


def canary_registry(scene: str, decision: Decision, control: Any, candidate: Any,
                    totals: dict[str, int]) -> CollectorRegistry:
    """The canary metrics of one review of `scene`'s canary (`control` / `candidate`: experiment_stats.Arm)."""
    r = CollectorRegistry()
    decisions = Gauge(DECISIONS, "canary decisions that ended a canary (promote, rollback), accumulated in the "
                      "metrics file (a gauge: each push replaces the last)", ["scene", "decision"], registry=r)
    for action in FINAL_ACTIONS:
        decisions.labels(scene, action).set(totals[action])
    Gauge(RUNNING, "1 while the scene's canary is undecided, 0 once promoted or rolled back", ["scene"],
          registry=r).labels(scene).set(1 if decision.action == "wait" else 0)
    shown = Gauge(IMPRESSIONS, "impressions of the current (or last) canary's variants", ["scene", "variant"],
                  registry=r)
    ctr = Gauge(CTR, "CTR (clicked impressions / impressions) of the current (or last) canary's variants",
                ["scene", "variant"], registry=r)
    for variant, arm in ((CONTROL, control), (CANARY, candidate)):
        shown.labels(scene, variant).set(arm.impressions)
        ctr.labels(scene, variant).set(arm.ctr)
    return r


def record_canary(settings: Any, scene: str, decision: Decision, control: Any, candidate: Any) -> None:
    """Write (and push) the canary metrics of one review. Never raises: a decision must not depend on
    its metrics (a failure is logged)."""
    try:
        name = canary_metrics_name(scene)
        previous = read_previous(metrics_file(settings, name))
        totals = {}
        for action in FINAL_ACTIONS:
            before = previous.value(DECISIONS, scene=scene, decision=action) if previous is not None else None
            totals[action] = int(before or 0) + (decision.action == action)
        write_job_metrics(settings, name, canary_registry(scene, decision, control, candidate, totals),
                          job=CANARY_JOB, grouping_key={"scene": scene})
    except Exception as exc:  # a full disk, an unwritable metrics dir: the decision itself is what matters
        logger.warning("could not write the canary metrics of scene %r (%s: %s)", scene, type(exc).__name__, exc)


__all__ = ["CANARY", "CANARY_JOB", "CTR", "DECISIONS", "FINAL_ACTIONS", "IMPRESSIONS", "RUNNING", "Published",
           "blocking_experiment", "canary_metrics_name", "canary_registry", "publish_candidate", "record_canary",
           "review_canary"]
