"""Online experiments between adapter versions of a scene: their state, and which user sees which variant.

One experiment per scene at a time, in `registry/<scene>/EXPERIMENT.json`, replaced atomically, so
every API replica's experiment follower (services/experiment_follower.py) reads a whole one within
`EXPERIMENT_POLL_S` -- replicas follow without a restart, as they follow the live pointer:

    {"active": {"id": "default-v000004-20261203T221500-3f2a", "scene": "default", "kind": "manual",
                "control": "v000003", "candidates": {"v000004": 10.0}, "started_at": "...", ...},
     "log": [{"id": "...", "action": "start" | "stop" | "promote" | "rollback", "at": "...", "detail": "..."}]}

Variants: `control` is the scene's live version at every moment (what the registry follower serves);
each candidate is a published version that is not live, named by its version, with a share of the
users in percent. Assignment is sticky by user: the user's pseudonym and the experiment id are hashed
(`bucket`, SHA-256) into one of `BUCKETS` buckets; the candidates take consecutive ranges of buckets
from 0, the rest is control. A new experiment id reshuffles everyone; a request without a user is
control. Every start, stop, promotion and rollback is appended to the file's `log` (and a promotion
is also in the registry pointer's log).

    streamrec experiment start default --candidate v000004 --percent 10   (services/experiment_cli.py)
"""

from __future__ import annotations

import hashlib
import json
import secrets
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from training.registry import Registry, RegistryError, validate_name

EXPERIMENT_FILE = "EXPERIMENT.json"
CONTROL = "control"  # the variant served by the live version
BUCKETS = 10_000  # assignment granularity: 0.01 % of the users
MAX_CANDIDATE_PERCENT = 90.0  # all candidates together; control keeps at least the rest
LOG_MAX = 100  # experiment log entries kept in the file

Kind = Literal["manual", "canary"]


class ExperimentError(RegistryError):
    """An experiment command that cannot be done; the message names the bad value."""


class Experiment(BaseModel):
    """One running experiment of a scene."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str = Field(description="Unique id; part of every assignment hash and every impression of it.")
    scene: str
    kind: Kind = Field(default="manual", description="manual (`streamrec experiment start`) or canary (the trainer's).")
    control: str | None = Field(default=None, description="The live version when it started (control follows the live pointer).")
    candidates: dict[str, float] = Field(description="Candidate version -> percent of the scene's users.")
    started_at: str
    started_ms: int = Field(description="Start time, epoch ms: impressions before it are not the experiment's.")

    def variant_of(self, user: str | None) -> str:
        """The variant `user` (a pseudonym) is assigned: a candidate version or CONTROL. Sticky: the same
        user and experiment always give the same answer."""
        if user is None:
            return CONTROL
        b = bucket(self.id, user)
        edge = 0
        for version, percent in self.candidates.items():
            edge += round(percent * BUCKETS / 100)
            if b < edge:
                return version
        return CONTROL


class ExperimentFile(BaseModel):
    """The whole `EXPERIMENT.json` of a scene."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    active: Experiment | None = None
    log: list[dict] = Field(default_factory=list)


def bucket(experiment_id: str, user: str) -> int:
    """The user's bucket in [0, BUCKETS) for this experiment (uniform, independent across experiments)."""
    digest = hashlib.sha256(f"{experiment_id}:{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def _now() -> datetime:
    return datetime.now(timezone.utc)


def read(registry: Registry, scene: str) -> ExperimentFile:
    """The scene's experiment file (empty when it has none); `ExperimentError` when it does not parse."""
    raw = registry.read_scene_file(scene, EXPERIMENT_FILE)
    if raw is None:
        return ExperimentFile()
    try:
        return ExperimentFile.model_validate(json.loads(raw))
    except (ValueError, ValidationError) as exc:
        raise ExperimentError(f"scene {scene!r}: {EXPERIMENT_FILE} does not parse ({exc}); fix or delete it") from None


def active(registry: Registry, scene: str) -> Experiment | None:
    return read(registry, scene).active


def _write(registry: Registry, scene: str, state: ExperimentFile) -> None:
    data = state.model_dump(mode="json")
    data["log"] = data["log"][:LOG_MAX]
    registry.write_scene_file(scene, EXPERIMENT_FILE, json.dumps(data, indent=1, sort_keys=True).encode())


def _entry(exp: Experiment, action: str, detail: str, **extra: object) -> dict:
    return {"id": exp.id, "action": action, "at": _now().isoformat(timespec="seconds"), "detail": detail, **extra}


def start(registry: Registry, scene: str, candidates: dict[str, float], *, kind: Kind = "manual") -> Experiment:
    """Start an experiment: each candidate (a published version that is not live) gets its percent of
    the users. `ExperimentError` names the bad value: a running experiment, an unknown or live version,
    a share outside (0, 90] in total."""
    validate_name(scene, "scene")
    if not candidates:
        raise ExperimentError("an experiment needs at least one --candidate VERSION")
    current = registry.current(scene)
    if current is None:
        raise ExperimentError(f"scene {scene!r} has no live version: publish one before an experiment")
    for version, percent in candidates.items():
        registry.get(scene, version)  # VersionNotFound names it
        if version == current.version:
            raise ExperimentError(f"--candidate {version}: it is the live version of {scene!r} (control already serves it)")
        if not 0 < percent <= MAX_CANDIDATE_PERCENT:
            raise ExperimentError(f"--percent {percent:g} for {version}: expected more than 0 and at most "
                                  f"{MAX_CANDIDATE_PERCENT:g}")
    total = sum(candidates.values())
    if total > MAX_CANDIDATE_PERCENT:
        raise ExperimentError(f"the candidates' percents add up to {total:g}: at most {MAX_CANDIDATE_PERCENT:g} "
                              "(control keeps the rest)")
    with registry.locked(scene):
        return _start_locked(registry, scene, candidates, kind, current.version)


def _start_locked(registry: Registry, scene: str, candidates: dict[str, float], kind: Kind, control: str) -> Experiment:
    state = read(registry, scene)
    if state.active is not None:
        raise ExperimentError(f"scene {scene!r} already runs experiment {state.active.id!r}: "
                              f"`streamrec experiment stop {scene}` first")
    now = _now()
    exp = Experiment(id=f"{scene}-{'-'.join(candidates)}-{now:%Y%m%dT%H%M%S}-{secrets.token_hex(2)}", scene=scene,
                     kind=kind, control=control, candidates=dict(candidates),
                     started_at=now.isoformat(timespec="seconds"), started_ms=int(now.timestamp() * 1000))
    shares = ", ".join(f"{v} {p:g}%" for v, p in candidates.items())
    _write(registry, scene, ExperimentFile(active=exp, log=[_entry(exp, "start", f"{kind}: {shares} vs control "
                                                                                  f"{control}"), *state.log]))
    return exp


def end(registry: Registry, scene: str, action: Literal["stop", "rollback", "promote"], detail: str,
        **record: object) -> Experiment:
    """End the scene's experiment, recording why (`record`: figures kept in the log entry). Control
    serves everyone again; a candidate stays published (and, unless promoted, not live)."""
    with registry.locked(scene):
        state = read(registry, scene)
        if state.active is None:
            raise ExperimentError(f"scene {scene!r} runs no experiment")
        exp = state.active
        _write(registry, scene, ExperimentFile(active=None, log=[_entry(exp, action, detail, **record), *state.log]))
    return exp


def promote(registry: Registry, scene: str, version: str | None, detail: str, **record: object) -> Experiment:
    """Make a candidate live and end the experiment (`version` None: its only candidate)."""
    exp = active(registry, scene)
    if exp is None:
        raise ExperimentError(f"scene {scene!r} runs no experiment")
    if version is None:
        if len(exp.candidates) != 1:
            raise ExperimentError(f"experiment {exp.id!r} has {len(exp.candidates)} candidates: name one "
                                  f"({', '.join(exp.candidates)})")
        version = next(iter(exp.candidates))
    if version not in exp.candidates:
        raise ExperimentError(f"{version!r} is not a candidate of {exp.id!r} ({', '.join(exp.candidates)})")
    registry.promote(scene, version, f"experiment {exp.id}: {detail}")
    return end(registry, scene, "promote", f"{version} promoted: {detail}", version=version, **record)


__all__ = ["BUCKETS", "CONTROL", "EXPERIMENT_FILE", "Experiment", "ExperimentError", "ExperimentFile", "active",
           "bucket", "end", "promote", "read", "start"]
