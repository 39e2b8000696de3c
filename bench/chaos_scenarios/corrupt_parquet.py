"""A corrupt Parquet file in the offline log: the feature job stops with a clear error naming the
file (the choice made: no quarantine, which would publish tables missing its events), the live
feature version stays as it was, and once the file is restored the next run's tables equal a
clean run's.

Two corruptions: a torn file (truncated: a full disk or a copy cut short; caught by the footer
check before any work) and bytes overwritten inside a data page (the footer is intact; the Ray
Data read fails and the job then decodes the new files to name the culprit). Events: the logged
events; lost: events the tables miss after recovery; recovery: restore -> tables published."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.chaos_scenarios.common import (
    ScenarioResult,
    half_folded_log,
    progress,
    run_cli,
    table_differences,
)
from streaming.features import load_feature_tables, read_manifest, run_features
from streaming.offline_log import CorruptLogFile, OfflineLog

NAME = "corrupt-parquet"
CLI_TIMEOUT_S = 240.0
GARBAGE = b"\xde\xad\xbe\xef" * 64  # what overwrites a data page


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 3 // 5])


def _overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 3  # inside the column chunks, far from the footer at the end
    data[mid: mid + len(GARBAGE)] = GARBAGE
    path.write_bytes(bytes(data))


def run(kafka_bootstrap: str, redis_url: str, workdir: Path, *, events: int = 3000, rate: float = 3000.0
        ) -> ScenarioResult:
    result = ScenarioResult(NAME)
    # The clean run (`clean`): the same log, intact, in a copy of the data dir.
    start = half_folded_log(kafka_bootstrap, redis_url, workdir, result, events=events, rate=rate, tags=("p", "q"),
                            log_flush_records=500, timeout_s=CLI_TIMEOUT_S)
    settings, clean, sent, live_before = start.settings, start.clean, start.sent, start.live_before

    log = OfflineLog(settings.log_dir)
    new_files = [f for f in log.list_files(settings.events_topic)
                 if f.end > int(read_manifest(settings)["watermarks"][settings.events_topic].get(str(f.partition), -1))]
    victim = Path(max(new_files, key=lambda f: f.end - f.start).path)
    backup = workdir / "backup.parquet"
    shutil.copy2(victim, backup)
    for how, corrupt in (("truncated", _truncate), ("page overwritten", _overwrite_middle)):
        corrupt(victim)
        if how == "truncated":  # through the CLI: exit status and the one line an operator sees
            proc = run_cli(settings, "features", "--no-progress", timeout_s=CLI_TIMEOUT_S)
            result.requests += 1
            ok = proc.returncode == 1 and str(victim) in proc.stderr and "restore" in proc.stderr
            result.failed += 0 if ok else 1
            result.check(ok, f"{how}: `streamrec features` exited {proc.returncode} without naming {victim}: "
                             f"{proc.stderr[-600:]}")
            if ok:
                result.notes.append("message: " + proc.stderr.strip().splitlines()[-1][:300])
        else:
            result.requests += 1
            try:
                run_features(settings)
                result.failed += 1
                result.check(False, f"{how}: the feature job published over a corrupt {victim}")
            except CorruptLogFile as exc:
                result.check(str(victim) in str(exc), f"{how}: the error names another file: {exc}")
            except Exception as exc:  # stopped, but an operator would not know which file to restore
                result.failed += 1
                result.check(False, f"{how}: stopped without naming the file: {type(exc).__name__}: {exc}")
        live = (settings.features_dir / "manifest.json").read_bytes()
        result.check(live == live_before, f"{how}: the live feature version changed over a corrupt file")
        progress(f"{NAME}: {how} file refused, live features unchanged")
        shutil.copy2(backup, victim)  # the operator restores it

    t0 = time.monotonic()
    run_features(settings)
    result.recovery_s = time.monotonic() - t0
    got, want = load_feature_tables(settings), load_feature_tables(clean)
    diff = table_differences(got, want)
    result.check(not diff, f"after the restore, tables differ from a clean run's: {diff}")
    result.lost = max(want.manifest["counts"]["events"] - got.manifest["counts"]["events"], 0)
    result.duplicated = max(got.manifest["counts"]["events"] - want.manifest["counts"]["events"], 0)
    result.check(got.manifest["counts"]["events"] == sent, f"tables hold {got.manifest['counts']['events']} of "
                                                           f"{sent} events")
    return result
