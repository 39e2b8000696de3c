"""Which experiment each scene runs on one replica, and which variant answers a user.

Every `EXPERIMENT_POLL_S` the follower reads each live scene's `EXPERIMENT.json` (training/experiments.py)
from the registry. A candidate version is loaded in the background (the replica's multiplexed loader,
as the registry follower loads a new live version) and takes its users only once it is ready here:
until then, and if it cannot load, its users get control and their impressions say so (`variant`
is the variant that answered, so the experiment's counts stay honest). A stopped experiment sends
everyone back to control at the next poll. `choose` is on the request path: one SHA-256 and a dict
lookup.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable

from services.api_schema import ExperimentView
from services.loaded_adapter import AdapterLoadError
from services.metrics import ServeMetrics
from services.registry_follower import POLL_ERRORS
from training.experiments import CONTROL, Experiment, ExperimentError
from training.experiments import read as read_experiment

logger = logging.getLogger(__name__)

EXPERIMENT_POLL_S = 1.0  # how often a replica reads the scenes' experiment files (replicas follow within ~1 s)


class ExperimentFollower:
    """`scenes()` names the live scenes; `load(scene, version)` returns a ready adapter or raises."""

    def __init__(self, registry: Any, load: Callable[[str, str], Awaitable[Any]], metrics: ServeMetrics,
                 scenes: Callable[[], list[str]], *, poll_s: float = EXPERIMENT_POLL_S) -> None:
        self.registry, self.load, self.metrics, self.scenes, self.poll_s = registry, load, metrics, scenes, poll_s
        self.experiments: dict[str, Experiment] = {}  # scene -> its running experiment
        self.ready: set[tuple[str, str]] = set()  # (scene, candidate version) loaded here
        self.failed: dict[tuple[str, str], str] = {}  # (scene, candidate) -> why it cannot load

    async def run(self) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(self.poll_s)

    async def poll(self) -> None:
        """Read every live scene's experiment; load the candidates not loaded yet. A file that cannot
        be read keeps the scene's last known experiment (a broken one stops it: say so, serve control)."""
        for scene in list(self.scenes()):
            try:
                exp = (await asyncio.to_thread(read_experiment, self.registry, scene)).active
            except ExperimentError as exc:
                self.metrics.survived("experiments", exc, f"scene {scene!r}: experiment file unreadable; serving control")
                exp = None
            except POLL_ERRORS as exc:
                self.metrics.survived("experiments", exc, f"scene {scene!r}: cannot read its experiment file; keeping "
                                                          "the last one read")
                continue
            if exp is None:
                if self.experiments.pop(scene, None) is not None:
                    logger.info("scene %s: experiment ended; control serves everyone", scene)
                continue
            if self.experiments.get(scene) != exp:
                logger.info("scene %s: experiment %s (%s)", scene, exp.id,
                            ", ".join(f"{v} {p:g}%" for v, p in exp.candidates.items()))
            self.experiments[scene] = exp
            for version in exp.candidates:
                key = (scene, version)
                if key in self.ready or key in self.failed:
                    continue
                try:
                    await self.load(scene, version)
                except AdapterLoadError as exc:
                    self.failed[key] = str(exc)
                    logger.error("experiment %s: candidate %s cannot load (%s); its users get control", exp.id,
                                 version, exc)
                except POLL_ERRORS as exc:  # transient: the next poll tries again
                    self.metrics.survived("experiments", exc, f"loading candidate {scene}@{version} failed; retrying")
                else:
                    self.ready.add(key)

    def choose(self, scene: str, user: str | None) -> tuple[str, str | None, str | None]:
        """(variant, version to serve or None for the live one, experiment id or None) for `user` (a pseudonym)."""
        exp = self.experiments.get(scene)
        if exp is None:
            return CONTROL, None, None
        variant = exp.variant_of(user)
        if variant == CONTROL or (scene, variant) not in self.ready:
            return CONTROL, None, exp.id
        return variant, variant, exp.id

    def views(self) -> dict[str, ExperimentView]:
        """What this replica knows of each scene's experiment (for /v1/models and the heartbeat)."""
        return {scene: ExperimentView(id=exp.id, kind=exp.kind, candidates=dict(exp.candidates),
                                      ready=sorted(v for v in exp.candidates if (scene, v) in self.ready),
                                      failed={v: why for (s, v), why in self.failed.items() if s == scene})
                for scene, exp in self.experiments.items()}


__all__ = ["EXPERIMENT_POLL_S", "ExperimentFollower"]
