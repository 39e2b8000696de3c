"""The data dir's filesystem full, for ingest: a clear error naming the path, nothing corrupted, and 0
lost once space returns.

A loop-mounted or tmpfs filesystem needs privileges this sandbox (and CI) lacks, so the portable
stand-in is RLIMIT_FSIZE on the `streamrec ingest` child, with SIGXFSZ ignored: a write past the
limit fails with EFBIG, as one on a full disk fails with ENOSPC, and both go through the same
`LogDiskFull` path (`streaming.offline_log.NO_SPACE_ERRNOS`). Ingest must exit 1 with one line
naming the log file, leave no partial or temporary file, and a restart with room must log and
count every event exactly once. (Not the feature job: its Ray processes would inherit the limit
and fail on their own logs first, which is a test of Ray, not of the job.)
Events: events produced; recovery: the restart with room -> every event logged and counted."""

from __future__ import annotations

import resource
import signal
import time
from pathlib import Path

from bench.chaos_scenarios.common import (
    Feeder,
    ScenarioResult,
    count_loss,
    event,
    isolated_settings,
    log_tail,
    popularity_total,
    progress,
    run_cli,
    spawn_cli,
    wait_for,
)
from streaming.events import EVENT_LOG_SCHEMA
from streaming.offline_log import CorruptLogFile, OfflineLog, check_log_file

NAME = "disk-full"
FILE_SIZE_LIMIT_BYTES = 8 * 1024  # above what the child logs before its first log file, below that file
FLUSH_RECORDS = 4000  # events per log file: a file of these is well over the limit
EXIT_TIMEOUT_S = 90.0
CLI_TIMEOUT_S = 240.0


def _limit_file_size() -> None:
    """In the child, before exec: writes past the limit fail with EFBIG instead of killing it."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES))


def run(kafka_bootstrap: str, redis_url: str, workdir: Path, *, events: int = 6000, rate: float = 3000.0
        ) -> ScenarioResult:
    result = ScenarioResult(NAME)
    settings = isolated_settings(kafka_bootstrap, redis_url, workdir / "data", log_flush_records=FLUSH_RECORDS,
                                 log_flush_interval_s=2.0)
    feeder = Feeder(settings, rate, tag="d", limit=events)
    feeder.start()
    full = spawn_cli(settings, workdir / "ingest-full.log", "ingest", "--no-progress", "--features-every", "0",
                     preexec_fn=_limit_file_size)
    try:
        wait_for(lambda: full.poll() is not None, EXIT_TIMEOUT_S, "ingest to stop on the full disk")
    except TimeoutError as exc:
        full.kill()
        result.check(False, f"{exc}: {log_tail(full.log_path)}")
    out = log_tail(full.log_path, 4000)
    log_dir = str(settings.log_dir)
    result.check(full.returncode == 1, f"ingest on a full disk exited {full.returncode}, not 1: {out}")
    result.check("cannot write the log file" in out and log_dir in out and "Traceback" not in out,
                 f"ingest's error does not name the log file in one line: {out}")
    lines = [line for line in out.splitlines() if "cannot write the log file" in line]
    if lines:
        result.notes.append("message: " + lines[-1][:300])
    n = feeder.stop()
    progress(f"{NAME}: ingest stopped on the full disk ({popularity_total(settings)} of {n} counted); restarting")
    leftovers = [p.name for p in Path(log_dir).rglob("*") if p.is_file() and p.name.startswith(".")]
    result.check(not leftovers, f"temporary files left in the log: {leftovers}")
    log = OfflineLog(settings.log_dir)
    for f in log.list_files(settings.events_topic):
        try:
            check_log_file(log, f, EVENT_LOG_SCHEMA, read_pages=True)
        except CorruptLogFile as exc:
            result.check(False, f"the full disk left a corrupt file: {exc}")

    t0 = time.monotonic()  # space is back: the limit is gone
    done = run_cli(settings, "ingest", "--until-idle", "3", "--no-progress", "--features-every", "0",
                   timeout_s=CLI_TIMEOUT_S)
    result.recovery_s = time.monotonic() - t0
    result.check(done.returncode == 0, f"ingest with room again exited {done.returncode}: {done.stderr[-800:]}")
    count_loss(result, settings, {event("d", i)["event_id"] for i in range(n)})
    return result
