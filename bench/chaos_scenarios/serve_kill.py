"""A Serve replica SIGKILLed under load, 2 replicas: few requests fail and capacity comes back.

`streamrec serve --replicas 2` (its own local Ray, a synthetic adapter) takes a steady paced load
from a few client threads. Once both replicas have answered and the load ran `steady_s`, one
replica's worker process (found by its process title under `serve`) is SIGKILLed; the load goes on.
Must hold: failed requests (non-2xx, no answer) at most MAX_ERROR_SHARE of all sent over the run,
and the deployment back at full capacity -- two replica processes, and a replacement replica (an id
not seen before the kill) answering through the proxy, which Serve does only once it is RUNNING --
within `recovery_target_s`. Events: none (no events are fed). Recovery: kill -> full capacity."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from bench.chaos_scenarios.common import ScenarioResult, isolated_settings, progress, wait_for
from bench.chaos_scenarios.serving import Load, ServedApi, describe_failures, failures

NAME = "serve-replica-sigkill"
REPLICAS = 2
MAX_ERROR_SHARE = 0.005  # the target: at most 0.5 % of the run's requests fail
RECOVERY_TARGET_S = 10.0  # the target: back to full capacity within this
RECOVERY_TIMEOUT_S = 300.0  # give up waiting (a replacement replica starts Python, torch, MiniLM, the adapter)
STEADY_TIMEOUT_S = 180.0


def run(kafka_bootstrap: str | None, redis_url: str, workdir: Path, *, rate: float = 80.0, clients: int = 8,
        steady_s: float = 20.0, after_s: float = 20.0, recovery_target_s: float | None = RECOVERY_TARGET_S
        ) -> ScenarioResult:
    """`recovery_target_s=None` reports the recovery time without checking it (the tests: no timed
    assertion on a shared machine)."""
    result = ScenarioResult(NAME)
    settings = isolated_settings(kafka_bootstrap, redis_url, workdir / "data")
    with ServedApi(settings, workdir, replicas=REPLICAS) as api:
        load = Load(api.base, rate, clients).start()
        try:
            wait_for(lambda: len(load.answers) >= rate * steady_s, STEADY_TIMEOUT_S, f"{steady_s:.0f} s of load")
            before = {p.pid for p in api.processes()}
            result.check(len(before) == REPLICAS, f"{len(before)} replica processes before the kill, not {REPLICAS}")
            ids_before = set(api.replica_ids)
            victim = min(before)
            os.kill(victim, signal.SIGKILL)
            killed = time.monotonic()
            progress(f"{NAME}: replica process {victim} SIGKILLed ({len(load.answers)} requests so far)")

            def full_capacity() -> bool:
                pids = {p.pid for p in api.processes()}
                if len(pids) < REPLICAS or victim in pids:
                    return False
                rid = api.probe_replica()
                return rid is not None and rid not in ids_before

            try:
                wait_for(full_capacity, RECOVERY_TIMEOUT_S, "a replacement replica to answer")
                result.recovery_s = time.monotonic() - killed
                progress(f"{NAME}: back to {REPLICAS} replicas after {result.recovery_s:.1f} s "
                         f"(new: {sorted(api.replica_ids - ids_before)})")
            except TimeoutError as exc:
                result.recovery_s = time.monotonic() - killed
                result.problems.append(str(exc))
            back = time.monotonic()
            wait_for(lambda: len(load.since(back)) >= rate * after_s, STEADY_TIMEOUT_S,
                     f"{after_s:.0f} s of load after the recovery")
        finally:
            answers = load.stop()
    result.requests, result.failed = len(answers), len(failures(answers))
    share = result.failed / max(result.requests, 1)
    result.check(result.requests > 0, "no request was answered")
    result.check(share <= MAX_ERROR_SHARE, f"{share:.2%} of requests failed (target <= {MAX_ERROR_SHARE:.1%}): "
                                           f"{describe_failures(answers)}")
    if recovery_target_s is not None:
        result.check(result.recovery_s <= recovery_target_s,
                     f"full capacity back after {result.recovery_s:.1f} s (target <= {recovery_target_s:.0f} s)")
    in_flight = [a for a in failures(answers) if a.sent < killed]  # sent before the kill, answered after it
    result.notes.append(f"{load.measured_rate():.0f} requests/s from {clients} clients; error share {share:.3%}"
                        + (f": {describe_failures(answers)} ({len(in_flight)} sent before the kill)"
                           if result.failed else ""))
    return result
