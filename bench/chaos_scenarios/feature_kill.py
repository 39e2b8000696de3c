"""The feature job SIGKILLed at random points, `kills` times: the tables then equal a clean run's.

The log holds a first half of the events already folded into a published version and a second
half not yet. `streamrec features` runs as a child process and is SIGKILLed: the first time at a
random moment of its start (lock, Ray start-up), the others at a random moment after it began
writing the new version's bucket files. Each next run first waits out the killed run's Redis lock
(`streaming.features.store.REDIS_LOCK_TTL_S`); the last one runs to the end. Its tables must
equal those of a run on an untouched copy of the same log, the live version must never change
before then, and the killed runs' Ray processes must go with them.
Events: events in the log; lost / duplicated: events the tables miss / hold twice; recovery: from
the last kill until the recovered version is published."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import psutil

from bench.chaos_scenarios.common import (
    ScenarioResult,
    half_folded_log,
    log_tail,
    progress,
    run_cli,
    spawn_cli,
    table_differences,
    wait_for,
)
from streaming.features import load_feature_tables

NAME = "feature-job-sigkill"
CLI_TIMEOUT_S = 300.0
EARLY_KILL_S = (0.5, 4.0)  # the first kill: this long after the start (random in the range)
LATE_KILL_FRACTION = (0.02, 0.5)  # the others: once this share of a clean run's bucket files is written
START_TIMEOUT_S = 120.0  # a run waiting out the killed run's Redis lock, then starting Ray
ORPHAN_TIMEOUT_S = 10.0  # how long a killed run's Ray processes may take to follow it


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def run(kafka_bootstrap: str, redis_url: str, workdir: Path, *, kills: int = 3, events: int = 4000,
        rate: float = 4000.0, seed: int = 5) -> ScenarioResult:
    result = ScenarioResult(NAME)
    rng = random.Random(seed)
    start = half_folded_log(kafka_bootstrap, redis_url, workdir, result, events=events, rate=rate, tags=("f", "g"),
                            log_flush_records=300, timeout_s=CLI_TIMEOUT_S)
    settings, clean, sent, live_before = start.settings, start.clean, start.sent, start.live_before
    live = settings.features_dir / "manifest.json"
    n_bucket_files = start.clean_bucket_files

    def bucket_files() -> set[Path]:  # version numbers are never reused: each run writes a new directory
        return set(settings.features_dir.glob("v*/**/*.parquet"))

    killed_at = time.monotonic()
    for k in range(1, kills + 1):
        before = bucket_files()
        proc = spawn_cli(settings, workdir / f"features-{k}.log", "features", "--no-progress")
        if k == 1:
            time.sleep(rng.uniform(*EARLY_KILL_S))  # a random moment is the point here, not a condition
            where = "during start-up"
        else:
            at = max(1, int(n_bucket_files * rng.uniform(*LATE_KILL_FRACTION)))
            wait_for(lambda: proc.poll() is not None or len(bucket_files() - before) >= at, START_TIMEOUT_S,
                     f"run {k} to write {at} bucket files")
            where = f"with {len(bucket_files() - before)} bucket files of its version written"
        children = _descendants(proc.pid)
        if proc.poll() is not None:
            result.check(False, f"run {k} ended (exit {proc.returncode}) before its kill: {log_tail(proc.log_path)}")
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        killed_at = time.monotonic()
        progress(f"{NAME}: kill {k}/{kills} {where}")
        result.notes.append(f"kill {k} {where}")
        _, alive = psutil.wait_procs(children, timeout=ORPHAN_TIMEOUT_S)
        if alive:  # Ray's head processes fate-share with the driver; a worker may linger a moment
            result.notes.append(f"{len(alive)} processes outlived killed run {k} by {ORPHAN_TIMEOUT_S:.0f} s: "
                                f"{sorted({p.name() for p in alive if p.is_running()})}; killed")
            for p in alive:
                p.kill()
        if live.read_bytes() != live_before:  # killed after its publish: then the new version must be whole
            diff = table_differences(load_feature_tables(settings), load_feature_tables(clean))
            result.check(not diff, f"kill {k} left a live version whose tables differ from a clean run's: {diff}")
            result.notes.append(f"kill {k} came after its run had published")

    final = run_cli(settings, "features", "--no-progress", timeout_s=CLI_TIMEOUT_S)
    result.recovery_s = time.monotonic() - killed_at
    result.check(final.returncode == 0, f"the run after the kills exited {final.returncode}: {final.stderr[-800:]}")
    got, want = load_feature_tables(settings), load_feature_tables(clean)
    diff = table_differences(got, want)
    result.check(not diff, f"after {kills} kills, tables differ from a clean run's: {diff}")
    result.lost = max(want.manifest["counts"]["events"] - got.manifest["counts"]["events"], 0)
    result.duplicated = max(got.manifest["counts"]["events"] - want.manifest["counts"]["events"], 0)
    result.check(want.manifest["counts"]["events"] == sent, f"the clean run holds {want.manifest['counts']['events']}"
                                                            f" of {sent} events")
    return result
