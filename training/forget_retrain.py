"""Forget requests reach the adapters: when the live adapter was trained on a forgotten user's events.

The feature tables list the forget tombstones they honour (`forgotten` in the feature manifest,
streaming.forget); an adapter lists the ones its training data honoured (`data_window.forgotten` in
its registry manifest). An incremental run starts from its parent's weights, so it honours only
what its parent honoured as well (`honoured_by_run`); only a run from scratch honours a new one.

Every training run (training/train_run.py) whose feature tables honour tombstones the live adapter
does not trains from scratch -- also when asked for `--incremental`, as the nightly Kubernetes job
is -- publishes past the gate (an adapter that remembers a forgotten person must not stay live), and
then retires what still remembers them (`retire_remembering`): the scene's older registry versions
that do not honour every tombstone (so no rollback can bring one back) and the scene's older run
directories (their checkpoints hold weights trained on the user).

The continuous trainer (training/continuous_trainer.py) does not wait for its schedule: it finds
the pending tombstones (`pending_tombstones`) and starts that run once the oldest of them is half
`STREAMREC_FORGET_RETRAIN_S` old (`retrain_due`: the other half is for the run itself and a retry;
batching keeps a burst of requests to one run).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Of STREAMREC_FORGET_RETRAIN_S, how much may pass before the retrain starts (the rest is for the run).
START_FRACTION = 0.5


def honoured(manifest: dict | None) -> set[str]:
    """The tombstone ids a registry version's manifest says its training data honoured."""
    return set(((manifest or {}).get("data_window") or {}).get("forgotten") or ())


def honoured_by_run(corpus_forgotten: list[str] | tuple[str, ...], parent_manifest: dict | None) -> list[str]:
    """What a run's adapter honours: the corpus's tombstones, intersected with the parent's when it
    starts from a parent (its weights remember what the parent saw)."""
    ids = set(corpus_forgotten)
    if parent_manifest is not None:
        ids &= honoured(parent_manifest)
    return sorted(ids)


def pending_tombstones(feature_manifest: dict | None, live_manifest: dict | None) -> set[str]:
    """Tombstones the feature tables honour but the live adapter does not."""
    return set((feature_manifest or {}).get("forgotten") or ()) - honoured(live_manifest)


def tombstone_times(settings: Any) -> dict[str, int]:
    """Tombstone id -> when it was requested (epoch ms), from the durable tombstones."""
    from streaming.forget import read_durable
    from streaming.offline_log import OfflineLog

    return read_durable(OfflineLog(settings.log_dir)).requested_at


def retrain_due(settings: Any, pending: set[str], now_s: float | None = None) -> tuple[bool, float]:
    """(whether the forget retrain should start now, the oldest pending tombstone's age in seconds)."""
    if not pending:
        return False, 0.0
    times = tombstone_times(settings)
    now_ms = (time.time() if now_s is None else now_s) * 1000
    # A tombstone whose time is unknown here (its file not readable yet) counts as due: err on forgetting.
    oldest = max((now_ms - times.get(t, 0)) / 1000 for t in pending)
    return oldest >= START_FRACTION * float(settings.forget_retrain_s), oldest


def retire_remembering(registry: Any, scene: str, must_honour: set[str], runs_dir: Path, keep_run: Path) -> list[str]:
    """Delete the scene's non-live versions that do not honour `must_honour`, and the scene's run
    directories other than `keep_run`. Returns the versions retired."""
    current = registry.current(scene)
    retired = []
    for info in registry.versions(scene):
        if current is not None and info.version == current.version:
            continue
        if not must_honour <= honoured(info.manifest):
            registry.retire(scene, info.version)
            retired.append(info.version)
    own = re.compile(rf"^{re.escape(scene)}-\d{{8}}T\d{{6}}(-\d+)?$")  # training.train_run.new_run_dir's names
    if Path(runs_dir).is_dir():
        for run in Path(runs_dir).iterdir():
            if run.is_dir() and own.match(run.name) and run.resolve() != Path(keep_run).resolve():
                shutil.rmtree(run, ignore_errors=True)
    if retired:
        logger.info("forget: retired %s/%s (trained on forgotten users' events); older run directories removed",
                    scene, ",".join(retired))
    return retired


__all__ = ["START_FRACTION", "honoured", "honoured_by_run", "pending_tombstones", "retire_remembering",
           "retrain_due", "tombstone_times"]
