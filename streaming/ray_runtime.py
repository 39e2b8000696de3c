"""The one way this project connects to Ray (the feature job, training, serving, the CLI)."""

from __future__ import annotations

import logging
import os

# Batch work (training, catalog embedding, the feature job's tasks) runs this much nicer than serving
# and ingest (`run_as_batch_work`).
BATCH_NICENESS = 10
# Ray starts every worker process -- Serve's replicas and proxy included -- at nice 15 unless told
# otherwise (raylet `worker_niceness`). bench/soak.py found the API at nice 15 starved by everything
# else at 0 on a shared machine (ingest, the broker, the trainer's driver): 30 s answers at half its
# idle maximum rate. Workers start at 0 instead; batch work lowers itself to BATCH_NICENESS.
RAY_WORKER_NICENESS_ENV = {"RAY_worker_niceness": "0"}


def run_as_batch_work() -> None:
    """Lower the calling thread's CPU priority to `BATCH_NICENESS` (Linux: per thread, inherited by the
    threads it starts). Idempotent; never raises (a container may forbid it: then nothing changes)."""
    try:
        current = os.nice(0)
        if current < BATCH_NICENESS:
            os.nice(BATCH_NICENESS - current)
    except OSError:
        pass


def ensure_ray(ray_address: str | None = None) -> None:
    """Connect to the cluster at `ray_address` (`RAY_ADDRESS` / `STREAMREC_RAY_ADDRESS`), or start a
    local instance of this process's own when it is unset; a no-op when Ray is already initialized.

    Unset means `address="local"`: never whatever `ray start` last ran on this machine -- a plain
    `ray.init()` follows /tmp/ray/ray_current_cluster, even to a head that is gone. Worker logs stay
    out of the driver's terminal, usage stats are off (no network at run time)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    for name, value in RAY_WORKER_NICENESS_ENV.items():  # a local instance's workers (see the constant)
        os.environ.setdefault(name, value)
    if ray_address:
        ray.init(address=ray_address, log_to_driver=False, logging_level=logging.WARNING)
    else:
        ray.init(address="local", include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
