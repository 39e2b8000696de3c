"""The demo's experiment step: two adapters of the tour under simulated traffic, then
`streamrec experiment status`.

The earlier adapter becomes the candidate for `EXPERIMENT_PERCENT` % of the users (sticky by user,
training/experiments.py) while the live one stays control; `services.simulate`'s users -- the synthetic
dataset's planted tastes, so only with `--quick` -- request `DEMO_REQUESTS` answers and click by their
tastes, their clicks carrying each answer's `request_id` to Kafka. Once the log holds every answer's
impression and every click (a wait on that condition), `streamrec experiment status` prints the table,
and the experiment is stopped: control serves everyone again.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Callable

from rich.markup import escape

SCENE = "default"
EXPERIMENT_PERCENT = 50.0  # half the users see the candidate: both arms fill at the same pace
DEMO_REQUESTS = 400  # enough for a visible difference in CTR, a minute or so on two cores
CANDIDATE_TIMEOUT_S = 120.0  # the replicas load the candidate in the background (seconds)
LOGGED_TIMEOUT_S = 120.0  # impressions and clicks reaching the log (ingest flushes every few seconds)
STATUS_TIMEOUT_S = 120.0


def logged(settings: Any, since_ms: int) -> tuple[int, int]:
    """(impressions, clicked impressions) of the scene in the log's attribution since `since_ms`."""
    from streaming.features.attribution import read_attribution

    arms = read_attribution(settings, scene=SCENE, since_ms=since_ms).arms.values()
    return sum(a.impressions for a in arms), sum(a.clicked for a in arms)


def candidate_ready(base_url: str, exp_id: str, candidate: str) -> bool:
    """Whether the answering replica has loaded the experiment's candidate (`GET /v1/models`); until then
    the candidate's users get control."""
    import requests

    try:
        view = (requests.get(f"{base_url}/v1/models", timeout=5).json().get("experiments") or {}).get(SCENE) or {}
    except (requests.RequestException, ValueError):
        return False
    return view.get("id") == exp_id and candidate in (view.get("ready") or [])


def run_experiment_step(up: Any, base_url: str, dataset_spec: str, candidate: str, *, say: Callable[..., None],
                        wait: Callable[[Callable[[], Any], float, str], Any]) -> None:
    """Start the experiment, drive it with simulated users, print `streamrec experiment status`, stop it.
    `up` is the tour's `services.up.Up`; `wait(cond, timeout_s, what)` the tour's wait."""
    from services.simulate import SimConfig, run_simulation
    from streaming.datasets.spec import parse_synthetic_spec
    from streaming.datasets.synthetic import synthetic_dataset
    from training import experiments
    from training.registry import Registry

    settings = up.settings
    registry = Registry(settings.registry_uri)
    exp = experiments.start(registry, SCENE, {candidate: EXPERIMENT_PERCENT}, kind="manual")
    try:
        say(f"  `streamrec experiment start {SCENE} --candidate {candidate} --percent {EXPERIMENT_PERCENT:g}`: "
            f"{candidate} for {EXPERIMENT_PERCENT:g}% of the users, the live {exp.control} (control) for the rest")
        wait(lambda: candidate_ready(base_url, exp.id, candidate), CANDIDATE_TIMEOUT_S,
             f"the API to load the candidate {candidate}")
        ds = synthetic_dataset(parse_synthetic_spec(dataset_spec))
        rep = run_simulation(settings, ds, SimConfig(requests=DEMO_REQUESTS, seed=0), base_url, progress=True,
                             check=False)
        per_version = ", ".join(f"{v} {x['ctr']:.3f}" for v, x in sorted(rep.by_version.items()))
        say(f"  {rep.impressions} simulated answers, {rep.clicked} with a click (CTR {rep.ctr:.3f}; by version: "
            f"{per_version}); the clicks went to Kafka with each answer's request_id")
        wait(lambda: all(a >= b for a, b in zip(logged(settings, exp.started_ms),
                                                (rep.impressions, rep.attributable_clicked))),
             LOGGED_TIMEOUT_S, "the experiment's impressions and clicks in the log")
        argv = [sys.executable, "-m", "services.cli", "experiment", "status", SCENE]
        done = subprocess.run(argv, env=up.env, capture_output=True, text=True, timeout=STATUS_TIMEOUT_S, check=False)
        say(f"  $ streamrec experiment status {SCENE}")
        say(escape((done.stdout + done.stderr).rstrip()))
    finally:
        experiments.end(registry, SCENE, "stop", "streamrec demo: experiment step done")
    say(f"  experiment stopped: {exp.control} serves everyone again")


__all__ = ["DEMO_REQUESTS", "EXPERIMENT_PERCENT", "candidate_ready", "logged", "run_experiment_step"]
