"""Fault injection for tests -- NOT a feature: nothing here changes what a normal run does.

The crash-safety claims of the registry (a reader never sees half a version, whatever step a
publish dies at) and of the Ray Train driver (a killed worker resumes from its last checkpoint)
can only be tested by killing a real process at a chosen point. The points that make that
possible live in production code, so they are gathered here behind one documented setting,
where nobody can mistake them for configuration:

    STREAMREC_FAULT_INJECT=<point>[,<point>...]      (unset or empty: every point is inert)

Points:

* ``registry.<step>`` with a step of `REGISTRY_CRASH_STEPS`: the publishing process calls
  ``os._exit(CRASH_EXIT_CODE)`` at that step -- dies like a SIGKILL would, without cleanup
  (tests/training/test_registry.py);
* ``ray_train.worker_pids``: each Ray Train worker writes its pid to
  ``<run_dir>/workers/rank-<r>.pid`` so that a test can SIGKILL it mid-epoch
  (tests/training/test_training.py). The driver reads the setting when `fit` starts and passes it
  to the workers, which may run in processes started before the variable was set.
"""

from __future__ import annotations

import os
from pathlib import Path

FAULT_ENV = "STREAMREC_FAULT_INJECT"
CRASH_EXIT_CODE = 99  # what a process killed at a crash point exits with (tests assert it)

REGISTRY_CRASH_STEPS = ("after_staging", "after_move", "before_pointer_replace", "after_pointer_replace")
WORKER_PIDS = "ray_train.worker_pids"
WORKER_PID_DIR = "workers"


def registry_point(step: str) -> str:
    """The point name of a registry publish step (`REGISTRY_CRASH_STEPS`)."""
    if step not in REGISTRY_CRASH_STEPS:
        raise ValueError(f"unknown registry crash step {step!r}: expected one of {REGISTRY_CRASH_STEPS}")
    return f"registry.{step}"


def active(point: str) -> bool:
    """Whether `STREAMREC_FAULT_INJECT` names `point`."""
    return point in {p.strip() for p in os.environ.get(FAULT_ENV, "").split(",") if p.strip()}


def crash_point(point: str) -> None:
    """Die here, without cleanup, when the setting names `point`; otherwise do nothing."""
    if active(point):
        os._exit(CRASH_EXIT_CODE)


def worker_pid_file(run_dir: str | Path, rank: int) -> Path:
    """Where worker `rank` of a Ray Train run writes its pid under ``ray_train.worker_pids``."""
    return Path(run_dir) / WORKER_PID_DIR / f"rank-{rank}.pid"


def write_worker_pid(run_dir: str | Path, rank: int) -> None:
    """Called by every Ray Train worker, on the driver's say-so (see the module docstring)."""
    path = worker_pid_file(run_dir, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(str(os.getpid()))


__all__ = ["CRASH_EXIT_CODE", "FAULT_ENV", "REGISTRY_CRASH_STEPS", "WORKER_PIDS", "active", "crash_point",
           "registry_point", "worker_pid_file", "write_worker_pid"]
